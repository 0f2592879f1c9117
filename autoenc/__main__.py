"""`python -m autoenc` is the same as the `autoenc` command."""

from autoenc.cli import main

main()

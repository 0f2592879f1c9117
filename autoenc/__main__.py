"""`python -m autoenc` is the same as the `autoenc` command."""

from autoenc.app.cli import main

main()

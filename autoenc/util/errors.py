"""The one exception type for mistakes a user can fix (the CLI prints it as one line), and the check
that objects run on their own settings when they are built."""


import os
import sys


class UserError(Exception):
    """A bad input, missing file or unusable checkpoint, with the fix in its message."""

    def _render_traceback_(self) -> list[str]:
        """What IPython and Jupyter show instead of the traceback: the one line, as the CLI prints it."""
        return [f"UserError: {self}"]


def require(ok: bool, key: str, value, what: str) -> None:
    """Refuses a setting `key=value` that is not `what` (a valid value, in words), naming the key."""
    if not ok:
        raise UserError(f"{key}={value!r} is invalid: it must be {what}; fix it on the command line")


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Interrupt:
    """A stop signal to this process (Ctrl-C's SIGINT, SIGTERM, SLURM's SIGUSR1): which one, if any, and
    whether a line has already said what was saved. The process then exits with 128 + its number."""

    signal: int | None = None
    reported = False


def fail(message: str) -> None:
    """Ends the process with the one line `autoenc: error: <message>` on stderr and exit code 2."""
    print(f"autoenc: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def full_error() -> bool:
    """Whether the user asked for tracebacks (HYDRA_FULL_ERROR=1 set before autoenc started)."""
    return os.environ.get("AUTOENC_USER_FULL_ERROR", os.environ.get("HYDRA_FULL_ERROR")) == "1"

"""The one exception type for mistakes a user can fix; the CLI prints it as one line."""


class UserError(Exception):
    """A bad input, missing file or unusable checkpoint, with the fix in its message."""

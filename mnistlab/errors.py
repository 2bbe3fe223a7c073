"""The one exception type for mistakes a user can fix (bad input, missing data, bad files)."""


class UserError(Exception):
    """A problem with the user's input or files: the CLI prints the message and exits with 2."""

    exit_code = 2

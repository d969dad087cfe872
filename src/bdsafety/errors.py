"""The one exception type for bad user input: the CLI prints its message on one line and exits 2."""


class UsageError(ValueError):
    """Bad input from the user (unknown name, bad value, corrupt file). The message names the fix."""

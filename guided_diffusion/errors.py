"""The error type for problems with the user's input (flags, files), reported in one line."""


class UsageError(ValueError):
    """Bad input the user can fix: the scripts print its message alone and exit with status 2."""

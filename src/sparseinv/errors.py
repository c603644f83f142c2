"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UsageError(ValueError):
    """Bad input from the user: a wrong name, file, flag value or folder.

    The message is a single sentence a person can act on; the CLI prints it on stderr
    and exits with code 2 without writing anything.
    """

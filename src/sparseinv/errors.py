"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UsageError(ValueError):
    """Bad input from the user: a wrong name, file, flag value or folder.

    The message is a single sentence a person can act on; the CLI prints it on stderr
    and exits with code 2 without writing anything.
    """


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

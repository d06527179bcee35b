"""The one exception type that the CLI turns into a clean, one-line error."""


class UsageError(Exception):
    """Bad input from the user: the CLI prints the message and exits with 2.

    The message is one sentence that names the bad value, states what is wrong
    and what to do, because it is all the user sees (no traceback).
    """

"""One exception type for every problem a user can fix; the CLI prints its message on one line."""


class NolnError(Exception):
    """A user-facing error: the message names the problem and the fix."""

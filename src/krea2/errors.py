"""One exception type for bad input: the CLI prints its message as a single line and exits 2."""


class Krea2Error(Exception):
    """A user-facing error: the message names the problem and what to do about it."""

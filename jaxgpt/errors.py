"""The one exception type users see: a short message naming the problem and the fix."""


class JaxgptError(Exception):
    """A user-facing error; the CLI prints it as one line instead of a traceback."""

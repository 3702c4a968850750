"""The one exception type users see: a clear, one-line message, never a traceback."""


class CLBenchError(Exception):
    """Bad input or state, with a message naming the file, line or key and what was expected."""

"""The one exception type users see: a clear, one-line message, never a traceback."""


class CLBenchError(Exception):
    """Bad input or state, with a message naming the file, line or key and what was expected."""


def describe(err: BaseException) -> str:
    """A foreign exception as "Type: message", for a CLBenchError's text (some messages alone
    are terse, e.g. PIL's)."""
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__

"""One exception type for every mistake a user can make, so CLIs can print it as one line."""


class PrefixTuneError(ValueError):
    """Bad input: the message says what was wrong and what was expected."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception (its name when it says nothing): one line per CLI error."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return text or type(exc).__name__

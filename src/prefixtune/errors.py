"""One exception type for every mistake a user can make, so CLIs can print it as one line."""


class PrefixTuneError(ValueError):
    """Bad input: the message says what was wrong and what was expected."""

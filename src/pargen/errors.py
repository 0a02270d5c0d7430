"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class PargenError(Exception):
    """A user-facing error: bad input, a missing file, a dataset that is not installed."""

"""The one exception type users see: a clear message, no traceback, non-zero exit."""


class ElboxError(Exception):
    """Bad input or an unrecoverable run condition. The message names the input and the problem."""

"""The one exception type users see (a clear message, no traceback, non-zero exit), and how a message shows the
user's text."""

from __future__ import annotations

from pathlib import Path


class ElboxError(Exception):
    """Bad input or an unrecoverable run condition. The message names the input and the problem."""


def shown(text: str | Path, limit: int = 200) -> str:
    """A path (or any user text) as a one-line message shows it: odd characters escaped, the middle of a long one
    cut (its start and its end, e.g. the file name, stay)."""
    text = str(text)
    text = text if text.isprintable() else repr(text)[1:-1]
    return text if len(text) <= limit else text[: limit // 2 - 2] + "..." + text[1 - limit // 2 :]

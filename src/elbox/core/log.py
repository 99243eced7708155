"""elbox's messages go through the standard `logging` module, each module's to logging.getLogger(__name__), all under
the "elbox" logger: what is being trained, one line per epoch, resumes, retries, downloads, a report's skipped file.

As in other ML libraries (transformers, Lightning), the "elbox" logger has a handler of its own, so that the messages
show in a terminal or a notebook with no set-up: INFO and above on stderr, written through tqdm so that a progress
bar stays whole ("elbox: ...", a warning "elbox: warning: ..."); it does not pass them on to the root logger. The
`elbox` command prints them this way. `import elbox` sets this up (every elbox module is imported under it). In a
program of your own:

    logging.getLogger("elbox").setLevel(logging.WARNING)   # quieter (or verbose=False where a function takes it)
    elbox.core.log.use_root_handlers()                     # to your own handlers instead, through the root logger
"""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

LIBRARY = logging.getLogger("elbox")


class TqdmHandler(logging.Handler):
    """Writes each record to stderr with tqdm.write, above any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)  # sys.stderr read now: it may have been replaced
        except Exception:  # logging's rule: a failing handler never raises into the program
            self.handleError(record)


class OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return ("elbox: warning: " if record.levelno >= logging.WARNING else "elbox: ") + record.getMessage()


DEFAULT_HANDLER = TqdmHandler()
DEFAULT_HANDLER.setFormatter(OneLineFormatter())
LIBRARY.addHandler(DEFAULT_HANDLER)
LIBRARY.setLevel(logging.INFO)
LIBRARY.propagate = False


def use_root_handlers() -> None:
    """Send elbox's messages to the root logger's handlers (your logging set-up) instead of elbox's own."""
    LIBRARY.removeHandler(DEFAULT_HANDLER)
    LIBRARY.propagate = True

"""The `elbox` command line: a parser generated from the option dataclasses of every command; the commands call
the public API."""

from elbox.cli.main import main

__all__ = ["main"]

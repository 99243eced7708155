"""The `elbox` command line: each command's parser (train's generated from the config dataclasses); the commands call
the public API."""

from elbox.cli.main import main

__all__ = ["main"]

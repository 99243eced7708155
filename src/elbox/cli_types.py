"""Command-line parsing pieces of elbox.cli: a parser whose errors are one ElboxError line, argparse types for
numbers with a range that fits the machine, and output files checked before any work."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from elbox.atomic import check_output_file, refuse_non_regular, shown
from elbox.errors import ElboxError

SEED_MAX = 2**63 - 1  # torch.manual_seed takes 64 bits; numpy's generators take any non-negative int


class UsageError(ElboxError):
    """A command line argparse refuses (unknown option, bad value): `elbox` exits 2, as argparse would."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise UsageError (one line) instead of printing usage and exiting.
    Its subparsers are Parsers too (argparse makes them of the parent's class); --help still prints and exits 0."""

    def error(self, message: str):
        raise UsageError(f"{shown(message, 300)} (see {self.prog} --help)")


def integer(low: int, high: int):
    """argparse type: an integer between low and high, inclusive."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer between {low} and {high}, got {shown(text, 40)}")
        return value

    parse.__name__ = "int"
    return parse


def real(above: float, high: float):
    """argparse type: a finite number > above and <= high."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not above < value <= high:  # False for NaN
            raise argparse.ArgumentTypeError(f"must be a number > {above:g} and <= {high:g}, got {shown(text, 40)}")
        return value

    parse.__name__ = "float"
    return parse


def output_file(text: str) -> Path:
    """argparse type of an output file the user names (--out, --json): checked at once, so that a path elbox
    cannot write is refused before minutes of work (ElboxError: not a regular file, missing directory, read-only)."""
    return check_output_file(text)


def report_file(text: str) -> Path:
    """argparse type of `elbox report --out FILE.html`: the HTML file, the Markdown beside it (FILE.md) and the
    folder of its images (report/) checked at once."""
    path = Path(text)
    if path.suffix == ".md":
        raise ElboxError(f"cannot write {shown(path)}: the report's Markdown goes beside the HTML as .md; "
                         "name the HTML file (FILE.html)")
    check_output_file(path)
    refuse_non_regular(path.with_suffix(".md"))
    images = path.parent / "report"
    if images.exists() and not images.is_dir():
        raise ElboxError(f"cannot write the report's images in {shown(images)}: it is not a directory")
    return path

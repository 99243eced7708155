"""Command-line parsing pieces of elbox.cli: a parser whose errors are one ElboxError line (with a "did you mean"
for a mistyped option or choice), argparse types for numbers with a range that fits the machine, output files
checked before any work, and functions imported on first use (so that `elbox --help` never loads torch)."""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

from elbox.core.errors import ElboxError, shown
from elbox.core.limits import COUNTS
from elbox.core.options import did_you_mean
from elbox.io.atomic import check_output_file, refuse_non_regular


class UsageError(ElboxError):
    """A command line argparse refuses (unknown option, bad value): `elbox` exits 2, as argparse would."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise UsageError (one line) instead of printing usage and exiting.
    Its subparsers are Parsers too (argparse makes them of the parent's class); --help still prints and exits 0.
    An unknown --option is refused before parsing, with the nearest known one, so that its value is not taken for
    a positional argument; a value that looks like a negative number (-1e-3, -.5) is a value, never an option."""

    commands: argparse.Action | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")  # argparse's own takes -1 and -0.5, not -1e-3

    def add_subparsers(self, **kwargs):
        self.commands = super().add_subparsers(**kwargs)
        return self.commands

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        flags = list(self._option_string_actions)
        for token in args:
            if token == "--" or (self.commands is not None and not token.startswith("-")):
                break  # the rest belongs to positional arguments, or to the command and its own parser
            flag = token.split("=", 1)[0]
            known = (name.startswith(flag) if self.allow_abbrev else name == flag for name in flags)
            if flag.startswith("--") and not any(known):  # prefixes where argparse takes them
                hint = did_you_mean(flag, flags, quote=False)
                self.error(f"unrecognized arguments: {shown(flag, 60)}" + (f"; {hint.strip()}" if hint else ""))
        return super().parse_known_args(args, namespace)

    def _check_value(self, action, value):
        if action.choices is not None and value not in action.choices:
            choices = [str(c) for c in action.choices]
            raise argparse.ArgumentError(
                action,
                f"invalid choice: {shown(repr(value), 60)}; {did_you_mean(value, choices)}"
                f"choose one of {', '.join(choices)}",
            )

    def error(self, message: str):
        raise UsageError(f"{shown(message, 300)} (see {self.prog} --help)")


def lazy(module: str, name: str):
    """The function module.name, imported when first called: commands import torch only when they run."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def integer(low: int, high: int):
    """argparse type: an integer between low and high, inclusive."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number between {low} and {high}, got {shown(text, 40)}")
        return value

    parse.__name__ = "int"
    return parse


def count(name: str):
    """argparse type of the whole-number option `name` of elbox.core.limits.COUNTS (the range the Python API checks
    too)."""
    return integer(*COUNTS[name])


def output_file(text: str) -> Path:
    """argparse type of an output file the user names (--out, --json): checked at once, so that a path elbox
    cannot write is refused before minutes of work (ElboxError: not a regular file, missing directory, read-only)."""
    return check_output_file(text)


def report_file(text: str) -> Path:
    """argparse type of `elbox report --out FILE.html`: the HTML file, the Markdown beside it (FILE.md) and the
    folder of its images (report/) checked at once."""
    path = Path(text)
    if path.suffix == ".md":
        raise ElboxError(
            f"cannot write {shown(path)}: the report's Markdown goes beside the HTML as .md; "
            "name the HTML file (FILE.html)"
        )
    check_output_file(path)
    refuse_non_regular(path.with_suffix(".md"))
    images = path.parent / "report"
    if images.exists() and not images.is_dir():
        raise ElboxError(f"cannot write the report's images in {shown(images)}: it is not a directory")
    return path

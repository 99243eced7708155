"""What the elbox command says around a command: warnings as one line, what Ctrl-C left and how to continue, and
the thread count a resumed or replayed run uses (elbox.cli runs the commands). Nothing here imports torch."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import warnings
from pathlib import Path

from elbox.cli.types import lazy
from elbox.core.errors import shown

recorded_threads = lazy("elbox.io.checkpoint", "recorded_threads")
usable_cores = lazy("elbox.core.system", "usable_cores")


def replayed_threads(config: dict) -> int | None:
    """The thread count a resumed or replayed run uses by default: the one it recorded (so that it reproduces bit for
    bit), unless $OMP_NUM_THREADS sets one (torchrun does) or the machine has fewer usable cores; a warning says
    when the run then uses another count than it recorded."""
    recorded = recorded_threads(config)
    if recorded is None:
        return None
    chosen = None if os.environ.get("OMP_NUM_THREADS", "").isdigit() else min(recorded, usable_cores())
    if chosen != recorded:
        warnings.warn(
            f"the run trained with {recorded} threads; with another count "
            f"({'$OMP_NUM_THREADS' if chosen is None else chosen}) "
            "its numbers agree with the recorded ones only to float32 rounding",
            stacklevel=2,
        )
    return chosen


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning for the command line: one "elbox: warning: ..." line, without Python's source line."""
    print(f"elbox: warning: {shown(' '.join(str(message).split()), 500)}", file=sys.stderr)


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the options written in argv, as argparse reads them (whole names, or unique prefixes)."""
    dests = set()
    for token in argv:
        flag = token.split("=", 1)[0]
        if not flag.startswith("--"):
            continue
        actions = parser._option_string_actions  # argparse's own table of option strings
        names = [flag] if flag in actions else [s for s in actions if s.startswith(flag)]
        if len(names) == 1:
            dests.add(actions[names[0]].dest)
    return dests


TRAINING_RUN: list[str] = []  # the run directory `elbox train` writes, once parsed: what Ctrl-C reports on


def interrupted(argv: list[str]) -> str:
    """What Ctrl-C left: for a training run, the last epoch saved and the command that continues it."""
    run_dir = TRAINING_RUN[-1] if TRAINING_RUN and argv[:1] == ["train"] else None
    if run_dir is None:
        return "elbox: interrupted"
    epochs = [r.get("epoch") for r in saved_records(Path(run_dir)) if r.get("kind") in ("epoch", "train_epoch", "fit")]
    # a state saved within the epoch after the last (--checkpoint-minutes; elbox.io.checkpoint.STATE_IN_EPOCH_FILE)
    state, last = (
        saved_state(Path(run_dir) / "state-in-epoch.safetensors"),
        saved_state(Path(run_dir) / "state.safetensors"),
    )
    within = state.get("partial_epoch") if _steps(state) > _steps(last) else None  # the newer, as --resume takes
    if isinstance(within, dict):
        state = f"a training state within epoch {within.get('epoch')}, after its batch {within.get('batches')}"
        held = f"epoch {epochs[-1]} (the last finished) and {state}" if epochs else state
    elif (Path(run_dir) / "state.safetensors").is_file() and epochs:
        held = f"epoch {epochs[-1]} (the last one saved)"
    else:
        return f"elbox: interrupted before the first epoch was saved; nothing to continue in {run_dir}"
    return f"elbox: interrupted; {run_dir} holds {held}; continue with: elbox train --resume {shlex.quote(run_dir)}"


def _steps(state: dict) -> int:
    step = state.get("step", -1)
    return step if type(step) is int else -1


def saved_state(path: Path) -> dict:
    """A training state's JSON (elbox.io.checkpoint.STATE_METADATA_KEY), read without torch; {} if unreadable."""
    from safetensors import SafetensorError, safe_open  # numpy's reader: the metadata only

    with contextlib.suppress(SafetensorError, OSError, ValueError, RecursionError):
        with safe_open(str(path), framework="np") as f:
            state = json.loads((f.metadata() or {}).get("elbox_training_state", "{}"))
            return state if isinstance(state, dict) else {}
    return {}


def saved_records(run_dir: Path) -> list[dict]:
    """The run's metrics records as saved (metrics.jsonl; damaged lines skipped)."""
    records = []
    with contextlib.suppress(OSError):
        for line in (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                records += [record] if isinstance(record, dict) else []
    return records

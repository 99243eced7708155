"""Helpers shared by the examples: run the elbox command, and get a trained run directory."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

ELBOX = [sys.executable, "-m", "elbox"]


def elbox(*args: str) -> None:
    """Run an elbox command as a user would type it, echoing it."""
    print("$ elbox " + shlex.join(args), flush=True)
    subprocess.run([*ELBOX, *args], check=True)


def trained_run(run_dir: str, epochs: int, *train_args: str) -> Path:
    """The run directory, trained first (elbox train) when it does not hold a model yet."""
    run = Path(run_dir)
    if not (run / "model.safetensors").is_file():
        elbox("train", "--epochs", str(epochs), *train_args, "--out", str(run), "--no-progress")
    return run

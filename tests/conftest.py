"""Fixtures and helpers shared by test modules.

Test modules import the helpers with `from conftest import make_trainer`: pytest's default ("prepend") import mode
puts tests/ on sys.path and registers this file as the module `conftest`, so the import finds this same module.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
from pathlib import Path

import pytest
import torch

from elbox import data
from elbox.data import get_data_space, load_split, sources
from elbox.io.run_config import TrainConfig
from elbox.models import build_model
from elbox.training.trainer import Trainer


@pytest.fixture
def isolated_data(tmp_path, monkeypatch):
    """Dataset lookup isolated from the machine: no $ELBOX_DATA, a private user cache, no system dirs, a fresh
    array cache."""
    monkeypatch.delenv("ELBOX_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIRS", [])
    data.clear_cache()
    yield
    data.clear_cache()


def make_trainer(
    run_dir: Path,
    model: str = "vae",
    model_config: dict | None = None,
    n_train: int = 400,
    n_val: int = 100,
    seed: int = 0,
    **train_options,
) -> Trainer:
    """A Trainer (no progress bars) on the synthetic dataset's first n_train training and n_val validation images.

    torch is seeded with `seed` just before the model is built (loading the synthetic data draws nothing from
    torch's global generator), the model is build_model(model, model_config), and the training settings are
    TrainConfig(seed=seed, **train_options), with the data space the model asks for.
    """
    train, _ = load_split("synthetic", "train")
    val, _ = load_split("synthetic", "validation")
    torch.manual_seed(seed)
    built = build_model(model, {} if model_config is None else model_config)
    config = TrainConfig(seed=seed, **train_options)
    return Trainer(
        built, train[:n_train], val[:n_val], get_data_space(built.data_space), config, run_dir, progress=False
    )


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every entry under `roots` (the roots included, symlinks not followed): its kind, and for regular files
    their bytes' hash and mode; for symlinks their target. What a hostile-input test compares before and after."""
    entries: dict[str, tuple] = {}
    for root in roots:
        paths = [root, *root.rglob("*")] if root.is_dir() and not root.is_symlink() else [root]
        for path in paths:
            if path.is_symlink():
                entries[str(path)] = ("link", os.readlink(path))
            elif path.is_file():
                entries[str(path)] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
            elif path.exists():
                entries[str(path)] = ("other", path.stat().st_mode)
    return entries


def run_cli_expecting_error(
    argv: list[str], untouched: list[Path] = (), seconds: int = 60, match: str | None = None
) -> str:
    """Run `elbox ARGV` in this process and assert it fails as the CLI promises: a non-zero exit, one error line on
    stderr, "elbox: error: ...", and it last (progress lines of the work done before may precede it), no exception
    escaping main (that would be a traceback), within `seconds` (SIGALRM stops a hang), and no change under any
    `untouched` path (files elbox did not create). Returns the message."""
    from elbox.cli.main import main

    before = snapshot(*untouched)
    out, err = io.StringIO(), io.StringIO()

    def hang(signum, frame):
        raise TimeoutError(f"elbox {' '.join(argv)} ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert code != 0, f"elbox {argv} exited 0; stdout {out.getvalue()!r}"
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("elbox: error: "), (
        f"elbox {argv}: stderr {err.getvalue()!r}"
    )
    message = errors[0]
    assert len(message) < 600, f"elbox {argv}: an over-long message ({len(message)} characters)"
    if match is not None:
        assert match in message, f"elbox {argv}: {message!r} does not say {match!r}"
    assert snapshot(*untouched) == before, f"elbox {argv} changed files it did not create"
    return message


def interrupt_in_epoch(trainer: Trainer, epoch: int) -> None:
    """Run trainer.fit() as if the process were killed when `epoch` starts (KeyboardInterrupt there): the run
    directory keeps the checkpoint of the epoch before."""
    original = trainer.train_epoch

    def crash(e):
        if e == epoch:
            raise KeyboardInterrupt
        return original(e)

    trainer.train_epoch = crash
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()


def interrupt_second_validation(monkeypatch) -> None:
    """Ctrl-C as the second validation of a run starts: its first epoch is saved, its second is not."""
    validate, calls = Trainer.validate, []

    def interrupt(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return validate(self)

    monkeypatch.setattr(Trainer, "validate", interrupt)


def two_tone_images(rng, n: int):
    """n 8 x 8 uint8 images, dark left half and bright right half with a little noise: binarized, nearly one pattern
    that a tiny model learns in a few epochs (the OOD tests' inliers)."""
    import numpy as np

    return np.clip(rng.normal(0, 8, (n, 8, 8)) + np.repeat([10.0, 245.0], 4)[None, None, :], 0, 255).astype(np.uint8)

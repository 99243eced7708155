"""Fixtures and helpers shared by test modules.

Test modules import the helpers with `from conftest import make_trainer`: pytest's default ("prepend") import mode
puts tests/ on sys.path and registers this file as the module `conftest`, so the import finds this same module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from elbox import data
from elbox.data import get_data_space, load_split, sources
from elbox.models import build_model
from elbox.training.config import TrainConfig
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


def make_trainer(run_dir: Path, model: str = "vae", model_config: dict | None = None, n_train: int = 400,
                 n_val: int = 100, seed: int = 0, **train_options) -> Trainer:
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
    return Trainer(built, train[:n_train], val[:n_val], get_data_space(built.data_space), config, run_dir, progress=False)

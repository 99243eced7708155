"""Run directories: weights in safetensors, config and state in JSON, every write atomic.

A run directory holds
    config.json          format version, model name and config, data and training settings
    model.safetensors    the model's weights (the EMA weights when training keeps an EMA), last epoch
    best.safetensors     the same, from the epoch with the best validation ELBO
    state.safetensors    the full training state at the end of the last epoch, for `elbox train --resume`:
                         model, EMA and optimizer tensors and random-number-generator states as tensors;
                         step counters, optimizer hyperparameters, learning-rate schedule and the metrics
                         records as JSON in the file's metadata (one file, so they can never disagree)
    metrics.jsonl        training curves, one JSON record per line
Loading never unpickles: safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from elbox.atomic import atomic_write_bytes, atomic_write_json
from elbox.errors import ElboxError
from elbox.models import build_model
from elbox.models.base import LatentVariableModel
from elbox.options import config_to_dict

# 2: likelihood options are model-config fields (sigma, n_mixtures); version 1 configs are upgraded on load
FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
BEST_WEIGHTS_FILE = "best.safetensors"
STATE_FILE = "state.safetensors"
STATE_METADATA_KEY = "elbox_training_state"


def read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ElboxError(f"{what} {path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ElboxError(f"{what} {path} is not valid JSON: {e}") from None


def save_weights(path: str | Path, model: torch.nn.Module) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(tensors))


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    """ElboxError unless `tensors` has exactly the names of `expected`, each with its shape and dtype."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ElboxError(f"{what} does not match the model config: missing {missing}, unexpected {unexpected}")
    for name, want in expected.items():
        got = tensors[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ElboxError(
                f"{what}: tensor {name!r} has shape {tuple(got.shape)} {got.dtype}, "
                f"the model config needs {tuple(want.shape)} {want.dtype}"
            )


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a safetensors file and its metadata; ElboxError if missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ElboxError(f"{what} {path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ElboxError(f"{what} {path} is corrupt or not a safetensors file: {e}") from None


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load safetensors weights into `model`, checking names, shapes and dtypes first."""
    tensors, _ = read_safetensors(path, "weights file")
    check_tensors(tensors, model.state_dict(), f"weights file {path}")
    model.load_state_dict(tensors)


def save_training_state(path: str | Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """One safetensors file: the tensors, and `state` (JSON) in its metadata. Atomic."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {STATE_METADATA_KEY: json.dumps(state), "format_version": str(FORMAT_VERSION)}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_training_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) written by save_training_state; ElboxError if missing, corrupt or from a newer format."""
    tensors, metadata = read_safetensors(path, "training state")
    if STATE_METADATA_KEY not in metadata:
        raise ElboxError(f"training state {path} has no {STATE_METADATA_KEY!r} metadata; it was not written by elbox train")
    version = metadata.get("format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise ElboxError(f"training state {path} has format version {version!r}; this elbox reads up to {FORMAT_VERSION}")
    try:
        state = json.loads(metadata[STATE_METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ElboxError(f"training state {path} has malformed JSON metadata: {e}") from None
    if not isinstance(state, dict):
        raise ElboxError(f"training state {path}: the metadata must be a JSON object")
    return tensors, state


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Delete temporary files left by writes that a crash interrupted (atomic_write_bytes names them .NAME.*.tmp)."""
    for tmp in Path(run_dir).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def write_run_config(run_dir: str | Path, model: LatentVariableModel, data: dict, train: dict) -> dict:
    config = {
        "format_version": FORMAT_VERSION,
        "model": model.name,
        "model_config": config_to_dict(model.config),
        "data": data,
        "train": train,
    }
    atomic_write_json(Path(run_dir) / CONFIG_FILE, config)
    return config


def save_pretrained(model: LatentVariableModel, directory: str | os.PathLike, data: dict[str, Any] | None = None) -> Path:
    """Write a model as a run directory (config.json + model.safetensors: what `elbox.load` and the `elbox`
    commands read; no pickle). `data` describes the training data ({"name": "fashion-mnist", ...}) so that
    `elbox evaluate` knows which dataset to use; the data space is always recorded."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(directory / WEIGHTS_FILE, model)
    write_run_config(directory, model, {**(data or {}), "space": model.data_space}, train={})
    return directory


def read_run_config(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ElboxError(f"run directory {run_dir} does not exist")
    config = read_json(run_dir / CONFIG_FILE, "run config")
    if not isinstance(config, dict):
        raise ElboxError(f"run config {run_dir / CONFIG_FILE} must be a JSON object")
    version = config.get("format_version")
    if not isinstance(version, int):
        raise ElboxError(f"run config {run_dir / CONFIG_FILE} has no integer format_version")
    if version > FORMAT_VERSION:
        raise ElboxError(
            f"run directory {run_dir} has format version {version}, newer than this elbox supports "
            f"({FORMAT_VERSION}); upgrade elbox"
        )
    for key in ("model", "model_config", "data"):
        if key not in config:
            raise ElboxError(f"run config {run_dir / CONFIG_FILE} lacks the key {key!r}")
    return config


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", **modules: torch.nn.Module) -> tuple[LatentVariableModel, dict]:
    """Rebuild a trained model from its run directory. Returns (model in eval mode, run config). modules: user-written
    networks the model's config names (a VAE's encoder and decoder), passed to its from_config."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    model = build_model(config["model"], config["model_config"], **modules)
    if not (run_dir / WEIGHTS_FILE).is_file():
        raise ElboxError(f"run directory {run_dir} is incomplete: {WEIGHTS_FILE} is missing (did training finish an epoch?)")
    load_weights(run_dir / WEIGHTS_FILE, model)
    return model.to(device).eval(), config

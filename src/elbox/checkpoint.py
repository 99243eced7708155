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
from elbox.data.spaces import space_from_record
from elbox.errors import ElboxError
from elbox.models import build_model
from elbox.models.base import (
    LatentVariableModel,
    check_model_size,
    model_class,
    model_config,
)
from elbox.options import (
    check_value,
    config_from_dict,
    config_to_dict,
    option_specs,
    short_repr,
)
from elbox.training.config import DataConfig, TrainConfig

# 2: likelihood options are model-config fields (sigma, n_mixtures); version 1 configs are upgraded on load
FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
BEST_WEIGHTS_FILE = "best.safetensors"
STATE_FILE = "state.safetensors"
STATE_METADATA_KEY = "elbox_training_state"


def read_json(path: str | Path, what: str) -> Any:
    """The JSON value of a file; ElboxError if it is missing, unreadable, not UTF-8 or not JSON (nested too deeply,
    a number too long: json raises RecursionError, ValueError)."""
    path = Path(path)
    if not path.is_file():
        raise ElboxError(f"{what} {path} is missing")
    try:
        return parse_json(path.read_text(encoding="utf-8"), f"{what} {path} is not valid JSON")
    except UnicodeDecodeError as e:
        raise ElboxError(f"{what} {path} is not valid JSON: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ElboxError(f"{what} {path} cannot be read: {e.strerror or e}") from None


def parse_json(text: str, problem: str) -> Any:
    """json.loads(text); ElboxError "PROBLEM: why" for malformed JSON, nesting too deep or a number too long."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ElboxError(f"{problem}: nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError, and int() of more than 4300 digits
        raise ElboxError(f"{problem}: {str(e)[:120]}") from None


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


def check_finite_tensors(tensors: dict[str, torch.Tensor], what: str) -> None:
    """ElboxError naming the first floating-point tensor that holds a NaN or infinite value."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ElboxError(f"{what} holds NaN or infinite values (tensor {short_repr(name)}); it cannot be used")


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load safetensors weights into `model`, checking names, shapes, dtypes and finite values first."""
    tensors, _ = read_safetensors(path, "weights file")
    check_tensors(tensors, model.state_dict(), f"weights file {path}")
    check_finite_tensors(tensors, f"weights file {path}")
    model.load_state_dict(tensors)


def save_training_state(path: str | Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """One safetensors file: the tensors, and `state` (JSON) in its metadata. Atomic."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {STATE_METADATA_KEY: json.dumps(state), "format_version": str(FORMAT_VERSION)}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_training_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) written by save_training_state; ElboxError if missing, corrupt, from a newer format or holding
    non-finite values. The state's fields are checked where they are used (elbox.training.state)."""
    tensors, metadata = read_safetensors(path, "training state")
    if STATE_METADATA_KEY not in metadata:
        raise ElboxError(f"training state {path} has no {STATE_METADATA_KEY!r} metadata; it was not written by elbox train")
    version = metadata.get("format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise ElboxError(f"training state {path} has format version {short_repr(version)}; this elbox reads up to "
                         f"{FORMAT_VERSION}")
    state = parse_json(metadata[STATE_METADATA_KEY], f"training state {path} has malformed JSON metadata")
    if not isinstance(state, dict):
        raise ElboxError(f"training state {path}: the metadata must be a JSON object")
    check_finite_tensors(tensors, f"training state {path}")
    return tensors, state


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
    """The run's config.json, every field checked (checked_run_config)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ElboxError(f"run directory {run_dir} does not exist")
    return checked_run_config(read_json(run_dir / CONFIG_FILE, "run config"), f"run config {run_dir / CONFIG_FILE}")


def checked_run_config(config: Any, what: str) -> dict:
    """A run config (config.json's JSON value), returned when every field has its type and range: format_version, the
    model's name and config, the data record with its data space, the training settings. Otherwise ElboxError, one
    line starting with `what` that names the field (format_version first: a newer elbox's run says so)."""
    if not isinstance(config, dict):
        raise ElboxError(f"{what} must be a JSON object, got {short_repr(config)}")
    version = config.get("format_version")
    if type(version) is not int or version < 1:
        raise ElboxError(f"{what}: format_version must be a whole number >= 1, got {short_repr(version)}")
    if version > FORMAT_VERSION:
        raise ElboxError(f"{what} has format version {version}, newer than this elbox supports ({FORMAT_VERSION}); "
                         "upgrade elbox")
    missing = [key for key in ("model", "model_config", "data") if key not in config]
    if missing:
        raise ElboxError(f"{what} lacks the key {missing[0]!r}")
    if not isinstance(config["model"], str):
        raise ElboxError(f"{what}: model must be a model's name, got {short_repr(config['model'])}")
    sections = [("model_config", lambda: check_model_size(model_class(config["model"]),
                                                         model_config(config["model"], config["model_config"]))),
                ("data", lambda: check_data_record(config["data"])),
                ("train", lambda: config_from_dict(TrainConfig, config.get("train", {}), "training settings"))]
    for section, check in sections:
        try:
            check()
        except ElboxError as e:
            raise ElboxError(f"{what}: {section}: {e}") from None
    return config


def check_data_record(record: Any) -> None:
    """ElboxError unless a run's "data" record is a JSON object with a valid data space and well-typed entries."""
    if not isinstance(record, dict):
        raise ElboxError(f"must be a JSON object, got {short_repr(record)}")
    space_from_record(record)
    for key in ("name", "path", "kind", "source", "validation"):
        if not isinstance(record.get(key, ""), str):
            raise ElboxError(f"{key} must be a string, got {short_repr(record[key])}")
    for spec in option_specs(DataConfig):
        if spec.name in record:
            check_value(spec, record[spec.name])


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

"""Run directories: weights in safetensors, config and state in JSON, every write atomic.

A run directory holds
    config.json          format version, model name and config, data and training settings
    model.safetensors    the model's weights (the EMA weights when training keeps an EMA), last epoch
    best.safetensors     the same, from the epoch with the best validation ELBO
    state.safetensors    the full training state at the end of the last epoch, for `elbox train --resume`:
                         model, EMA and optimizer tensors and random-number-generator states as tensors;
                         step counters, optimizer hyperparameters, learning-rate schedule and the metrics
                         records as JSON in the file's metadata (one file, so they can never disagree)
    state-in-epoch.safetensors   the same, saved within the epoch after (--checkpoint-minutes), with where that
                         epoch stands; --resume prefers it while it is the newer; an epoch's end removes it
    metrics.jsonl        training curves, one JSON record per line
Loading never unpickles: safetensors and JSON only.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from elbox.core.errors import ElboxError
from elbox.core.options import check_value, config_from_dict, config_to_dict, option_specs, short_repr
from elbox.core.system import resolve_device
from elbox.data.preprocessing import Preprocessing
from elbox.data.spaces import space_from_record
from elbox.io.atomic import atomic_write_bytes, atomic_write_json
from elbox.io.run_config import DataConfig, TrainConfig
from elbox.models import build_model
from elbox.models.base import (
    CONFIG_VERSION,
    LatentVariableModel,
    check_model_size,
    model_class,
    model_config,
)

FORMAT_VERSION = CONFIG_VERSION  # of config.json and the training state (elbox.models.base has its history)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
BEST_WEIGHTS_FILE = "best.safetensors"
STATE_FILE = "state.safetensors"
STATE_IN_EPOCH_FILE = "state-in-epoch.safetensors"
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


# Larger than any weight training gives: its square overflows float32 (3.4e38), so a model holding one computes NaN
MAX_WEIGHT = 1e19


def check_finite_tensors(tensors: dict[str, torch.Tensor], what: str, bound: float = math.inf) -> None:
    """ElboxError naming the first floating-point tensor that holds a NaN or infinite value, or one beyond `bound`
    in magnitude (MAX_WEIGHT for a model's weights)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ElboxError(f"{what} holds NaN or infinite values (tensor {short_repr(name)}); it cannot be used")
        if tensor.is_floating_point() and tensor.numel() and tensor.abs().max() > bound:
            raise ElboxError(
                f"{what} holds values beyond {bound:g} in magnitude (tensor {short_repr(name)}), "
                "which overflow float32 arithmetic; it cannot be used"
            )


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load safetensors weights into `model`, checking names, shapes, dtypes and finite values first."""
    tensors, _ = read_safetensors(path, "weights file")
    check_tensors(tensors, model.state_dict(), f"weights file {path}")
    check_finite_tensors(tensors, f"weights file {path}", MAX_WEIGHT)
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
        raise ElboxError(
            f"training state {path} has no {STATE_METADATA_KEY!r} metadata; it was not written by elbox train"
        )
    version = metadata.get("format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise ElboxError(
            f"training state {path} has format version {short_repr(version)}; this elbox reads up to {FORMAT_VERSION}"
        )
    state = parse_json(metadata[STATE_METADATA_KEY], f"training state {path} has malformed JSON metadata")
    if not isinstance(state, dict):
        raise ElboxError(f"training state {path}: the metadata must be a JSON object")
    check_finite_tensors(tensors, f"training state {path}")
    return tensors, state


def resume_state_file(run_dir: Path) -> Path:
    """The training state --resume continues from: state-in-epoch.safetensors while it is newer (more steps) than
    state.safetensors (a crash can come between an epoch's state and the removal of the one within it)."""
    in_epoch, last = run_dir / STATE_IN_EPOCH_FILE, run_dir / STATE_FILE
    if not in_epoch.exists() or last.exists() and state_step(last) >= state_step(in_epoch):
        return last
    return in_epoch


def state_step(path: Path) -> int:
    """The optimizer step a training state was saved at, from its metadata alone (the tensors are not read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            state = parse_json(
                (f.metadata() or {}).get(STATE_METADATA_KEY, "{}"), f"training state {path} has malformed JSON metadata"
            )
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ElboxError(f"training state {path} is corrupt or not a safetensors file: {e}") from None
    step = state.get("step") if isinstance(state, dict) else None
    if type(step) is not int:
        raise ElboxError(f"training state {path}: step must be a whole number, got {short_repr(step)}")
    return step


def write_run_config(
    run_dir: str | Path, model: LatentVariableModel, data: dict, train: dict, system: dict | None = None
) -> dict:
    """config.json. system: where the run trained ({"threads": N, "device": ..., "torch": version}): float32 sums
    are reordered by another thread count, so a run reproduces bit for bit with the same one (resume and --config use
    it)."""
    config = {
        "format_version": FORMAT_VERSION,
        "model": model.name,
        "model_config": config_to_dict(model.config),
        "data": data,
        "train": train,
        **({"system": system} if system else {}),
    }
    atomic_write_json(Path(run_dir) / CONFIG_FILE, config)
    return config


def save_pretrained(
    model: LatentVariableModel, directory: str | os.PathLike, data: dict[str, Any] | None = None
) -> Path:
    """Write a model as a run directory (config.json + model.safetensors: what `elbox.load` and the `elbox`
    commands read; no pickle). `data` describes the training data ({"name": "fashion-mnist", ...}) so that
    `elbox evaluate` knows which dataset to use; the model's preprocessing (its data space, with a table's
    standardization and columns, an image size) is always recorded.

    Like `elbox train --out`, it writes only into a new or empty directory, or over an earlier save_pretrained
    output (config.json and model.safetensors alone): never over a training run or a user's files."""
    if not isinstance(model, LatentVariableModel):
        raise ElboxError(f"save_pretrained takes a model (run.model for a Run), got {type(model).__name__}")
    directory = Path(directory)
    record = {**(data or {}), **preprocessing_record(model)}
    check_data_record(record)
    check_pretrained_directory(directory)
    save_weights(directory / WEIGHTS_FILE, model)
    write_run_config(directory, model, record, train={})
    return directory


def preprocessing_record(model: LatentVariableModel) -> dict[str, Any]:
    """The "data" entries that rebuild the model's preprocessing: its own, or else its data space's (a model of
    vectors needs the standardization its run fitted)."""
    if model.preprocessing is not None:
        return model.preprocessing.to_record()
    if model.data_space == "real":
        raise ElboxError(
            f"this {model.name} model of vectors has no standardization to save with it: save the model "
            "of a run (elbox.load(run_dir), or run.model), which carries the one fitted on its data"
        )
    return {"space": model.data_space}


def check_pretrained_directory(directory: Path) -> None:
    """ElboxError unless `directory` may take save_pretrained's files (see save_pretrained); it is created if absent."""
    if directory.exists() and not directory.is_dir():
        raise ElboxError(f"cannot write the model to {directory}: it is a file, not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        entries = sorted(p.name for p in directory.iterdir())
    except OSError as e:
        raise ElboxError(f"cannot write the model to {directory}: {e.strerror or e}") from None
    if not entries:
        return
    if set(entries) <= {CONFIG_FILE, WEIGHTS_FILE}:
        try:
            earlier = read_json(directory / CONFIG_FILE, "config")
        except ElboxError:
            earlier = None
        if isinstance(earlier, dict) and earlier.get("train") == {} and "format_version" in earlier:
            return  # an earlier save_pretrained output: replaced
    listed = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise ElboxError(
        f"cannot save the model in {directory}: it holds files that are not an earlier save_pretrained "
        f"output ({listed}); elbox writes a model only into a new or empty directory"
    )


def read_run_config(run_dir: str | Path) -> dict:
    """The run's config.json, every field checked (checked_run_config)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ElboxError(f"run directory {run_dir} does not exist")
    return checked_run_config(read_json(run_dir / CONFIG_FILE, "run config"), f"run config {run_dir / CONFIG_FILE}")


def checked_run_config(config: Any, what: str) -> dict:
    """A run config (config.json's JSON value), returned when every field has its type and range: format_version, the
    model's name and config, the data record with its data space, the training settings. Otherwise ElboxError, one
    line starting with `what` that names the field (format_version first: a newer elbox's run says so). A config
    of an older format is returned in the current one (the model's upgrade_config)."""
    if not isinstance(config, dict):
        raise ElboxError(f"{what} must be a JSON object, got {short_repr(config)}")
    version = config.get("format_version")
    if type(version) is not int or version < 1:
        raise ElboxError(f"{what}: format_version must be a whole number >= 1, got {short_repr(version)}")
    if version > FORMAT_VERSION:
        raise ElboxError(
            f"{what} has format version {version}, newer than this elbox supports ({FORMAT_VERSION}); upgrade elbox"
        )
    missing = [key for key in ("model", "model_config", "data") if key not in config]
    if missing:
        raise ElboxError(f"{what} lacks the key {missing[0]!r}")
    if not isinstance(config["model"], str):
        raise ElboxError(f"{what}: model must be a model's name, got {short_repr(config['model'])}")
    settings = {}

    def check_model_config() -> None:
        settings["model"] = model_config(config["model"], config["model_config"], version)
        check_model_size(model_class(config["model"]), settings["model"])

    sections = [
        ("model_config", check_model_config),
        ("data", lambda: check_data_record(config["data"])),
        ("train", lambda: config_from_dict(TrainConfig, config.get("train", {}), "training settings")),
        ("system", lambda: recorded_threads(config)),
    ]
    for section, check in sections:
        try:
            check()
        except ElboxError as e:
            raise ElboxError(f"{what}: {section}: {e}") from None
    if version == FORMAT_VERSION:
        return config
    return {**config, "format_version": FORMAT_VERSION, "model_config": config_to_dict(settings["model"])}


def check_data_record(record: Any) -> None:
    """ElboxError unless a run's "data" record is a JSON object with a valid data space and well-typed entries."""
    if not isinstance(record, dict):
        raise ElboxError(f"must be a JSON object, got {short_repr(record)}")
    space_from_record(record)
    for key in ("name", "path", "kind", "source", "validation"):
        if not isinstance(record.get(key, ""), str):
            raise ElboxError(f"{key} must be a string, got {short_repr(record[key])}")
    names = record.get("column_names", [])
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ElboxError(f"column_names must be a list of column names, got {short_repr(names)}")
    for spec in option_specs(DataConfig):
        if spec.name in record:
            check_value(spec, record[spec.name])


WEIGHTS = {"last": WEIGHTS_FILE, "best": BEST_WEIGHTS_FILE}  # which weights of a run to load


def result_weights(train: dict) -> str:
    """Which weights are a run's result, from its training settings: "best" for a run trained with early stopping
    (its best epoch), else "last"."""
    return "best" if train.get("patience") else "last"


def load_run(
    run_dir: str | Path, device: str | torch.device = "cpu", weights: str = "last", **modules: torch.nn.Module
) -> tuple[LatentVariableModel, dict]:
    """Rebuild a trained model from its run directory. Returns (model in eval mode, run config). weights: "last" (the
    last epoch's, model.safetensors) or "best" (the best on validation, best.safetensors). modules: user-written
    networks the model's config names (a VAE's encoder and decoder), passed to its from_config."""
    if weights not in WEIGHTS:
        raise ElboxError(f"weights must be one of {', '.join(WEIGHTS)}, got {short_repr(weights)}")
    device = resolve_device(device) if isinstance(device, str) else device
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    model = build_model(config["model"], config["model_config"], **modules)
    path = run_dir / WEIGHTS[weights]
    if not path.is_file():
        why = "(did training finish an epoch?)" if weights == "last" else "(only models trained by gradient keep one)"
        raise ElboxError(f"run directory {run_dir} has no {WEIGHTS[weights]} {why}")
    load_weights(path, model)
    model.preprocessing = Preprocessing.from_record(config["data"])
    return model.to(device).eval(), config


def recorded_threads(config: dict) -> int | None:
    """The CPU thread count a run trained with (config.json "system"), or None for a run that recorded none."""
    system = config.get("system", {}) if isinstance(config, dict) else {}
    if not isinstance(system, dict):
        raise ElboxError(f"must be a JSON object, got {short_repr(system)}")
    threads = system.get("threads")
    if threads is not None and (type(threads) is not int or not 1 <= threads <= 1024):
        raise ElboxError(f"threads must be a whole number between 1 and 1024, got {short_repr(threads)}")
    return threads

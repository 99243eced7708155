"""The training state a resumed run continues from, bit for bit: model, EMA and optimizer tensors, random-number-
generator states, step counters, the learning-rate schedule and the metrics records (written by elbox.io.checkpoint
as one safetensors file with the JSON in its metadata); a state saved within an epoch adds where that epoch stands
(EpochProgress)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from elbox.core.errors import ElboxError
from elbox.core.options import MAX_SEED, config_from_dict, short_repr
from elbox.io.checkpoint import check_tensors
from elbox.io.run_config import TrainConfig, config_dict

COUNTS = ("epoch", "step", "skipped_steps", "skipped_large_grad")
# entries a saved state must share with this run's optimizer and schedule: they follow from its config, not its progress
ADAM_SETTINGS = (
    "params",
    "betas",
    "eps",
    "weight_decay",
    "decoupled_weight_decay",
    "amsgrad",
    "maximize",
    "initial_lr",
)
SCHEDULE_SETTINGS = ("T_max", "eta_min", "base_lrs")


@dataclass
class EpochProgress:
    """Where a training epoch stands: what a state saved within the epoch adds, so that a resumed run draws the
    epoch's batch order again and continues after its done batches, with the same sums for the epoch's record."""

    epoch: int
    shuffle_state: Tensor  # the shuffle generator's state before the epoch drew its batch order
    batches: int = 0  # batches of the epoch done, skipped steps included
    examples: int = 0  # examples in `sums`
    sums: dict[str, float] = dataclasses.field(default_factory=dict)  # each term times the examples of its step
    interval_examples: int = 0  # the same since the last training record
    interval: dict[str, float] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0  # spent on the epoch so far, and since the last training record (for the rates logged)
    interval_seconds: float = 0.0

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "shuffle_state"}


def pack_training_state(
    trainer: Any, epoch: int, progress: EpochProgress | None = None
) -> tuple[dict[str, Tensor], dict]:
    """Everything a resumed run needs to continue bit for bit: (tensors, JSON-ready state), after `epoch`, or within
    the epoch after it when `progress` is given."""
    tensors = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    if trainer.ema is not None:
        tensors.update({f"ema.{k}": v for k, v in trainer.ema.state_dict().items()})
    optimizer = trainer.optimizer.state_dict()
    for index, values in optimizer["state"].items():
        tensors.update({f"optimizer.{index}.{key}": v for key, v in values.items()})  # Adam's state is all tensors
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.batches"] = trainer.generator.get_state()
    tensors["rng.shuffle"] = trainer.shuffle_generator.get_state() if progress is None else progress.shuffle_state
    if trainer.device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(trainer.device)
    state = {
        "epoch": epoch,
        "step": trainer.step,
        "skipped_steps": trainer.skipped_steps,
        "skipped_large_grad": trainer.skipped_large_grad,
        "best_val_elbo": trainer.best_val_elbo,
        "recent_nonfinite": [int(x) for x in trainer.recent_nonfinite],
        "optimizer_param_groups": optimizer["param_groups"],
        "lr_scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
        "train_config": config_dict(trainer.config),
        "records": trainer.records,
    }
    if progress is not None:
        state["partial_epoch"] = progress.to_json()
    return tensors, state


def unpack_training_state(trainer: Any, tensors: dict[str, Tensor], state: dict, what: str = "training state") -> None:
    """Load a training_state() back; ElboxError when it does not fit this model and configuration."""

    def part(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    try:
        # fields added later take defaults; how often a state is saved does not change the run's numbers
        saved = dataclasses.replace(
            saved_train_config(state, what), checkpoint_minutes=trainer.config.checkpoint_minutes
        )
        if saved != trainer.config:
            raise ElboxError(f"{what} was written with other training settings than the run's config.json")
        check_state(trainer, state, what)
        check_tensors(part("model."), trainer.model.state_dict(), f"{what} (model tensors)")
        trainer.model.load_state_dict(part("model."))
        if trainer.ema is not None:
            check_tensors(part("ema."), trainer.ema.state_dict(), f"{what} (EMA tensors)")
            trainer.ema.load_state_dict(part("ema."))
        trainer.optimizer.load_state_dict(
            {
                "state": _optimizer_state(trainer.optimizer, part("optimizer."), what),
                "param_groups": state["optimizer_param_groups"],
            }
        )
        if trainer.scheduler is not None:
            trainer.scheduler.load_state_dict(state["lr_scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        trainer.generator.set_state(tensors["rng.batches"])
        trainer.shuffle_generator.set_state(tensors["rng.shuffle"])
        if trainer.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], trainer.device)
        trainer.step, trainer.start_epoch = int(state["step"]), int(state["epoch"]) + 1
        trainer.skipped_steps, trainer.skipped_large_grad = (
            int(state["skipped_steps"]),
            int(state["skipped_large_grad"]),
        )
        trainer.best_val_elbo = float(state["best_val_elbo"])
        trainer.recent_nonfinite.clear()
        trainer.recent_nonfinite.extend(bool(x) for x in state.get("recent_nonfinite", []))  # absent in older states
        trainer.saved_epoch = trainer.start_epoch - 1
        trainer.records = list(state["records"])
        partial = state.get("partial_epoch")  # a state saved within an epoch
        if partial is not None:
            trainer.resume_progress = EpochProgress(**partial, shuffle_state=tensors["rng.shuffle"])
    except ElboxError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:200]  # torch's messages span lines
        raise ElboxError(f"{what} is incomplete or does not fit this run: {type(e).__name__}: {reason}") from None


def saved_train_config(state: dict, what: str) -> TrainConfig:
    values = field(state, "train_config", what)
    try:
        return config_from_dict(TrainConfig, values, "train_config")
    except ElboxError as e:
        raise ElboxError(f"{what}: {e}") from None


def field(state: dict, key: str, what: str) -> Any:
    if key not in state:
        raise ElboxError(f"{what} is incomplete: it lacks the field {key!r}")
    return state[key]


def check_state(trainer: Any, state: dict, what: str) -> None:
    """ElboxError naming the field unless every field of a saved state has its type and range and fits the trainer's
    optimizer and schedule (the state's JSON is read before any of it is used)."""
    for key in COUNTS:
        value = field(state, key, what)
        if type(value) is not int or not 0 <= value <= MAX_SEED:
            raise ElboxError(f"{what}: {key} must be a whole number >= 0, got {short_repr(value)}")
    best = field(state, "best_val_elbo", what)
    if _kind(best) not in ("int", "float") and best != -math.inf:
        raise ElboxError(f"{what}: best_val_elbo must be a finite number (or -Infinity), got {short_repr(best)}")
    recent = state.get("recent_nonfinite", [])
    if not isinstance(recent, list) or not all(type(x) is int and x in (0, 1) for x in recent):
        raise ElboxError(f"{what}: recent_nonfinite must be a list of 0s and 1s, got {short_repr(recent)}")
    records = field(state, "records", what)
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and isinstance(r.get("kind"), str) for r in records
    ):
        raise ElboxError(f'{what}: records must be a list of JSON objects with a "kind", got {short_repr(records)}')
    if state.get("partial_epoch") is not None:
        _check_partial_epoch(state["partial_epoch"], trainer, state, what)
    current = _as_json(trainer.optimizer.state_dict()["param_groups"])
    groups = field(state, "optimizer_param_groups", what)
    if not isinstance(groups, list) or len(groups) != len(current):
        raise ElboxError(f"{what}: optimizer_param_groups must be a list of {len(current)}, got {short_repr(groups)}")
    for group, want in zip(groups, current):
        _check_entries(group, want, ADAM_SETTINGS, f"{what}: optimizer_param_groups")
    schedule = field(state, "lr_scheduler", what)
    if trainer.scheduler is None and schedule is not None:
        raise ElboxError(f"{what}: lr_scheduler must be null (a constant learning rate), got {short_repr(schedule)}")
    if trainer.scheduler is not None:
        _check_entries(schedule, _as_json(trainer.scheduler.state_dict()), SCHEDULE_SETTINGS, f"{what}: lr_scheduler")
        if schedule.get("last_epoch", state["step"]) != state["step"]:  # the schedule follows the step count
            raise ElboxError(
                f"{what}: lr_scheduler's last_epoch {short_repr(schedule['last_epoch'])} is not the step "
                f"count {state['step']}"
            )


def _check_partial_epoch(partial: Any, trainer: Any, state: dict, what: str) -> None:
    """ElboxError unless `partial` is an EpochProgress's JSON for the epoch after the state's, consistent with the
    state's step count and the trainer's batches."""
    names = {f.name for f in dataclasses.fields(EpochProgress)} - {"shuffle_state"}
    if not isinstance(partial, dict) or set(partial) != names:
        raise ElboxError(f"{what}: partial_epoch must be a JSON object with the keys {sorted(names)}")
    if partial["epoch"] != state["epoch"] + 1 or type(partial["epoch"]) is not int:
        raise ElboxError(f"{what}: partial_epoch is of epoch {short_repr(partial['epoch'])}, not {state['epoch'] + 1}")
    limits = {  # batches: at least one done, and not the epoch's last (its end saves the epoch)
        "batches": (1, min(trainer.steps_per_epoch - 1, state["step"])),
        "examples": (0, partial["batches"] * trainer.config.batch_size if type(partial["batches"]) is int else 0),
        "interval_examples": (0, partial["examples"] if type(partial["examples"]) is int else 0),
    }
    for key, (low, high) in limits.items():
        if type(partial[key]) is not int or not low <= partial[key] <= high:
            raise ElboxError(
                f"{what}: partial_epoch's {key} must be a whole number from {low} to {high}, "
                f"got {short_repr(partial[key])}"
            )
    for key in ("seconds", "interval_seconds"):
        if not _is_float(partial[key]) or partial[key] < 0:
            raise ElboxError(f"{what}: partial_epoch's {key} must be a number >= 0, got {short_repr(partial[key])}")
    for key in ("sums", "interval"):
        sums = partial[key]
        if not isinstance(sums, dict) or not all(_is_float(v) for v in sums.values()):
            raise ElboxError(f"{what}: partial_epoch's {key} must map names to finite numbers, got {short_repr(sums)}")
    if not set(partial["interval"]) <= set(partial["sums"]) or bool(partial["sums"]) != (partial["examples"] > 0):
        raise ElboxError(f"{what}: partial_epoch's sums and interval do not fit its examples")


def _is_float(value: Any) -> bool:
    """A finite JSON number that float64 holds exactly enough: a float, or a whole number up to 2**53."""
    return _kind(value) == "float" or (type(value) is int and abs(value) <= 2**53)


def _check_entries(saved: Any, current: dict, settings: tuple[str, ...], what: str) -> None:
    """ElboxError unless `saved` is a JSON object whose keys `current` has, with the same values for `settings` and
    values of the same JSON types, numbers >= 0, for the others."""
    if not isinstance(saved, dict):
        raise ElboxError(f"{what} must be a JSON object, got {short_repr(saved)}")
    for key, value in saved.items():
        value = list(value) if isinstance(value, tuple) else value  # a state not read from JSON (Trainer.restore)
        fits = key in current and (value == current[key] if key in settings else _kind(value) == _kind(current[key]))
        numbers = value if isinstance(value, list) else [value]
        if not fits or any(_kind(v) in ("int", "float") and v < 0 for v in numbers):
            raise ElboxError(f"{what}: {short_repr(key)} is {short_repr(value)}, which does not fit this run")


def _kind(value: Any) -> str | list[str]:
    """The JSON type of a value ("int", "float", "bool", "NoneType", "str", ...; "non-finite" for NaN and infinities),
    a list's as the list of its items' types (one level: deeper nesting is never a fit)."""
    if isinstance(value, list):
        return [type(v).__name__ if isinstance(v, (list, dict)) else _kind(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "non-finite"
    return type(value).__name__


def _as_json(value: Any) -> Any:
    """A state dict as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def _optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], what: str
) -> dict[int, dict[str, Tensor]]:
    """{parameter index: {name: tensor}} from "index.name" keys: for each parameter that has a state, Adam's step
    count (a single float32 whole number >= 0) and moments (its parameter's shape and dtype), and nothing else."""
    groups = [group for group in optimizer.param_groups for _ in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or int(index) >= len(params):
            raise ElboxError(f"{what}: optimizer tensor {key!r} names no parameter of this model")
        state.setdefault(int(index), {})[name] = value
    for index, values in state.items():
        expected = _adam_state_names(groups[index])
        if set(values) != expected:
            raise ElboxError(
                f"{what}: the optimizer state of parameter {index} has the tensors {sorted(values)}; "
                f"Adam keeps {sorted(expected)}"
            )
        for name, value in values.items():
            _check_optimizer_tensor(value, params[index], f"{what}: optimizer tensor '{index}.{name}'", name == "step")
    return state


def _adam_state_names(group: dict) -> set[str]:
    """The tensors Adam keeps for each parameter of a param group (Kingma & Ba 2015, Algorithm 1; AMSGrad's running
    maximum, Reddi et al. 2018)."""
    return {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group.get("amsgrad") else set())


def _check_optimizer_tensor(value: Tensor, param: Tensor, what: str, is_step: bool) -> None:
    """ElboxError unless `value` is what Adam keeps: a step count (one float32 whole number >= 0), or a moment of
    `param`'s shape and dtype."""
    if is_step:
        if value.shape != () or value.dtype != torch.float32:
            raise ElboxError(
                f"{what} has shape {tuple(value.shape)} {value.dtype}; Adam's step count is one float32 "
                "number, shape ()"
            )
        count = value.item()
        if not (math.isfinite(count) and count >= 0 and count == int(count)):
            raise ElboxError(f"{what} is {count}; Adam's step count is a whole number >= 0")
    elif value.shape != param.shape or value.dtype != param.dtype:
        raise ElboxError(
            f"{what} has shape {tuple(value.shape)} {value.dtype}; its parameter's moments need "
            f"{tuple(param.shape)} {param.dtype}"
        )

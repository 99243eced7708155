"""The training state a resumed run continues from, bit for bit: model, EMA and optimizer tensors, random-number-
generator states, step counters, the learning-rate schedule and the metrics records (written by elbox.checkpoint
as one safetensors file with the JSON in its metadata)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from elbox.checkpoint import check_tensors
from elbox.errors import ElboxError
from elbox.options import config_from_dict
from elbox.training.config import TrainConfig, config_dict


def pack_training_state(trainer: Any, epoch: int) -> tuple[dict[str, Tensor], dict]:
    """Everything a resumed run needs to continue bit for bit: (tensors, JSON-ready state)."""
    tensors = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    if trainer.ema is not None:
        tensors.update({f"ema.{k}": v for k, v in trainer.ema.state_dict().items()})
    optimizer = trainer.optimizer.state_dict()
    for index, values in optimizer["state"].items():
        tensors.update({f"optimizer.{index}.{key}": v for key, v in values.items()})  # Adam's state is all tensors
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.batches"] = trainer.generator.get_state()
    tensors["rng.shuffle"] = trainer.shuffle_generator.get_state()
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
    return tensors, state

def unpack_training_state(trainer: Any, tensors: dict[str, Tensor], state: dict, what: str = "training state") -> None:
    """Load a training_state() back; ElboxError when it does not fit this model and configuration."""
    def part(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    try:
        if config_from_dict(TrainConfig, state["train_config"]) != trainer.config:  # fields added later take defaults
            raise ElboxError(f"{what} was written with other training settings than the run's config.json")
        check_tensors(part("model."), trainer.model.state_dict(), f"{what} (model tensors)")
        trainer.model.load_state_dict(part("model."))
        if trainer.ema is not None:
            check_tensors(part("ema."), trainer.ema.state_dict(), f"{what} (EMA tensors)")
            trainer.ema.load_state_dict(part("ema."))
        trainer.optimizer.load_state_dict({"state": _optimizer_state(trainer.optimizer, part("optimizer."), what),
                                        "param_groups": state["optimizer_param_groups"]})
        if trainer.scheduler is not None:
            trainer.scheduler.load_state_dict(state["lr_scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        trainer.generator.set_state(tensors["rng.batches"])
        trainer.shuffle_generator.set_state(tensors["rng.shuffle"])
        if trainer.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], trainer.device)
        trainer.step, trainer.start_epoch = int(state["step"]), int(state["epoch"]) + 1
        trainer.skipped_steps, trainer.skipped_large_grad = int(state["skipped_steps"]), int(state["skipped_large_grad"])
        trainer.best_val_elbo = float(state["best_val_elbo"])
        trainer.recent_nonfinite.clear()
        trainer.recent_nonfinite.extend(bool(x) for x in state.get("recent_nonfinite", []))  # absent in older states
        trainer.saved_epoch = trainer.start_epoch - 1
        trainer.records = list(state["records"])
    except ElboxError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ElboxError(f"{what} is incomplete or does not fit this run: {type(e).__name__}: {e}") from None

def _optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], what: str) -> dict[int, dict[str, Tensor]]:
    """{parameter index: {name: tensor}} from "index.name" keys, each moment shaped like its parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or int(index) >= len(params):
            raise ElboxError(f"{what}: optimizer tensor {key!r} names no parameter of this model")
        if name != "step" and value.shape != params[int(index)].shape:
            raise ElboxError(f"{what}: optimizer tensor {key!r} has shape {tuple(value.shape)}, "
                             f"its parameter {tuple(params[int(index)].shape)}")
        state.setdefault(int(index), {})[name] = value
    return state

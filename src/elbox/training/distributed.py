"""Training in several processes (torchrun): joining the process group, and the few collectives the trainer needs.
Each is a no-op in a single process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

from elbox.core.system import resolve_device


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def first_process() -> bool:
    """Process 0 of a torchrun job (read before the process group exists), or a single process."""
    return os.environ.get("RANK", "0") == "0"


def rank_and_world_size() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def init_distributed(device_name: str) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL with one GPU per process (LOCAL_RANK), gloo on
    CPUs. Rendezvous (single machine or several) is torchrun's, through its environment variables."""
    device = resolve_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def all_ranks_agree(flag: Tensor) -> bool:
    """True when the flag holds on every process (so all take the same branch and none waits forever)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return bool(flag)
    flag = flag.to(torch.int32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def mean_over_ranks(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Average per-process batch means: each process holds an equal share of the global batch."""
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        return values
    stacked = torch.stack([v.float() for v in values.values()])
    dist.all_reduce(stacked)
    return dict(zip(values, stacked / world_size))


def local_part(x: Tensor) -> Tensor:
    """This process's contiguous share of a global batch."""
    rank, world_size = rank_and_world_size()
    return torch.tensor_split(x, world_size)[rank] if world_size > 1 else x

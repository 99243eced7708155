"""Using a trained model: samples, per-image scores, features and reconstructions (the public API behind
`elbox sample`, `score` (with its CSV), `encode` and `reconstruct`). Everything runs without autograd."""

from __future__ import annotations

import csv
import inspect
import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from elbox.atomic import atomic_write_bytes
from elbox.data import DataSpace, get_data_space
from elbox.data.formats import read_images, to_8bit_tensor
from elbox.data.inputs import as_examples
from elbox.data.user import open_source
from elbox.errors import ElboxError
from elbox.evaluation import score_per_example
from elbox.models.base import Encoder, LatentVariableModel, Reconstructs


def sample_options(model: LatentVariableModel, temperature: float | list[float] = 1.0, draw: bool = False,
                   steps: int | None = None) -> dict:
    """The keyword arguments of model.sample() for these options; ElboxError for one the model does not take."""
    options: dict[str, Any] = {}
    if draw:
        options["mean"] = False
    if temperature not in (1.0, [1.0]):
        options["temperature"] = temperature[0] if isinstance(temperature, list) and len(temperature) == 1 else temperature
    if steps is not None:
        options["steps"] = steps
    accepted = inspect.signature(model.sample).parameters
    names = {"mean": "--draw", "temperature": "--temperature", "steps": "--steps"}
    unsupported = [names[name] for name in options if name not in accepted]
    if unsupported:
        raise ElboxError(f"the {model.name} model's samples take no {' or '.join(unsupported)} option")
    return options


@torch.no_grad()
def sample(model: LatentVariableModel, n: int = 64, *, temperature: float | list[float] = 1.0, draw: bool = False,
           steps: int | None = None, seed: int = 0) -> Tensor:
    """n samples [n, C, H, W] in [0, 1], on the CPU: means of p(x|z) (draw=True: draws from it). temperature
    scales the prior's standard deviation (one value, or one per level); steps: diffusion sampling steps."""
    options = sample_options(model, temperature, draw, steps)
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(seed)
        return model.sample(n, **options).clamp(0, 1).cpu()


def user_images(model: LatentVariableModel, data: Any, seed: int, space: DataSpace | None = None) -> tuple[Tensor, list[str]]:
    """A user's 8-bit images (a .npy/.npz file or a folder of images, or an array or tensor), or for a model of real
    vectors a user's vectors (an array or table file, or an array), checked against the model's data shape and put
    in its data space (the run's: space_from_record; by default the model's): (x, a name per example)."""
    space = space or get_data_space(model.data_space)
    if space.name == "real":
        vectors = as_examples(open_source(data) if isinstance(data, (str, os.PathLike)) else data, f"input {data}"
                              if isinstance(data, (str, os.PathLike)) else "input array")
        if tuple(vectors.shape[1:]) != tuple(model.config.data_shape):
            raise ElboxError(f"the input has vectors of {vectors.shape[1]} values; the model takes {model.config.data_shape[0]}")
        return space.eval_data(vectors.to(model.device)), [str(i) for i in range(vectors.shape[0])]
    if isinstance(data, (str, os.PathLike)):
        array, names = read_images(data)
        what = f"input {data}"
    else:
        array = data.detach().cpu().numpy() if isinstance(data, Tensor) else np.asarray(data)
        names, what = [str(i) for i in range(len(array))] if array.ndim else [], "input array"
    images = to_8bit_tensor(array, tuple(model.config.data_shape), what)
    return space.eval_data(images.to(model.device), seed=seed), names


@torch.no_grad()
def score(model: LatentVariableModel, data: Any, *, iw_samples: int = 1000, elbo_samples: int = 8, batch_size: int = 500,
          seed: int = 0, progress: bool = False, space: DataSpace | None = None) -> tuple[Tensor, list[str], str]:
    """Per-example log-likelihood estimates (nats, float64 [N]; of the 8-bit images, or of vectors in their original
    units), their names, and which estimate it is: the exact log p(x) where the model has it, else IWAE-K, else the
    ELBO. space: the run's data space (needed for real vectors)."""
    space = space or get_data_space(model.data_space)
    x, names = user_images(model, data, seed, space)
    offset = space.log_prob_offset(math.prod(x.shape[1:]))
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(seed)
        values, estimate = score_per_example(model, x, offset, iw_samples, batch_size, elbo_samples, progress=progress)
    return values, names, estimate


@torch.no_grad()
def encode(model: LatentVariableModel, data: Any, *, batch_size: int = 500, seed: int = 0,
           space: DataSpace | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """Posterior means ("mean" [N, d]) and, where the model has them, variances ("variance") of the images."""
    if not isinstance(model, Encoder):
        raise ElboxError(f"the {model.name} model has no encoder")
    x, names = user_images(model, data, seed, space)
    parts: dict[str, list[Tensor]] = {}
    for s in range(0, x.shape[0], batch_size):
        mean, variance = model.encode_moments(x[s : s + batch_size])
        parts.setdefault("mean", []).append(mean.cpu())
        if variance is not None:
            parts.setdefault("variance", []).append(variance.cpu())
    return {k: torch.cat(v).numpy() for k, v in parts.items()}, names


@torch.no_grad()
def reconstruction_grid(model: LatentVariableModel, x: Tensor, nrow: int = 8) -> Tensor:
    """Rows alternate: nrow images of x, then their reconstructions (means of p(x | E[z|x]))."""
    if not isinstance(model, Reconstructs):
        raise ElboxError(f"the {model.name} model has no reconstructions (no encoder to map an image to a latent)")
    recon = model.reconstruct(x)
    return torch.cat([t for i in range(0, x.shape[0], nrow) for t in (x[i : i + nrow], recon[i : i + nrow])]).cpu()


def save_features(path: str | Path, features: dict[str, np.ndarray], names: list[str]) -> None:
    """features and names as an .npz, written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, names=np.array(names), **features)
    atomic_write_bytes(path, buffer.getvalue())


def write_scores_csv(path: str | Path, names: list[str], log_likelihood: Tensor, num_dims: int, estimate: str) -> None:
    """One row per image: name, log-likelihood estimate (nats), bits/dim, the estimate used. Atomic write."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["index", "name", "log_likelihood_nats", "bits_per_dim", "estimate"])
    bits = num_dims * math.log(2)
    for i, (name, value) in enumerate(zip(names, log_likelihood.tolist())):
        writer.writerow([i, name, f"{value:.6f}", f"{-value / bits:.6f}", estimate])
    atomic_write_bytes(path, buffer.getvalue().encode())

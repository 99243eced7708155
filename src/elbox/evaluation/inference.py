"""Using a trained model: samples, per-image scores, features and reconstructions (the public API behind
`elbox sample`, `score` (with its CSV), `encode` and `reconstruct`). Everything runs without autograd.

Scores belong to the example alone: each example's randomness (its binarization or dequantization, its importance
samples or ELBO draws) comes from a generator seeded with a hash of its own bytes and the user's seed
(`example_seed`), so an image scores the same alone or among others, at any position, in any batch size, from any
file format, on every call. A binary (Bernoulli) model cannot score a grey image as such: it scores the mean over
BINARIZATIONS Bernoulli binarizations of it, x_d ~ Bernoulli(k_d/255) (the dynamic binarization it was trained on,
Salakhutdinov & Murray 2008), with the standard error of that mean.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import inspect
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from elbox.core.command_options import BINARIZATIONS, EncodeOptions, SampleOptions, ScoreOptions
from elbox.core.errors import ElboxError
from elbox.core.limits import check_count_option, check_temperature
from elbox.data import DataSpace
from elbox.data.formats import to_8bit_tensor
from elbox.data.inputs import as_examples
from elbox.data.preprocessing import input_space, open_input
from elbox.data.user import read_images
from elbox.data.user_tables import TABLE_SUFFIXES, Table
from elbox.io.atomic import SAMPLES_FIRST_COLUMN, SCORES_HEADER, WRITTEN_BY, atomic_write_bytes
from elbox.models.base import Encoder, ExactLikelihood, LatentVariableModel, Reconstructs
from elbox.models.estimates import score_per_example

STDERR_COLUMN = SCORES_HEADER[3]  # "log_likelihood_stderr_nats"


def sample_options(
    model: LatentVariableModel,
    temperature: float | Sequence[float] = SampleOptions.temperature,
    draw: bool = SampleOptions.draw,
    steps: int | None = SampleOptions.steps,
) -> dict:
    """The keyword arguments of model.sample() for these options; ElboxError for one the model does not take."""
    options: dict[str, Any] = {}
    if draw:
        options["mean"] = False
    temperatures = list(temperature) if isinstance(temperature, (list, tuple)) else [temperature]
    if temperatures != [1.0]:
        options["temperature"] = temperatures[0] if len(temperatures) == 1 else temperatures
    if steps is not None:
        options["steps"] = steps
    accepted = inspect.signature(model.sample).parameters
    names = {"mean": "--draw", "temperature": "--temperature", "steps": "--steps"}
    unsupported = [names[name] for name in options if name not in accepted]
    if unsupported:
        raise ElboxError(f"the {model.name} model's samples take no {' or '.join(unsupported)} option")
    return options


@torch.no_grad()
def sample(
    model: Any,
    n: int = SampleOptions.n,
    *,
    temperature: float | Sequence[float] = SampleOptions.temperature,
    draw: bool = SampleOptions.draw,
    steps: int | None = SampleOptions.steps,
    seed: int = SampleOptions.seed,
    progress: bool = False,
) -> Tensor:
    """n samples [n, C, H, W] in [0, 1], on the CPU, not requiring gradients: means of p(x|z) (draw=True: draws
    from it); for a model of real vectors, [n, D] in the data's original units. model: a model, a Run or a run
    directory. temperature scales the prior's standard deviation (one value,
    or one per level); steps: diffusion sampling steps; progress: a bar over the sampling steps of models that take
    several (diffusion)."""
    from elbox.core.progress import sample_with_progress

    model = as_model(model)
    n, seed = check_count_option(n, "n"), check_count_option(seed, "seed")
    temperature = check_temperature(temperature)
    steps = None if steps is None else check_count_option(steps, "steps")
    options = sample_options(model, temperature, draw, steps)
    space = input_space(model)  # before sampling: a model of vectors needs its standardization
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(seed)
        samples = sample_with_progress(model, n, progress, **options).detach().cpu()
    return space.unstandardize(samples.double()) if space.name == "real" else samples.clamp(0, 1)


def as_model(model: Any) -> LatentVariableModel:
    """A model given as itself, as a Run (its model) or as a run directory (loaded, on the CPU)."""
    from elbox.io.checkpoint import load_run
    from elbox.training.workflows import Run

    if isinstance(model, (str, os.PathLike)):
        return load_run(model)[0]
    model = model.model if isinstance(model, Run) else model
    if not isinstance(model, LatentVariableModel):
        raise ElboxError(
            f"give a model, a Run or a run directory (elbox.load(run_dir) loads one), got {type(model).__name__}"
        )
    return model


def example_seed(example: Tensor, seed: int) -> int:
    """The seed of one example's randomness: 63 bits of the BLAKE2b hash of the user's seed and the example's bytes
    (uint8 pixels [C, H, W], or float32 values), so that its draws belong to it alone."""
    data = example.detach().cpu().contiguous().numpy().tobytes()
    digest = hashlib.blake2b(int(seed).to_bytes(8, "little", signed=True) + data, digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def user_examples(
    model: LatentVariableModel, data: Any, space: DataSpace, id_column: str | None = None
) -> tuple[Tensor, list[str]]:
    """A user's examples as given, read as the model's run read its data (model.preprocessing: a folder's image size,
    a table's columns by name), checked against the model, and a name for each: 8-bit images uint8 [N, *data_shape]
    (a .npy/.npz file, a folder of images, one image file, or an array, tensor or Dataset; see
    formats.to_8bit_tensor), or for a model of real vectors [N, D] (an array or table file, or an array; a table's
    id_column names its rows)."""
    is_path = isinstance(data, (str, os.PathLike))
    what = f"input {data}" if is_path else "input " + ("Dataset" if isinstance(data, Dataset) else "array")
    if id_column is not None and not is_path:
        raise ElboxError(f"{what}: an ID column names the rows of a table file; give the table's path")
    preprocessing = model.preprocessing
    if space.name == "real":
        source = open_input(model, data, id_column) if is_path else data
        vectors = as_examples(source, what)
        if tuple(vectors.shape[1:]) != tuple(model.config.data_shape):
            raise ElboxError(
                f"{what} has examples of shape {tuple(vectors.shape[1:])}; the model takes vectors of "
                f"{model.config.data_shape[0]} values"
            )
        names = (source.row_names if isinstance(source, Table) else None) or [str(i) for i in range(vectors.shape[0])]
        return vectors, names
    names: list[str] = []
    if is_path:
        if str(data).lower().endswith(TABLE_SUFFIXES):
            raise ElboxError(f"{what} is a table; the {model.name} model takes 8-bit images")
        array, names = read_images(data, preprocessing.image_size if preprocessing is not None else None)
    elif isinstance(data, Tensor):
        array = data.detach().cpu().numpy()
    else:
        array = as_examples(data, what).numpy() if isinstance(data, Dataset) else np.asarray(data)
    images = to_8bit_tensor(array, tuple(model.config.data_shape), what)
    return images, names or [str(i) for i in range(images.shape[0])]


def model_inputs(
    examples: Tensor, space: DataSpace, seed: int, binarizations: int
) -> tuple[Tensor, list[int], list[int]]:
    """The examples in the data space, each transformed with its own randomness (example_seed), on the CPU:
    (rows, rows per example, seeds). A grey image (a pixel other than 0 and 255) in the binary space gives
    `binarizations` rows, its binarizations; every other example one row (binary images binarize to themselves)."""
    seeds = [example_seed(e, seed) for e in examples]
    grey = ((examples != 0) & (examples != 255)).flatten(1).any(1).tolist() if space.name == "binary" else []
    counts = [binarizations if g else 1 for g in grey] or [1] * len(seeds)
    rows = [
        space.eval_data(examples[i : i + 1].expand(n, *examples.shape[1:]), seed=s)
        for i, (n, s) in enumerate(zip(counts, seeds))
    ]
    return torch.cat(rows), counts, seeds


def check_options(batch_size: Any, seed: Any, binarizations: Any, iw_samples: Any = 1, elbo_samples: Any = 1) -> None:
    for value, name in (
        (batch_size, "batch_size"),
        (seed, "seed"),
        (binarizations, "binarizations"),
        (iw_samples, "iw_samples"),
        (elbo_samples, "elbo_samples"),
    ):
        check_count_option(value, name)


def estimate_text(method: str, space: DataSpace, seed: int, counts: list[int], binarizations: int) -> str:
    """How scores were computed, in words: the method, what was drawn and how it was seeded, how a binary model
    treated grey images, and the dequantization correction."""
    grey = sum(n > 1 for n in counts)
    drawn = [] if method == "exact log p(x)" else ["importance samples" if method.startswith("IWAE") else "ELBO draws"]
    drawn += {"binary": ["binarization"] if grey else [], "continuous": ["dequantization"]}.get(space.name, [])
    unit = "vector from its values" if space.name == "real" else "image from its pixels"
    parts = [method] + ([f"{' and '.join(drawn)} seeded per {unit} and seed {seed}"] if drawn else [])
    if grey:
        parts.append(
            f"binary model: grey images scored by the mean over {binarizations} binarizations (s.e. in "
            f"column {STDERR_COLUMN})" + (", binary images as given" if grey < len(counts) else "")
        )
    if space.name == "continuous":
        parts.append("dequantized images, -D ln 256 included")
    return "; ".join(parts)


@torch.no_grad()
def score_with_stderr(
    model: Any,
    data: Any,
    *,
    iw_samples: int = ScoreOptions.iw_samples,
    elbo_samples: int = ScoreOptions.elbo_samples,
    batch_size: int = ScoreOptions.batch_size,
    seed: int = ScoreOptions.seed,
    progress: bool = False,
    space: DataSpace | None = None,
    binarizations: int = BINARIZATIONS,
    id_column: str | None = None,
) -> tuple[Tensor, Tensor, list[str], str]:
    """score(), with the standard error of each value [N] float64 (over a grey image's binarizations; NaN where a
    value is one estimate): (values, standard errors, names, estimate)."""
    model = as_model(model)
    check_options(batch_size, seed, binarizations, iw_samples, elbo_samples)
    space = input_space(model, space)
    examples, names = user_examples(model, data, space, id_column)
    x, counts, seeds = model_inputs(examples, space, seed, binarizations)
    offset = space.log_prob_offset(math.prod(x.shape[1:]))
    if isinstance(
        model, ExactLikelihood
    ):  # float64, so that no float32 rounding of a batch's products shows in a score
        model, x = copy.deepcopy(model).double(), x.double()
    values, stderr, method = score_per_example(
        model, x.to(model.device), counts, seeds, offset, iw_samples, batch_size, elbo_samples, progress
    )
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        raise ElboxError(
            f"the {model.name} model gives a non-finite log-likelihood for {len(bad)} of {len(names)} "
            f"examples (the first: {names[bad[0]]}); its weights or the input are out of range"
        )
    return values, stderr, names, estimate_text(method, space, seed, counts, binarizations)


def score(
    model: Any,
    data: Any,
    *,
    iw_samples: int = ScoreOptions.iw_samples,
    elbo_samples: int = ScoreOptions.elbo_samples,
    batch_size: int = ScoreOptions.batch_size,
    seed: int = ScoreOptions.seed,
    progress: bool = False,
    space: DataSpace | None = None,
    binarizations: int = BINARIZATIONS,
    id_column: str | None = None,
) -> tuple[Tensor, list[str], str]:
    """Per-example log-likelihood estimates (nats, float64 [N]; of the 8-bit images, or of vectors in their original
    units), their names, and how they were computed (the `estimate` text): the exact log p(x) where the model has
    it, else IWAE-K, else the ELBO. Each example's randomness is its own (see the module's docstring); a binary model
    scores a grey image by the mean over `binarizations` binarizations (score_with_stderr adds standard errors).
    data: a path (.npy/.npz, a folder of images, one image file; a table for vectors), or an array, tensor or
    Dataset. model: a model, a Run or a run directory; it reads the input as its run read its data (standardization,
    table columns by name, image size). space: another data space to read it in. id_column: a table's column whose
    values name the rows."""
    values, _, names, estimate = score_with_stderr(
        model,
        data,
        iw_samples=iw_samples,
        elbo_samples=elbo_samples,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        space=space,
        binarizations=binarizations,
        id_column=id_column,
    )
    return values, names, estimate


@torch.no_grad()
def encode(
    model: Any,
    data: Any,
    *,
    batch_size: int = EncodeOptions.batch_size,
    seed: int = EncodeOptions.seed,
    space: DataSpace | None = None,
    binarizations: int = BINARIZATIONS,
    id_column: str | None = None,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Posterior means ("mean" [N, d]) and, where the model has them, variances ("variance") of the examples (data
    as for score), as NumPy arrays, and their names. A binary model encodes a grey image by the mixture
    (1/M) sum_m q(z|b_m) over its M = `binarizations` binarizations b_m: the mean of their means, and the mean of
    their variances plus the variance of their means. model: a model, a Run or a run directory, as for score."""
    model = as_model(model)
    if not isinstance(model, Encoder):
        raise ElboxError(f"the {model.name} model has no encoder")
    check_options(batch_size, seed, binarizations)
    space = input_space(model, space)
    examples, names = user_examples(model, data, space, id_column)
    x, counts, _ = model_inputs(examples, space, seed, binarizations)
    parts: dict[str, list[Tensor]] = {}
    for s in range(0, x.shape[0], batch_size):
        mean, variance = model.encode_moments(x[s : s + batch_size].to(model.device))
        parts.setdefault("mean", []).append(mean.detach().double().cpu())
        if variance is not None:
            parts.setdefault("variance", []).append(variance.detach().double().cpu())
    means = torch.cat(parts["mean"]).split(counts)
    features = {"mean": torch.stack([m.mean(0) for m in means])}
    if "variance" in parts:
        variances = torch.cat(parts["variance"]).split(counts)
        features["variance"] = torch.stack([v.mean(0) + m.var(0, unbiased=False) for m, v in zip(means, variances)])
    return {k: v.float().numpy() for k, v in features.items()}, names


@torch.no_grad()
def reconstruction_grid(model: LatentVariableModel, x: Tensor, nrow: int = 8) -> Tensor:
    """Rows alternate: nrow images of x, then their reconstructions (means of p(x | E[z|x]))."""
    if not isinstance(model, Reconstructs):
        raise ElboxError(f"the {model.name} model has no reconstructions (no encoder to map an image to a latent)")
    recon = model.reconstruct(x)
    return torch.cat([t for i in range(0, x.shape[0], nrow) for t in (x[i : i + nrow], recon[i : i + nrow])]).cpu()


def write_samples_csv(path: str | Path, samples: Tensor, columns: Sequence[str] | None) -> None:
    """Samples of vectors [n, D] as CSV, one row each, under the columns' names (x0, x1, ... without them). Atomic."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([SAMPLES_FIRST_COLUMN, *(columns or [f"x{j}" for j in range(samples.shape[1])])])
    writer.writerows([i, *(repr(v) for v in row)] for i, row in enumerate(samples.tolist()))
    atomic_write_bytes(path, buffer.getvalue().encode())


def save_features(path: str | Path, features: dict[str, np.ndarray], names: list[str]) -> None:
    """features and names as an .npz, written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, names=np.array(names), written_by=np.array(WRITTEN_BY), **features)
    atomic_write_bytes(path, buffer.getvalue())


def write_scores_csv(
    path: str | Path,
    names: list[str],
    log_likelihood: Tensor,
    num_dims: int | None,
    estimate: str,
    stderr: Tensor | None = None,
    extra: dict[str, Tensor] | None = None,
) -> None:
    """One row per example: name, log-likelihood estimate (nats), its standard error where there is one (a grey
    image's binarizations; else empty), bits/dim (of 8-bit data; empty for real vectors: num_dims None), how the
    estimate was computed, then the `extra` columns (anomaly scores and their p-values). Atomic write."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    extra = extra or {}
    writer.writerow([*SCORES_HEADER, *extra])
    bits = num_dims * math.log(2) if num_dims else None
    errors = stderr.tolist() if stderr is not None else [math.nan] * len(names)
    columns = [column.tolist() for column in extra.values()]
    for i, (name, value, error) in enumerate(zip(names, log_likelihood.tolist(), errors)):
        writer.writerow(
            [
                i,
                name,
                f"{value:.6f}",
                "" if math.isnan(error) else f"{error:.6f}",
                "" if bits is None else f"{-value / bits:.6f}",
                estimate,
                *(f"{c[i]:.6g}" for c in columns),
            ]
        )
    atomic_write_bytes(path, buffer.getvalue().encode())

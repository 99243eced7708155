"""Feeding a model: data spaces turn data into model inputs, `iterate_batches` makes the batches.

Data spaces turn uint8 images into the float32 values in [0, 1] a model sees:
  "binary"      dynamic binarization, x ~ Bernoulli(k/255)
  "continuous"  uniform dequantization, y = (k + u)/256, u ~ U[0, 1)
  "discrete"    x = k/255, no randomness
and real-valued vectors [N, D] into standardized ones:
  "real"        y = (x - mean) / std per dimension, mean and std fitted on the training data (fit_real_space)

Which space a model takes follows from its image space and its data_shape (`model_data_space`: vectors, a 1-D
data_shape (D,), go to "real"). A run records its space in config.json's "data" record (`space_record`):
    {"space": "binary"}                                              the image spaces have no parameters
    {"space": "real", "scaling": {"mean": [m_1, ...], "std": [s_1, ...]}}   D floats each, original units
and `space_from_record(config["data"])` rebuilds it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from elbox.core.errors import ElboxError
from elbox.core.options import short_repr

# ---------------------------------------------------------------------------
# Data spaces


class DataSpace:
    """How data become the float32 values a model sees: uint8 images [B, C, H, W] become values in [0, 1] (the
    image spaces), float vectors [B, D] standardized ones ('real')."""

    name: str = ""

    def train_batch(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        part: tuple[int, int] | None = None,
        perturb: float = 0.0,
    ) -> torch.Tensor:
        """Transform a training batch; random spaces draw fresh randomness each call. part = (start, rows): x is
        rows start, start + 1, ... of a global batch of `rows` rows (one process's share under torchrun); the
        randomness is drawn for the global batch and sliced, so each share gets what one process would draw.
        perturb: the rate of perturbed_images, applied first (0: none)."""
        x = self._check(x)
        return self._transform(perturbed_images(x, perturb, generator, part) if perturb else x, generator, part)

    def eval_data(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Transform evaluation data deterministically: same seed -> identical tensor."""
        x = self._check(x)
        generator = torch.Generator(device=x.device).manual_seed(seed)
        return self._transform(x, generator, None)

    def log_prob_offset(self, num_dims: int) -> float:
        """Nats to add to a model's log-density to get a log-probability (or density) of the data as given."""
        return 0.0

    def to_record(self) -> dict:
        """The parameters that rebuild this space with from_record (JSON-ready); none for the image spaces."""
        return {}

    @classmethod
    def from_record(cls, record: dict) -> DataSpace:
        """The space from its parameters (to_record's dict)."""
        if record:
            raise ElboxError(f"data space {cls.name!r} takes no parameters, got {', '.join(map(str, record))[:100]}")
        return cls()

    def _transform(
        self, x: torch.Tensor, generator: torch.Generator | None, part: tuple[int, int] | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise ElboxError(f"data space {self.name!r} expects a uint8 tensor of 8-bit images, got {got}")
        return x


def _noise(draw, x: torch.Tensor, part: tuple[int, int] | None) -> torch.Tensor:
    """draw(shape) for x's shape, or for the global batch that x is rows part[0].. of (then sliced)."""
    if part is None:
        return draw(x.shape)
    start, rows = part
    return draw((rows, *x.shape[1:]))[start : start + x.shape[0]]


def perturbed_images(
    x: torch.Tensor, rate: float, generator: torch.Generator | None, part: tuple[int, int] | None
) -> torch.Tensor:
    """Ren et al. (2019)'s perturbation, which trains a background model: each 8-bit value of x (uint8) replaced, with
    probability `rate`, by a value drawn uniformly from 0..255."""
    replace = _noise(lambda shape: torch.rand(shape, generator=generator, device=x.device), x, part) < rate
    values = _noise(
        lambda shape: torch.randint(0, 256, shape, generator=generator, device=x.device, dtype=torch.uint8), x, part
    )
    return torch.where(replace, values, x)


DATA_SPACES: dict[str, type[DataSpace]] = {}


def _register(cls: type[DataSpace]) -> type[DataSpace]:
    DATA_SPACES[cls.name] = cls
    return cls


@_register
class BinarySpace(DataSpace):
    """Dynamic binarization: x ~ Bernoulli(k/255), a fresh draw per training batch."""

    name = "binary"

    def _transform(self, x, generator, part):
        # u uniform on {0..254}: P(u < k) = k/255 exactly, and integer draws are twice as fast as bernoulli()
        u = _noise(
            lambda shape: torch.randint(0, 255, shape, generator=generator, device=x.device, dtype=torch.uint8), x, part
        )
        return (u < x).float()


def _dequantize(k: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(k + u)/256, kept strictly below (k + 1)/256 despite float32 rounding of k + u."""
    v = torch.minimum(k + u, torch.nextafter(k + 1, k))
    return v / 256  # exact: division by a power of two


@_register
class ContinuousSpace(DataSpace):
    """Uniform dequantization: y = (k + u)/256 with u ~ U[0, 1)."""

    name = "continuous"

    def _transform(self, x, generator, part):
        u = _noise(lambda shape: torch.rand(shape, generator=generator, device=x.device), x, part)
        return _dequantize(x.float(), u)

    def log_prob_offset(self, num_dims: int) -> float:
        # Each bin has width 1/256: log P(k) = log E_u p(y) - D ln 256 >= E_u log p(y) - D ln 256 (Jensen).
        return -num_dims * math.log(256)


@_register
class DiscreteSpace(DataSpace):
    """8-bit data as is: x = k/255, no randomness."""

    name = "discrete"

    def _transform(self, x, generator, part):
        return x.float() / 255


@_register
class RealSpace(DataSpace):
    """Real-valued vectors [B, D], standardized per dimension: y = (x - mean) / std, no randomness.

    mean and std [D] (float64) are fitted on the training data (fit_real_space) and stored with the run. A model's
    density p_y of the standardized data is a density of the original data by the change of variables
        log p_x(x) = log p_y(y) - sum_d log std_d,
    so log_prob_offset = -sum_d log std_d, and every log p(x), bound and score reported is in the original units.
    Inputs are float tensors [B, D] of finite values; the model sees float32.
    """

    name = "real"

    def __init__(self, mean: Sequence[float] | Tensor | None = None, std: Sequence[float] | Tensor | None = None):
        if mean is None or std is None:
            given = [name for name, value in (("mean", mean), ("std", std)) if value is not None]
            raise ElboxError(_real_scaling_needed(", ".join(given) or "nothing"))
        self.mean = _scaling_vector(mean, "mean")
        self.std = _scaling_vector(std, "std")
        if self.mean.shape != self.std.shape:
            raise ElboxError(f"the 'real' space's mean has {self.mean.numel()} values and its std {self.std.numel()}")
        bad = (self.std <= 0).nonzero().flatten().tolist()
        if bad:
            raise ElboxError(
                f"the 'real' space's std must be > 0; it is {self.std[bad[0]].item():g} in column {bad[0]}"
            )

    @property
    def num_dims(self) -> int:
        return self.mean.numel()

    def _check(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise ElboxError(f"data space 'real' expects a float tensor of vectors [N, {self.num_dims}], got {got}")
        if x.dim() != 2 or x.shape[1] != self.num_dims:
            raise ElboxError(f"data space 'real' expects vectors [N, {self.num_dims}], got shape {tuple(x.shape)}")
        check_finite(x)
        return x

    def _transform(self, x, generator, part):
        return ((x.double() - self.mean.to(x.device)) / self.std.to(x.device)).float()

    def log_prob_offset(self, num_dims: int) -> float:
        # the log-determinant of the inverse scaling x = mean + std * y
        if num_dims != self.num_dims:
            raise ElboxError(f"the 'real' space scales {self.num_dims} dimensions, not {num_dims}")
        return -self.std.log().sum().item()

    def unstandardize(self, y: Tensor) -> Tensor:
        """Model values y [N, D] (samples, reconstructions) back in the original units, in y's dtype."""
        return (y.double() * self.std.to(y.device) + self.mean.to(y.device)).to(y.dtype)

    def to_record(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_record(cls, record: dict) -> RealSpace:
        if not isinstance(record, dict) or set(record) != {"mean", "std"}:
            keys = ", ".join(map(str, record))[:100] if isinstance(record, dict) else type(record).__name__
            raise ElboxError(_real_scaling_needed(keys or "nothing"))
        return cls(record["mean"], record["std"])


def _real_scaling_needed(got: str) -> str:
    return (
        "the 'real' data space standardizes with a mean and std fitted to the training data, "
        f'{{"mean": [...], "std": [...]}} (got {got}): build it with fit_real_space(batches), or a run\'s '
        "with space_from_record(config['data'])"
    )


def _scaling_vector(values: Any, what: str) -> Tensor:
    """A non-empty, finite float64 vector [D] from a list or a tensor (the 'real' space's mean or std)."""
    if isinstance(values, (list, tuple)) and any(isinstance(v, bool) for v in values):
        raise ElboxError(f"the 'real' space's {what} must be a list of numbers, got {short_repr(values)}")
    try:
        vector = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise ElboxError(f"the 'real' space's {what} must be a list of numbers, got {short_repr(values)}") from None
    if vector.dim() != 1 or vector.numel() == 0:
        raise ElboxError(
            f"the 'real' space's {what} must be a non-empty list of numbers, got shape {tuple(vector.shape)}"
        )
    bad = (~torch.isfinite(vector)).nonzero().flatten().tolist()
    if bad:
        raise ElboxError(f"the 'real' space's {what} is {vector[bad[0]].item()} in column {bad[0]}; it must be finite")
    return vector.clone()


def check_finite(x: Tensor, first_row: int = 0) -> None:
    """ElboxError naming the row (counted from first_row) and column of the first NaN or infinite value of x [N, D]."""
    if torch.isfinite(x.sum()):  # one cheap reduction on the happy path
        return
    bad = (~torch.isfinite(x)).nonzero()
    if bad.numel():
        row, column = bad[0].tolist()
        raise ElboxError(
            f"the data have a non-finite value ({x[row, column].item()}) in row {first_row + row}, column {column}"
        )


def fit_real_space(batches: Iterable[Tensor | np.ndarray]) -> RealSpace:
    """The 'real' space of data given as batches of vectors [B, D]: mean and std (1/N, the maximum-likelihood
    std) per column in one streaming float64 pass (batch statistics merged by Chan et al.'s update), so the data
    need not fit in memory. ElboxError for no data or one example, a non-float batch, a shape that changes, a NaN
    or infinite value (naming its row and column) and a constant column (naming it)."""
    n, mean, m2, low, high = 0, None, None, None, None
    for batch in batches:
        x = _float_batch(batch, mean)
        check_finite(x, n)
        x = x.detach().to(torch.float64)
        b = x.shape[0]
        if b == 0:
            continue
        batch_mean = x.mean(0)
        batch_m2 = (x - batch_mean).square().sum(0)
        if mean is None:
            mean, m2, low, high = batch_mean, batch_m2, x.amin(0), x.amax(0)
        else:
            delta = batch_mean - mean
            mean = mean + delta * (b / (n + b))
            m2 = m2 + batch_m2 + delta.square() * (n * b / (n + b))
            low, high = torch.minimum(low, x.amin(0)), torch.maximum(high, x.amax(0))
        n += b
    if n < 2:
        raise ElboxError(f"cannot standardize vectors from {n} example(s): need at least 2")
    constant = (low == high).nonzero().flatten().tolist()
    if constant:
        columns = ", ".join(map(str, constant[:10])) + (", ..." if len(constant) > 10 else "")
        raise ElboxError(
            f"column(s) {columns} of the data are constant (value {low[constant[0]].item():g} in column "
            f"{constant[0]}); a constant column has no density: drop it"
        )
    return RealSpace(mean, (m2 / n).sqrt())


def _float_batch(batch: Any, mean: Tensor | None) -> Tensor:
    """A batch of fit_real_space as a float tensor [B, D], D the same as the batches before (mean's length)."""
    x = torch.from_numpy(batch) if isinstance(batch, np.ndarray) else batch
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise ElboxError(f"fit_real_space needs batches of float vectors [B, D], got {got}")
    if x.dim() != 2 or (mean is not None and x.shape[1] != mean.numel()):
        want = f"[B, {mean.numel()}]" if mean is not None else "[B, D]"
        raise ElboxError(f"fit_real_space needs batches of vectors {want}, got shape {tuple(x.shape)}")
    return x


def get_data_space(name: str, **params: Any) -> DataSpace:
    """A data space by name; params are the space's own ('real': mean and std, see RealSpace)."""
    if name not in DATA_SPACES:
        raise ElboxError(f"unknown data space {str(name)[:40]!r}; valid data spaces: {', '.join(DATA_SPACES)}")
    return DATA_SPACES[name].from_record(params)


def space_record(space: DataSpace) -> dict:
    """The entries of a run's config.json "data" record that rebuild its space: {"space": name} and, for a space with
    parameters ('real'), "scaling": its parameters (see the module docstring)."""
    scaling = space.to_record()
    return {"space": space.name, **({"scaling": scaling} if scaling else {})}


def space_from_record(data_record: dict) -> DataSpace:
    """The data space of a run from its config.json "data" record (space_record's entries)."""
    if not isinstance(data_record, dict) or not isinstance(data_record.get("space"), str):
        raise ElboxError('the run\'s data record names no data space (config.json: "data": {"space": ...})')
    scaling = data_record.get("scaling", {})
    if not isinstance(scaling, dict):
        raise ElboxError(f"the run's data scaling must be a JSON object, got {type(scaling).__name__}")
    return get_data_space(data_record["space"], **scaling)


def model_data_space(image_space: str, data_shape: Sequence[int], what: str) -> str:
    """The data space of a model whose images come from image_space, for examples of data_shape.

    The one rule for vectors: a 1-D data_shape (D,) holds real numbers, which a model with a continuous density
    (image space "continuous") takes standardized, in the "real" space; other models cannot take them (ElboxError
    naming `what`, e.g. "the bernoulli likelihood"). Images keep image_space."""
    if len(data_shape) != 1:
        return image_space
    if image_space == "continuous":
        return "real"
    raise ElboxError(
        f"{what} models 8-bit images (the {image_space!r} space), not vectors of real numbers "
        f"(data_shape {tuple(data_shape)}); vectors go to {VECTOR_MODELS}"
    )


# where model_data_space and image-only models send vectors, in words
VECTOR_MODELS = (
    "the gaussian, mixture and linear models and the mlp vae with the gaussian or gaussian-learned likelihood"
)


# ---------------------------------------------------------------------------
# Batching


def iterate_batches(
    n: int,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Index tensors covering range(n) in batches; gather with x[idx].

    Arguments are checked at call time, not at the first next().
    """
    if batch_size <= 0:
        raise ElboxError(f"batch size must be positive, got {batch_size}")
    if n <= 0:
        raise ElboxError(f"empty dataset: cannot make batches from {n} examples")
    if drop_last and n < batch_size:
        raise ElboxError(f"no full batch: {n} examples is fewer than batch size {batch_size} with drop_last")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    end = n - n % batch_size if drop_last else n
    return (order[i : i + batch_size] for i in range(0, end, batch_size))

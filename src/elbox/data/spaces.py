"""Feeding a model: data spaces turn uint8 images into model inputs, `iterate_batches` makes the batches.

Data spaces turn uint8 images into the float32 values in [0, 1] a model sees:
  "binary"      dynamic binarization, x ~ Bernoulli(k/255)
  "continuous"  uniform dequantization, y = (k + u)/256, u ~ U[0, 1)
  "discrete"    x = k/255, no randomness
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from elbox.errors import ElboxError

# ---------------------------------------------------------------------------
# Data spaces


class DataSpace:
    """How uint8 images [B, C, H, W] become the float32 values in [0, 1] a model sees."""

    name: str = ""

    def train_batch(self, x: torch.Tensor, generator: torch.Generator | None = None,
                    part: tuple[int, int] | None = None) -> torch.Tensor:
        """Transform a training batch; random spaces draw fresh randomness each call. part = (start, rows): x is
        rows start, start + 1, ... of a global batch of `rows` rows (one process's share under torchrun); the
        randomness is drawn for the global batch and sliced, so each share gets what one process would draw."""
        return self._transform(self._check(x), generator, part)

    def eval_data(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Transform evaluation data deterministically: same seed -> identical tensor."""
        x = self._check(x)
        generator = torch.Generator(device=x.device).manual_seed(seed)
        return self._transform(x, generator, None)

    def log_prob_offset(self, num_dims: int) -> float:
        """Nats to add to a model's log-density to get a log-probability of the 8-bit data."""
        return 0.0

    def _transform(self, x: torch.Tensor, generator: torch.Generator | None, part: tuple[int, int] | None) -> torch.Tensor:
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
        u = _noise(lambda shape: torch.randint(0, 255, shape, generator=generator, device=x.device, dtype=torch.uint8), x, part)
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


def get_data_space(name: str) -> DataSpace:
    try:
        return DATA_SPACES[name]()
    except KeyError:
        raise ElboxError(f"unknown data space {name!r}; valid data spaces: {', '.join(DATA_SPACES)}") from None


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

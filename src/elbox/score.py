"""Scoring new data: estimate log p(x) per image and write the scores.

The images come from a user's file or folder, read and checked by elbox.data.formats (`read_images`,
`to_8bit_tensor`; the accepted inputs are listed there), then go through the run's data space exactly
as test images do (binarized or dequantized with the given seed, or k/255).

The estimate per image is the tightest one the model has: the exact log p(x), else IWAE-K, else the ELBO.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import torch

from elbox.atomic import atomic_write_bytes
from elbox.data.formats import NPZ_KEYS, read_images, to_8bit_tensor

# The readers live in elbox.data.formats; importable from here as before.
__all__ = ["NPZ_KEYS", "read_images", "to_8bit_tensor", "write_scores_csv"]


def write_scores_csv(path: str | Path, names: list[str], log_likelihood: torch.Tensor, num_dims: int, estimate: str) -> None:
    """One row per image: name, log-likelihood estimate (nats), bits/dim, the estimate used. Atomic write."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["index", "name", "log_likelihood_nats", "bits_per_dim", "estimate"])
    bits = num_dims * math.log(2)
    for i, (name, value) in enumerate(zip(names, log_likelihood.tolist())):
        writer.writerow([i, name, f"{value:.6f}", f"{-value / bits:.6f}", estimate])
    atomic_write_bytes(path, buffer.getvalue().encode())

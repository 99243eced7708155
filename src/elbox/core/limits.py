"""The ranges of the options of the commands that use a trained model (evaluate, score, encode, sample, reconstruct,
tighten), declared once: the command line's argparse types (elbox.cli) and the Python functions (elbox.evaluate,
elbox.score, ...) check the same bounds with the same words. They fit the machine: a value beyond them would overflow,
allocate until failure or run for days. (No torch here: `elbox --help` imports this.)"""

from __future__ import annotations

import math
import operator
from typing import Any

from elbox.core.errors import ElboxError
from elbox.core.options import MAX_SEED, short_repr

COUNTS: dict[str, tuple[int, int]] = {  # name: (lowest, highest), inclusive
    "n": (1, 10_000),  # images to sample or reconstruct
    "iw_samples": (1, 100_000),  # importance samples K
    "elbo_samples": (1, 10_000),  # Monte Carlo samples of an ELBO
    "batch_size": (1, 10_000),  # examples per pass
    "steps": (1, 100_000),  # sampling or optimization steps
    "threads": (1, 1024),
    "seed": (0, MAX_SEED),
    "limit": (1, 10**9),  # examples to evaluate
    "binarizations": (1, 10_000),  # of a grey image scored by a binary model
    "regret_steps": (1, 100_000),  # of the likelihood regret's per-example refit
    "llr_k": (0, 100),  # levels drawn from the prior in LLR^{>k} (at most the model's levels: checked with the model)
    "bootstrap": (1, 100_000),  # resamples of the detection metrics' standard errors
}
# the anomaly scores (elbox.evaluation.anomaly), named here for the command line's choices
ANOMALY_METHODS = ("likelihood", "complexity", "typicality", "llr", "regret", "background")
# elbox ood's estimates: 16 binarizations of each grey image (for a binary model) and 25 importance samples each. The
# binarizations matter more than the samples: LLR^{>1} of the default HVAE, Fashion-MNIST against digits, 300 images
# each, AUROC 0.805 with 1 binarization and 1000 samples, 0.913 with 4 and 250, 0.924 with 16 and 25, 0.926 with 16
# and 100 (benchmarks/ood.py)
OOD_IW_SAMPLES = 25
OOD_BINARIZATIONS = 16
TEMPERATURE = (0.0, 100.0)  # > lowest and <= highest


def count_range_text(name: str) -> str:
    low, high = COUNTS[name]
    return f"a whole number between {low} and {high}"


def check_count_option(value: Any, name: str) -> int:
    """value as an int in COUNTS[name]; ElboxError "NAME must be a whole number between LOW and HIGH, got VALUE"."""
    low, high = COUNTS[name]
    try:
        count = operator.index(value)
    except TypeError:
        count = None
    if count is None or isinstance(value, bool) or not low <= count <= high:
        raise ElboxError(f"{name} must be {count_range_text(name)}, got {short_repr(value)}")
    return count


def check_temperature(value: Any) -> float | list[float]:
    """A temperature (one number, or a list of numbers: one per level), each > 0 and <= 100 and finite."""
    low, high = TEMPERATURE
    values = value if isinstance(value, (list, tuple)) else [value]
    for t in values:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (low < t <= high) or math.isnan(t):
            raise ElboxError(
                f"temperature must be a number > {low:g} and <= {high:g} (or a list of them), got {short_repr(value)}"
            )
    return [float(t) for t in values] if isinstance(value, (list, tuple)) else float(value)

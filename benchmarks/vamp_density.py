"""The VampPrior's log density, two ways, on one CPU thread: torch.distributions' MixtureSameFamily (what elbox used
before stop 36: a [batch, K, d] table of elementwise work) against elbox.core.bounds.diag_gaussian_mixture_log_prob
(the square expanded; since stop 39 one float64 matrix product with a table computed once). Forward and backward,
K = 500 components of d = 40, a batch of 100: the sizes of the VampPrior rows of benchmarks/reproduce. Also the error
of each against float64.

    python benchmarks/vamp_density.py     # prints, and writes benchmarks/results/vamp-density.json

Time it with nothing else running.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vae import environment  # noqa: E402

from elbox.core.bounds import diag_gaussian_mixture_log_prob  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def torch_distributions(z, means, stds):
    weights = Categorical(logits=torch.zeros(means.shape[0], dtype=means.dtype), validate_args=False)
    components = Independent(Normal(means, stds, validate_args=False), 1, validate_args=False)
    return MixtureSameFamily(weights, components, validate_args=False).log_prob(z)


def milliseconds(density, z, means, log_var, repeats: int = 30) -> float:
    """Median milliseconds of one forward and backward pass."""
    times = []
    for i in range(repeats + 3):
        start = time.perf_counter()
        density(z, means, (log_var / 2).exp()).sum().backward()
        if i >= 3:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    means = torch.randn(500, 40, requires_grad=True)
    log_var = (torch.rand(500, 40) * 8 - 6).requires_grad_()  # the papers' log-variance bounds, [-6, 2]
    z = torch.randn(100, 40, requires_grad=True)
    exact = torch_distributions(z.double(), means.double(), (log_var.double() / 2).exp())
    record = {"environment": environment(torch.device("cpu")), "components": 500, "dims": 40, "batch": 100}
    for name, density in (("torch.distributions", torch_distributions), ("expanded", diag_gaussian_mixture_log_prob)):
        error = (density(z, means, (log_var / 2).exp()).double() - exact).abs().max().item()
        record[name] = {"ms_forward_backward": milliseconds(density, z, means, log_var), "max_error_nats": error}
        print(name, record[name], flush=True)
    record["speedup"] = record["torch.distributions"]["ms_forward_backward"] / record["expanded"]["ms_forward_backward"]
    print(f"speed-up {record['speedup']:.1f}x")
    (RESULTS / "vamp-density.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()

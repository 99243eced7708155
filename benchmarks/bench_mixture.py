"""Benchmark: elbox's Gaussian mixture EM against scikit-learn's GaussianMixture, in the same run.

Data: the 55 000 Fashion-MNIST training images, dequantized with the continuous data space (seed 0),
flattened and projected on their top 50 principal components (PCA computed here: eigh of the
float64 covariance of the centered pixels). Model: 10 components, full covariances, floor 1e-3 on
the diagonal (scikit-learn: reg_covar=1e-3), float64 on both sides.

Both start from the same parameters: elbox's k-means++ initialization (`GaussianMixture.initialize`),
passed to scikit-learn as weights_init / means_init / precisions_init. The two runs then compute
the same EM iterates, so their log-likelihoods must agree to rounding.

1. Fixed iterations (tol = 0, --iterations, default 100), for each thread count in --threads: both
   fits timed whole, interleaved over --repeats rounds (order alternating); time per iteration =
   fit wall time / iterations, each side's set-up included (elbox: k-means++ and one E-step;
   scikit-learn: its init M-step and its final E-step). Each timing records the CPU time other
   processes used meanwhile (the 2-core machine is shared).
2. To convergence (tol = 1e-4 on the mean per-example log-likelihood / ELBO, absolute, at most
   --converge-max-iter iterations): iterations, final mean log-likelihood (scikit-learn's score(X)).
3. Cross-check: elbox's log_prob evaluated at scikit-learn's fitted parameters against score(X).
4. elbox's records: the ELBO / log-likelihood sequence never decreases (smallest step, warnings).

scikit-learn is needed for this script only; it is not a dependency of elbox:
    .venv/bin/pip install scikit-learn

Usage: .venv/bin/python benchmarks/bench_mixture.py [--iterations 100] [--repeats 3] [--threads 2 1]
                                                    [--converge-max-iter 1000] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from elbox.core.system import keep_freed_memory_in_heap
from elbox.data import get_data_space, load_split
from elbox.models import build_model

try:
    import sklearn
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture as SklearnGaussianMixture
    from threadpoolctl import threadpool_info, threadpool_limits
except ImportError:
    sys.exit("bench_mixture.py needs scikit-learn (not an elbox dependency): .venv/bin/pip install scikit-learn")

REPO_ROOT = Path(__file__).resolve().parent.parent
N_COMPONENTS = 10
PCA_DIMS = 50
FLOOR = 1e-3
TOL = 1e-4


class CpuMonitor:
    """Wall time, this process's CPU time, and CPU time used by other processes (from /proc/stat)."""

    def __enter__(self):
        self.busy0 = self._busy()
        t = os.times()
        self.own0, self.wall0 = t.user + t.system, time.perf_counter()
        return self

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = [int(f) for f in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        except (OSError, ValueError, IndexError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.wall0
        t = os.times()
        own = t.user + t.system - self.own0
        self.result = {"wall_s": wall, "own_cpu_s": own}
        busy = self._busy()
        if busy is not None and self.busy0 is not None:
            other = max(0.0, busy - self.busy0 - own)
            self.result["other_cpu_fraction"] = other / (wall * (os.cpu_count() or 1))
        return False


def pca_data(dims: int) -> tuple[torch.Tensor, float]:
    """PCA-`dims` projection [N, dims] float64 of the dequantized training pixels, and the variance share kept."""
    images, _ = load_split("fashion-mnist", "train")
    x = get_data_space("continuous").eval_data(images, seed=0).reshape(images.shape[0], -1).double()
    centered = x - x.mean(0)
    a = centered.numpy()  # numpy's a.T @ a is a symmetric rank-k update (syrk): half the flops of a general matmul
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.from_numpy(a.T @ a) / x.shape[0])  # ascending
    top = eigenvectors[:, -dims:].flip(1)
    explained = (eigenvalues[-dims:].sum() / eigenvalues.sum()).item()
    return centered @ top, explained


def mixture_config(max_iter: int, tol: float) -> dict:
    return {
        "data_shape": [PCA_DIMS],
        "n_components": N_COMPONENTS,
        "covariance": "full",
        "init": "kmeans++",
        "max_iter": max_iter,
        "tol": tol,
        "covariance_floor": FLOOR,
        "seed": 0,
    }


def initial_parameters(x: torch.Tensor) -> dict:
    """elbox's k-means++ starting point, in scikit-learn's terms."""
    model = build_model("mixture", mixture_config(1, 0.0))
    model.initialize(x)
    covariances = model.covariances()
    precisions = torch.cholesky_inverse(torch.linalg.cholesky(covariances))
    return {
        "weights_init": model.log_mixing_weights.exp().numpy(),
        "means_init": model.means.numpy().copy(),
        "precisions_init": precisions.numpy(),
    }


def run_elbox(x: torch.Tensor, max_iter: int, tol: float) -> dict:
    model = build_model("mixture", mixture_config(max_iter, tol))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        with CpuMonitor() as monitor:
            records = model.fit(x)
    log_likelihood = model.log_prob(x).mean().item()
    steps = np.diff([v for r in records for v in (r["elbo"], r["log_likelihood"])])
    times = [r["time_s"] for r in records]
    return {
        **monitor.result,
        "iterations": len(records),
        "converged": records[-1]["converged"],
        "per_iteration_s": monitor.result["wall_s"] / len(records),
        "in_fit_iteration_median_s": float(np.median(times)),
        "log_likelihood": log_likelihood,
        "smallest_objective_step": float(steps.min()) if len(steps) else None,
        "decrease_warnings": len(caught),
        "records": records,
    }


def run_sklearn(x: np.ndarray, init: dict, max_iter: int, tol: float) -> dict:
    model = SklearnGaussianMixture(
        n_components=N_COMPONENTS,
        covariance_type="full",
        reg_covar=FLOOR,
        tol=tol,
        max_iter=max_iter,
        init_params="random_from_data",
        random_state=0,
        **init,  # init_params is overridden by the *_init values
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with CpuMonitor() as monitor:
            model.fit(x)
    return {
        **monitor.result,
        "iterations": int(model.n_iter_),
        "converged": bool(model.converged_),
        "per_iteration_s": monitor.result["wall_s"] / model.n_iter_,
        "log_likelihood": float(model.score(x)),
        "_model": model,
    }


def median_of(attempts: list[dict], key: str) -> float:
    return float(np.median([a[key] for a in attempts]))


def strip(result: dict, keep_records: bool = False) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_") and (keep_records or k != "records")}


def environment(threads: list[int]) -> dict:
    cpu = "unknown"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        revision = "unknown"
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_revision": revision,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
        "numpy": np.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_default_threads": torch.get_num_threads(),
        "threads_measured": threads,
        "blas_libraries": [
            {k: info.get(k) for k in ("internal_api", "num_threads", "version", "prefix")} for info in threadpool_info()
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=100, help="EM iterations of the timed runs (tol = 0)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per thread count")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[torch.get_num_threads()],
        help="thread counts to time (torch and BLAS alike)",
    )
    parser.add_argument("--converge-max-iter", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "mixture_cpu.json")
    args = parser.parse_args(argv)
    keep_freed_memory_in_heap()

    start = time.perf_counter()
    x, explained = pca_data(PCA_DIMS)
    x_numpy = x.numpy()
    print(
        f"data: {x.shape[0]} x {PCA_DIMS} (PCA of 784 dequantized pixels, {explained:.1%} of the variance), "
        f"{time.perf_counter() - start:.1f} s",
        flush=True,
    )
    init = initial_parameters(x)
    default_threads = torch.get_num_threads()

    # 1. fixed number of iterations, interleaved
    timing = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        attempts = {"elbox": [], "sklearn": []}
        with threadpool_limits(limits=threads):
            for round_ in range(args.repeats):
                order = ["elbox", "sklearn"] if round_ % 2 == 0 else ["sklearn", "elbox"]
                for side in order:
                    if side == "elbox":
                        result = run_elbox(x, args.iterations, 0.0)
                    else:
                        result = run_sklearn(x_numpy, init, args.iterations, 0.0)
                    attempts[side].append(strip(result))
                    print(
                        f"  threads {threads} round {round_ + 1} {side:8s} {result['wall_s']:7.2f} s "
                        f"({result['per_iteration_s'] * 1e3:6.1f} ms/iteration, others used "
                        f"{result.get('other_cpu_fraction', float('nan')):.0%} of the CPUs), "
                        f"log-likelihood {result['log_likelihood']:.10f}",
                        flush=True,
                    )
        ours, theirs = (
            median_of(attempts["elbox"], "per_iteration_s"),
            median_of(attempts["sklearn"], "per_iteration_s"),
        )
        timing[str(threads)] = {
            "elbox_per_iteration_s": ours,
            "sklearn_per_iteration_s": theirs,
            "speedup": theirs / ours,
            "elbox_in_fit_iteration_median_s": median_of(attempts["elbox"], "in_fit_iteration_median_s"),
            "log_likelihood_elbox": attempts["elbox"][0]["log_likelihood"],
            "log_likelihood_sklearn": attempts["sklearn"][0]["log_likelihood"],
            "attempts": attempts,
        }
    torch.set_num_threads(default_threads)

    # 2. to convergence
    ours = run_elbox(x, args.converge_max_iter, TOL)
    theirs = run_sklearn(x_numpy, init, args.converge_max_iter, TOL)
    relative_difference = abs(ours["log_likelihood"] - theirs["log_likelihood"]) / abs(theirs["log_likelihood"])

    # 3. both log-densities at scikit-learn's parameters
    sk = theirs["_model"]
    check = build_model("mixture", mixture_config(1, 0.0))
    check.log_mixing_weights.copy_(torch.from_numpy(np.log(sk.weights_)))
    check.means.copy_(torch.from_numpy(sk.means_))
    check.scale_tril.copy_(torch.linalg.cholesky(torch.from_numpy(sk.covariances_)))
    check.fitted_examples.fill_(x.shape[0])
    cross_check = check.log_prob(x).mean().item() - theirs["log_likelihood"]

    result = {
        "benchmark": "Gaussian mixture EM, elbox vs scikit-learn, PCA-50 Fashion-MNIST train (dequantized, seed 0)",
        "units": "seconds; log-likelihoods in nats per example (density of the PCA-50 projection)",
        "environment": environment(args.threads),
        "data": {"n_examples": x.shape[0], "dims": PCA_DIMS, "pca_variance_explained": explained},
        "model": {
            "n_components": N_COMPONENTS,
            "covariance": "full",
            "covariance_floor_and_reg_covar": FLOOR,
            "init": "elbox k-means++ (seed 0), passed to scikit-learn as weights/means/precisions_init",
            "dtype": "float64 on both sides",
        },
        "fixed_iterations": {"iterations": args.iterations, "tol": 0.0, "repeats": args.repeats, "by_threads": timing},
        "to_convergence": {
            "tol": TOL,
            "max_iter": args.converge_max_iter,
            "elbox": strip(ours, keep_records=True),
            "sklearn": strip(theirs),
            "log_likelihood_relative_difference": relative_difference,
        },
        "log_prob_at_sklearn_parameters_minus_sklearn_score": cross_check,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(f"{'':34s} {'elbox':>14s} {'scikit-learn':>14s} {'ratio':>8s}")
    for threads, t in timing.items():
        print(
            f"{f'ms / EM iteration, {threads} thread(s)':34s} {t['elbox_per_iteration_s'] * 1e3:14.1f} "
            f"{t['sklearn_per_iteration_s'] * 1e3:14.1f} {t['speedup']:7.2f}x"
        )
        print(
            f"{f'  log-likelihood after {args.iterations} iters':34s} {t['log_likelihood_elbox']:14.8f} "
            f"{t['log_likelihood_sklearn']:14.8f}"
        )
    print(f"{'iterations to convergence':34s} {ours['iterations']:14d} {theirs['iterations']:14d}")
    print(
        f"{'final log-likelihood (nats/ex.)':34s} {ours['log_likelihood']:14.8f} {theirs['log_likelihood']:14.8f}"
        f" {relative_difference:8.1e} relative"
    )
    print(
        f"{'fit wall time to convergence (s)':34s} {ours['wall_s']:14.2f} {theirs['wall_s']:14.2f}"
        f" {theirs['wall_s'] / ours['wall_s']:7.2f}x"
    )
    print(f"elbox log_prob at scikit-learn's parameters - score(X): {cross_check:.2e} nats")
    print(
        f"elbox ELBO/log-likelihood sequence: smallest step {ours['smallest_objective_step']:.3e}, "
        f"{ours['decrease_warnings']} decrease warnings"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""LLR^{>1} against the digits at every split of an estimate's cost (issue 29): binarizations B of each grey image,
importance samples K_L of L (log p(x)) and K_1 of L^{>1}, each bound as an IWAE-K or as an ELBO (the mean log
weight), all read from one stream of raw log weights per example and bound:

    python benchmarks/ood_llr_grid.py MODEL [--samples 100] [--n 2000] [--runs /root/runs/ood]

MODEL is a run of benchmarks/ood.py (its `train` step) with two or more levels, e.g. skip (the default HVAE). Each
example's rows (its 16 binarizations, seeded by the example as `elbox ood` seeds them) get `--samples` log weights
of L and of L^{>1} from the global generator seeded by the example, the same draws of z2 for both bounds, as in
`elbox ood`; the first B rows and first K samples of them give the estimate at (B, K). AUROC from scikit-learn, with
200 bootstrap resamples (detection_metrics). Writes benchmarks/results/ood-llr-grid-MODEL.json. It times nothing:
the cost of a setting is its number of draws (the timing step of benchmarks/ood.py times the defaults).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
BINARIZATIONS = 16
GRID = [(16, 25, 25), (16, 25, 50), (16, 25, 100), (16, 50, 50), (16, 50, 100), (16, 100, 100), (16, 10, 100)]
GRID += [(8, 25, 25), (8, 50, 50), (8, 25, 100), (8, 50, 100), (8, 100, 100), (4, 100, 100)]


def log_weights(model, x: torch.Tensor, counts: list[int], seeds: list[int], samples: int) -> dict[str, torch.Tensor]:
    """Raw log weights [N, samples, rows] of L and of L^{>1}, each example's from the generator seeded by it."""
    if set(counts) != {BINARIZATIONS}:
        raise SystemExit(f"every example must be a grey image with {BINARIZATIONS} binarizations")
    out = {"L": [], "L1": []}
    with torch.no_grad():
        for i, rows in enumerate(x.split(counts)):
            torch.manual_seed(seeds[i])
            out["L"].append(model.log_weights_sampler(rows)(samples).double())
            torch.manual_seed(seeds[i])
            out["L1"].append(model.log_weights_above_sampler(rows, 1)(samples).double())
    return {name: torch.stack(v) for name, v in out.items()}


def bound(w: torch.Tensor, b: int, k: int, iwae: bool) -> torch.Tensor:
    """Each example's mean over its first b rows of IWAE-k (log-mean-exp of the first k log weights) or of the
    ELBO (their mean)."""
    w = w[:, :k, :b]
    per_row = torch.logsumexp(w, 1) - math.log(k) if iwae else w.mean(1)
    return per_row.mean(-1)


def main() -> None:
    from bench_vae import environment

    from elbox.data.preprocessing import input_space
    from elbox.evaluation.detection import detection_metrics, examples_of
    from elbox.evaluation.inference import model_inputs
    from elbox.io.checkpoint import load_run

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--samples", type=int, default=100, help="log weights per row and bound (the largest K)")
    parser.add_argument("--n", type=int, default=2000, help="examples of each set (the digits: all 1,797)")
    parser.add_argument("--runs", type=Path, default=Path("/root/runs/ood"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    m, config = load_run(args.runs / args.model)
    m.eval()
    sets = {
        "inliers": examples_of(m, config, "test", "inliers", args.n, 0)[0],
        "digits": examples_of(m, config, str(args.runs / "data" / "digits.npy"), "outliers", args.n, 0)[0],
    }
    weights = {}
    for name, examples in sets.items():
        x, counts, seeds = model_inputs(examples, input_space(m), 0, BINARIZATIONS)
        start = time.perf_counter()
        weights[name] = log_weights(m, x, counts, seeds, args.samples)
        print(f"{name}: {len(counts)} examples, {time.perf_counter() - start:.0f} s", flush=True)
    grid = []
    for b, k_l, k_1 in [g for g in GRID if max(g[1:]) <= args.samples]:
        for form in ("iwae", "elbo"):
            llr = {
                name: bound(w["L"], b, k_l, form == "iwae") - bound(w["L1"], b, k_1, form == "iwae")
                for name, w in weights.items()
            }
            figures = detection_metrics(llr["inliers"], llr["digits"], 200, 0)
            grid.append({"binarizations": b, "k_L": k_l, "k_L1": k_1, "bounds": form, **figures})
            print(f"B={b} K_L={k_l} K_1={k_1} {form}: AUROC {figures['auroc']:.4f} ± {figures['auroc_stderr']:.4f}")
    record = {
        "model": args.model,
        "samples": args.samples,
        "n_inliers": len(sets["inliers"]),
        "n_digits": len(sets["digits"]),
        "grid": grid,
        "environment": environment(torch.device("cpu")),
    }
    out = HERE / "results" / f"ood-llr-grid-{args.model}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

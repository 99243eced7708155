"""Out-of-distribution detection with `elbox score`: a Fashion-MNIST model's log-likelihood estimates for
in-distribution test images against other inputs, summarized by the AUROC (1 = perfectly separated,
0.5 = chance, below 0.5 = the other inputs get *higher* likelihood, a known failure of likelihoods,
Nalisnick et al. 2019).

    python examples/ood_score.py [--run runs/example-vae] [--epochs 5] [--n 1000] [--iw-samples 100]

Other inputs: uniform noise images, elbox's synthetic blobs-and-stripes images, Fashion-MNIST turned upside
down, and MNIST test images when they are on disk (they cannot be downloaded everywhere; the script says so).
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import numpy as np
from common import elbox, trained_run

from elbox.data import find_dataset_dir, load_split
from elbox.errors import ElboxError


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P(score of an in-distribution input > score of another input), ties counting half (Mann-Whitney U)."""
    greater = (in_scores[:, None] > out_scores[None, :]).mean()
    ties = (in_scores[:, None] == out_scores[None, :]).mean()
    return float(greater + 0.5 * ties)


def score(run: Path, images: np.ndarray, folder: Path, name: str, iw_samples: int) -> np.ndarray:
    np.save(folder / f"{name}.npy", images)
    out = folder / f"{name}.csv"
    elbox("score", str(run), "--input", str(folder / f"{name}.npy"), "--out", str(out), "--iw-samples", str(iw_samples), "--no-progress")
    with open(out) as f:
        return np.array([float(row["log_likelihood_nats"]) for row in csv.DictReader(f)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/example-vae")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs if the run must be trained")
    parser.add_argument("--n", type=int, default=1000, help="images per set")
    parser.add_argument("--iw-samples", type=int, default=100)
    args = parser.parse_args()
    run = trained_run(args.run, args.epochs, "--model", "vae", "--latent-dim", "16", "--hidden-dims", "512")
    rng = np.random.default_rng(0)
    fashion = load_split("fashion-mnist", "test")[0][: args.n, 0].numpy()
    others = {
        "uniform noise": rng.integers(0, 256, fashion.shape, dtype=np.uint8),
        "synthetic blobs and stripes": load_split("synthetic", "test")[0][:, 0].numpy(),
        "Fashion-MNIST upside down": fashion[:, ::-1].copy(),
    }
    try:
        find_dataset_dir("mnist", download=False)
        others["MNIST digits"] = load_split("mnist", "test")[0][: args.n, 0].numpy()
    except ElboxError:
        print("MNIST is not on this machine (it cannot be downloaded here): skipping the MNIST comparison")
    with tempfile.TemporaryDirectory() as tmp:
        in_scores = score(run, fashion, Path(tmp), "fashion", args.iw_samples)
        results = {name: score(run, images, Path(tmp), name.replace(" ", "-"), args.iw_samples) for name, images in others.items()}
    print(f"\nlog-likelihood estimates (IWAE-{args.iw_samples}, nats per image) under a Fashion-MNIST VAE:")
    print(f"  {'Fashion-MNIST test (in-distribution)':<40} mean {in_scores.mean():10.1f}")
    for name, values in results.items():
        print(f"  {name:<40} mean {values.mean():10.1f}   AUROC {auroc(in_scores, values):.3f}")


if __name__ == "__main__":
    main()

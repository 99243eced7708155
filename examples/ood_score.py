"""Out-of-distribution detection with `elbox ood`: a Fashion-MNIST model's anomaly scores on its test images against
other inputs, each summarized by its AUROC (1 = perfectly separated, 0.5 = chance, below 0.5 = the other inputs look
*more* normal, the known failure of raw likelihood, Nalisnick et al. 2019). docs/ood.md explains the scores.

    python examples/ood_score.py [--run runs/example-hvae] [--epochs 5] [--n 1000] [--iw-samples 100]

Other inputs: uniform noise images, elbox's synthetic blobs-and-stripes images, Fashion-MNIST turned upside down,
and MNIST test images when they are on disk (they cannot be downloaded everywhere; the script says so).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from common import elbox, trained_run

from elbox.core.errors import ElboxError
from elbox.data import find_dataset_dir, load_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/example-hvae")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs if the run must be trained")
    parser.add_argument("--n", type=int, default=1000, help="images per set")
    parser.add_argument("--iw-samples", type=int, default=100)
    args = parser.parse_args()
    run = trained_run(args.run, args.epochs, "--model", "hvae")
    rng = np.random.default_rng(0)
    fashion = load_split("fashion-mnist", "test")[0][: args.n].numpy()
    others = {
        "uniform noise": rng.integers(0, 256, fashion.shape, dtype=np.uint8),
        "synthetic blobs and stripes": load_split("synthetic", "test")[0][: args.n].numpy(),
        "Fashion-MNIST upside down": fashion[:, :, ::-1].copy(),
    }
    try:
        find_dataset_dir("mnist", download=False)
        others["MNIST digits"] = load_split("mnist", "test")[0][: args.n].numpy()
    except ElboxError:
        print("MNIST is not on this machine (it cannot be downloaded here): skipping the MNIST comparison")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, images in others.items():
            path, result = Path(tmp) / f"{name.replace(' ', '-')}.npy", Path(tmp) / "ood.json"
            np.save(path, images)
            elbox(
                "ood",
                str(run),
                "--outliers",
                str(path),
                "--limit",
                str(args.n),
                "--iw-samples",
                str(args.iw_samples),
                "--json",
                str(result),
                "--no-progress",
            )
            rows[name] = json.loads(result.read_text())["methods"]
    methods = list(next(iter(rows.values())))
    print(f"\nAUROC of each anomaly score, {args.n} Fashion-MNIST test images against each other set:")
    print(f"  {'other inputs':<32}" + "".join(f"{m:>12}" for m in methods))
    for name, figures in rows.items():
        print(f"  {name:<32}" + "".join(f"{figures[m]['auroc']:12.3f}" for m in methods))


if __name__ == "__main__":
    main()

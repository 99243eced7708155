"""Your own data with elbox: a VAE on a folder of images, and a Gaussian mixture and a VAE on a table, from the command
line and from Python. The data are scikit-learn's bundled data sets (installed with `pip install scikit-learn`):
the 8x8 handwritten digits written out as a folder of PNGs, and the breast-cancer table (569 rows, 30 real columns)
written out as a CSV.

    python examples/own_data.py [--out runs/own-data]

It prints held-out test log-likelihoods in nats per example: of the 8-bit images for the VAE on images (binarized,
IWAE-100), and of the table rows in their original units for the mixture and the VAE on the table. For the mixture it
also fits scikit-learn's GaussianMixture (same components, full covariances, no regularization to speak of) to the
same rows and prints its log-likelihood of the same test rows in the same units.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import elbox
from elbox.data.inputs import as_examples, run_data


def write_digit_folder(folder: Path) -> int:
    """The digits as 8-bit grayscale PNGs (values 0..16 scaled to 0..255), in one subfolder per class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image * 255 / 16).astype(np.uint8)).save(folder / str(label) / f"{i:04d}.png")
    return len(digits.images)


def write_tables(directory: Path, seed: int = 0) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """The breast-cancer table split 80/20 at random into train.csv and test.csv (features only)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    order = np.random.default_rng(seed).permutation(len(data.data))
    n_test = len(order) // 5
    test, train = data.data[order[:n_test]], data.data[order[n_test:]]
    header = ",".join(name.replace(" ", "_") for name in data.feature_names)
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.csv", train), ("test.csv", test)):
        np.savetxt(directory / name, rows, delimiter=",", header=header, comments="", fmt="%.10g")
    return directory / "train.csv", directory / "test.csv", train, test


def symmetric(matrices: np.ndarray) -> np.ndarray:
    return (matrices + matrices.transpose(0, 2, 1)) / 2


def sklearn_from_the_same_start(run: elbox.Run, test: np.ndarray, components: int) -> float:
    """scikit-learn's GaussianMixture run by EM on the same training rows (original units) from the same starting
    point as elbox's best restart (its k-means++ start, mapped from the standardized space), to convergence: its
    mean log-likelihood of the test rows, nats per row. A mixture's likelihood has many local optima; from one start,
    the two EM implementations must agree."""
    from sklearn.mixture import GaussianMixture

    from elbox.data import space_from_record
    from elbox.models import build_model

    space = space_from_record(run.config["data"])
    rows = as_examples(run_data(run.config["data"], 0)[0], "training rows")
    restarts = [r for r in run.history if "restart" in r and "converged" in r]
    best = max(restarts, key=lambda r: r["log_likelihood"])["restart"] if restarts else 0
    start = build_model(
        "mixture", {**run.config["model_config"], "seed": run.config["model_config"]["seed"] + best, "n_init": 1}
    )
    start.initialize(space.eval_data(rows).double())
    mean, std = space.mean.double(), space.std.double()
    means = (start.means * std + mean).numpy()
    covariances = (start.covariances() * std[:, None] * std[None, :]).numpy()
    reference = GaussianMixture(
        components,
        covariance_type="full",
        reg_covar=1e-12,
        tol=1e-10,
        max_iter=1000,
        weights_init=start.log_mixing_weights.exp().numpy(),
        means_init=means,
        precisions_init=symmetric(np.linalg.inv(covariances)),
    )
    return float(reference.fit(rows.double().numpy()).score(test))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/own-data")
    parser.add_argument("--components", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)

    # (a) a VAE on a folder of images: from the command line ...
    folder = out / "digits"
    print(f"wrote {write_digit_folder(folder)} PNGs to {folder}")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "elbox",
            "train",
            "vae",
            "--data",
            str(folder),
            "--epochs",
            "30",
            "--batch-size",
            "64",
            "--latent-dim",
            "8",
            "--hidden-dims",
            "256",
            "--out",
            str(out / "vae-digits-cli"),
            "--no-progress",
        ],
        check=True,
    )
    # ... and from Python
    run = elbox.fit(
        "vae",
        str(folder),
        epochs=30,
        batch_size=64,
        latent_dim=8,
        hidden_dims=[256],
        out=out / "vae-digits-py",
        progress=False,
    )
    result = elbox.evaluate(run, iw_samples=[1, 100])  # the run's held-out images (10 %, seeded)
    print(
        f"VAE on the digit folder: held-out NLL {result['nll_iw']:.2f} ± {result['nll_iw_stderr']:.2f} nats per image "
        f"(binarized 8x8 images, IWAE-100); ELBO {result['elbo']:.2f}"
    )

    # (b) a Gaussian mixture and a VAE on a table
    train_csv, test_csv, train, test = write_tables(out / "breast-cancer")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "elbox",
            "train",
            "mixture",
            "--data",
            str(train_csv),
            "--n-components",
            str(args.components),
            "--n-init",
            "10",
            "--covariance-floor",
            "1e-9",
            "--tol",
            "1e-10",
            "--max-iter",
            "1000",
            "--out",
            str(out / "mixture-cli"),
            "--no-progress",
        ],
        check=True,
    )
    mixture = elbox.fit(
        "mixture",
        str(train_csv),
        n_components=args.components,
        covariance_floor=1e-9,
        n_init=10,
        tol=1e-10,
        max_iter=1000,
        progress=False,
        verbose=False,
    )
    ours = -elbox.evaluate(mixture, str(test_csv))["nll_exact"]
    theirs = sklearn_from_the_same_start(mixture, test, args.components)
    vae = elbox.fit(
        "vae",
        str(train_csv),
        likelihood="gaussian-learned",
        latent_dim=4,
        hidden_dims=[64],
        epochs=200,
        batch_size=64,
        lr=1e-3,
        progress=False,
        verbose=False,
    )
    vae_result = elbox.evaluate(vae, str(test_csv), iw_samples=[1, 1000])
    print(f"test log-likelihood, nats per row in the table's original units ({len(test)} held-out rows, 30 columns):")
    print(f"  elbox mixture ({args.components} components, exact)   {ours:10.3f}")
    print(f"  scikit-learn GaussianMixture, EM from elbox's start  {theirs:10.3f}   (difference {ours - theirs:+.3f})")
    print(f"  elbox VAE (gaussian-learned, IWAE-1000 lower bound) {-vae_result['nll_iw']:10.3f}")


if __name__ == "__main__":
    main()

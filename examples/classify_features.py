"""Downstream use: a linear classifier on VAE features (posterior means from `elbox encode`) vs on raw pixels.

    python examples/classify_features.py [--run runs/example-vae] [--epochs 5] [--train-images 10000]

Trains a VAE on dynamically binarized Fashion-MNIST if the run directory has none, encodes the first
--train-images training images and the 10,000 test images with `elbox encode`, fits multinomial logistic
regression (L-BFGS, small L2 penalty) on the features and on the raw pixels, and prints both test accuracies.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import elbox, trained_run

from elbox.data import load_split


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-4, steps: int = 200) -> torch.nn.Linear:
    """Multinomial logistic regression on standardized features, fitted by L-BFGS."""
    model = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y) + l2 * model.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def accuracy(train_x, train_y, test_x, test_y) -> float:
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    model = fit_logistic_regression((train_x - mean) / std, train_y)
    with torch.no_grad():
        return (model((test_x - mean) / std).argmax(1) == test_y).float().mean().item()


def encode(run: Path, images: torch.Tensor, folder: Path, name: str) -> torch.Tensor:
    np.save(folder / f"{name}.npy", images.numpy())
    elbox("encode", str(run), "--input", str(folder / f"{name}.npy"), "--out", str(folder / f"{name}-features.npz"))
    with np.load(folder / f"{name}-features.npz", allow_pickle=False) as features:
        return torch.from_numpy(features["mean"]).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/example-vae")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs if the run must be trained")
    parser.add_argument("--train-images", type=int, default=10000)
    args = parser.parse_args()
    torch.manual_seed(0)
    run = trained_run(args.run, args.epochs, "--model", "vae", "--latent-dim", "16", "--hidden-dims", "512")
    train_images, train_labels = load_split("fashion-mnist", "train")
    test_images, test_labels = load_split("fashion-mnist", "test")
    train_images, train_labels = train_images[: args.train_images], train_labels[: args.train_images]
    with tempfile.TemporaryDirectory() as tmp:
        train_features = encode(run, train_images, Path(tmp), "train")
        test_features = encode(run, test_images, Path(tmp), "test")
    pixels = lambda images: images.flatten(1).float() / 255  # noqa: E731
    results = {
        f"VAE posterior means ({train_features.shape[1]} features)": accuracy(
            train_features, train_labels, test_features, test_labels
        ),
        "raw pixels (784 features)": accuracy(pixels(train_images), train_labels, pixels(test_images), test_labels),
    }
    print(f"\nlinear classifier trained on {args.train_images} Fashion-MNIST training images, tested on 10000:")
    for name, value in results.items():
        print(f"  {name:<40} test accuracy {100 * value:.2f} %")


if __name__ == "__main__":
    main()

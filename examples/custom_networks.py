"""A VAE with your own encoder and decoder: train it on Fashion-MNIST, evaluate IWAE-K, sample, save and load.

    python examples/custom_networks.py [--epochs 3] [--out runs/custom-vae]

The encoder maps x [B, 1, 28, 28] to [B, 2 * latent_dim] (posterior means, then pre-softplus standard deviations); the
decoder maps z [B, latent_dim] to Bernoulli logits, any shape with 784 values per example. elbox records the classes'
names in config.json and the weights in safetensors; it never pickles or imports your classes, so loading takes them
again: elbox.load(run_dir, encoder=ConvEncoder(...), decoder=ConvDecoder(...)).
"""

from __future__ import annotations

import argparse

from torch import nn

import elbox
from elbox.models import VAE, VAEConfig


class ConvEncoder(nn.Module):
    def __init__(self, latent_dim: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 4, stride=2, padding=1),
            nn.SiLU(),  # 14x14
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.SiLU(),  # 7x7
            nn.Flatten(),
            nn.Linear(2 * width * 7 * 7, 2 * latent_dim),
        )

    def forward(self, x):
        return self.net(x)


class ConvDecoder(nn.Module):
    def __init__(self, latent_dim: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, 2 * width * 7 * 7),
            nn.SiLU(),
            nn.Unflatten(1, (2 * width, 7, 7)),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1),
            nn.SiLU(),  # 14x14
            nn.ConvTranspose2d(width, 1, 4, stride=2, padding=1),  # 28x28 logits
        )

    def forward(self, z):
        return self.net(z)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--out", default="runs/custom-vae")
    args = parser.parse_args()

    config = VAEConfig(data_shape=(1, 28, 28), latent_dim=args.latent_dim, likelihood="bernoulli")
    model = VAE(config, encoder=ConvEncoder(args.latent_dim), decoder=ConvDecoder(args.latent_dim))
    run = elbox.fit(model, "fashion-mnist", epochs=args.epochs, lr=2e-3, out=args.out)
    result = elbox.evaluate(run, iw_samples=[1, 100], limit=2000)
    print(
        f"test NLL {result['nll_iw']:.2f} ± {result['nll_iw_stderr']:.2f} nats (IWAE-100, first 2000 test images, "
        f"dynamically binarized Fashion-MNIST); ELBO {result['elbo']:.2f}; active units {result['active_units']}"
    )
    loaded = elbox.load(args.out, encoder=ConvEncoder(args.latent_dim), decoder=ConvDecoder(args.latent_dim))
    images = elbox.sample(loaded, 64)
    print(f"reloaded from {args.out}; sampled {tuple(images.shape)}; see {args.out}/samples.png")


if __name__ == "__main__":
    main()

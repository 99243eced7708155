"""Variational autoencoder: p(z) = N(0, I), p(x|z) from a decoder, q(z|x) = N(mu(x), diag sigma(x)^2)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elbox.bounds import (
    ELBOTerms,
    ImportanceSamples,
    diag_gaussian_log_prob,
    diag_gaussian_log_prob_from_noise,
    gaussian_elbo,
    kl_diag_gaussians,
    sample_diag_gaussian,
    standard_normal_log_prob,
)
from elbox.errors import ElboxError
from elbox.likelihoods import build_likelihood
from elbox.models.base import LatentVariableModel, per_level_temperatures, register_model
from elbox.nets import apply_flat, conv_decoder, conv_encoder, mlp

ARCHITECTURES = ("mlp", "conv")


def _integers(name: str, values) -> list[int]:
    """The values as a list of ints; ElboxError for anything that is not a whole number (bools included)."""
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ElboxError(f"{name} must be whole numbers, got {values!r}")
    return list(values)


@dataclass
class VAEConfig:
    data_shape: tuple[int, int, int] = (1, 28, 28)
    latent_dim: int = 20
    hidden_dims: list[int] = field(default_factory=lambda: [512])  # MLP widths (after the convs for "conv")
    architecture: str = "mlp"
    conv_channels: list[int] = field(default_factory=lambda: [32, 64])  # "conv" only
    activation: str = "relu"
    likelihood: str = "bernoulli"
    likelihood_options: dict = field(default_factory=dict)
    min_std: float = 1e-4  # floor on the posterior standard deviation

    def __post_init__(self):
        self.data_shape = tuple(_integers("data_shape", self.data_shape))
        self.hidden_dims = _integers("hidden_dims", self.hidden_dims)
        self.conv_channels = _integers("conv_channels", self.conv_channels)
        _integers("latent_dim", [self.latent_dim])
        if not isinstance(self.likelihood_options, dict):
            raise ElboxError(f"likelihood_options must be a JSON object, got {self.likelihood_options!r}")
        if len(self.data_shape) != 3 or min(self.data_shape) < 1:
            raise ElboxError(f"data_shape must be (channels, height, width) with positive sizes, got {self.data_shape}")
        if self.latent_dim < 1:
            raise ElboxError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if any(h < 1 for h in self.hidden_dims):
            raise ElboxError(f"hidden_dims must be positive, got {self.hidden_dims}")
        if self.architecture not in ARCHITECTURES:
            raise ElboxError(f"unknown architecture {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.architecture == "conv" and (not self.conv_channels or min(self.conv_channels) < 1):
            raise ElboxError(f"conv_channels must be a non-empty list of positive sizes, got {self.conv_channels}")
        if not self.min_std > 0:
            raise ElboxError(f"min_std must be > 0, got {self.min_std}")


@register_model("vae", VAEConfig)
class VAE(LatentVariableModel):
    """Single-latent VAE with an MLP or a small convolutional encoder and decoder."""

    def __init__(self, config: VAEConfig):
        super().__init__(config)
        c = config
        self.likelihood = build_likelihood(c.likelihood, c.data_shape, **c.likelihood_options)
        num_dims = math.prod(c.data_shape)
        n_params = self.likelihood.num_params
        if c.architecture == "mlp":
            self.encoder = nn.Sequential(nn.Flatten(), mlp(num_dims, c.hidden_dims, 2 * c.latent_dim, c.activation))
            self.decoder = mlp(c.latent_dim, list(reversed(c.hidden_dims)), n_params * num_dims, c.activation)
        else:
            conv, n_features = conv_encoder(c.data_shape, c.conv_channels, c.activation)
            self.encoder = nn.Sequential(conv, mlp(n_features, c.hidden_dims, 2 * c.latent_dim, c.activation))
            deconv, feature_shape = conv_decoder(c.data_shape, c.conv_channels, n_params * c.data_shape[0], c.activation)
            self.decoder = nn.Sequential(
                mlp(c.latent_dim, list(reversed(c.hidden_dims)), math.prod(feature_shape), c.activation),
                nn.Unflatten(-1, feature_shape),
                deconv,
            )

    @property
    def data_space(self) -> str:
        return self.likelihood.data_space

    # -- the two distributions -----------------------------------------------------------------

    def posterior_params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of q(z|x), each [B, latent_dim]."""
        h = self.encoder(x)
        mean, raw_std = h.chunk(2, dim=-1)
        return mean, F.softplus(raw_std) + self.config.min_std

    def decode(self, z: Tensor) -> Tensor:
        """Likelihood parameters [*batch, P, C, H, W] for latents [*batch, latent_dim]."""
        out = apply_flat(self.decoder, z, 1)
        c, h, w = self.config.data_shape
        return out.reshape(*z.shape[:-1], self.likelihood.num_params, c, h, w)

    # -- the model interface ---------------------------------------------------------------------

    def elbo(self, x: Tensor, n_samples: int = 1, analytic_kl: bool = True) -> ELBOTerms:
        mean, std = self.posterior_params(x)
        return gaussian_elbo(
            mean, std, lambda z: self.likelihood.log_prob(self.decode(z), x), n_samples, analytic_kl
        )

    def log_weights(self, x: Tensor, k: int, detach_posterior_params: bool = False) -> Tensor:
        return self.log_weights_sampler(x, detach_posterior_params)(k)

    def log_weights_sampler(self, x: Tensor, detach_posterior_params: bool = False) -> Callable[[int], Tensor]:
        """Encode x once; the returned function draws n samples of log p(x, z) - log q(z|x) [n, B].

        detach_posterior_params: evaluate log q(z|x) with q's mean and std detached (the STL/DReG form, see
        elbox.bounds): same values, but q's parameters get gradient only through the draws z.
        """
        mean, std = self.posterior_params(x)

        def draw(n: int) -> Tensor:
            return self._draw_log_weights(x, mean, std, n, detach_posterior_params)[2]

        return draw

    def importance_samples(self, x: Tensor, k: int, detach_posterior_params: bool = False) -> ImportanceSamples:
        """k reparameterized draws per example with their log weights, for the IWAE training objective."""
        if k < 1:
            raise ElboxError(f"the number of importance samples K must be >= 1, got {k}")
        mean, std = self.posterior_params(x)
        z, log_px_given_z, log_w = self._draw_log_weights(x, mean, std, k, detach_posterior_params)
        terms = ELBOTerms(reconstruction=log_px_given_z.mean(0), kl={"z": kl_diag_gaussians(mean, std).sum(-1)})
        return ImportanceSamples(log_w=log_w, z=z, terms=terms)

    def _draw_log_weights(
        self, x: Tensor, mean: Tensor, std: Tensor, n: int, detach_posterior_params: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """n draws z ~ q(z|x): returns (z [n, B, d], log p(x|z) [n, B], log p(x, z) - log q(z|x) [n, B])."""
        z, eps = sample_diag_gaussian(mean, std, n)
        log_px_given_z = self.likelihood.log_prob(self.decode(z), x)
        if detach_posterior_params:
            log_q = diag_gaussian_log_prob(z, mean.detach(), std.detach())
        else:
            log_q = diag_gaussian_log_prob_from_noise(eps, std)
        return z, log_px_given_z, log_px_given_z + standard_normal_log_prob(z) - log_q

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x, z) = log p(x|z) + log p(z) for latents z [S, B, d]; returns [S, B]."""
        return self.likelihood.log_prob(self.decode(z), x) + standard_normal_log_prob(z)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The amortized encoder's parameters (what `elbox tighten` refits with the decoder frozen)."""
        return list(self.encoder.parameters())

    def encode(self, x: Tensor) -> Tensor:
        return self.posterior_params(x)[0]

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(z|x), each [B, latent_dim]."""
        mean, std = self.posterior_params(x)
        return mean, std.square()

    def reconstruct(self, x: Tensor) -> Tensor:
        """Mean of p(x|z) at the posterior mean z = E_q[z]."""
        return self.likelihood.mean(self.decode(self.encode(x)))

    def sample(self, n: int, mean: bool = True, temperature: float | list[float] = 1.0) -> Tensor:
        """Draw z ~ N(0, temperature^2 I); return the mean of p(x|z) (mean=True, for grids) or a draw."""
        if n < 1:
            raise ElboxError(f"the number of samples must be >= 1, got {n}")
        ref = next(self.parameters())
        (temperature,) = per_level_temperatures(temperature, 1)
        z = temperature * torch.randn(n, self.config.latent_dim, device=ref.device, dtype=ref.dtype)
        params = self.decode(z)
        return self.likelihood.mean(params) if mean else self.likelihood.sample(params)

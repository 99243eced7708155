"""Variational autoencoder: p(z) = N(0, I), p(x|z) from a decoder, q(z|x) = N(mu(x), diag sigma(x)^2)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from elbox.core.bounds import (
    ELBOTerms,
    ImportanceSamples,
    check_count,
    diag_gaussian_log_prob,
    diag_gaussian_log_prob_from_noise,
    gaussian_elbo,
    kl_diag_gaussians,
    sample_diag_gaussian,
    standard_normal_log_prob,
)
from elbox.core.errors import ElboxError
from elbox.core.nets import (
    GATED,
    MLP_ACTIVATIONS,
    WEIGHT_INITS,
    apply_flat,
    check_logvar_bounds,
    conv_decoder,
    conv_encoder,
    initialize_weights,
    mlp,
    posterior_std,
)
from elbox.core.options import check_options, option, short_repr
from elbox.models.base import (
    DATA_SHAPE_LIMITS,
    MAX_WIDTH,
    LatentVariableModel,
    check_data_shape,
    check_image_shape,
    per_level_temperatures,
    register_model,
)
from elbox.models.likelihood_options import LikelihoodModel, LikelihoodOptions
from elbox.models.vampprior import VampPrior

ARCHITECTURES = ("mlp", "conv")
PRIORS = ("standard", "vamp")


@dataclass
class VAEConfig(LikelihoodOptions):
    data_shape: tuple[int, ...] = option(
        (1, 28, 28),
        "shape of one example: (channels, height, width), or (D,) for vectors (mlp architecture)",
        **DATA_SHAPE_LIMITS,
    )
    latent_dim: int = option(32, "latent dimensions", minimum=1, maximum=MAX_WIDTH)
    hidden_dims: list[int] = option(
        help="hidden layer widths of the encoder's MLP (the decoder mirrors them; after the convolutions for conv)",
        factory=lambda: [512],
        minimum=1,
        maximum=MAX_WIDTH,
        metavar="H",
    )
    architecture: str = option("mlp", "encoder and decoder networks", choices=ARCHITECTURES)
    conv_channels: list[int] = option(
        help="conv architecture: channels of each strided convolution",
        factory=lambda: [32, 64],
        minimum=1,
        maximum=MAX_WIDTH,
        metavar="C",
        used_with={"architecture": "conv"},
    )
    activation: str = option(
        "relu", "activation function (gated: gated dense hidden layers, mlp only)", choices=MLP_ACTIVATIONS
    )
    min_std: float = option(1e-4, "floor on the posterior standard deviation", above=0)
    logvar_bounds: list[float] | None = option(
        None,
        "bound the posterior's log-variance to [LOW, HIGH] with a hardtanh, "
        "std = exp(logvar / 2) (the VampPrior papers use -6 2; default: "
        "std = softplus + min_std)",
        max_items=2,
        metavar="B",
    )
    prior: str = option(
        "standard",
        "p(z): standard (N(0, I)) or vamp (VampPrior: a mixture of the posteriors at learned pseudo-inputs)",
        choices=PRIORS,
    )
    pseudo_inputs: int = option(
        500,
        "--prior vamp: number of pseudo-inputs (mixture components)",
        minimum=1,
        maximum=MAX_WIDTH,
        metavar="K",
        used_with={"prior": "vamp"},
    )
    weight_init: str = option(
        "default",
        "initialization of the linear layers: default (PyTorch's) or he (N(0, 2 / fan_in), as the VampPrior networks)",
        choices=WEIGHT_INITS,
    )
    # user-written networks, by class name ("module:QualName"); "" = the built-in ones (see VAE)
    encoder: str = option("", "class of a user-written encoder", cli=False)
    decoder: str = option("", "class of a user-written decoder", cli=False)

    def __post_init__(self):
        check_options(self)
        check_data_shape(self.data_shape)
        if self.architecture == "conv":
            check_image_shape(self.data_shape, "the conv architecture")
        elif len(self.data_shape) not in (1, 3):
            raise ElboxError(
                "data_shape must be (channels, height, width) for images or (D,) for vectors, got "
                f"{short_repr(self.data_shape)}"
            )
        self.data_space()  # a likelihood that cannot model the data (bernoulli on vectors, ...) is refused here
        if self.architecture == "conv" and not self.conv_channels:
            raise ElboxError("conv_channels must be a non-empty list of positive sizes")
        if self.architecture == "conv" and self.activation == GATED:
            raise ElboxError("the gated activation makes gated dense layers: it applies to the mlp architecture only")
        check_logvar_bounds(self.logvar_bounds)
        if self.prior == "vamp" and len(self.data_shape) != 3:
            raise ElboxError("the VampPrior's pseudo-inputs are images in [0, 1]: --prior vamp models images only")


def _class_name(module: nn.Module | None, recorded: str, role: str) -> str:
    """module:QualName of a user-written network, checked against the name a saved config records."""
    if module is None:
        if recorded:
            raise ElboxError(
                f"this VAE was built with a user-written {role}, {recorded}; elbox never unpickles or imports "
                f"it: pass it again, e.g. elbox.load(run_dir, {role}={recorded.split(':')[-1]}(...), ...)"
            )
        return ""
    if not isinstance(module, nn.Module):
        raise ElboxError(f"the {role} must be a torch.nn.Module, got {type(module).__name__}")
    name = f"{type(module).__module__}:{type(module).__qualname__}"
    if recorded and recorded != name:
        raise ElboxError(f"the {role} given is a {name}; this VAE was built with a {recorded}")
    return name


@register_model("vae", VAEConfig)
class VAE(LikelihoodModel, LatentVariableModel):
    """Single-latent VAE with an MLP or a small convolutional encoder and decoder; the MLP one also models vectors
    [B, D] (data_shape (D,), the standardized 'real' space) with a gaussian likelihood."""

    # chosen by time to quality: on a 2-core CPU a test NLL below 234 nats (IWAE-5000, binarized Fashion-MNIST) in
    # under 200 s (benchmarks/results/speed.md)
    train_defaults: ClassVar[dict[str, Any]] = {"epochs": 36, "lr": 3e-3, "lr_schedule": "cosine"}
    amortization_gap = True

    def __init__(self, config: VAEConfig, encoder: nn.Module | None = None, decoder: nn.Module | None = None):
        """encoder, decoder: your own networks instead of the built-in ones. The encoder maps x [B, *data_shape] to
        [B, 2 * latent_dim] (means, then pre-softplus standard deviations); the decoder maps z [B, latent_dim] to
        the likelihood's parameters, any shape with num_params * prod(data_shape) values per example. The config
        records their class names; loading a saved model takes them again (elbox.load(dir, encoder=..., decoder=...)),
        elbox never pickles or imports them."""
        config = dataclasses.replace(
            config,
            encoder=_class_name(encoder, config.encoder, "encoder"),
            decoder=_class_name(decoder, config.decoder, "decoder"),
        )
        super().__init__(config)
        c = config
        self.likelihood = c.build_likelihood()
        num_dims = math.prod(c.data_shape)
        n_params = self.likelihood.num_params
        if c.architecture == "mlp":
            self.encoder = nn.Sequential(nn.Flatten(), mlp(num_dims, c.hidden_dims, 2 * c.latent_dim, c.activation))
            self.decoder = mlp(c.latent_dim, list(reversed(c.hidden_dims)), n_params * num_dims, c.activation)
        else:
            conv, n_features = conv_encoder(c.data_shape, c.conv_channels, c.activation)
            self.encoder = nn.Sequential(conv, mlp(n_features, c.hidden_dims, 2 * c.latent_dim, c.activation))
            deconv, feature_shape = conv_decoder(
                c.data_shape, c.conv_channels, n_params * c.data_shape[0], c.activation
            )
            self.decoder = nn.Sequential(
                mlp(c.latent_dim, list(reversed(c.hidden_dims)), math.prod(feature_shape), c.activation),
                nn.Unflatten(-1, feature_shape),
                deconv,
            )
        initialize_weights(self, c.weight_init)
        if encoder is not None:
            self.encoder = encoder
        if decoder is not None:
            self.decoder = decoder
        if encoder is not None or decoder is not None:
            self._check_network_shapes()
        if c.prior == "vamp":
            self.vamp = VampPrior(c.pseudo_inputs, c.data_shape, c.weight_init)
            self.inexact_kl_terms = frozenset({"z"})  # no closed form: the single-sample log q - log p

    def activation_elements(self) -> int:
        """Per-sample elements of the VampPrior's log density (else 0), for the evaluator's memory bound."""
        return self.vamp.activation_elements() if self.config.prior == "vamp" else 0

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """log p(z) [*batch] for latents [*batch, d]: the standard normal, or the VampPrior."""
        return self.prior_density()(z)

    def prior_density(self) -> Callable[[Tensor], Tensor]:
        """z -> log p(z); the VampPrior's components computed once, for every pass of a sampler."""
        if self.config.prior == "vamp":
            return self.vamp.density(self.posterior_params)
        return standard_normal_log_prob

    @classmethod
    def from_config(cls, config: VAEConfig, encoder: nn.Module | None = None, decoder: nn.Module | None = None) -> VAE:
        return cls(config, encoder=encoder, decoder=decoder)

    @torch.no_grad()
    def _check_network_shapes(self) -> None:
        """One forward pass of two zero examples through user-written networks, to name a wrong output size now."""
        c, modes = self.config, [(m, m.training) for m in (self.encoder, self.decoder)]
        for m, _ in modes:
            m.eval()
        try:
            ref = next(self.encoder.parameters(), torch.zeros(()))
            h = self.encoder(torch.zeros(2, *c.data_shape, dtype=ref.dtype, device=ref.device))
            if tuple(h.shape) != (2, 2 * c.latent_dim):
                raise ElboxError(
                    f"the encoder {c.encoder or 'given'} returns shape {tuple(h.shape[1:])} per batch of "
                    f"x {tuple(c.data_shape)}; it must return [B, 2 * latent_dim] = [B, {2 * c.latent_dim}]"
                )
            out = self.decoder(torch.zeros(2, c.latent_dim, dtype=ref.dtype, device=ref.device))
            want = self.likelihood.num_params * math.prod(c.data_shape)
            if out.shape[0] != 2 or out[0].numel() != want:
                raise ElboxError(
                    f"the decoder {c.decoder or 'given'} returns {out[0].numel()} values per example; the "
                    f"{c.likelihood} likelihood needs {want} ({self.likelihood.num_params} x {tuple(c.data_shape)})"
                )
        finally:
            for m, mode in modes:
                m.train(mode)

    @property
    def data_space(self) -> str:
        return self.config.data_space()

    # -- the two distributions -----------------------------------------------------------------

    def posterior_params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of q(z|x), each [B, latent_dim]."""
        h = self.encoder(x)
        mean, raw_std = h.chunk(2, dim=-1)
        return mean, posterior_std(raw_std, self.config.logvar_bounds, self.config.min_std)

    def decode(self, z: Tensor) -> Tensor:
        """Likelihood parameters [*batch, P, *data_shape] for latents [*batch, latent_dim]."""
        out = apply_flat(self.decoder, z, 1)
        return out.reshape(*z.shape[:-1], self.likelihood.num_params, *self.config.data_shape)

    # -- the model interface ---------------------------------------------------------------------

    def elbo(self, x: Tensor, n_samples: int = 1, analytic_kl: bool = True) -> ELBOTerms:
        """The ELBO's terms; the KL is analytic for the standard prior (unless analytic_kl=False), and the Monte Carlo
        estimate log q(z|x) - log p(z) on the same draws for the VampPrior, which has no closed form."""
        mean, std = self.posterior_params(x)
        if self.config.prior == "standard":
            return gaussian_elbo(
                mean, std, lambda z: self.likelihood.log_prob(self.decode(z), x), n_samples, analytic_kl
            )
        check_count(n_samples, "n_samples")
        z, eps = sample_diag_gaussian(mean, std, n_samples)
        kl = diag_gaussian_log_prob_from_noise(eps, std) - self.prior_log_prob(z)
        reconstruction = self.likelihood.log_prob(self.decode(z), x).mean(0)
        return ELBOTerms(reconstruction=reconstruction, kl={"z": kl.mean(0)}, inexact_kl=self.inexact_kl_terms)

    def log_weights(self, x: Tensor, k: int, detach_posterior_params: bool = False) -> Tensor:
        return self.log_weights_sampler(x, detach_posterior_params)(k)

    def log_weights_sampler(self, x: Tensor, detach_posterior_params: bool = False) -> Callable[[int], Tensor]:
        """Encode x once; the returned function draws n samples of log p(x, z) - log q(z|x) [n, B].

        detach_posterior_params: evaluate log q(z|x) with q's mean and std detached (the STL/DReG form, see
        elbox.core.bounds): same values, but q's parameters get gradient only through the draws z.
        """
        mean, std = self.posterior_params(x)
        log_prior = self.prior_density()

        def draw(n: int) -> Tensor:
            return self._draw_log_weights(x, mean, std, n, detach_posterior_params, log_prior)[2]

        return draw

    def importance_samples(self, x: Tensor, k: int, detach_posterior_params: bool = False) -> ImportanceSamples:
        """k reparameterized draws per example with their log weights, for the IWAE training objective."""
        check_count(k, "the number of importance samples K")
        mean, std = self.posterior_params(x)
        log_prior = self.prior_density()
        z, log_px_given_z, log_w = self._draw_log_weights(x, mean, std, k, detach_posterior_params, log_prior)
        if self.config.prior == "standard":
            kl = kl_diag_gaussians(mean, std).sum(-1)
        else:  # the VampPrior's, estimated on the draws
            kl = (log_px_given_z - log_w).mean(0)
        terms = ELBOTerms(reconstruction=log_px_given_z.mean(0), kl={"z": kl}, inexact_kl=self.inexact_kl_terms)
        return ImportanceSamples(log_w=log_w, z=z, terms=terms)

    def _draw_log_weights(
        self,
        x: Tensor,
        mean: Tensor,
        std: Tensor,
        n: int,
        detach_posterior_params: bool,
        log_prior: Callable[[Tensor], Tensor],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """n draws z ~ q(z|x): returns (z [n, B, d], log p(x|z) [n, B], log p(x, z) - log q(z|x) [n, B]), log p(z)
        from log_prior (prior_density)."""
        z, eps = sample_diag_gaussian(mean, std, n)
        log_px_given_z = self.likelihood.log_prob(self.decode(z), x)
        if detach_posterior_params:
            log_q = diag_gaussian_log_prob(z, mean.detach(), std.detach())
        else:
            log_q = diag_gaussian_log_prob_from_noise(eps, std)
        return z, log_px_given_z, log_px_given_z + log_prior(z) - log_q

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x, z) = log p(x|z) + log p(z) for latents z [S, B, d]; returns [S, B]."""
        return self.likelihood.log_prob(self.decode(z), x) + self.prior_log_prob(z)

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
        check_count(n)
        ref = next(self.parameters())
        (temperature,) = per_level_temperatures(temperature, 1)
        if self.config.prior == "vamp":
            z = self.vamp.sample(self.posterior_params, n, temperature)
        else:
            z = temperature * torch.randn(n, self.config.latent_dim, device=ref.device, dtype=ref.dtype)
        params = self.decode(z)
        return self.likelihood.mean(params) if mean else self.likelihood.sample(params)

"""The Markovian (bottom-up) hierarchical VAE, hvae_type "markov" (the module docstring of elbox.models.hvae has its
graph and terms)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elbox.core.bounds import (
    diag_gaussian_log_prob,
    diag_gaussian_log_prob_from_noise,
    diag_gaussian_mixture_density,
    kl_diag_gaussians,
    sample_diag_gaussian,
    standard_normal_log_prob,
)
from elbox.core.nets import apply_flat, mlp
from elbox.models.hvae import HVAE, Draws, HVAEConfig, _draw_like
from elbox.models.vampprior import VAMP_ELEMENTS_PER_COMPONENT, draw_from_components


class MarkovHVAE(HVAE):
    """Bottom-up Markov chain of T diagonal-Gaussian levels with MLP transitions."""

    hvae_type = "markov"

    def __init__(self, config: HVAEConfig):
        super().__init__(config)
        # the terms below the top are single-sample estimates of E[log q - log p], not KLs: they can be negative,
        # and a free-bits floor on them would cut the gradient of the prior transitions; the VampPrior has no
        # closed-form KL either
        below_top = self.level_names[:-1] if config.top_prior == "standard" else self.level_names
        self.inexact_kl_terms = frozenset(below_top)
        c = config
        num_dims = math.prod(c.data_shape)
        dims = c.latent_dims
        rev = list(reversed(c.hidden_dims))
        # encoders[0]: q(z_1|x); encoders[t]: q(z_{t+1}|z_t).  decoders[0]: p(x|z_1); decoders[t]: p(z_t|z_{t+1}).
        self.encoders = nn.ModuleList(
            [nn.Sequential(nn.Flatten(), mlp(num_dims, c.hidden_dims, 2 * dims[0], c.activation))]
            + [mlp(dims[t - 1], c.hidden_dims, 2 * dims[t], c.activation) for t in range(1, c.levels)]
        )
        self.decoders = nn.ModuleList(
            [mlp(dims[0], rev, self.likelihood.num_params * num_dims, c.activation)]
            + [mlp(dims[t], rev, 2 * dims[t - 1], c.activation) for t in range(1, c.levels)]
        )
        if c.top_prior == "vamp":  # small noise around 0, inside every data space; training moves them
            self.pseudo_inputs = nn.Parameter(0.01 * torch.randn(c.pseudo_inputs, *c.data_shape))

    def activation_elements(self) -> int:
        """Per-sample elements of the VampPrior's log density (VampPrior.activation_elements; else 0)."""
        return VAMP_ELEMENTS_PER_COMPONENT * self.config.pseudo_inputs if self.config.top_prior == "vamp" else 0

    def vamp_components(self) -> tuple[Tensor, Tensor]:
        """The VampPrior p(z_T)'s components, mean and std [K, d_T]: the top posteriors along the chain of means from
        each pseudo-input (module docstring)."""
        inputs = self.pseudo_inputs
        for t in range(self.config.levels):
            mean, std = self._posterior(t, inputs)
            inputs = mean
        return mean, std

    def _posterior(self, t: int, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of q(z_{t+1}|.) (0-based t) from its input: x for t = 0, else z_t."""
        raw = self.encoders[t](inputs) if t == 0 else apply_flat(self.encoders[t], inputs, 1)
        mean, raw_std = raw.chunk(2, dim=-1)
        return mean, F.softplus(raw_std) + self.config.min_std

    def _prior(self, t: int, z_above: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of p(z_{t+1}|z_{t+2}) (0-based t < T - 1)."""
        mean, raw_std = apply_flat(self.decoders[t + 1], z_above, 1).chunk(2, dim=-1)
        return mean, F.softplus(raw_std) + self.config.min_std

    def decode(self, z1: Tensor) -> Tensor:
        return self._params_shape(apply_flat(self.decoders[0], z1, 1), z1.shape[:-1])

    def prepare(self, x: Tensor) -> tuple[tuple[Tensor, Tensor], Callable[[Tensor], Tensor]]:
        """What does not depend on the draws: q(z_1|x)'s mean and std, and z_T -> log p(z_T) (the VampPrior's
        components computed once for every pass of a sampler)."""
        if self.config.top_prior == "standard":
            return self._posterior(0, x), standard_normal_log_prob
        return self._posterior(0, x), diag_gaussian_mixture_density(*self.vamp_components())

    def _posterior_chain(self, prepared, n: int) -> tuple[list[Tensor], list[Tensor], tuple[Tensor, Tensor]]:
        """n draws z_1..T ~ q up the chain: (the draws [n, B, d_t], their log q [n, B], the top level's mean and
        std)."""
        (mean, std), _ = prepared
        zs, log_q = [], []
        for t in range(self.config.levels):
            if t > 0:
                mean, std = self._posterior(t, zs[-1])
            z, eps = sample_diag_gaussian(mean, std, n) if t == 0 else _draw_like(mean, std)
            zs.append(z)
            log_q.append(diag_gaussian_log_prob_from_noise(eps, std))
        return zs, log_q, (mean, std)

    def _log_priors(self, zs: list[Tensor], top_log_prob: Callable[[Tensor], Tensor]) -> list[Tensor]:
        """log p(z_t|z_{t+1}) for each level t, and log p(z_T) at the top [n, B] (top_log_prob, from prepare)."""
        log_p = [diag_gaussian_log_prob(zs[t], *self._prior(t, zs[t + 1])) for t in range(len(zs) - 1)]
        log_p.append(top_log_prob(zs[-1]))
        return log_p

    def draw(self, prepared, x: Tensor, n: int) -> Draws:
        """n joint draws z_1..T ~ q: Draws(log p(x|z_1) [n, B], per-level KL terms {name: [n or 1, B]}, log weights
        [n, B]). The top level's KL term is analytic under the standard prior, the others single-sample."""
        zs, log_q, (mean, std) = self._posterior_chain(prepared, n)
        log_p = self._log_priors(zs, prepared[1])
        log_px = self.likelihood.log_prob(self.decode(zs[0]), x)
        kl = {name: log_q[t] - log_p[t] for t, name in enumerate(self.level_names)}
        if self.config.top_prior == "standard":  # the top level's KL in closed form
            kl[self.level_names[-1]] = kl_diag_gaussians(mean, std).sum(-1).reshape(-1, x.shape[0])  # [1, B] when T = 1
        return Draws(log_px, kl, log_px + sum(log_p) - sum(log_q))

    def draw_above(self, prepared, x: Tensor, n: int, k: int) -> Tensor:
        """Log weights [n, B] of L^{>k}, 1 <= k <= T: z_1..T ~ q up the chain, then z_k..z_1 drawn again from
        p(z_t|z_{t+1}) (all of them from the prior for k = T); the weight keeps the terms of the levels above k."""
        levels = self.config.levels
        if k < levels:
            zs, log_q, _ = self._posterior_chain(prepared, n)
            log_ratio = sum(p - q for p, q in zip(self._log_priors(zs, prepared[1])[k:], log_q[k:]))
            z = zs[k]
        else:
            z, log_ratio = self.top_prior_draw(n * x.shape[0], 1.0).reshape(n, x.shape[0], -1), 0.0
        for t in reversed(range(k if k < levels else levels - 1)):
            mean, std = self._prior(t, z)
            z = mean + std * torch.randn_like(mean)
        return self.likelihood.log_prob(self.decode(z), x) + log_ratio

    def top_prior_draw(self, n: int, temperature: float) -> Tensor:
        """n draws [n, d_T] of p(z_T), its standard deviation scaled by the temperature (a VampPrior's drawn
        component's)."""
        if self.config.top_prior == "standard":
            ref = next(self.parameters())
            return temperature * torch.randn(n, self.config.latent_dims[-1], device=ref.device, dtype=ref.dtype)
        return draw_from_components(*self.vamp_components(), n, temperature)

    def level_moments(self, x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Mean and variance of q(z_1|x), q(z_2|E z_1), ...: each level's posterior along the chain of means."""
        moments, inputs = {}, x
        for t, name in enumerate(self.level_names):
            mean, std = self._posterior(t, inputs)
            moments[name], inputs = (mean, std.square()), mean
        return moments

    def decode_from_means(self, x: Tensor) -> Tensor:
        return self.decode(self.encode_levels(x)["z1"])

    def ancestral_params(self, n: int, temperatures: list[float]) -> Tensor:
        """Top level first; a VampPrior's temperature scales the standard deviation of the drawn component."""
        z = self.top_prior_draw(n, temperatures[-1])
        for t in reversed(range(self.config.levels - 1)):
            mean, std = self._prior(t, z)
            z = mean + temperatures[t] * std * torch.randn_like(mean)
        return self.decode(z)

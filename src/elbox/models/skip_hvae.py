"""The HVAE with skip paths (hvae_type "skip"; Tomczak & Welling 2018, section 3.4, for two levels):

    generative   p(z2) p(z1|z2) p(x|z1,z2)      z2 the top level, z1 next to x; p(z2) standard or a VampPrior
    inference    q(z2|x) q(z1|x,z2)

Unlike the Markov chain (x -> z1 -> z2), both the encoder of z1 and the decoder see both levels: q(z1|x,z2) joins a
network of x with one of z2, p(x|z1,z2) one of z1 with one of z2 (each branch one hidden layer, then a joint one).
With D the hidden width and gated dense layers this is the 2-level HVAE of the VampPrior and Exemplar VAE papers:

    q(z2|x)      x -> D -> D -> (mean, log-variance)
    q(z1|x,z2)   [x -> D, z2 -> D] -> D -> (mean, log-variance)
    p(z1|z2)     z2 -> D -> D -> (mean, log-variance)
    p(x|z1,z2)   [z1 -> D, z2 -> D] -> D -> the likelihood's parameters

log w = log p(x|z1,z2) + log p(z1|z2) + log p(z2) - log q(z1|x,z2) - log q(z2|x) for z2 ~ q(z2|x), z1 ~ q(z1|x,z2).
The ELBO's terms: z1's is KL(q(z1|x,z2) || p(z1|z2)) in closed form at the drawn z2 (its expectation over z2 is the
term of the bound, with less variance than log q - log p); z2's is analytic for the standard prior and the single-sample
log q(z2|x) - log p(z2) for the VampPrior.

With T > 2 levels (`levels`), the same pattern continues upwards: q(z_T|x) at the top, q(z_t|x,z_{t+1}) and
p(z_t|z_{t+1}) for each level below it, and the decoder p(x|z1,z2) on the two lowest levels, so that the levels
above z2 reach x through z2. Each level's KL term is the closed form at the drawn level above.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elbox.core.bounds import (
    diag_gaussian_log_prob,
    diag_gaussian_log_prob_from_noise,
    kl_diag_gaussians,
    sample_diag_gaussian,
    standard_normal_log_prob,
)
from elbox.core.nets import apply_flat, hidden_layer, initialize_weights, mlp, posterior_std, split_first_layer
from elbox.models.hvae import HVAE, Draws, HVAEConfig, _draw_like
from elbox.models.vampprior import VampPrior


class Joined(nn.Module):
    """joint([a(x_a), b(x_b)]): a network on each input, their outputs concatenated, then a joint network (the skip
    paths of q(z1|x,z2) and p(x|z1,z2))."""

    def __init__(self, a: nn.Module, b: nn.Module, joint: nn.Module):
        super().__init__()
        self.a, self.b, self.joint = a, b, joint

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.joint(torch.cat([self.a(a), self.b(b)], dim=-1))


def joined_mlp(a_dim: int, b_dim: int, width: int, out_dim: int, act: str) -> Joined:
    """[a -> D, b -> D] -> D -> out: one hidden layer on each input, one joint hidden layer, a linear output."""
    return Joined(
        nn.Sequential(*hidden_layer(a_dim, width, act)),
        nn.Sequential(*hidden_layer(b_dim, width, act)),
        mlp(2 * width, [width], out_dim, act),
    )


class SkipHVAE(HVAE):
    """The HVAE with skip paths (the module docstring has its graph and terms), with T >= 2 levels."""

    hvae_type = "skip"

    def __init__(self, config: HVAEConfig):
        super().__init__(config)
        c = config
        num_dims, top = math.prod(c.data_shape), c.levels
        (width,), dims = c.hidden_dims, c.latent_dims
        # named encoder_z{t} and prior_z{t}, in this order, so the two-level model keeps its weight names
        setattr(
            self,
            f"encoder_z{top}",
            nn.Sequential(nn.Flatten(), mlp(num_dims, [width, width], 2 * dims[-1], c.activation)),
        )
        for t in range(1, top):  # q(z_t|x,z_{t+1}) and p(z_t|z_{t+1})
            setattr(self, f"encoder_z{t}", joined_mlp(num_dims, dims[t], width, 2 * dims[t - 1], c.activation))
            setattr(self, f"prior_z{t}", mlp(dims[t], [width, width], 2 * dims[t - 1], c.activation))
        self.decoder = joined_mlp(dims[0], dims[1], width, self.likelihood.num_params * num_dims, c.activation)
        initialize_weights(self, c.weight_init)
        self.set_top_prior()

    def set_top_prior(self) -> None:
        """The VampPrior's pseudo-inputs where the config asks for it, and which KL terms are inexact: every level below
        the top has a KL at the drawn level above; the top's is a single-sample estimate under the VampPrior (it can be
        negative)."""
        c = self.config
        self.inexact_kl_terms = frozenset() if c.top_prior == "standard" else frozenset({f"z{c.levels}"})
        if c.top_prior == "vamp":
            self.vamp = VampPrior(c.pseudo_inputs, c.data_shape, c.weight_init)

    def activation_elements(self) -> int:
        return self.vamp.activation_elements() if self.config.top_prior == "vamp" else 0

    def _gaussian(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        mean, raw_std = raw.chunk(2, dim=-1)
        return mean, posterior_std(raw_std, self.config.logvar_bounds, self.config.min_std)

    def encoder(self, t: int) -> nn.Module:
        return getattr(self, f"encoder_z{t}")

    def posterior_top(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of q(z_T|x), each [B, d_T]."""
        return self._gaussian(self.encoder(self.config.levels)(x))

    def posterior(self, t: int, x_part: Tensor, z_above: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of q(z_t|x,z_{t+1}) [*batch, d_t], from x's part of the joint network's first layer [B, .]
        (x_part, computed once per image) and z_{t+1}."""
        joined = self.encoder(t)
        linear, act, rest = split_first_layer(joined.joint)
        features = apply_flat(joined.b, z_above, 1)
        pre = x_part + F.linear(features, linear.weight[:, -features.shape[-1] :])
        return self._gaussian(apply_flat(rest, act(pre), 1))

    def prior(self, t: int, z_above: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of p(z_t|z_{t+1}) [*batch, d_t]."""
        return self._gaussian(apply_flat(getattr(self, f"prior_z{t}"), z_above, 1))

    def decode_levels(self, z1: Tensor, z2: Tensor) -> Tensor:
        """The likelihood's parameters [*batch, P, C, H, W] at (z1, z2) [*batch, d]."""
        batch = z1.shape[:-1]
        out = self.decoder(z1.reshape(-1, z1.shape[-1]), z2.reshape(-1, z2.shape[-1]))
        return self._params_shape(out, batch)

    def top_density(self) -> Callable[[Tensor], Tensor]:
        """z_T -> log p(z_T); a VampPrior's components computed once, for every pass of a sampler."""
        if self.config.top_prior == "vamp":
            return self.vamp.density(self.posterior_top)
        return standard_normal_log_prob

    # -- the HVAE interface ----------------------------------------------------------------------

    def x_branch(self, t: int, x: Tensor) -> Tensor:
        """The x branch of q(z_t|x,z_{t+1}): features [B, D]."""
        return self.encoder(t).a(x.flatten(1))

    def x_part(self, t: int, x: Tensor) -> Tensor:
        """x's part of the first layer of q(z_t|x,z_{t+1})'s joint network, W [a(x); b(z)] + c = W_a a(x) + c + W_b
        b(z): computed once per image, it saves the joint layer's x half on every importance sample."""
        linear, _, _ = split_first_layer(self.encoder(t).joint)
        features = self.x_branch(t, x)
        return F.linear(features, linear.weight[:, : features.shape[-1]], linear.bias)

    def prepare(self, x: Tensor) -> tuple[tuple[Tensor, Tensor], list[Tensor], Callable[[Tensor], Tensor]]:
        """What does not depend on the draws: q(z_T|x)'s parameters, x's part of each q(z_t|x,z_{t+1}) (z1's first)
        and log p(z_T) (top_density)."""
        return self.posterior_top(x), self.x_parts(x), self.top_density()

    def x_parts(self, x: Tensor) -> list[Tensor]:
        """x_part of each level below the top, z1's first."""
        return [self.x_part(t, x) for t in range(1, self.config.levels)]

    def draw(self, prepared, x: Tensor, n: int) -> Draws:
        """n joint draws z_T ~ q(z_T|x), then z_t ~ q(z_t|x,z_{t+1}) down to z1: Draws(log p(x|z1,z2) [n, B], {"z1",
        ..., "zT": terms [n or 1, B]}, log weights [n, B])."""
        (mean, std), x_parts, top_log_prob = prepared
        top = self.config.levels
        z, eps = sample_diag_gaussian(mean, std, n)
        zs, log_q, log_p = {top: z}, {top: diag_gaussian_log_prob_from_noise(eps, std)}, {top: top_log_prob(z)}
        standard = self.config.top_prior == "standard"
        kl = {top: kl_diag_gaussians(mean, std).sum(-1)[None] if standard else log_q[top] - log_p[top]}
        for t in range(top - 1, 0, -1):
            mean, std = self.posterior(t, x_parts[t - 1], zs[t + 1])
            zs[t], eps = _draw_like(mean, std)
            prior_mean, prior_std = self.prior(t, zs[t + 1])
            log_q[t] = diag_gaussian_log_prob_from_noise(eps, std)
            log_p[t] = diag_gaussian_log_prob(zs[t], prior_mean, prior_std)
            kl[t] = kl_diag_gaussians(mean, std, prior_mean, prior_std).sum(-1)
        log_px = self.likelihood.log_prob(self.decode_levels(zs[1], zs[2]), x)
        levels = range(1, top + 1)
        log_w = sum((log_p[t] for t in levels), log_px)
        for t in levels:
            log_w = log_w - log_q[t]
        return Draws(log_px, {f"z{t}": kl[t] for t in levels}, log_w)

    def draw_above(self, prepared, x: Tensor, n: int, k: int) -> Tensor:
        """Log weights [n, B] of L^{>k}: the levels above k from q, weighted by p / q, and z_k .. z1 from the prior
        given the level above; k = T draws every level from the prior."""
        (mean, std), x_parts, top_log_prob = prepared
        top = self.config.levels
        if k < top:
            z, eps = sample_diag_gaussian(mean, std, n)
            log_ratio = top_log_prob(z) - diag_gaussian_log_prob_from_noise(eps, std)
        else:
            z, log_ratio = self.top_prior_draw(n * x.shape[0], 1.0).reshape(n, x.shape[0], -1), 0.0
        zs = {top: z}
        for t in range(top - 1, 0, -1):
            prior_mean, prior_std = self.prior(t, zs[t + 1])
            if t > k:
                mean, std = self.posterior(t, x_parts[t - 1], zs[t + 1])
                zs[t], eps = _draw_like(mean, std)
                log_ratio = log_ratio + diag_gaussian_log_prob(zs[t], prior_mean, prior_std)
                log_ratio = log_ratio - diag_gaussian_log_prob_from_noise(eps, std)
            else:
                zs[t], _ = _draw_like(prior_mean, prior_std)
        return self.likelihood.log_prob(self.decode_levels(zs[1], zs[2]), x) + log_ratio

    def top_prior_draw(self, n: int, temperature: float) -> Tensor:
        """n draws [n, d_T] of p(z_T), its standard deviation scaled by the temperature (a VampPrior's drawn
        component's)."""
        if self.config.top_prior == "vamp":
            return self.vamp.sample(self.posterior_top, n, temperature)
        ref = next(self.parameters())
        return temperature * torch.randn(n, self.config.latent_dims[-1], device=ref.device, dtype=ref.dtype)

    def level_moments(self, x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Mean and variance of q(z_T|x), then of each q(z_t|x, E z_{t+1}) down the levels; z1 first."""
        (mean, std), x_parts = self.posterior_top(x), self.x_parts(x)
        moments = {self.config.levels: (mean, std.square())}
        for t in range(self.config.levels - 1, 0, -1):
            mean, std = self.posterior(t, x_parts[t - 1], mean)
            moments[t] = (mean, std.square())
        return {f"z{t}": moments[t] for t in sorted(moments)}

    def decode_from_means(self, x: Tensor) -> Tensor:
        moments = self.level_moments(x)
        return self.decode_levels(moments["z1"][0], moments["z2"][0])

    def ancestral_params(self, n: int, temperatures: list[float]) -> Tensor:
        """z_T from the prior (a VampPrior's temperature scales the drawn component's std), then each z_t ~
        p(z_t|z_{t+1}) down to z1."""
        top = self.config.levels
        zs = {top: self.top_prior_draw(n, temperatures[top - 1])}
        for t in range(top - 1, 0, -1):
            mean, std = self.prior(t, zs[t + 1])
            zs[t] = mean + temperatures[t - 1] * std * torch.randn_like(mean)
        return self.decode_levels(zs[1], zs[2])


class GatedConv2d(nn.Module):
    """h = conv_W(x) * sigmoid(conv_V(x)): a convolution with a learned sigmoid gate (Dauphin et al. 2017), both halves
    from one convolution of twice the channels."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, 2 * c_out, kernel, stride, padding)

    def forward(self, x: Tensor) -> Tensor:
        h, g = self.conv(x).chunk(2, dim=1)
        return h * torch.sigmoid(g)


def gated_convs(c_in: int, layers: list[tuple[int, int, int, int]]) -> nn.Sequential:
    """Gated convolutions (out channels, kernel, stride, padding) from c_in channels."""
    modules, c = [], c_in
    for c_out, kernel, stride, padding in layers:
        modules.append(GatedConv2d(c, c_out, kernel, stride, padding))
        c = c_out
    return nn.Sequential(*modules)


class ConvSkipHVAE(SkipHVAE):
    """The convolutional two-level HVAE with skip paths of Tomczak & Welling (2018) (their ConvHVAE): the graph of
    SkipHVAE, with gated convolutions where x comes in and goes out (H and W divisible by 4):

        q(z2|x)     x -> GC 32 (7x7) -> GC 32 (3x3, /2) -> GC 64 (5x5) -> GC 64 (3x3, /2) -> GC 6 (3x3) -> mean, logvar
        q(z1|x,z2)  [x -> GC 32 (3x3) -> GC 32 (/2) -> GC 64 -> GC 64 (/2) -> GC 6, z2 -> 6HW/16] -> D -> mean, logvar
        p(z1|z2)    z2 -> D -> D -> (mean, logvar)
        p(x|z1,z2)  [z1 -> D, z2 -> D] -> C H W -> GC 64 (3x3) -> 3 x GC 64 (3x3) -> 1x1 conv -> likelihood parameters
    """

    hvae_type = "conv-skip"

    def __init__(self, config: HVAEConfig):
        HVAE.__init__(self, config)
        c = config
        channels, height, width = c.data_shape
        (hidden,), (d1, d2) = c.hidden_dims, c.latent_dims
        features = 6 * (height // 4) * (width // 4)
        self.encoder_z2 = nn.Sequential(
            gated_convs(channels, [(32, 7, 1, 3), (32, 3, 2, 1), (64, 5, 1, 2), (64, 3, 2, 1), (6, 3, 1, 1)]),
            nn.Flatten(),
            nn.Linear(features, 2 * d2),
        )
        self.encoder_z1 = Joined(
            nn.Sequential(
                gated_convs(channels, [(32, 3, 1, 1), (32, 3, 2, 1), (64, 3, 1, 1), (64, 3, 2, 1), (6, 3, 1, 1)]),
                nn.Flatten(),
            ),
            nn.Sequential(*hidden_layer(d2, features, c.activation)),
            mlp(2 * features, [hidden], 2 * d1, c.activation),
        )
        self.prior_z1 = mlp(d2, [hidden, hidden], 2 * d1, c.activation)
        self.decoder = Joined(
            nn.Sequential(*hidden_layer(d1, hidden, c.activation)),
            nn.Sequential(*hidden_layer(d2, hidden, c.activation)),
            nn.Sequential(*hidden_layer(2 * hidden, channels * height * width, c.activation)),
        )
        self.decoder_convs = nn.Sequential(
            gated_convs(channels, [(64, 3, 1, 1)] * 4), nn.Conv2d(64, self.likelihood.num_params * channels, 1)
        )
        initialize_weights(self, c.weight_init)
        self.set_top_prior()

    def x_branch(self, t: int, x: Tensor) -> Tensor:
        return self.encoder(t).a(x)

    def decode_levels(self, z1: Tensor, z2: Tensor) -> Tensor:
        batch = z1.shape[:-1]
        maps = self.decoder(z1.reshape(-1, z1.shape[-1]), z2.reshape(-1, z2.shape[-1]))
        return self._params_shape(self.decoder_convs(maps.reshape(-1, *self.config.data_shape)), batch)

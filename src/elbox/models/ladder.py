"""Top-down (ladder) hierarchical VAEs (Sønderby et al. 2016, LVAE; Vahdat & Kautz 2020, NVAE; Child 2021, VDVAE),
convolutional (LadderHVAE, hvae_type="ladder") or fully connected (MLPLadderHVAE, hvae_type="mlp-ladder"); built
by elbox.models.hvae.HVAE from its config:

    p(x, z_1..T) = p(z_T) prod_{l=1}^{T-1} p(z_l|z_>l) p(x|z_1..T),   q(z_1..T|x) = prod_l q(z_l|x, z_>l)

z_1 is the level next to x and z_T the top (coarsest), as for every HVAE type; the top-down passes go from z_T
down to z_1 (in code, index i = 0 is z_T), and the config's per-level lists are given z1 first. A deterministic
bottom-up pass computes features of x for each level (at each resolution for the convolutional ladder, at each
depth of the MLP for the fully connected one); the top-down path carries a state h that starts from a learned
constant. At each level the prior's parameters come from h and the posterior's from h and the bottom-up features,
either
  "residual"  (NVAE's residual normal distribution, Vahdat & Kautz 2020):  q = N(mu_p + dmu, (sigma_p * dsigma)^2)
  "precision" (LVAE's precision-weighted merge, Sønderby et al. 2016):
              1/sigma_q^2 = 1/sigma^^2 + 1/sigma_p^2,  mu_q = (mu^/sigma^^2 + mu_p/sigma_p^2) sigma_q^2
Both are diagonal Gaussians, so every level's KL(q(z_l|x, z_>l) || p(z_l|z_>l)) is analytic (the expectation
over z_>l is the single sample the top-down pass drew). Several levels may share a resolution (latent
groups). Initialization: every prior head's last layer is zero, so the prior starts at N(0, I) (standard
deviations 1 + min_std),
and every residual branch's last layer is scaled by 1/sqrt(number of residual blocks) (VDVAE).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elbox.core.bounds import diag_gaussian_log_prob, diag_gaussian_log_prob_from_noise, kl_diag_gaussians
from elbox.core.nets import ACTIVATIONS, ResBlock, ResidualMLP, inverse_softplus, mlp
from elbox.models.hvae import HVAE, Draws, HVAEConfig

# softplus(0 + SOFTPLUS_ONE) = 1: a zero network output means a standard deviation (or ratio) of 1
SOFTPLUS_ONE = inverse_softplus(1.0)


def gaussian_params(raw: Tensor, min_std: float, dim: int) -> tuple[Tensor, Tensor]:
    """Split raw network outputs into (mean, std) along `dim`; std = softplus(raw + SOFTPLUS_ONE) + min_std,
    so a zero output is N(0, ~1)."""
    mean, raw_std = raw.chunk(2, dim=dim)
    return mean, F.softplus(raw_std + SOFTPLUS_ONE) + min_std


class LevelDraw(NamedTuple):
    """One level of a top-down pass: z_l, the noise eps it was drawn with (z_l = mu_q + std_q eps; None when z_l is
    q's mean or was drawn from the prior), and the (mean, std) of q(z_l|x, z_>l) (None when not computed) and of
    p(z_l|z_>l)."""

    z: Tensor
    eps: Tensor | None
    q: tuple[Tensor, Tensor] | None
    p: tuple[Tensor, Tensor]

    def kl(self) -> Tensor:
        """KL(q(z_l|x, z_>l) || p(z_l|z_>l)) [rows], analytic (both diagonal Gaussians)."""
        return kl_diag_gaussians(*self.q, *self.p).flatten(1).sum(1)

    def log_ratio(self) -> Tensor:
        """log p(z_l|z_>l) - log q(z_l|x, z_>l) [rows] at the drawn z_l."""
        log_q = diag_gaussian_log_prob_from_noise(self.eps.flatten(1), self.q[1].flatten(1))
        return diag_gaussian_log_prob(self.z.flatten(1), self.p[0].flatten(1), self.p[1].flatten(1)) - log_q


class TopDownHVAE(HVAE):
    """What both ladders share: the two top-down paths over `levels_td` (each level with `prior`, `posterior`,
    `z_proj` and `blocks` modules), the posterior forms, and the model interface on top of them. A subclass builds
    the networks and defines prepare() (bottom-up features, one per level, top first), _initial_state and
    _at_level.

    Both paths carry the state h down the levels, z_T first: at level l, p(z_l|z_>l) from h, z_l drawn, h <- blocks(h
    + z_proj(z_l)). The posterior path (inference) draws z_l from q(z_l|x, z_>l), from h and the level's bottom-up
    features; the prior path (generation) from p(z_l|z_>l). Their lists go top first; the model interface names
    and orders the levels z1 first (level_names)."""

    levels_td: nn.ModuleList
    out: nn.Module

    def _initial_state(self, rows: int) -> Tensor:
        """The top-down state before the top level: a learned constant repeated for `rows` rows."""
        return self.h_top.expand(rows, *self.h_top.shape[1:])

    def _at_level(self, h: Tensor, i: int) -> Tensor:
        """The state moved to where level i works (i = number of levels: where the output head works)."""
        return h

    def _prior(self, level: nn.Module, h: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of p(z_l|z_>l) from the state."""
        return gaussian_params(level.prior(h), self.config.min_std, dim=1)

    def posterior_path(
        self, features: list[Tensor], n: int, means: bool = False, prior_from: int | None = None
    ) -> tuple[list[LevelDraw], Tensor]:
        """The top-down pass of inference for n draws of each example of the bottom-up features (B rows each): at
        each level z_l ~ q(z_l|x, z_>l), or q's mean when `means`; the levels from `prior_from` on (top first) are
        drawn from p(z_l|z_>l) instead, their q not computed (the bound L^{>k}). Returns every level's LevelDraw
        ([n * B, ...] rows, draw-major) and the final state at the output head."""
        batch = features[0].shape[0]
        h = self._initial_state(n * batch)
        levels = []
        for i, level in enumerate(self.levels_td):
            h = self._at_level(h, i)
            mu_p, std_p = self._prior(level, h)
            if prior_from is not None and i >= prior_from:
                drawn = LevelDraw(mu_p + std_p * torch.randn_like(mu_p), None, None, (mu_p, std_p))
            else:
                f = features[i]
                f = f.unsqueeze(0).expand(n, *f.shape).reshape(n * batch, *f.shape[1:])
                mu_q, std_q = self._posterior(level.posterior(torch.cat([h, f], dim=1)), mu_p, std_p)
                eps = None if means else torch.randn_like(mu_q)
                z = mu_q if means else mu_q + std_q * eps
                drawn = LevelDraw(z, eps, (mu_q, std_q), (mu_p, std_p))
            levels.append(drawn)
            h = level.blocks(h + level.z_proj(drawn.z))
        return levels, self._at_level(h, len(self.levels_td))

    def prior_path(self, n: int, temperatures: list[float]) -> Tensor:
        """The top-down pass of generation for n draws: z_l ~ p(z_l|z_>l) with its standard deviation scaled by the
        level's temperature (temperatures z1 first). Returns the final state at the output head."""
        h = self._initial_state(n)
        for i, (level, temperature) in enumerate(zip(self.levels_td, temperatures[::-1])):
            h = self._at_level(h, i)
            mu_p, std_p = self._prior(level, h)
            z = mu_p + temperature * std_p * torch.randn_like(mu_p)
            h = level.blocks(h + level.z_proj(z))
        return self._at_level(h, len(self.levels_td))

    def _posterior(self, raw: Tensor, mu_p: Tensor, std_p: Tensor) -> tuple[Tensor, Tensor]:
        a, b = gaussian_params(raw, self.config.min_std, dim=1)
        if self.config.posterior == "residual":  # q = N(mu_p + dmu, (std_p * dsigma)^2)
            return mu_p + a, (std_p * b).clamp_min(self.config.min_std)
        precision_hat, precision_p = b.pow(-2), std_p.pow(-2)  # precision-weighted merge of (a, b) with the prior
        var_q = 1 / (precision_hat + precision_p)
        return (a * precision_hat + mu_p * precision_p) * var_q, var_q.sqrt()

    def named_z1_first(self, top_first: list[LevelDraw]) -> list[tuple[str, LevelDraw]]:
        """The levels of a top-down pass with their names, z1 (next to x) first."""
        return list(zip(self.level_names, top_first[::-1]))

    def _decode_state(self, h: Tensor, batch: Sequence[int]) -> Tensor:
        return self._params_shape(self.out(h), batch)

    # -- the model interface ---------------------------------------------------------------------

    def draw(self, prepared: list[Tensor], x: Tensor, n: int) -> Draws:
        """n draws z_1..L ~ q(z|x): log p(x|z), the analytic KL of each level at the draws above it, log weights."""
        batch = x.shape[0]
        levels, h = self.posterior_path(prepared, n)
        log_px = self.likelihood.log_prob(self._decode_state(h, (n, batch)), x)
        kl = {name: level.kl().view(n, batch) for name, level in self.named_z1_first(levels)}
        log_ratio = torch.stack([level.log_ratio() for level in levels]).sum(0).view(n, batch)
        return Draws(log_px, kl, log_px + log_ratio)

    def draw_above(self, prepared: list[Tensor], x: Tensor, n: int, k: int) -> Tensor:
        """Log weights [n, B] of L^{>k}, k >= 1: the top levels z ~ q down the path, the k levels next to x (the last k
        of the top-down pass) from their prior p(z_l|z_above); the weight keeps the terms of the levels drawn from q."""
        batch = x.shape[0]
        levels, h = self.posterior_path(prepared, n, prior_from=self.config.levels - k)
        log_ratio = [x.new_zeros(n * batch)] + [level.log_ratio() for level in levels if level.q is not None]
        log_px = self.likelihood.log_prob(self._decode_state(h, (n, batch)), x)
        return log_px + torch.stack(log_ratio).sum(0).view(n, batch)

    def level_distributions(self, x: Tensor) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """(mu_q, std_q, mu_p, std_p) at every level along one posterior draw, top (z_T) first (for tests and
        analysis)."""
        levels, _ = self.posterior_path(self.prepare(x), 1)
        return [(*level.q, *level.p) for level in levels]

    def level_moments(self, x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Each level's posterior mean and variance, with the levels above it set to their posterior means:
        {name: ([B, d_l], [B, d_l])}."""
        levels, _ = self.posterior_path(self.prepare(x), 1, means=True)
        return {name: (lv.q[0].flatten(1), lv.q[1].flatten(1).square()) for name, lv in self.named_z1_first(levels)}

    def decode_from_means(self, x: Tensor) -> Tensor:
        _, h = self.posterior_path(self.prepare(x), 1, means=True)
        return self._decode_state(h, (x.shape[0],))

    def ancestral_params(self, n: int, temperatures: list[float]) -> Tensor:
        return self._decode_state(self.prior_path(n, temperatures), (n,))


class LadderLevel(nn.Module):
    """One convolutional top-down level: prior head, posterior head, latent projection into the state, residual
    blocks."""

    def __init__(self, config: HVAEConfig, residual_scale: float):
        super().__init__()
        c, zc = config.channels, config.latent_channels
        mid = max(c // 4, 8)
        self.prior = ResBlock.bottleneck(c, mid, 2 * zc, zero_last=True)
        self.posterior = ResBlock.bottleneck(2 * c, mid, 2 * zc)
        self.z_proj = nn.Conv2d(zc, c, 1)
        with torch.no_grad():
            self.z_proj.weight.mul_(residual_scale)
        self.blocks = nn.Sequential(
            *[ResBlock.bottleneck(c, mid, c, residual_scale) for _ in range(config.blocks_per_level)]
        )


class LadderHVAE(TopDownHVAE):
    """Top-down hierarchical VAE on convolutional residual blocks (see the module docstring)."""

    hvae_type = "ladder"

    def __init__(self, config: HVAEConfig):
        super().__init__(config)
        cfg = config
        c_data, h, w = cfg.data_shape
        c = cfg.channels
        mid = max(c // 4, 8)
        self.factors = cfg.level_downsample[::-1]  # top first, as the top-down pass goes
        self.resolutions = sorted(set(self.factors))  # fine to coarse
        n_blocks = cfg.blocks_per_level * (len(self.resolutions) + cfg.levels) + cfg.levels
        scale = 1 / math.sqrt(n_blocks)
        self.stem = nn.Conv2d(c_data, c, 3, padding=1)
        self.bottom_up = nn.ModuleList(
            [
                nn.Sequential(*[ResBlock.bottleneck(c, mid, c, scale) for _ in range(cfg.blocks_per_level)])
                for _ in self.resolutions
            ]
        )
        top = self.factors[0]
        self.h_top = nn.Parameter(torch.zeros(1, c, h // top, w // top))
        self.levels_td = nn.ModuleList([LadderLevel(cfg, scale) for _ in range(cfg.levels)])
        self.out = nn.Sequential(nn.GELU(), nn.Conv2d(c, self.likelihood.num_params * c_data, 3, padding=1))

    def activation_elements(self) -> int:
        """Per-sample activation elements that bound IWAE evaluation passes: the top-down state upsampled to the
        image size, and the same again twice over for the temporaries around it (concatenations, heads)."""
        _, h, w = self.config.data_shape
        return 3 * self.config.channels * h * w

    def prepare(self, x: Tensor) -> list[Tensor]:
        """Bottom-up features of x at each level's resolution, top level first: [B, C, H/f, W/f] for its factor f
        (levels that share a resolution share the tensor)."""
        h = self.stem(x)
        features, factor = {}, 1
        for target, blocks in zip(self.resolutions, self.bottom_up):
            h = _resize(h, factor, target)
            factor = target
            h = blocks(h)
            features[target] = h
        return [features[f] for f in self.factors]

    def _at_level(self, h: Tensor, i: int) -> Tensor:
        source = self.factors[max(i - 1, 0)]
        return _resize(h, source, self.factors[i] if i < len(self.factors) else 1)


class MLPLadderLevel(nn.Module):
    """One top-down level on vectors: prior head, posterior head (from [state, bottom-up features]), latent
    projection into the state, residual MLP blocks."""

    def __init__(self, width: int, latent_dim: int, config: HVAEConfig, residual_scale: float):
        super().__init__()
        act = config.activation
        self.prior = nn.Sequential(ACTIVATIONS[act](), nn.Linear(width, 2 * latent_dim))
        nn.init.zeros_(self.prior[-1].weight)
        nn.init.zeros_(self.prior[-1].bias)
        self.posterior = nn.Sequential(ACTIVATIONS[act](), mlp(2 * width, [max(1, width // 2)], 2 * latent_dim, act))
        self.z_proj = nn.Linear(latent_dim, width)
        with torch.no_grad():
            self.z_proj.weight.mul_(residual_scale)
        self.blocks = nn.Sequential(
            *[ResidualMLP(width, width, act, residual_scale) for _ in range(config.blocks_per_level)]
        )


class MLPLadderHVAE(TopDownHVAE):
    """Top-down hierarchical VAE on fully connected residual blocks, the original LVAE shape (Sønderby et al. 2016)
    with a residual top-down state (as in the convolutional ladder): a deterministic bottom-up MLP
    x -> hidden_dims -> W (W = the last hidden width) followed by blocks_per_level residual MLP blocks per level, one
    feature vector per level (the deepest for the top level); a top-down state of width W, from a learned constant,
    that each level's z_l enters through a linear projection and residual blocks; p(x|z) from the final state
    through the hidden widths in reverse. Every layer is a matrix product over the batch: it trains at about half the
    machine's matrix-product rate on a CPU (benchmarks/run.py, family hvae-mlp-ladder)."""

    hvae_type = "mlp-ladder"

    def __init__(self, config: HVAEConfig):
        super().__init__(config)
        cfg = config
        num_dims = math.prod(cfg.data_shape)
        width = cfg.hidden_dims[-1]
        scale = 1 / math.sqrt(2 * cfg.blocks_per_level * cfg.levels + cfg.levels)
        self.stem = nn.Sequential(nn.Flatten(), mlp(num_dims, cfg.hidden_dims[:-1], width, cfg.activation))
        self.bottom_up = nn.ModuleList(
            [
                nn.Sequential(*[ResidualMLP(width, width, cfg.activation, scale) for _ in range(cfg.blocks_per_level)])
                for _ in range(cfg.levels)
            ]
        )
        self.h_top = nn.Parameter(torch.zeros(1, width))
        self.levels_td = nn.ModuleList([MLPLadderLevel(width, d, cfg, scale) for d in cfg.latent_dims[::-1]])
        self.out = nn.Sequential(
            ACTIVATIONS[cfg.activation](),
            mlp(width, list(reversed(cfg.hidden_dims[:-1])), self.likelihood.num_params * num_dims, cfg.activation),
        )

    def activation_elements(self) -> int:
        """Per-sample activation elements that bound IWAE evaluation passes: the state, the repeated features, their
        concatenation and the residual blocks' temporaries, about 8 vectors of width W."""
        return 8 * self.config.hidden_dims[-1]

    def prepare(self, x: Tensor) -> list[Tensor]:
        """Bottom-up features [B, W], one per level, top level (the deepest features) first."""
        h, features = self.stem(x), []
        for blocks in self.bottom_up:
            h = blocks(h)
            features.append(h)
        return features[::-1]


def _resize(h: Tensor, factor: int, target: int) -> Tensor:
    """Move a map from 1/factor of the image size to 1/target: average pooling down, nearest upsampling up."""
    if target > factor:
        return F.avg_pool2d(h, target // factor)
    if target < factor:
        return F.interpolate(h, scale_factor=factor // target, mode="nearest")
    return h

"""Top-down (ladder) hierarchical VAEs (Sønderby et al. 2016, LVAE; Vahdat & Kautz 2020, NVAE; Child 2021, VDVAE),
convolutional (LadderHVAE, hvae_type="ladder") or fully connected (MLPLadderHVAE, hvae_type="mlp-ladder"); built
by elbox.models.hvae.HVAE from its config:

    p(x, z_1..L) = p(z_1) prod_{l=2}^L p(z_l|z_<l) p(x|z_<=L),   q(z_1..L|x) = prod_l q(z_l|x, z_<l)

z_1 is the top (coarsest) level. A deterministic bottom-up pass computes features of x for each level (at
each resolution for the convolutional ladder, at each depth of the MLP for the fully connected one);
the top-down path carries a state h that starts from a learned constant. At each level the prior's
parameters come from h and the posterior's from h and the bottom-up features, either
  "residual"  (NVAE's residual normal distribution, Vahdat & Kautz 2020):  q = N(mu_p + dmu, (sigma_p * dsigma)^2)
  "precision" (LVAE's precision-weighted merge, Sønderby et al. 2016):
              1/sigma_q^2 = 1/sigma^^2 + 1/sigma_p^2,  mu_q = (mu^/sigma^^2 + mu_p/sigma_p^2) sigma_q^2
Both are diagonal Gaussians, so every level's KL(q(z_l|x, z_<l) || p(z_l|z_<l)) is analytic (the expectation
over z_<l is the single sample the top-down pass drew). Several levels may share a resolution (latent
groups). Initialization: every prior head's last layer is zero, so the prior starts at N(0, I) (standard
deviations 1 + min_std),
and every residual branch's last layer is scaled by 1/sqrt(number of residual blocks) (VDVAE).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elbox.core.bounds import diag_gaussian_log_prob, diag_gaussian_log_prob_from_noise, kl_diag_gaussians
from elbox.core.nets import ACTIVATIONS, ResBlock, ResidualMLP, inverse_softplus, mlp
from elbox.models.hvae import HVAE, HVAEConfig

# softplus(0 + SOFTPLUS_ONE) = 1: a zero network output means a standard deviation (or ratio) of 1
SOFTPLUS_ONE = inverse_softplus(1.0)


def gaussian_params(raw: Tensor, min_std: float, dim: int) -> tuple[Tensor, Tensor]:
    """Split raw network outputs into (mean, std) along `dim`; std = softplus(raw + SOFTPLUS_ONE) + min_std,
    so a zero output is N(0, ~1)."""
    mean, raw_std = raw.chunk(2, dim=dim)
    return mean, F.softplus(raw_std + SOFTPLUS_ONE) + min_std


class TopDownHVAE(HVAE):
    """What both ladders share: the top-down pass over `levels_td` (each level with `prior`, `posterior`, `z_proj`
    and `blocks` modules), the posterior forms, and the model interface on top of it. A subclass builds the
    networks and defines prepare() (bottom-up features, one per level, top first), _initial_state and _at_level."""

    levels_td: nn.ModuleList
    out: nn.Module

    def _initial_state(self, rows: int) -> Tensor:
        """The top-down state before the top level: a learned constant repeated for `rows` rows."""
        return self.h_top.expand(rows, *self.h_top.shape[1:])

    def _at_level(self, h: Tensor, i: int) -> Tensor:
        """The state moved to where level i works (i = number of levels: where the output head works)."""
        return h

    def _top_down(
        self,
        features: list[Tensor] | None,
        n: int,
        batch: int,
        pick: Callable[[int, Tensor, Tensor, Tensor, Tensor], Tensor],
    ) -> Tensor:
        """The top-down path for n draws of `batch` rows; returns the final state [n * batch, ...].

        At each level, pick(level, mu_q, std_q, mu_p, std_p) chooses z (posterior and prior parameters, the
        posterior ones None when features is None, i.e. when sampling from the prior)."""
        h = self._initial_state(n * batch)
        for i, level in enumerate(self.levels_td):
            h = self._at_level(h, i)
            mu_p, std_p = gaussian_params(level.prior(h), self.config.min_std, dim=1)
            mu_q = std_q = None
            if features is not None:
                f = features[i]
                f = f.unsqueeze(0).expand(n, *f.shape).reshape(n * batch, *f.shape[1:])
                mu_q, std_q = self._posterior(level.posterior(torch.cat([h, f], dim=1)), mu_p, std_p)
            z = pick(i, mu_q, std_q, mu_p, std_p)
            h = level.blocks(h + level.z_proj(z))
        return self._at_level(h, len(self.levels_td))

    def _posterior(self, raw: Tensor, mu_p: Tensor, std_p: Tensor) -> tuple[Tensor, Tensor]:
        a, b = gaussian_params(raw, self.config.min_std, dim=1)
        if self.config.posterior == "residual":  # q = N(mu_p + dmu, (std_p * dsigma)^2)
            return mu_p + a, (std_p * b).clamp_min(self.config.min_std)
        precision_hat, precision_p = b.pow(-2), std_p.pow(-2)  # precision-weighted merge of (a, b) with the prior
        var_q = 1 / (precision_hat + precision_p)
        return (a * precision_hat + mu_p * precision_p) * var_q, var_q.sqrt()

    def _decode_state(self, h: Tensor, batch: Sequence[int]) -> Tensor:
        return self._params_shape(self.out(h), batch)

    # -- the model interface ---------------------------------------------------------------------

    def draw(self, prepared: list[Tensor], x: Tensor, n: int):
        """n draws z_1..L ~ q(z|x). Returns (log p(x|z) [n, B], analytic KL per level {name: [n, B]},
        log weights [n, B])."""
        batch = x.shape[0]
        kl: dict[str, Tensor] = {}
        log_ratio = []  # log p(z_l|z_<l) - log q(z_l|x, z_<l) per level, for the log weights

        def pick(i, mu_q, std_q, mu_p, std_p):
            eps = torch.randn_like(mu_q)
            z = mu_q + std_q * eps
            kl[self.level_names[i]] = kl_diag_gaussians(mu_q, std_q, mu_p, std_p).flatten(1).sum(1).view(n, batch)
            log_q = diag_gaussian_log_prob_from_noise(eps.flatten(1), std_q.flatten(1))
            log_ratio.append(diag_gaussian_log_prob(z.flatten(1), mu_p.flatten(1), std_p.flatten(1)) - log_q)
            return z

        params = self._decode_state(self._top_down(prepared, n, batch, pick), (n, batch))
        log_px = self.likelihood.log_prob(params, x)
        return log_px, kl, log_px + torch.stack(log_ratio).sum(0).view(n, batch)

    def draw_above(self, prepared: list[Tensor], x: Tensor, n: int, k: int) -> Tensor:
        """Log weights [n, B] of L^{>k}, k >= 1: the top levels z ~ q down the path, the k levels next to x (the last k
        of the top-down pass) from their prior p(z_l|z_above); the weight keeps the terms of the levels drawn from q."""
        batch, first_from_prior = x.shape[0], self.config.levels - k
        log_ratio = [x.new_zeros(n * batch)]

        def pick(i, mu_q, std_q, mu_p, std_p):
            if i >= first_from_prior:
                return mu_p + std_p * torch.randn_like(mu_p)
            eps = torch.randn_like(mu_q)
            z = mu_q + std_q * eps
            log_q = diag_gaussian_log_prob_from_noise(eps.flatten(1), std_q.flatten(1))
            log_ratio.append(diag_gaussian_log_prob(z.flatten(1), mu_p.flatten(1), std_p.flatten(1)) - log_q)
            return z

        params = self._decode_state(self._top_down(prepared, n, batch, pick), (n, batch))
        return self.likelihood.log_prob(params, x) + torch.stack(log_ratio).sum(0).view(n, batch)

    def level_distributions(self, x: Tensor) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """(mu_q, std_q, mu_p, std_p) at every level along one posterior draw, top first (for tests and analysis)."""
        found = []

        def pick(i, mu_q, std_q, mu_p, std_p):
            found.append((mu_q, std_q, mu_p, std_p))
            return mu_q + std_q * torch.randn_like(mu_q)

        self._top_down(self.prepare(x), 1, x.shape[0], pick)
        return found

    def level_moments(self, x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Each level's posterior mean and variance, with the levels above it set to their posterior means:
        {name: ([B, d_l], [B, d_l])}."""
        moments = {}

        def pick(i, mu_q, std_q, mu_p, std_p):
            moments[self.level_names[i]] = (mu_q.flatten(1), std_q.flatten(1).square())
            return mu_q

        self._top_down(self.prepare(x), 1, x.shape[0], pick)
        return moments

    def decode_from_means(self, x: Tensor) -> Tensor:
        h = self._top_down(self.prepare(x), 1, x.shape[0], lambda i, mu_q, std_q, mu_p, std_p: mu_q)
        return self._decode_state(h, (x.shape[0],))

    def ancestral_params(self, n: int, temperatures: list[float]) -> Tensor:
        def pick(i, mu_q, std_q, mu_p, std_p):
            return mu_p + temperatures[i] * std_p * torch.randn_like(mu_p)

        return self._decode_state(self._top_down(None, 1, n, pick), (n,))


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
        self.factors = list(cfg.level_downsample)
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
        self.levels_td = nn.ModuleList([MLPLadderLevel(width, d, cfg, scale) for d in cfg.latent_dims])
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

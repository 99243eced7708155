"""Variational diffusion models (Kingma et al. 2021): a Markovian hierarchical VAE whose encoder is fixed noise.

Data are 8-bit images. The model takes elbox's "discrete" space x = k/255 and works on VDM's grid
    x = 2 (k + 1/2) / 256 - 1,  k in {0..255}.
Encoder (variance preserving): q(z_t|x) = N(alpha_t x, sigma_t^2 I), t in [0, 1], with
    gamma(t) = -log SNR(t) increasing,  alpha_t^2 = sigmoid(-gamma(t)),  sigma_t^2 = sigmoid(gamma(t)).
Negative ELBO, in nats per example (elbox.bounds.ELBOTerms: reconstruction, kl["prior"], kl["diffusion"]):
    -ELBO(x) = E_q(z_0|x)[-log p(x|z_0)]        reconstruction: 256-way categorical per pixel,
                                                  p(x_i = k | z_0) = softmax_k(-1/2 e^{-gamma_0} (z_0i/alpha_0 - x_k)^2)
             + KL(q(z_1|x) || N(0, I))          prior
             + L_T(x)                           diffusion, the denoising KL terms:
      continuous time (timesteps = 0):  L_inf = 1/2 E_{t~U(0,1)}[gamma'(t) ||eps - eps_hat(z_t; t)||^2]
      discrete time (T steps, t_i = i/T): L_T = sum_i 1/2 expm1(gamma(t_i) - gamma(t_{i-1})) E||eps - eps_hat||^2
The generative model is p(z_s|z_t) = q(z_s|z_t, x = x_hat(z_t; t)) (REFERENCE.md, VDM).

The denoiser is a U-Net conditioned on the normalized log-SNR c = (gamma_t - gamma_min)/(gamma_max - gamma_min), not
on t, so the continuous-time loss depends on the schedule only through its endpoints; the interior only changes the
estimator's variance. Its output is read in one of three parameterizations (noise eps, clean data x0, or the
conditional score of q(z_t|x), -eps/sigma_t); they give the same ELBO for equivalent predictions.

Schedules (all map [0, 1] onto [gamma_min, gamma_max], increasing):
  linear          gamma linear in t, fixed endpoints (VDM's fixed linear)
  learned-linear  gamma linear in t, endpoints learned on the ELBO
  learned-net     a monotone network shape (VDM's NNet), endpoints learned on the ELBO; in continuous time its
                  interior is fitted to minimize the variance of the diffusion loss estimate (VDM App. I.2): the
                  interior's ELBO gradient is zero in expectation, so it gets the gradient of E[L^2] instead.
                  In discrete time the interior matters and is fitted on the ELBO.
  cosine          DDPM/iDDPM's cosine alpha_bar (s = 0.008), restricted to the times where gamma lies in range
  linear-beta     the continuous-time limit of DDPM's linear beta schedule (1e-4 to 0.02 over 1000 steps),
                  likewise restricted. DDPM's own endpoints are about gamma in [-9.2, 10.1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elbox.bounds import ELBOTerms
from elbox.errors import ElboxError
from elbox.options import check_options, option
from elbox.models.base import LatentVariableModel, register_model
from elbox.nets import ConditionedUNet

SCHEDULES = ("linear", "learned-linear", "learned-net", "cosine", "linear-beta")
PARAMETERIZATIONS = ("eps", "x0", "score")
DIFFUSION_LOSSES = ("elbo", "simple")
NUM_LEVELS = 256
# Upper bound on elements of the [*, 256] logits of the categorical reconstruction computed at once.
MAX_LOGIT_ELEMENTS = 2**24
GAMMA_LIMIT = 30.0  # |gamma| bound: sigmoid(-30) = 9e-14, already below float32's resolution next to 1


# ----------------------------------------------------------------------------------------------
# Noise schedules


class NoiseSchedule(nn.Module):
    """gamma(t) = gamma_min + (gamma_max - gamma_min) * shape(t), with shape increasing from 0 to 1 on [0, 1].

    Subclasses define `shape_and_slope(t) -> (shape, d shape / dt)`; derivatives are analytic (tested against
    autograd). Endpoints are buffers, or parameters when `learned_endpoints` (gamma_max = gamma_min + exp(w)).
    """

    # True when the interior is fitted to the estimator's variance rather than the ELBO (continuous time)
    interior_fits_variance: bool = False

    def __init__(self, gamma_min: float, gamma_max: float, learned_endpoints: bool = False):
        super().__init__()
        start = torch.tensor(float(gamma_min))
        log_width = torch.tensor(math.log(gamma_max - gamma_min))
        if learned_endpoints:
            self.gamma_start, self.log_width = nn.Parameter(start), nn.Parameter(log_width)
        else:
            self.register_buffer("gamma_start", start)
            self.register_buffer("log_width", log_width)

    def endpoints(self) -> tuple[Tensor, Tensor]:
        """(gamma(0), gamma(1)) as scalar tensors."""
        return self.gamma_start, self.gamma_start + self.log_width.exp()

    def shape_and_slope(self, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, t: Tensor) -> Tensor:
        return self.gamma_and_slope(t)[0]

    def gamma_and_slope(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """gamma(t) and gamma'(t)."""
        shape, slope = self.shape_and_slope(t)
        width = self.log_width.exp()
        return self.gamma_start + width * shape, width * slope


class LinearSchedule(NoiseSchedule):
    def shape_and_slope(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return t, torch.ones_like(t)


class MonotoneNetSchedule(NoiseSchedule):
    """VDM's monotone network: g(t) = l1(t) + l3(sigmoid(l2(l1(t)))) / n with positive weights (softplus), so g is
    increasing; shape(t) = (g(t) - g(0)) / (g(1) - g(0)). Starts close to linear."""

    def __init__(self, gamma_min: float, gamma_max: float, hidden: int = 1024):
        super().__init__(gamma_min, gamma_max, learned_endpoints=True)
        inv_softplus_1 = math.log(math.e - 1)
        self.w1 = nn.Parameter(torch.tensor(inv_softplus_1))
        self.w2 = nn.Parameter(torch.randn(hidden) * 0.1 + inv_softplus_1)
        self.b2 = nn.Parameter(torch.randn(hidden) * 0.1)
        self.w3 = nn.Parameter(torch.randn(hidden) * 0.1 - 2.0)
        self.hidden = hidden

    def _g_and_slope(self, t: Tensor) -> tuple[Tensor, Tensor]:
        w1, w2, w3 = F.softplus(self.w1), F.softplus(self.w2), F.softplus(self.w3)
        h = w1 * t
        u = torch.sigmoid(h[..., None] * w2 + self.b2)
        g = h + (u * w3).sum(-1) / self.hidden
        slope = w1 * (1 + (u * (1 - u) * w2 * w3).sum(-1) / self.hidden)
        return g, slope

    def shape_and_slope(self, t: Tensor) -> tuple[Tensor, Tensor]:
        g, slope = self._g_and_slope(t)
        ends, _ = self._g_and_slope(torch.tensor([0.0, 1.0], device=t.device, dtype=t.dtype))
        span = ends[1] - ends[0]
        return (g - ends[0]) / span, slope / span


class _RestrictedSchedule(NoiseSchedule):
    """A fixed schedule gamma_f(tau) on tau in [0, 1], restricted to the interval [tau_lo, tau_hi] where
    gamma_f runs from gamma_min to gamma_max: shape(t) = (gamma_f(tau(t)) - gamma_min) / (gamma_max - gamma_min),
    tau(t) = tau_lo + (tau_hi - tau_lo) t. Subclasses give gamma_f, its derivative and its inverse."""

    def __init__(self, gamma_min: float, gamma_max: float):
        super().__init__(gamma_min, gamma_max)
        self.tau_lo, self.tau_hi = self.inverse(gamma_min), self.inverse(gamma_max)
        if not 0 <= self.tau_lo < self.tau_hi <= 1:
            top = self.gamma_f(torch.tensor(1.0, dtype=torch.float64))[0].item()
            raise ElboxError(f"gamma range [{gamma_min}, {gamma_max}] lies outside what the {type(self).__name__} reaches, "
                             f"gamma < {top:.4g}")

    def gamma_f(self, tau: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, gamma: float) -> float:
        raise NotImplementedError

    def shape_and_slope(self, t: Tensor) -> tuple[Tensor, Tensor]:
        tau = self.tau_lo + (self.tau_hi - self.tau_lo) * t.double()
        gamma, dgamma = self.gamma_f(tau)
        width = self.log_width.exp().double()
        shape = (gamma - self.gamma_start.double()) / width
        slope = dgamma * (self.tau_hi - self.tau_lo) / width
        return shape.to(t.dtype), slope.to(t.dtype)


class CosineSchedule(_RestrictedSchedule):
    """alpha_bar(tau) = f(tau)/f(0), f(tau) = cos^2(theta), theta = (tau + s)/(1 + s) * pi/2 (Nichol & Dhariwal).
    gamma = log(1/alpha_bar - 1) = log(sin(theta - theta0) sin(theta + theta0)) - 2 log cos(theta),
    using cos^2 a - cos^2 b = sin(b - a) sin(b + a), which stays accurate near tau = 0."""

    s = 0.008

    def _theta(self, tau):
        return (tau + self.s) / (1 + self.s) * (math.pi / 2)

    def gamma_f(self, tau: Tensor) -> tuple[Tensor, Tensor]:
        theta, theta0 = self._theta(tau), self._theta(0.0)
        gamma = torch.log(torch.sin(theta - theta0) * torch.sin(theta + theta0)) - 2 * torch.log(torch.cos(theta))
        dtheta = math.pi / (2 * (1 + self.s))
        dgamma = dtheta * (1 / torch.tan(theta - theta0) + 1 / torch.tan(theta + theta0) + 2 * torch.tan(theta))
        return gamma, dgamma

    def inverse(self, gamma: float) -> float:
        """tau with gamma_f(tau) = gamma. With d = theta - theta0, e^gamma/(1 + e^gamma) = 1 - alpha_bar gives
        sin(d) sin(2 theta0 + d) = cos^2(theta0) sigmoid(gamma); solved for d by Newton's method on the logs (the
        closed form through acos loses d when it is tiny, at gamma << 0)."""
        theta0 = self._theta(0.0)
        target = math.log(math.cos(theta0) ** 2) - math.log1p(math.exp(-gamma))  # log(cos^2 theta0 * sigmoid(gamma))
        d = min(math.exp(target) / math.sin(2 * theta0), math.pi / 2 - theta0 - 1e-9)
        for _ in range(100):
            f = math.log(math.sin(d)) + math.log(math.sin(2 * theta0 + d)) - target
            step = f / (1 / math.tan(d) + 1 / math.tan(2 * theta0 + d))
            d = min(max(d - step, d / 10), (d + math.pi / 2 - theta0) / 2)
            if abs(step) < 1e-15 * d:
                break
        return (1 + self.s) * (2 / math.pi) * d


class LinearBetaSchedule(_RestrictedSchedule):
    """DDPM's linear beta from beta_1 to beta_T over T0 = 1000 steps, in continuous time:
    -log alpha_bar(tau) = c(tau) = T0 (beta_1 tau + (beta_T - beta_1) tau^2 / 2), gamma = log(expm1(c))."""

    steps, beta_1, beta_T = 1000, 1e-4, 0.02

    def gamma_f(self, tau: Tensor) -> tuple[Tensor, Tensor]:
        c = self.steps * (self.beta_1 * tau + (self.beta_T - self.beta_1) * tau**2 / 2)
        dc = self.steps * (self.beta_1 + (self.beta_T - self.beta_1) * tau)
        one_minus_alpha_bar = -torch.expm1(-c)
        return c + torch.log(one_minus_alpha_bar), dc / one_minus_alpha_bar

    def inverse(self, gamma: float) -> float:
        c = math.log1p(math.exp(gamma))  # softplus(gamma) = -log alpha_bar
        a, b = self.steps * (self.beta_T - self.beta_1) / 2, self.steps * self.beta_1
        return 2 * c / (b + math.sqrt(b * b + 4 * a * c))  # the positive root of a tau^2 + b tau = c, without cancellation


def build_schedule(name: str, gamma_min: float, gamma_max: float, timesteps: int) -> NoiseSchedule:
    if name == "linear":
        return LinearSchedule(gamma_min, gamma_max)
    if name == "learned-linear":
        return LinearSchedule(gamma_min, gamma_max, learned_endpoints=True)
    if name == "learned-net":
        schedule = MonotoneNetSchedule(gamma_min, gamma_max)
        schedule.interior_fits_variance = timesteps == 0
        return schedule
    if name == "cosine":
        return CosineSchedule(gamma_min, gamma_max)
    if name == "linear-beta":
        return LinearBetaSchedule(gamma_min, gamma_max)
    raise ElboxError(f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


# ----------------------------------------------------------------------------------------------
# The model


@dataclass
class DiffusionConfig:
    data_shape: tuple[int, ...] = option((1, 28, 28), "shape of one image (channels, height, width)", minimum=1, cli=False)
    timesteps: int = option(0, "number of steps T of the discrete-time model; 0 = continuous time", minimum=0, metavar="T")
    schedule: str = option("learned-linear", "noise schedule gamma(t) = -log SNR(t)", choices=SCHEDULES)
    gamma_min: float = option(-13.3, "gamma(0) (the initial value when learned)", minimum=-GAMMA_LIMIT, maximum=GAMMA_LIMIT)
    gamma_max: float = option(5.0, "gamma(1) (the initial value when learned)", minimum=-GAMMA_LIMIT, maximum=GAMMA_LIMIT)
    parameterization: str = option("eps", "what the denoiser predicts: the noise (eps), the data (x0) or the score",
                                   choices=PARAMETERIZATIONS)
    loss: str = option("elbo", "train on the ELBO, or on the simple unweighted noise-prediction loss (reports are "
                               "always the ELBO)", choices=DIFFUSION_LOSSES, aliases=("--diffusion-loss",))
    channels: list[int] = option(help="U-Net width per resolution level (each further level halves the image)",
                                 factory=lambda: [16, 32, 64], minimum=1, aliases=("--unet-channels",), metavar="C")
    blocks_per_level: int = option(1, "U-Net residual blocks per resolution", minimum=1)
    fourier_features: bool = option(True, "feed Fourier features of z_t to the U-Net")

    def __post_init__(self):
        check_options(self)
        checks = [
            (len(self.data_shape) == 3, f"data_shape must be (channels, height, width), got {self.data_shape}"),
            (self.gamma_min < self.gamma_max, f"need gamma_min < gamma_max, got {self.gamma_min}, {self.gamma_max}"),
            (bool(self.channels), "channels must be a non-empty list of positive widths"),
            (not (self.loss == "simple" and self.schedule.startswith("learned")),
             f"the simple loss gives the {self.schedule} schedule no gradient that balances its endpoints; use a fixed schedule or the elbo loss"),
        ]
        for ok, message in checks:
            if not ok:
                raise ElboxError(message)


def window_half_width(gamma_0: Tensor) -> int:
    """Half-width W (in grid steps) of the window of 2W + 1 grid values that reconstruction_log_prob sums over.

    u lies within half a step of its nearest grid value, so one m steps beyond it has a logit at least
    r^2 ((m - 1/2)^2 - 1/4) / 2 lower, r = spacing / sigma = (2/256) e^{-gamma_0/2}. Beyond W the terms fall
    geometrically (ratio <= e^{-r^2}), on both sides, so the values outside the window weigh at most
    2 e^{-r^2 ((W + 1/2)^2 - 1/4) / 2} / (1 - e^{-r^2}) of the nearest one. W makes that <= e^-30: the window's
    log-sum-exp is low by less than 1e-13 per pixel."""
    r = (2 / NUM_LEVELS) * math.exp(-0.5 * float(gamma_0))
    tail = math.log(2 / -math.expm1(-r * r))
    return max(1, math.ceil(math.sqrt(2 * (30 + tail) / (r * r) + 0.25) - 0.5))


def bin_indices(x: Tensor) -> Tensor:
    """k in {0..255} of 8-bit data stored as x = k/255; ElboxError for anything else."""
    scaled = x * (NUM_LEVELS - 1)
    k = scaled.round()
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1 or (scaled - k).abs().max() > 1e-3:
        raise ElboxError("the diffusion model takes 8-bit data x = k/255 with k in {0..255} (the discrete space); "
                         f"got values in [{x.min().item():.4g}, {x.max().item():.4g}] not all on that grid")
    return k.long()


def encode_8bit(x: Tensor) -> Tensor:
    """elbox's discrete space x = k/255 -> VDM's grid 2(k + 1/2)/256 - 1."""
    return (2 * (x * (NUM_LEVELS - 1)).round() + 1) / NUM_LEVELS - 1


def alpha_sigma(gamma: Tensor) -> tuple[Tensor, Tensor]:
    """alpha = sqrt(sigmoid(-gamma)), sigma = sqrt(sigmoid(gamma))."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def _per_example(v: Tensor, ndim: int) -> Tensor:
    """[N] -> [N, 1, 1, ...] to broadcast against [N, *data_shape]."""
    return v.reshape(-1, *([1] * ndim))


@register_model("diffusion", DiffusionConfig)
class DiffusionModel(LatentVariableModel):
    """Variational diffusion model on 8-bit images (see the module docstring). No log_weights and no encoder:
    the ELBO is estimated over time (and summed exactly over steps in discrete time)."""

    def __init__(self, config: DiffusionConfig):
        super().__init__(config)
        self.schedule = build_schedule(config.schedule, config.gamma_min, config.gamma_max, config.timesteps)
        self.denoiser = ConditionedUNet(config.data_shape, config.channels, config.blocks_per_level, config.fourier_features)
        grid = (2 * torch.arange(NUM_LEVELS, dtype=torch.float32) + 1) / NUM_LEVELS - 1
        self.register_buffer("grid", grid, persistent=False)

    @property
    def data_space(self) -> str:
        return "discrete"

    @property
    def trains_on_surrogate(self) -> bool:
        return self.config.loss == "simple"

    # -- pieces of the ELBO, on encoded data x in R^D (any real values, so tests can use Gaussian data) -----

    def predict_eps(self, z: Tensor, gamma: Tensor) -> Tensor:
        """The denoiser's prediction read as noise eps_hat, for z_t [N, *data_shape] and gamma_t [N]."""
        out, alpha, sigma = self._denoise(z, gamma)
        if self.config.parameterization == "eps":
            return out
        if self.config.parameterization == "x0":
            return (z - alpha * out) / sigma
        return -sigma * out  # score of q(z_t|x) = -eps / sigma_t

    def _denoise(self, z: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Raw denoiser output and alpha_t, sigma_t shaped to broadcast with z."""
        gamma_min, gamma_max = self.schedule.endpoints()
        cond = (gamma - gamma_min) / (gamma_max - gamma_min)
        alpha, sigma = alpha_sigma(_per_example(gamma, z.dim() - 1))
        return self.denoiser(z, cond) + self.skip(z, alpha), alpha, sigma

    def skip(self, z: Tensor, alpha: Tensor) -> Tensor:
        """Added to the denoiser's output so that, with the output layer at zero, each parameterization starts
        from a sensible guess: eps_hat = z_t (VDM; right at high noise), x_hat = alpha_t z_t, s_hat = -z_t (both exact
        for data ~ N(0, I))."""
        p = self.config.parameterization
        return z if p == "eps" else alpha * z if p == "x0" else -z

    def _squared_error(self, x: Tensor, z: Tensor, eps: Tensor, gamma: Tensor) -> Tensor:
        """Per-example ||eps - eps_hat||^2, computed in the parameterization's own space: for x0,
        SNR_t ||x - x_hat||^2; for the score, ||eps + sigma_t s_hat||^2 (the same quantity, exactly)."""
        out, alpha, sigma = self._denoise(z, gamma)
        p = self.config.parameterization
        if p == "eps":
            err = eps - out
        elif p == "x0":
            err = (x - out) * (alpha / sigma)
        else:
            err = eps + sigma * out
        return err.flatten(1).square().sum(-1)

    def prior_kl(self, x: Tensor) -> Tensor:
        """KL(q(z_1|x) || N(0, I)) = 1/2 sum_i (alpha_1^2 x_i^2 + sigma_1^2 - log sigma_1^2 - 1), per example."""
        _, gamma_1 = self.schedule.endpoints()
        alpha_sq, sigma_sq = torch.sigmoid(-gamma_1), torch.sigmoid(gamma_1)
        per_dim = 0.5 * (alpha_sq * x.square() + sigma_sq - F.logsigmoid(gamma_1) - 1)
        return per_dim.flatten(1).sum(-1)

    @property
    def activation_elements(self) -> int:
        """Per-image activation elements of the denoiser's forward pass (bounds evaluation batches)."""
        return self.denoiser.activation_elements

    def reconstruction_log_prob(self, x: Tensor, k: Tensor, eps: Tensor) -> Tensor:
        """log p(x|z_0) for z_0 = alpha_0 x + sigma_0 eps: per pixel, a 256-way softmax over the grid values
        x_k of -1/2 e^{-gamma_0} (z_0/alpha_0 - x_k)^2, with z_0/alpha_0 = x + e^{gamma_0/2} eps. k: bin indices.

        The softmax is sharp (at gamma_0 = -13.3 the grid spacing is 6 standard deviations), so it is computed over
        a window of grid values around u that holds all but e^-30 of the mass (window_half_width); the full 256
        values when the window would be as wide, or when a pixel's own bin falls outside it."""
        gamma_0, _ = self.schedule.endpoints()
        u = (x + torch.exp(0.5 * gamma_0) * eps).flatten(1)
        k = k.flatten(1)
        half = window_half_width(gamma_0.detach())
        if 2 * half + 1 < NUM_LEVELS:
            # window start per pixel: centred on u's nearest bin, shifted to stay inside [0, 255]
            nearest = ((u.detach() + 1) * (NUM_LEVELS / 2) - 0.5).round().long()
            start = (nearest - half).clamp(0, NUM_LEVELS - 2 * half - 1)
            if bool(((k >= start) & (k <= start + 2 * half)).all()):
                grid = self.grid[start[..., None] + torch.arange(2 * half + 1, device=u.device)]
                logits = -0.5 * torch.exp(-gamma_0) * (u[..., None] - grid).square()
                log_p = logits.gather(-1, (k - start)[..., None]).squeeze(-1) - logits.logsumexp(-1)
                return log_p.sum(-1)
        rows = max(1, MAX_LOGIT_ELEMENTS // (u.shape[1] * NUM_LEVELS))
        parts = []
        for s in range(0, u.shape[0], rows):
            logits = self.decoder_logits(u[s : s + rows], gamma_0)
            log_p = logits.gather(-1, k[s : s + rows, :, None]).squeeze(-1) - logits.logsumexp(-1)
            parts.append(log_p.sum(-1))
        return torch.cat(parts)

    def decoder_logits(self, u: Tensor, gamma_0: Tensor) -> Tensor:
        """Logits [..., 256] of p(x = k | z_0) for u = z_0/alpha_0: -1/2 e^{-gamma_0} (u - x_k)^2."""
        return -0.5 * torch.exp(-gamma_0) * (u[..., None] - self.grid).square()

    def sample_times(self, n: int, batch: int, device: torch.device) -> Tensor:
        """t [n, batch] with U(0, 1) marginals. Training: one stratified (antithetic) grid over all n*batch draws,
        t = (u + i/(n batch)) mod 1 (VDM). Evaluation: each example gets its own u_b and t = (u_b + j/n) mod 1,
        so the per-example estimates are independent of each other."""
        if self.training:
            offsets = torch.arange(n * batch, device=device).reshape(n, batch) / (n * batch)
            return (torch.rand((), device=device) + offsets) % 1
        return (torch.rand(1, batch, device=device) + torch.arange(n, device=device)[:, None] / n) % 1

    def diffusion_loss(self, x: Tensor, t: Tensor, timesteps: int | None = None) -> tuple[Tensor, Tensor]:
        """Single-time estimates of the diffusion term L_T at times t [N] for encoded data x [N, *data_shape].

        Continuous time (timesteps 0): 1/2 gamma'(t) ||eps - eps_hat||^2. Discrete time: step i = floor(t T) + 1,
        T * 1/2 expm1(gamma(i/T) - gamma((i-1)/T)) ||eps - eps_hat||^2, the sum over steps estimated by one.
        Returns (loss [N], simple [N]) where simple = 1/2 ||eps - eps_hat||^2 (the unweighted noise-prediction loss).
        """
        timesteps = self.config.timesteps if timesteps is None else timesteps
        if timesteps > 0:
            t = (torch.floor(t * timesteps) + 1).clamp(max=timesteps) / timesteps
        shape, slope = self.schedule.shape_and_slope(t)
        gamma_min, gamma_max = self.schedule.endpoints()
        gamma = gamma_min + (gamma_max - gamma_min) * shape
        eps = torch.randn_like(x)
        alpha, sigma = alpha_sigma(_per_example(gamma, x.dim() - 1))
        z = alpha * x + sigma * eps
        sq = self._squared_error(x, z, eps, gamma)
        if timesteps > 0:
            gamma_s = self.schedule(t - 1 / timesteps)
            weight = timesteps * torch.expm1(gamma - gamma_s)
        else:
            weight = (gamma_max - gamma_min) * slope
        loss = 0.5 * weight * sq
        if self.schedule.interior_fits_variance and timesteps == 0 and self.training and loss.requires_grad:
            self._fit_interior_to_variance(loss, shape, slope)
        return loss, 0.5 * sq

    @staticmethod
    def _fit_interior_to_variance(loss: Tensor, shape: Tensor, slope: Tensor) -> None:
        """Replace the gradient reaching the schedule's interior (through shape(t) and shape'(t), which the other
        terms do not touch) by that of sum_i L_i^2 / (2 mean L): each example's gradient scaled by L_i / mean L.
        Its ELBO gradient is zero in expectation (the loss depends on the schedule only through its endpoints),
        so this lowers the estimator's variance without biasing the bound (VDM App. I.2)."""
        scale = (loss / loss.mean()).detach()
        shape.register_hook(lambda g: g * scale)
        slope.register_hook(lambda g: g * scale)

    # -- the model interface ---------------------------------------------------------------------

    def elbo(self, x: Tensor, n_samples: int = 1) -> ELBOTerms:
        """ELBO terms per example, the diffusion term averaged over n_samples times (see sample_times).
        With loss="simple", ELBOTerms.objective is recon - prior - 1/2 ||eps - eps_hat||^2, the training surrogate."""
        k = bin_indices(x)
        x_enc = encode_8bit(x)
        batch = x.shape[0]
        t = self.sample_times(n_samples, batch, x.device).reshape(-1)
        x_rep = x_enc.expand(n_samples, *x_enc.shape).reshape(-1, *x_enc.shape[1:])
        loss, simple = self.diffusion_loss(x_rep, t)
        recon = self.reconstruction_log_prob(x_rep, k.repeat(n_samples, *([1] * (k.dim() - 1))), torch.randn_like(x_rep))
        recon = recon.reshape(n_samples, batch).mean(0)
        prior = self.prior_kl(x_enc)
        diffusion = loss.reshape(n_samples, batch).mean(0)
        objective = None
        if self.config.loss == "simple":
            objective = recon - prior - simple.reshape(n_samples, batch).mean(0)
        return ELBOTerms(reconstruction=recon, kl={"prior": prior, "diffusion": diffusion}, objective=objective)

    def elbo_all_steps(self, x: Tensor, timesteps: int | None = None) -> ELBOTerms:
        """Discrete-time ELBO with the diffusion term summed exactly over all T steps (one noise draw per step):
        T denoiser passes per example. Defaults to the model's own T."""
        timesteps = self.config.timesteps if timesteps is None else timesteps
        if timesteps < 1:
            raise ElboxError("the exact sum over steps needs a discrete-time model (timesteps >= 1)")
        k = bin_indices(x)
        x_enc = encode_8bit(x)
        recon = self.reconstruction_log_prob(x_enc, k, torch.randn_like(x_enc))
        diffusion = self.diffusion_sum(x_enc, timesteps)
        return ELBOTerms(reconstruction=recon, kl={"prior": self.prior_kl(x_enc), "diffusion": diffusion})

    def diffusion_sum(self, x: Tensor, timesteps: int) -> Tensor:
        """The discrete-time diffusion term of encoded data x, summed over its T steps (one noise draw each)."""
        total = torch.zeros(x.shape[0], device=x.device)
        for i in range(1, timesteps + 1):
            t = torch.full((x.shape[0],), (i - 0.5) / timesteps, device=x.device)
            total = total + self.diffusion_loss(x, t, timesteps)[0] / timesteps
        return total

    def elbo_for_evaluation(self, x: Tensor, n_samples: int = 1) -> ELBOTerms:
        """What the evaluator reports: the exact sum over steps in discrete time, Monte Carlo over t otherwise."""
        return self.elbo_all_steps(x) if self.config.timesteps > 0 else self.elbo(x, n_samples)

    def elbo_protocol(self, n_samples: int) -> str:
        if self.config.timesteps > 0:
            return f"discrete time, T = {self.config.timesteps}: diffusion term summed exactly over all steps (one noise draw each)"
        return f"continuous time: diffusion term estimated with {n_samples} time sample(s) per example (stratified), one noise draw each"

    @torch.no_grad()
    def sample(self, n: int, steps: int | None = None) -> Tensor:
        """Ancestral sampling with `steps` steps (default: the model's T, or 256 in continuous time), from
        z_1 ~ N(0, I): z_s = alpha_s/alpha_t (z_t - sigma_t c eps_hat) + sigma_s sqrt(c) eps, c = -expm1(gamma_s - gamma_t),
        then x ~ p(x|z_0). Returns images in [0, 1] (k/255)."""
        steps = (self.config.timesteps or 256) if steps is None else steps
        if n < 1 or steps < 1:
            raise ElboxError(f"the number of samples and of steps must be >= 1, got {n} and {steps}")
        ref = self.grid
        z = torch.randn(n, *self.config.data_shape, device=ref.device)
        ndim = len(self.config.data_shape)
        for i in range(steps, 0, -1):
            t = torch.full((n,), i / steps, device=ref.device)
            gamma_t, gamma_s = self.schedule(t), self.schedule(t - 1 / steps)
            eps_hat = self.predict_eps(z, gamma_t)
            c = _per_example(-torch.expm1(gamma_s - gamma_t), ndim)
            alpha_t, sigma_t = alpha_sigma(_per_example(gamma_t, ndim))
            alpha_s, sigma_s = alpha_sigma(_per_example(gamma_s, ndim))
            z = alpha_s / alpha_t * (z - sigma_t * c * eps_hat) + sigma_s * c.sqrt() * torch.randn_like(z)
        gamma_0, _ = self.schedule.endpoints()
        u = z / alpha_sigma(gamma_0)[0]
        k = torch.cat([torch.distributions.Categorical(logits=self.decoder_logits(u[i : i + 1], gamma_0)).sample() for i in range(n)])
        return k.float() / (NUM_LEVELS - 1)

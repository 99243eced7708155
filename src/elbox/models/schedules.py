"""Noise schedules of the variational diffusion model (Kingma et al. 2021, §3.2): gamma(t) = -log SNR(t), increasing
on t in [0, 1] from gamma_min to gamma_max, with alpha_t^2 = sigmoid(-gamma(t)) and sigma_t^2 = sigmoid(gamma(t)).
SCHEDULE_CLASSES maps each name of DiffusionConfig.schedule to its class:

  linear          gamma linear in t, fixed endpoints (VDM's fixed linear)
  learned-linear  gamma linear in t, endpoints learned on the ELBO
  learned-net     a monotone network shape (VDM's NNet, App. H), endpoints learned on the ELBO; in continuous time its
                  interior is fitted to minimize the variance of the diffusion loss estimate (VDM §5.3, App. I.2): the
                  interior's ELBO gradient is zero in expectation, so it gets the gradient of E[L^2] instead.
                  In discrete time the interior matters and is fitted on the ELBO.
  cosine          the cosine alpha_bar of Nichol & Dhariwal 2021 (s = 0.008), restricted to the times where gamma lies
                  in range
  linear-beta     the continuous-time limit of the linear beta schedule of Ho et al. 2020 (1e-4 to 0.02 over 1000
                  steps), likewise restricted. DDPM's own endpoints are about gamma in [-9.2, 10.1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elbox.core.errors import ElboxError
from elbox.core.nets import inverse_softplus


class NoiseSchedule(nn.Module):
    """gamma(t) = gamma_min + (gamma_max - gamma_min) * shape(t), with shape increasing from 0 to 1 on [0, 1].

    Subclasses define `shape_and_slope(t) -> (shape, d shape / dt)`; derivatives are analytic (tested against
    autograd). Endpoints are buffers, or parameters when `learned_endpoints` (gamma_max = gamma_min + exp(w)).
    """

    learned_endpoints: bool = False  # the endpoints are parameters, trained on the ELBO
    learned_interior: bool = False  # the shape between the endpoints has parameters
    # True when the interior is fitted to the estimator's variance rather than the ELBO (continuous time; set by
    # build_schedule)
    interior_fits_variance: bool = False

    def __init__(self, gamma_min: float, gamma_max: float):
        super().__init__()
        start = torch.tensor(float(gamma_min))
        log_width = torch.tensor(math.log(gamma_max - gamma_min))
        if self.learned_endpoints:
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


class LearnedLinearSchedule(LinearSchedule):
    learned_endpoints = True


class MonotoneNetSchedule(NoiseSchedule):
    """VDM's monotone network: g(t) = l1(t) + l3(sigmoid(l2(l1(t)))) / n with positive weights (softplus), so g is
    increasing; shape(t) = (g(t) - g(0)) / (g(1) - g(0)). Starts close to linear."""

    learned_endpoints = True
    learned_interior = True

    def __init__(self, gamma_min: float, gamma_max: float, hidden: int = 1024):
        super().__init__(gamma_min, gamma_max)
        inv_softplus_1 = inverse_softplus(1.0)
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
            raise ElboxError(
                f"gamma range [{gamma_min}, {gamma_max}] lies outside what the {type(self).__name__} reaches, "
                f"gamma < {top:.4g}"
            )

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
    """alpha_bar(tau) = f(tau)/f(0), f(tau) = cos^2(theta), theta = (tau + s)/(1 + s) * pi/2 (Nichol & Dhariwal 2021,
    eq. (17)).
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
    """The linear beta of Ho et al. 2020 (DDPM) from beta_1 to beta_T over T0 = 1000 steps, in continuous time:
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
        return (
            2 * c / (b + math.sqrt(b * b + 4 * a * c))
        )  # the positive root of a tau^2 + b tau = c, without cancellation


SCHEDULE_CLASSES: dict[str, type[NoiseSchedule]] = {
    "linear": LinearSchedule,
    "learned-linear": LearnedLinearSchedule,
    "learned-net": MonotoneNetSchedule,
    "cosine": CosineSchedule,
    "linear-beta": LinearBetaSchedule,
}
SCHEDULES = tuple(SCHEDULE_CLASSES)


def build_schedule(name: str, gamma_min: float, gamma_max: float, timesteps: int) -> NoiseSchedule:
    """The schedule `name` from gamma_min to gamma_max, for a model of `timesteps` steps (0: continuous time)."""
    if name not in SCHEDULE_CLASSES:
        raise ElboxError(f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    schedule = SCHEDULE_CLASSES[name](gamma_min, gamma_max)
    # In continuous time the diffusion loss depends on the schedule only through its endpoints (VDM §5.1), so a
    # learned interior is fitted to the variance of its estimate instead (§5.3, App. I.2).
    schedule.interior_fits_variance = schedule.learned_interior and timesteps == 0
    return schedule

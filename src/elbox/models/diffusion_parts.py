"""The pieces of the variational diffusion model (elbox.models.diffusion; Kingma et al. 2021, VDM): what the
denoiser's output predicts (three parameterizations), the 8-bit grid, and the window of grid values the
reconstruction term sums over."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from elbox.core.errors import ElboxError

NUM_LEVELS = 256


# Parameterizations: what the denoiser's output o predicts. Each gives eps_hat, the noise prediction of VDM eq. (10)
# (x_hat = (z_t - sigma_t eps_hat) / alpha_t), and eps - eps_hat computed in its own space.


class EpsParameterization:
    """o = eps_hat."""

    @staticmethod
    def skip(z: Tensor, alpha: Tensor) -> Tensor:
        return z  # eps_hat = z_t (VDM; right at high noise)

    @staticmethod
    def eps_hat(out: Tensor, z: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return out

    @staticmethod
    def eps_error(out: Tensor, x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return eps - out


class X0Parameterization:
    """o = x_hat; eps - eps_hat = (alpha_t / sigma_t)(x - x_hat), so ||eps - eps_hat||^2 = SNR_t ||x - x_hat||^2."""

    @staticmethod
    def skip(z: Tensor, alpha: Tensor) -> Tensor:
        return alpha * z  # x_hat = alpha_t z_t (exact for data ~ N(0, I))

    @staticmethod
    def eps_hat(out: Tensor, z: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return (z - alpha * out) / sigma

    @staticmethod
    def eps_error(out: Tensor, x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return (x - out) * (alpha / sigma)


class ScoreParameterization:
    """o = s_hat, the score of q(z_t|x), -eps / sigma_t: eps_hat = -sigma_t s_hat."""

    @staticmethod
    def skip(z: Tensor, alpha: Tensor) -> Tensor:
        return -z  # s_hat = -z_t (exact for data ~ N(0, I))

    @staticmethod
    def eps_hat(out: Tensor, z: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return -sigma * out

    @staticmethod
    def eps_error(out: Tensor, x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return eps + sigma * out


PARAMETERIZATION_CLASSES = {"eps": EpsParameterization, "x0": X0Parameterization, "score": ScoreParameterization}
PARAMETERIZATIONS = tuple(PARAMETERIZATION_CLASSES)


FULL_WINDOW = NUM_LEVELS // 2  # a half-width whose window, 2W + 1 values, spans the whole grid


def window_half_width(gamma_0: Tensor) -> int:
    """Half-width W (in grid steps) of the window of 2W + 1 grid values that reconstruction_log_prob sums over.

    u lies within half a step of its nearest grid value, so one m steps beyond it has a logit at least
    r^2 ((m - 1/2)^2 - 1/4) / 2 lower, r = spacing / sigma = (2/256) e^{-gamma_0/2}. Beyond W the terms fall
    geometrically (ratio <= e^{-r^2}), on both sides, so the values outside the window weigh at most
    2 e^{-r^2 ((W + 1/2)^2 - 1/4) / 2} / (1 - e^{-r^2}) of the nearest one. W makes that <= e^-30: the window's
    log-sum-exp is low by less than 1e-13 per pixel.

    W is at most FULL_WINDOW (a window of 257 >= 256 values: the full softmax), which is also the answer for a
    gamma_0 that is not a number (diverged training: the loss is then NaN, and the trainer deals with it). log r is
    clamped to [-20, 20], beyond which W is FULL_WINDOW, or 1, either way."""
    gamma = float(gamma_0)
    if math.isnan(gamma):
        return FULL_WINDOW
    log_r = min(max(math.log(2 / NUM_LEVELS) - 0.5 * gamma, -20.0), 20.0)
    r_sq = math.exp(2 * log_r)
    tail = math.log(2 / -math.expm1(-r_sq))
    return min(FULL_WINDOW, max(1, math.ceil(math.sqrt(2 * (30 + tail) / r_sq + 0.25) - 0.5)))


def bin_indices(x: Tensor) -> Tensor:
    """k in {0..255} of 8-bit data stored as x = k/255; ElboxError for anything else."""
    scaled = x * (NUM_LEVELS - 1)
    k = scaled.round()
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1 or (scaled - k).abs().max() > 1e-3:
        raise ElboxError(
            "the diffusion model takes 8-bit data x = k/255 with k in {0..255} (the discrete space); "
            f"got values in [{x.min().item():.4g}, {x.max().item():.4g}] not all on that grid"
        )
    return k.long()


def encode_8bit(x: Tensor) -> Tensor:
    """elbox's discrete space x = k/255 -> VDM's grid 2(k + 1/2)/256 - 1."""
    return (2 * (x * (NUM_LEVELS - 1)).round() + 1) / NUM_LEVELS - 1


def alpha_sigma(gamma: Tensor) -> tuple[Tensor, Tensor]:
    """alpha = sqrt(sigmoid(-gamma)), sigma = sqrt(sigmoid(gamma))."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()

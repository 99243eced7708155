"""Bound estimators: reparameterized Gaussian sampling, Gaussian KL, the ELBO and the IWAE bound.

Everything is in nats, per example. Conventions:

    ELBO(x)   = E_q[log p(x|z)] - KL(q(z|x) || p(z))
    IWAE_K(x) = E[ logsumexp_k log w_k - log K ],   log w_k = log p(x, z_k) - log q(z_k|x),  z_k ~ q(z|x)
    ELBO = IWAE_1 <= IWAE_K <= log p(x)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from elbox.errors import ElboxError

LOG_2PI = math.log(2 * math.pi)


# ----------------------------------------------------------------------------------------------
# Sampling


def sample_diag_gaussian(
    mean: Tensor, std: Tensor, n_samples: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Reparameterized draws z = mean + std * eps, eps ~ N(0, I).

    Returns (z, eps), both [n_samples, *mean.shape]; gradients flow to mean and std through z.
    """
    eps = torch.randn((n_samples, *mean.shape), dtype=mean.dtype, device=mean.device, generator=generator)
    return mean + std * eps, eps


def diag_gaussian_log_prob_from_noise(eps: Tensor, std: Tensor) -> Tensor:
    """log N(z; mean, diag(std^2)) for z = mean + std * eps, summed over the last dim.

    Written in terms of eps, which is exact and cheaper than re-deriving (z - mean) / std.
    """
    return -0.5 * (eps.square() + LOG_2PI).sum(-1) - std.log().sum(-1)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I), summed over the last dim."""
    return -0.5 * (z.square() + LOG_2PI).sum(-1)


# ----------------------------------------------------------------------------------------------
# KL divergences


def kl_diag_gaussians(mean_q: Tensor, std_q: Tensor, mean_p: Tensor | float = 0.0, std_p: Tensor | float = 1.0) -> Tensor:
    """Elementwise KL(N(mean_q, std_q^2) || N(mean_p, std_p^2)); sum over dims yourself.

    KL = log std_p - log std_q + (std_q^2 + (mean_q - mean_p)^2) / (2 std_p^2) - 1/2
    """
    mean_p = torch.as_tensor(mean_p, dtype=mean_q.dtype, device=mean_q.device)
    std_p = torch.as_tensor(std_p, dtype=mean_q.dtype, device=mean_q.device)
    var_ratio = (std_q / std_p).square()
    return 0.5 * (var_ratio + ((mean_q - mean_p) / std_p).square() - 1.0 - var_ratio.log())


def kl_full_gaussians(mean_q: Tensor, scale_tril_q: Tensor, mean_p: Tensor, scale_tril_p: Tensor) -> Tensor:
    """KL(N(mean_q, S_q) || N(mean_p, S_p)) for full covariances given by Cholesky factors L (S = L L^T).

    KL = 1/2 [ tr(S_p^-1 S_q) + (mean_p - mean_q)^T S_p^-1 (mean_p - mean_q) - d + log det S_p - log det S_q ]

    Shapes: means [..., d], factors [..., d, d] (broadcastable); returns [...].
    """
    d = mean_q.shape[-1]
    # tr(S_p^-1 S_q) = ||L_p^-1 L_q||_F^2 ;  Mahalanobis term = ||L_p^-1 (mean_p - mean_q)||^2
    whitened_scale = torch.linalg.solve_triangular(scale_tril_p, scale_tril_q, upper=False)
    diff = (mean_p - mean_q).unsqueeze(-1)
    whitened_diff = torch.linalg.solve_triangular(scale_tril_p, diff, upper=False).squeeze(-1)
    trace = whitened_scale.square().sum((-2, -1))
    mahalanobis = whitened_diff.square().sum(-1)
    # log det S = 2 sum log diag(L)
    logdet_p = 2 * scale_tril_p.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    logdet_q = 2 * scale_tril_q.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * (trace + mahalanobis - d + logdet_p - logdet_q)


def kl_monte_carlo(
    q: torch.distributions.Distribution, p: torch.distributions.Distribution, n_samples: int
) -> tuple[Tensor, Tensor]:
    """Monte Carlo KL(q || p) = E_q[log q(z) - log p(z)] with n_samples reparameterized draws.

    Returns (estimate, standard error), each with q's batch shape.
    """
    z = q.rsample((n_samples,))
    log_ratio = q.log_prob(z) - p.log_prob(z)
    stderr = log_ratio.std(0) / math.sqrt(n_samples) if n_samples > 1 else torch.full_like(log_ratio[0], math.nan)
    return log_ratio.mean(0), stderr


# ----------------------------------------------------------------------------------------------
# ELBO


@dataclass
class ELBOTerms:
    """Per-example ELBO terms in nats, summed over data dimensions.

    reconstruction: [B] E_q[log p(x|z)]
    kl: name -> [B]  one entry per latent group / level / diffusion term
    """

    reconstruction: Tensor
    kl: dict[str, Tensor]

    @property
    def kl_total(self) -> Tensor:
        return sum(self.kl.values(), torch.zeros_like(self.reconstruction))

    @property
    def elbo(self) -> Tensor:
        return self.reconstruction - self.kl_total


def gaussian_elbo(
    mean: Tensor,
    std: Tensor,
    log_likelihood: Callable[[Tensor], Tensor],
    n_samples: int = 1,
    analytic_kl: bool = True,
) -> ELBOTerms:
    """ELBO for a diagonal-Gaussian posterior q = N(mean, std^2) [B, d] and prior N(0, I).

    log_likelihood maps z [S, B, d] to log p(x|z) [S, B]. The reconstruction term is averaged
    over n_samples reparameterized draws; the KL is analytic or the Monte Carlo estimate
    log q(z) - log p(z) on the same draws.
    """
    if n_samples < 1:
        raise ElboxError(f"n_samples must be >= 1, got {n_samples}")
    z, eps = sample_diag_gaussian(mean, std, n_samples)
    reconstruction = log_likelihood(z).mean(0)
    if analytic_kl:
        kl = kl_diag_gaussians(mean, std).sum(-1)
    else:
        kl = (diag_gaussian_log_prob_from_noise(eps, std) - standard_normal_log_prob(z)).mean(0)
    return ELBOTerms(reconstruction=reconstruction, kl={"z": kl})


# ----------------------------------------------------------------------------------------------
# Importance-weighted bound


def log_mean_exp(log_w: Tensor, dim: int = 0) -> Tensor:
    """log (1/K sum_k exp(log_w_k)) along dim, stable."""
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])


def iwae_bound(
    log_weights: Callable[[int], Tensor], k: int, max_samples_per_pass: int
) -> Tensor:
    """IWAE_K per example, in float64.

    log_weights(n) returns log p(x, z) - log q(z|x) for n fresh samples, shape [n, B]. The K samples
    are drawn in chunks of at most max_samples_per_pass, each one batched forward pass, and the
    logsumexp is accumulated in float64 across chunks, so memory is bounded and K = 5000 is exact
    to float64 rounding in the accumulation.
    """
    if k < 1:
        raise ElboxError(f"the number of importance samples K must be >= 1, got {k}")
    chunk = max(1, min(k, max_samples_per_pass))
    running: Tensor | None = None
    done = 0
    while done < k:
        n = min(chunk, k - done)
        lse = torch.logsumexp(log_weights(n).double(), 0)
        running = lse if running is None else torch.logaddexp(running, lse)
        done += n
    return running - math.log(k)


def mean_and_stderr(values: Tensor) -> tuple[float, float]:
    """Mean over examples and its standard error std / sqrt(n) (nan for n < 2)."""
    values = values.double()
    n = values.numel()
    if n == 0:
        raise ElboxError("cannot average over zero examples")
    mean = values.mean().item()
    stderr = (values.std() / math.sqrt(n)).item() if n > 1 else math.nan
    return mean, stderr


def iwae_bounds(
    log_weights: Callable[[int], Tensor], ks: list[int], max_samples_per_pass: int
) -> dict[int, Tensor]:
    """IWAE_K per example for several K from one stream of samples, in float64.

    The first K of the K_max draws give the IWAE_K estimate, so IWAE-1, -10, ..., -5000 together cost
    what IWAE-5000 alone costs. Each estimate is unbiased for its own bound; they are correlated.
    """
    ks = sorted(set(ks))
    if not ks or ks[0] < 1:
        raise ElboxError(f"the numbers of importance samples K must be >= 1, got {ks}")
    chunk = max(1, max_samples_per_pass)
    running: Tensor | None = None
    done = 0
    out: dict[int, Tensor] = {}
    for k in ks:
        while done < k:
            n = min(chunk, k - done)
            lse = torch.logsumexp(log_weights(n).double(), 0)
            running = lse if running is None else torch.logaddexp(running, lse)
            done += n
        out[k] = running - math.log(k)
    return out

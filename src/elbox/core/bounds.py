"""Bound estimators: reparameterized Gaussian sampling, Gaussian KL, the ELBO and the IWAE bound.

Everything is in nats, per example. Conventions:

    ELBO(x)   = E_q[log p(x|z)] - KL(q(z|x) || p(z))
    IWAE_K(x) = E[ logsumexp_k log w_k - log K ],   log w_k = log p(x, z_k) - log q(z_k|x),  z_k ~ q(z|x)
    ELBO = IWAE_1 <= IWAE_K <= log p(x)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from elbox.core.errors import ElboxError

LOG_2PI = math.log(2 * math.pi)


# ----------------------------------------------------------------------------------------------
# Sample counts and sampling


def check_count(value, name: str = "the number of samples", minimum: int = 1) -> int:
    """value as an int >= minimum (a Python or numpy integer, not a bool); ElboxError otherwise, worded like the
    option checks of elbox.core.options."""
    try:
        count = operator.index(value)
    except TypeError:
        count = None
    if count is None or isinstance(value, bool):
        raise ElboxError(f"{name} must be a whole number, got {value!r}")
    if count < minimum:
        raise ElboxError(f"{name} must be >= {minimum}, got {count}")
    return count


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


def kl_diag_gaussians(
    mean_q: Tensor, std_q: Tensor, mean_p: Tensor | float = 0.0, std_p: Tensor | float = 1.0
) -> Tensor:
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
    objective: [B] or None  a surrogate the model asks to be trained on instead of the ELBO (the diffusion
        model's simplified loss); never reported as a bound
    inexact_kl: the names of the kl entries that are not exact KLs (empty, the common case: all are).

    An exact KL is, for each draw, the KL divergence of the entry's posterior from its prior in closed form, given the
    draws of the levels both are conditioned on (a ladder level's KL(q(z_l|x, z_<l) || p(z_l|z_<l)) at the drawn z_<l):
    never negative, and its expectation is the entry's term of the bound. The diffusion model's entries are exact: the
    prior term is analytic, and each draw of the diffusion term is the closed-form KL of one step at the drawn z_t
    times the number of steps (in continuous time, its limit), or their sum over all steps. The other entries are
    single-sample Monte Carlo estimates log q(z) - log p(z), which can be negative: the Markov HVAE's levels below
    the top (q and p condition on different levels, so not even their expectation is a KL), the VampPrior's levels
    (no closed form), a KL estimated by sampling on request (gaussian_elbo with analytic_kl=False).
    """

    reconstruction: Tensor
    kl: dict[str, Tensor]
    objective: Tensor | None = None
    inexact_kl: frozenset[str] = frozenset()

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
    check_count(n_samples, "n_samples")
    z, eps = sample_diag_gaussian(mean, std, n_samples)
    reconstruction = log_likelihood(z).mean(0)
    if analytic_kl:
        kl = kl_diag_gaussians(mean, std).sum(-1)
    else:
        kl = (diag_gaussian_log_prob_from_noise(eps, std) - standard_normal_log_prob(z)).mean(0)
    inexact = frozenset() if analytic_kl else frozenset({"z"})
    return ELBOTerms(reconstruction=reconstruction, kl={"z": kl}, inexact_kl=inexact)


# ----------------------------------------------------------------------------------------------
# Importance-weighted bound


def log_mean_exp(log_w: Tensor, dim: int = 0) -> Tensor:
    """log (1/K sum_k exp(log_w_k)) along dim, stable."""
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])


def iwae_bound(log_weights: Callable[[int], Tensor], k: int, max_samples_per_pass: int) -> Tensor:
    """IWAE_K per example, in float64.

    log_weights(n) returns log p(x, z) - log q(z|x) for n fresh samples, shape [n, B]. The K samples
    are drawn in chunks of at most max_samples_per_pass, each one batched forward pass, and the
    logsumexp is accumulated in float64 across chunks, so memory is bounded and K = 5000 is exact
    to float64 rounding in the accumulation.
    """
    check_count(k, "the number of importance samples K")
    return iwae_bounds(log_weights, [k], max_samples_per_pass)[k]


def iwae(model, x: Tensor, k: int, max_samples_per_pass: int = 100) -> Tensor:
    """IWAE_K per example [B], float64, for an ImportanceWeighted model (elbox.models.base): its
    log_weights_sampler encodes x once where the model can."""
    return iwae_bound(model.log_weights_sampler(x), k, max_samples_per_pass)


def mean_and_stderr(values: Tensor) -> tuple[float, float]:
    """Mean over examples and its standard error std / sqrt(n) (nan for n < 2)."""
    values = values.double()
    n = values.numel()
    if n == 0:
        raise ElboxError("cannot average over zero examples")
    mean = values.mean().item()
    stderr = (values.std() / math.sqrt(n)).item() if n > 1 else math.nan
    return mean, stderr


def iwae_bounds(log_weights: Callable[[int], Tensor], ks: list[int], max_samples_per_pass: int) -> dict[int, Tensor]:
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


# ----------------------------------------------------------------------------------------------
# Training objectives and their gradient estimators
#
# The IWAE objective (Burda et al. 2015) trains on the per-example estimate logsumexp_k log w_k - log K.
# The three estimators share that value and differ only in the gradient they give the encoder
# parameters phi (the decoder parameters theta get sum_k w~_k grad_theta log w_k from all three;
# w~_k = w_k / sum_j w_j are the normalized weights):
#
#   reparam  differentiate the estimate through z_k = mean + std * eps_k and log q.
#   stl      "sticking the landing" (Roeder et al. 2017): log q(z_k|x) is evaluated with q's mean and std
#            detached, so phi reaches log w_k only through z_k. Drops the score term; biased for K > 1
#            (Tucker et al. 2018 show its bias), unbiased for K = 1.
#   dreg     doubly reparameterized (Tucker et al. 2018, §3): the STL log weights, and the gradient that
#            reaches z_k scaled by w~_k once more, so the encoder gets
#                sum_k w~_k^2  d log w_k / d z_k  d z_k / d phi         (log q's parameters held fixed)
#            which is unbiased for grad_phi IWAE_K. Derivation: the total derivative is
#            sum_k w~_k (d log w_k/d z_k  dz_k/d phi - d log q_phi(z_k)/d phi); the score term
#            E[w~_k d log q_phi(z_k)/d phi] equals, by reparameterizing it a second time (the identity
#            E_q[f(z) d log q_phi(z)/d phi] = E_eps[df/dz dz/d phi] for f = w~_k at fixed phi),
#            E[d w~_k/d z_k  dz_k/d phi] = E[(w~_k - w~_k^2) d log w_k/d z_k  dz_k/d phi]; subtracting leaves w~_k^2.

IWAE_ESTIMATORS = ("reparam", "stl", "dreg")
# estimators whose log weights use log q(z|x) with the posterior parameters detached
DETACHED_POSTERIOR_ESTIMATORS = ("stl", "dreg")


def check_iwae_estimator(estimator: str) -> None:
    if estimator not in IWAE_ESTIMATORS:
        raise ElboxError(f"unknown IWAE gradient estimator {estimator!r}; choose one of {', '.join(IWAE_ESTIMATORS)}")


def diag_gaussian_log_prob(z: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(z; mean, diag(std^2)) for any z, summed over the last dim.

    Used with mean and std detached for the STL/DReG log weights: the value equals the log density of the
    draw, but its gradient reaches q's parameters only through z.
    """
    return -0.5 * (((z - mean) / std).square() + LOG_2PI).sum(-1) - std.log().sum(-1)


def diag_gaussian_mixture_log_prob(z: Tensor, means: Tensor, stds: Tensor) -> Tensor:
    """log (1/K) sum_k N(z; means_k, diag(stds_k^2)) [*batch] for z [*batch, d] and K components [K, d]
    (diag_gaussian_mixture_density, for one z)."""
    return diag_gaussian_mixture_density(means, stds)(z)


def diag_gaussian_mixture_density(means: Tensor, stds: Tensor) -> Callable[[Tensor], Tensor]:
    """z [*batch, d] -> log (1/K) sum_k N(z; means_k, diag(stds_k^2)) [*batch], for K components [K, d], with what
    depends on the components alone computed once (for the many passes of an importance-sampling stream).

    The square is expanded, -0.5 sum_d (z_d - m_kd)^2 / s_kd^2 = z^2 . (-a_k / 2) + z . b_k - m_k . b_k / 2 with
    a_k = 1 / s_k^2 and b_k = m_k / s_k^2, so the [batch, K] table of log N(z; m_k, s_k) is one matrix product of
    [z^2, z] with the [2d, K] table [-a / 2; b], plus a constant per component, rather than [batch, K, d] elementwise
    work (benchmarks/vamp_density.py). The product runs in float64: the terms can be 1e5 and cancel, which costs
    float32 up to nats. Apple's MPS has no float64: there the [batch, K, d] differences are formed directly
    (mixture_components_direct)."""
    log_k = math.log(means.shape[0])
    if means.device.type == "mps":

        def direct(z: Tensor) -> Tensor:
            components = mixture_components_direct(z.reshape(-1, z.shape[-1]), means, stds)
            return (torch.logsumexp(components, dim=-1) - log_k).reshape(z.shape[:-1])

        return direct
    means_wide, stds_wide = means.double(), stds.double()
    a = stds_wide.pow(-2)
    b = means_wide * a
    table = torch.cat([-0.5 * a, b], dim=-1).T  # [2d, K]
    constant = -0.5 * ((means_wide * b).sum(-1) + means.shape[-1] * LOG_2PI) - stds_wide.log().sum(-1)  # [K]

    def density(z: Tensor) -> Tensor:
        z_wide = z.reshape(-1, z.shape[-1]).double()
        components = torch.addmm(constant, torch.cat([z_wide.square(), z_wide], dim=-1), table)
        return (torch.logsumexp(components, dim=-1) - log_k).to(z.dtype).reshape(z.shape[:-1])

    return density


def mixture_components_direct(z: Tensor, means: Tensor, stds: Tensor) -> Tensor:
    """log N(z_n; means_k, diag(stds_k^2)) [N, K] for z [N, d], from the differences z_n - means_k [N, K, d]."""
    return diag_gaussian_log_prob(z[:, None, :], means, stds)


@dataclass
class ImportanceSamples:
    """K reparameterized samples per example and what the training objectives need from them.

    log_w: [K, B] log p(x, z_k) - log q(z_k|x)
    z:     [K, B, d] the draws z_k that log_w was computed from (DReG rescales the gradient reaching them), or
           None for models whose draws are several tensors and which refuse DReG (hierarchical VAEs)
    terms: ELBOTerms for reporting (not for gradients): reconstruction averaged over the K draws, analytic KL
    """

    log_w: Tensor
    z: Tensor | None
    terms: ELBOTerms


def normalized_weights(log_w: Tensor) -> Tensor:
    """w~_k = w_k / sum_j w_j over dim 0, from log weights [K, B]."""
    return torch.softmax(log_w, dim=0)


def iwae_objective(log_w: Tensor) -> Tensor:
    """Per-example IWAE_K estimate [B], logsumexp_k log w_k - log K, from log weights [K, B].

    Its gradient is the reparam estimator when log_w holds the full log q(z|x), the STL estimator when log q
    was evaluated with q's parameters detached, and the DReG estimator when, in addition,
    dreg_reweight_latent_gradient was applied to the z that produced log_w. K = 1 gives the single-sample
    ELBO with a Monte Carlo KL.
    """
    return log_mean_exp(log_w, 0)


def dreg_reweight_latent_gradient(z: Tensor, log_w: Tensor) -> None:
    """Turn the STL gradient of iwae_objective(log_w) into the DReG gradient.

    Requires: log_w computed from z [K, B, d] with log q's parameters detached, and z used for nothing else
    that is differentiated. d iwae_objective / d z_k = w~_k d log w_k / d z_k; a hook on z multiplies it by
    the (constant) w~_k, giving w~_k^2 d log w_k / d z_k, which flows on to the encoder through z = mean + std * eps.
    The decoder's gradient does not pass through z, so it keeps the usual sum_k w~_k grad_theta log w_k:
    one backward pass gives both. (Tucker et al. 2018, §3, the IWAE-DReG estimator.)
    """
    if z.shape[:2] != log_w.shape:
        raise ElboxError(
            f"z must be [K, B, d] matching log weights [K, B]; got z {tuple(z.shape)}, log_w {tuple(log_w.shape)}"
        )
    if not z.requires_grad:
        return  # nothing will be differentiated (e.g. under torch.no_grad)
    weights = normalized_weights(log_w.detach()).unsqueeze(-1)
    z.register_hook(lambda grad: grad * weights)


def free_bits_kl(kl: dict[str, Tensor], free_bits: float) -> Tensor:
    """KL term of the free-bits objective (Kingma et al. 2016): sum over groups of max(lambda, KL_group).

    kl maps group name -> per-example KL [B]; each group's KL is averaged over the minibatch before the
    max, so lambda (nats) floors the batch-average KL of each group. A group below the floor contributes the
    constant lambda and no gradient. For a single-group model (the VAE's one group "z") the floor applies to
    the whole latent's KL, summed over its dimensions. Returns a scalar.
    """
    if not free_bits >= 0 or not math.isfinite(free_bits):
        raise ElboxError(f"free bits must be a finite number >= 0 nats, got {free_bits}")
    if not kl:
        raise ElboxError("free bits need at least one KL group")
    return torch.stack([group_kl.mean().clamp_min(free_bits) for group_kl in kl.values()]).sum()

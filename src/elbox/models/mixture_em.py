"""The EM computations of the Gaussian mixture (elbox.models.mixture, whose docstring has the math): component
log-densities, responsibilities, the M-step and k-means++ seeding, on float64 data in chunks of rows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from elbox.core.bounds import LOG_2PI
from elbox.core.errors import ElboxError

# Expected number of points below which a component counts as empty (its mean and covariance
# are kept). Far below one point, and far above the underflow range of float64 responsibilities.
EMPTY_COUNT = 1e-200
# Rows per chunk of the E-step and M-step matmuls: CHUNK_ELEMENTS / (K * D), so that the [rows, K * D]
# float64 temporary is 8 MiB (2048 rows for K = 10, D = 50: measured fastest on PCA-50 Fashion-MNIST,
# 8192 rows was 4x slower in the M-step), but at least MIN_CHUNK_ROWS, so that for large D the
# [D, K * D] accumulator is not re-read for every few rows (D = 784: 1024 rows 15 % faster than 133).
F64 = torch.float64
CHUNK_ELEMENTS = 2**20
MIN_CHUNK_ROWS = 1024


@dataclass
class MixtureParams:
    """theta: log pi [K], means [K, D], and scale_tril [K, D, D] ("full") or variances [K, D] ("diag")."""

    log_mixing_weights: Tensor
    means: Tensor
    scale: Tensor


# ----------------------------------------------------------------------------------------------
# The two steps, on flattened float64 data x [N, D]


def _chunks(n: int, k: int, d: int):
    rows = max(1, CHUNK_ELEMENTS // (k * d), min(n, MIN_CHUNK_ROWS))
    return [(start, min(n, start + rows)) for start in range(0, n, rows)]


def component_log_densities(x: Tensor, params: MixtureParams, covariance: str) -> Tensor:
    """log N(x_n; mu_k, Sigma_k) for every example and component [N, K]."""
    means, scale = params.means, params.scale
    k, d = means.shape
    out = torch.empty(x.shape[0], k, dtype=x.dtype, device=x.device)
    if covariance == "full":
        # With W_k = L_k^-1 (L_k the Cholesky factor of Sigma_k), the Mahalanobis distance is
        # ||W_k x - W_k mu_k||^2 and -1/2 log det Sigma_k = sum log diag W_k.
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        precision_tril = torch.linalg.solve_triangular(scale, eye.expand(k, d, d), upper=False)
        # x @ stacked = [W_1 x, ..., W_K x] for all rows at once: block k of the columns is W_k^T
        stacked = precision_tril.transpose(1, 2).permute(1, 0, 2).reshape(d, k * d)
        shift = (precision_tril @ means.unsqueeze(-1)).squeeze(-1)  # W_k mu_k [K, D]
        constant = precision_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1) - 0.5 * d * LOG_2PI
        for start, end in _chunks(x.shape[0], k, d):
            whitened = (x[start:end] @ stacked).view(-1, k, d).sub_(shift)
            out[start:end] = constant - 0.5 * whitened.square_().sum(-1)
    else:
        # sum_d (x_d - mu_kd)^2 / s_kd = x^2 . (1/s_k) - 2 x . (mu_k / s_k) + mu_k^2 . (1/s_k)
        precision = scale.reciprocal()
        scaled_means = means * precision
        constant = -0.5 * (d * LOG_2PI + scale.log().sum(-1) + (means * scaled_means).sum(-1))
        for start, end in _chunks(x.shape[0], k, d):
            rows = x[start:end]
            out[start:end] = constant - 0.5 * (rows.square() @ precision.T) + rows @ scaled_means.T
    return out


def logsumexp_rows(values: Tensor) -> Tensor:
    """logsumexp over dim 1 of finite values [N, K]; measured 10x faster than torch.logsumexp for K = 10."""
    top = values.amax(1, keepdim=True)
    return (values - top).exp().sum(1).log() + top.squeeze(1)


def log_joint(x: Tensor, params: MixtureParams, covariance: str) -> Tensor:
    """log pi_k + log N(x_n; mu_k, Sigma_k) [N, K]."""
    return component_log_densities(x, params, covariance).add_(params.log_mixing_weights)


def m_step(x: Tensor, q: Tensor, previous: MixtureParams, covariance: str, floor: float) -> MixtureParams:
    """theta maximizing the ELBO for responsibilities q [N, K] (see the module docstring)."""
    n, d = x.shape
    k = q.shape[1]
    counts = q.sum(0)  # N_k
    safe_counts = counts.clamp_min(torch.finfo(x.dtype).tiny)
    means = (q.T @ x) / safe_counts[:, None]
    empty = counts < EMPTY_COUNT
    if covariance == "full":
        # second moments sum_n q_nk x_n x_n^T for all k in one matmul per chunk: x^T [q_n1 x_n, ..., q_nK x_n]
        moments = torch.zeros(d, k * d, dtype=x.dtype, device=x.device)
        for start, end in _chunks(n, k, d):
            rows = x[start:end]
            weighted = (q[start:end, :, None] * rows[:, None, :]).reshape(-1, k * d)
            moments.addmm_(rows.T, weighted)
        moments = moments.view(d, k, d).permute(1, 0, 2)
        # data are centered by fit, so E_q[x x^T] - mu mu^T loses no digits that matter in float64
        cov = moments / safe_counts[:, None, None] - means[:, :, None] * means[:, None, :]
        cov.diagonal(dim1=-2, dim2=-1).add_(floor)
        scale, info = torch.linalg.cholesky_ex(cov)
        failed = (info != 0) & ~empty
        if failed.any():
            raise ElboxError(
                f"mixture EM: the covariance of component(s) {failed.nonzero().flatten().tolist()} is not "
                f"positive definite after adding covariance_floor={floor}; increase covariance_floor"
            )
        scale = torch.where(empty[:, None, None], previous.scale, scale)
    else:
        second = (q.T @ x.square()) / safe_counts[:, None]
        scale = (second - means.square()).clamp_min(floor)
        scale = torch.where(empty[:, None], previous.scale, scale)
    means = torch.where(empty[:, None], previous.means, means)
    log_weights = safe_counts.log() - counts.sum().log()
    return MixtureParams(log_weights, means, scale)


def free_parameters(k: int, d: int, covariance: str) -> int:
    """Free parameters of a K-component mixture in D dimensions: K - 1 weights, K D means, and K D (D + 1) / 2
    covariance entries ("full") or K D variances ("diag")."""
    per_covariance = d * (d + 1) // 2 if covariance == "full" else d
    return k - 1 + k * d + k * per_covariance


def bic(mean_log_likelihood: float, n: int, k: int, d: int, covariance: str) -> float:
    """The Bayesian information criterion of Schwarz (1978), -2 log L + p ln N (lower is better), for a fit whose
    mean log-likelihood over N examples is mean_log_likelihood (log L = N times it) and p = free_parameters."""
    return -2 * n * mean_log_likelihood + free_parameters(k, d, covariance) * math.log(n)


def kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Indices [k] of greedy k-means++ seeds (Arthur and Vassilvitskii 2007).

    The first seed is uniform. Each next one: draw 2 + floor(ln k) candidates with probability
    proportional to their squared distance to the nearest seed so far, keep the candidate that
    leaves the smallest sum of those squared distances. (scikit-learn's kmeans_plusplus uses the same
    number of candidates; the greedy choice makes two seeds in one cluster much less likely.)
    """
    n = x.shape[0]
    n_candidates = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator, device=x.device))
    chosen = [first]
    nearest = (x - x[first]).square().sum(1)  # squared distance to the nearest seed [N]
    for _ in range(1, k):
        total = nearest.sum()
        if total > 0:
            candidates = torch.multinomial(nearest / total, n_candidates, replacement=True, generator=generator)
        else:  # every point sits on a seed already (duplicated data): any point will do
            candidates = torch.randint(n, (n_candidates,), generator=generator, device=x.device)
        # [candidates, N] squared distances, then the nearest-seed distances each candidate would leave
        distances = torch.cdist(x[candidates], x).square()
        updated = torch.minimum(nearest, distances)
        best = int(updated.sum(1).argmin())
        chosen.append(int(candidates[best]))
        nearest = updated[best]
    return torch.tensor(chosen, device=x.device)


# ----------------------------------------------------------------------------------------------
# The model

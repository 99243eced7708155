"""Gaussian mixture fitted by EM, written as coordinate ascent on the ELBO.

    p(z = k) = pi_k,   p(x | z = k) = N(x; mu_k, Sigma_k),   k = 1..K,   x flattened to D dimensions

    ELBO(q, theta) = (1/N) sum_n sum_k q_nk [log pi_k + log N(x_n; mu_k, Sigma_k) - log q_nk]
                   = (1/N) sum_n log p(x_n) - (1/N) sum_n KL(q_n || p(z | x_n))

E-step (maximize over q with theta fixed): q_nk = p(z = k | x_n), the responsibilities. The KL is
then 0, so the ELBO equals the mean log-likelihood.
M-step (maximize over theta with q fixed), with N_k = sum_n q_nk:

    pi_k = N_k / N,   mu_k = (1/N_k) sum_n q_nk x_n
    Sigma_k = (1/N_k) sum_n q_nk (x_n - mu_k)(x_n - mu_k)^T + floor * I        covariance="full"
    sigma2_kd = max((1/N_k) sum_n q_nk (x_nd - mu_kd)^2, floor)                covariance="diag"

Each step can only raise the ELBO, so the sequence L(theta_0) <= ELBO(q_1, theta_1) <= L(theta_1) <=
ELBO(q_2, theta_2) <= ... never decreases, where L(theta) is the mean log-likelihood. The floor keeps
every Sigma_k positive definite when a component owns a single point or duplicated points. For "diag"
the floored variance is the exact maximizer over {sigma2 >= floor}, so the guarantee is exact. For
"full", adding floor * I (scikit-learn's reg_covar) is not the exact maximizer of the ELBO (that would
clip the eigenvalues of the scatter matrix at the floor); the two differ by O(floor), so a decrease is
possible in principle when floor is large against the component's spread. `fit` warns if the ELBO or
the log-likelihood drops by more than float rounding; none was seen in the tests or on PCA-50
Fashion-MNIST (smallest step +3e-5 nats, benchmarks/README.md).

Components that own (almost) no data, N_k < EMPTY_COUNT, keep their previous mean and covariance
(any value maximizes the ELBO when no point is assigned) and get weight N_k / N, floored at the
smallest positive float64 so that log pi_k stays finite.

Numerics: fitting runs in float64 on data shifted by its mean. log N(x; mu_k, Sigma_k) for all
components is one matmul of the data against the K inverse Cholesky factors side by side, in chunks
of rows; the M-step's K weighted scatter matrices are one matmul too. The buffers are float64 and
`log_prob`, `elbo`, `encode` and `sample` compute in (and return) the dtype of the buffers.

Initialization (`init`), both seeded by `seed`: "kmeans++" picks K data points as centers by greedy
k-means++ (`kmeans_plus_plus`: each next center drawn with probability proportional to the squared
distance to the nearest center so far, best of 2 + ln K candidates); "random" picks K distinct data
points uniformly. Every point is then assigned to its nearest center and one M-step on these hard
assignments gives theta_0 (a center that gets no point, possible only with duplicated data, becomes
an empty component).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Categorical

from elbox.bounds import LOG_2PI, ELBOTerms, check_count
from elbox.errors import ElboxError
from elbox.models.base import Callback, register_model
from elbox.models.gaussian import (
    COVARIANCES,
    ContinuousDensity,
    check_data_shape,
    flatten_data,
)
from elbox.options import check_options, option

INITS = ("kmeans++", "random")
F64 = torch.float64
# Expected number of points below which a component counts as empty (its mean and covariance
# are kept). Far below one point, and far above the underflow range of float64 responsibilities.
EMPTY_COUNT = 1e-200
# fit warns when the ELBO or the log-likelihood drops by more than this, relative to 1 + |value|
ROUNDING_SLACK = 1e-9
# Rows per chunk of the E-step and M-step matmuls: CHUNK_ELEMENTS / (K * D), so that the [rows, K * D]
# float64 temporary is 8 MiB (2048 rows for K = 10, D = 50: measured fastest on PCA-50 Fashion-MNIST,
# 8192 rows was 4x slower in the M-step), but at least MIN_CHUNK_ROWS, so that for large D the
# [D, K * D] accumulator is not re-read for every few rows (D = 784: 1024 rows 15 % faster than 133).
CHUNK_ELEMENTS = 2**20
MIN_CHUNK_ROWS = 1024


@dataclass
class MixtureConfig:
    data_shape: tuple[int, ...] = option((1, 28, 28), "shape of one example, e.g. (1, 28, 28) or (50,)", minimum=1, cli=False)
    n_components: int = option(10, "number of mixture components", minimum=1, aliases=("--components",))
    covariance: str = option("full", "covariance structure", choices=COVARIANCES)
    init: str = option("kmeans++", "EM initialization (see the module docstring)", choices=INITS)
    max_iter: int = option(100, "EM iterations at most", minimum=1)
    # absolute, like scikit-learn's tol on the mean log-likelihood
    tol: float = option(1e-4, "stop when the mean ELBO improves by less than this many nats per example over one "
                              "iteration (0: run all max_iter iterations)", minimum=0)
    covariance_floor: float = option(1e-3, "added to each covariance diagonal (full) or floor on the variances (diag)", above=0)
    seed: int = option(0, "seed of the EM initialization", minimum=0)

    def __post_init__(self):
        check_options(self)
        check_data_shape(self.data_shape)


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


@register_model("mixture", MixtureConfig)
class GaussianMixture(ContinuousDensity):
    """Mixture of K Gaussians over the flattened data, with a categorical latent z; fitted by `fit(x)`.

    Buffers (float64): `log_mixing_weights` (log pi) [K], `means` [K, D], and `scale_tril` [K, D, D],
    the Cholesky factors of the covariances ("full"), or `variances` [K, D] ("diag");
    `fitted_examples`, the number of examples fitted on (0 until `fit`/`initialize` runs or a fitted
    state_dict is loaded).

    The posterior q(z|x) is exact, so `elbo(x).elbo == log_prob(x)` and every importance weight
    equals p(x): the bounds can be checked against the truth.
    """

    trains_by_gradient = False

    def __init__(self, config: MixtureConfig):
        super().__init__(config)
        k, d = config.n_components, math.prod(config.data_shape)
        self.register_buffer("log_mixing_weights", torch.full((k,), -math.log(k), dtype=F64))
        self.register_buffer("means", torch.zeros(k, d, dtype=F64))
        if config.covariance == "full":
            self.register_buffer("scale_tril", torch.eye(d, dtype=F64).repeat(k, 1, 1))
        else:
            self.register_buffer("variances", torch.ones(k, d, dtype=F64))
        self.register_buffer("fitted_examples", torch.zeros((), dtype=torch.int64))

    # -- parameters ---------------------------------------------------------------------------

    @property
    def params(self) -> MixtureParams:
        scale = self.scale_tril if self.config.covariance == "full" else self.variances
        return MixtureParams(self.log_mixing_weights, self.means, scale)

    def _store(self, params: MixtureParams, shift: Tensor, n: int) -> None:
        self.log_mixing_weights.copy_(params.log_mixing_weights)
        self.means.copy_(params.means + shift)
        (self.scale_tril if self.config.covariance == "full" else self.variances).copy_(params.scale)
        self.fitted_examples.fill_(n)

    def covariances(self) -> Tensor:
        """Sigma_k [K, D, D] (floor included)."""
        if self.config.covariance == "full":
            return self.scale_tril @ self.scale_tril.transpose(1, 2)
        return torch.diag_embed(self.variances)

    def _check_fitted(self) -> None:
        if int(self.fitted_examples) == 0:
            raise ElboxError("mixture model is not fitted: call fit(x) or load a fitted state_dict")

    def _flatten(self, x: Tensor) -> Tensor:
        self._check_fitted()
        return flatten_data(x, self.config.data_shape, "mixture").to(self.means)

    # -- fitting ----------------------------------------------------------------------------------

    def _centered_data(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x flattened to float64 [N, D] minus its mean, and the mean."""
        x = flatten_data(x, self.config.data_shape, "mixture")
        k = self.config.n_components
        if x.shape[0] < k:
            raise ElboxError(f"mixture model: x has {x.shape[0]} examples, fewer than n_components={k}")
        x = x.to(device=self.means.device, dtype=F64, copy=True)
        shift = x.mean(0)
        return x.sub_(shift), shift

    def _initial_params(self, x: Tensor) -> MixtureParams:
        """theta_0 from seeds chosen by config.init, on centered float64 data x."""
        c = self.config
        n, d = x.shape
        generator = torch.Generator(device=x.device).manual_seed(c.seed)
        if c.init == "kmeans++":
            seeds = kmeans_plus_plus(x, c.n_components, generator)
        else:
            seeds = torch.randperm(n, generator=generator, device=x.device)[: c.n_components]
        centers = x[seeds]
        distances = x.square().sum(1, keepdim=True) - 2 * x @ centers.T + centers.square().sum(1)
        q = torch.nn.functional.one_hot(distances.argmin(1), c.n_components).to(x.dtype)
        # what a center that gets no point keeps (possible only with duplicated data): an isotropic
        # Gaussian with the average variance of the data
        variance = x.square().mean() + c.covariance_floor
        if c.covariance == "full":
            scale = variance.sqrt() * torch.eye(d, dtype=x.dtype, device=x.device).repeat(c.n_components, 1, 1)
        else:
            scale = variance.expand(c.n_components, d).clone()
        fallback = MixtureParams(torch.zeros(c.n_components, dtype=x.dtype, device=x.device), centers, scale)
        return m_step(x, q, fallback, c.covariance, c.covariance_floor)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set the parameters to theta_0, the EM starting point that `fit(x)` uses."""
        x, shift = self._centered_data(x)
        self._store(self._initial_params(x), shift, x.shape[0])

    @torch.no_grad()
    def fit(self, x: Tensor, callback: Callback | None = None) -> list[dict]:
        """Run EM on all of x from theta_0 (see `initialize`); returns one record per iteration, each also passed
        to callback as soon as its iteration ends.

        Record t: {"iteration": t, "elbo": ELBO(q_t, theta_t), the mean ELBO with q_t from the E-step
        and theta_t after the M-step, "log_likelihood": mean log p(x_n; theta_t), "time_s": seconds
        this iteration took}, nats per example (a density on the data space: no -D ln 256 offset).
        The last record also has "converged": whether EM stopped because the ELBO improved by less
        than tol (never with tol = 0, which runs all max_iter iterations).
        """
        c = self.config
        x, shift = self._centered_data(x)
        params = self._initial_params(x)
        # E-step for theta_0: log q = log p(x, z) - log p(x)
        joint = log_joint(x, params, c.covariance)
        log_evidence = logsumexp_rows(joint)
        log_q = joint - log_evidence[:, None]
        log_likelihood = log_evidence.mean().item()
        previous_elbo = log_likelihood  # = ELBO(q_1, theta_0)
        records = []
        for iteration in range(1, c.max_iter + 1):
            start = time.perf_counter()
            q = log_q.exp()
            params = m_step(x, q, params, c.covariance, c.covariance_floor)
            joint = log_joint(x, params, c.covariance)
            # ELBO(q_t, theta_t); q log q is 0 where q underflows to 0 (log q stays finite)
            elbo = (q * (joint - log_q)).sum(1).mean().item()
            self._warn_if_decreased(iteration, "M-step", "log-likelihood", log_likelihood, "ELBO", elbo)
            # E-step: q_{t+1} = p(z | x; theta_t), which makes the ELBO the log-likelihood L(theta_t)
            log_evidence = logsumexp_rows(joint)
            log_q = joint - log_evidence[:, None]
            log_likelihood = log_evidence.mean().item()
            self._warn_if_decreased(iteration, "E-step", "ELBO", elbo, "log-likelihood", log_likelihood)
            record = {"iteration": iteration, "elbo": elbo, "log_likelihood": log_likelihood,
                      "time_s": time.perf_counter() - start}
            converged = c.tol > 0 and elbo - previous_elbo < c.tol
            previous_elbo = elbo
            if converged or iteration == c.max_iter:
                record["converged"] = converged
            records.append(record)
            if callback is not None:
                callback(record)
            if converged:
                break
        self._store(params, shift, x.shape[0])
        return records

    @staticmethod
    def _warn_if_decreased(iteration: int, step: str, name_before: str, before: float, name_after: str, after: float):
        if after < before - ROUNDING_SLACK * (1 + abs(before)):
            warnings.warn(
                f"mixture EM iteration {iteration}: the {step} lowered the objective from {name_before} "
                f"{before:.10g} to {name_after} {after:.10g} nats/example, more than float rounding",
                RuntimeWarning,
                stacklevel=3,
            )

    # -- the model interface ----------------------------------------------------------------------

    def _posterior_terms(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """log p(x, z=k) [N, K], log p(x) [N], log q(z=k|x) [N, K] for model input x."""
        joint = log_joint(self._flatten(x), self.params, self.config.covariance)
        log_evidence = logsumexp_rows(joint)
        return joint, log_evidence, joint - log_evidence[:, None]

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log p(x) = logsumexp_k [log pi_k + log N(x; mu_k, Sigma_k)] per example [N], nats."""
        return self._posterior_terms(x)[1]

    def elbo(self, x: Tensor, n_samples: int = 1) -> ELBOTerms:
        """ELBO with q(z|x) the exact posterior (the responsibilities) under the current parameters.

        reconstruction = sum_k q_k log N(x; mu_k, Sigma_k), kl["z"] = KL(q(z|x) || pi). The expectation
        over the K values of z is summed exactly, so n_samples (>= 1) does not change anything, and
        because q is the exact posterior, elbo == log_prob(x) up to float rounding.
        """
        check_count(n_samples)
        joint, _, log_q = self._posterior_terms(x)
        q = log_q.exp()
        log_pi = self.log_mixing_weights
        reconstruction = (q * (joint - log_pi)).sum(1)
        kl = (q * (log_q - log_pi)).sum(1)
        return ELBOTerms(reconstruction=reconstruction, kl={"z": kl})

    def log_weights(self, x: Tensor, k: int) -> Tensor:
        """[k, N] log p(x, z_j) - log q(z_j|x) for z_j ~ q(z|x), the exact posterior: every weight is
        log p(x) up to rounding, so IWAE-K equals log p(x) for every K."""
        return self.log_weights_sampler(x)(k)

    def log_weights_sampler(self, x: Tensor) -> Callable[[int], Tensor]:
        """Compute the posterior of x once; the returned function draws [n, N] log weights."""
        joint, _, log_q = self._posterior_terms(x)
        log_ratio = joint - log_q  # log p(x, z=k) - log q(z=k|x) for every k [N, K]
        q = log_q.exp()

        def draw(n: int) -> Tensor:
            check_count(n)
            z = torch.multinomial(q, n, replacement=True)  # [N, n]
            return log_ratio.gather(1, z).T

        return draw

    def encode(self, x: Tensor) -> Tensor:
        """Responsibilities q(z=k|x) [N, K]; rows sum to 1."""
        return self._posterior_terms(x)[2].exp()

    def posterior(self, x: Tensor) -> Categorical:
        """q(z|x) = p(z|x) as a Categorical with batch shape [N] over the K components."""
        return Categorical(logits=self._posterior_terms(x)[2])

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws [n, *data_shape]: z ~ Categorical(pi), then x ~ N(mu_z, Sigma_z).

        Raw draws of the density, not clamped to [0, 1] (clamping would change the distribution);
        callers clamp for display (elbox.plots does).
        """
        check_count(n)
        self._check_fitted()
        z = torch.multinomial(self.log_mixing_weights.exp(), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.num_dims, generator=generator, dtype=self.means.dtype, device=self.means.device)
        if self.config.covariance == "full":
            noise = torch.empty_like(eps)
            for k in range(self.config.n_components):  # not a hot path: one matmul per component
                rows = z == k
                noise[rows] = eps[rows] @ self.scale_tril[k].T
        else:
            noise = eps * self.variances[z].sqrt()
        return (self.means[z] + noise).reshape(n, *self.config.data_shape)

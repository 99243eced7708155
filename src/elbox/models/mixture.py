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
possible when floor is not small against the component's spread. `fit` warns if the ELBO or the
log-likelihood drops by more than float rounding. None was seen on PCA-50 Fashion-MNIST (smallest step +3e-5
nats); one was, fitting K = 3 to 400 rows of a 2-component mixture in 3-D (a component of 8 points with a
smallest covariance eigenvalue of 0.002, twice the floor 1e-3): 2.5e-5 nats at one iteration, gone with floor 1e-6.

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

Choosing K (n_components=None, the default): EM is run for every K in CANDIDATE_COMPONENTS that the data can
support (K = 1 always; larger K when N >= K (D + 1) rows for full covariances, N >= 2 K for diagonal ones: on
average a component owns enough rows for a nonsingular covariance estimate), each with n_init restarts, and the K of
the lowest BIC (Schwarz 1978) is kept:

    BIC(K) = -2 log L + p ln N,   p = K - 1 + K D + K D (D + 1) / 2 ("full") or K - 1 + 2 K D ("diag")

with log L the training-set log-likelihood of that K's fit. BIC rather than held-out likelihood: it uses every
training row, needs no second split, is deterministic given the fits, and leaves the run's validation data unused,
so the validation log-likelihood reported after the fit is not biased by the choice. It is a large-N approximation
(to the log marginal likelihood) that counts the floored covariances as free parameters. The chosen K is written
into the model's config (config.n_components), so a saved model is rebuilt with the right shapes.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.distributions import Categorical

from elbox.core.bounds import ELBOTerms, check_count
from elbox.core.errors import ElboxError
from elbox.core.options import MAX_SEED, check_options, option
from elbox.models.base import DATA_SHAPE_LIMITS, Callback, check_data_shape, register_model
from elbox.models.gaussian import COVARIANCES, ContinuousDensity, flatten_data
from elbox.models.mixture_em import (
    F64,
    MixtureParams,
    bic,
    free_parameters,
    kmeans_plus_plus,
    log_joint,
    logsumexp_rows,
    m_step,
)

INITS = ("kmeans++", "random")
# the K tried when n_components is None (the module docstring)
CANDIDATE_COMPONENTS = (1, 2, 3, 4, 6, 8, 10)
MAX_COMPONENTS = 10**5
MAX_INITS = 1000
# fit warns when the ELBO or the log-likelihood drops by more than this, relative to 1 + |value|
ROUNDING_SLACK = 1e-9


@dataclass
class MixtureConfig:
    data_shape: tuple[int, ...] = option(
        (1, 28, 28), "shape of one example, e.g. (1, 28, 28) or (50,)", **DATA_SHAPE_LIMITS
    )
    n_components: int | None = option(
        None,
        "number of mixture components (default: chosen by BIC, Schwarz 1978, among "
        f"{', '.join(map(str, CANDIDATE_COMPONENTS))}, each fitted by EM on the training set; K is tried only when "
        "there are at least K (D + 1) training rows (full covariance) or 2 K (diag); the chosen K is saved "
        "with the model)",
        minimum=1,
        maximum=MAX_COMPONENTS,
        aliases=("--components",),
    )
    covariance: str = option("full", "covariance structure", choices=COVARIANCES)
    init: str = option("kmeans++", "EM initialization (see the module docstring)", choices=INITS)
    max_iter: int = option(100, "EM iterations at most", minimum=1, maximum=10**6)
    # absolute, like scikit-learn's tol on the mean log-likelihood
    tol: float = option(
        1e-4,
        "stop when the mean ELBO improves by less than this many nats per example over one "
        "iteration (0: run all max_iter iterations)",
        minimum=0,
    )
    covariance_floor: float = option(
        1e-3, "added to each covariance diagonal (full) or floor on the variances (diag)", above=0
    )
    seed: int = option(0, "seed of the EM initialization", minimum=0, maximum=MAX_SEED - MAX_INITS)
    n_init: int = option(
        1,
        "EM runs from initializations seeded seed, seed + 1, ...; the one with the highest "
        "final log-likelihood is kept (as scikit-learn's n_init)",
        minimum=1,
        maximum=MAX_INITS,
    )

    def __post_init__(self):
        check_options(self)
        check_data_shape(self.data_shape)


@register_model("mixture", MixtureConfig)
class GaussianMixture(ContinuousDensity):
    """Mixture of K Gaussians over the flattened data, with a categorical latent z; fitted by `fit(x)`.

    Buffers (float64): `log_mixing_weights` (log pi) [K], `means` [K, D], and `scale_tril` [K, D, D],
    the Cholesky factors of the covariances ("full"), or `variances` [K, D] ("diag");
    `fitted_examples`, the number of examples fitted on (0 until `fit`/`initialize` runs or a fitted
    state_dict is loaded).

    The posterior q(z|x) is exact, so `elbo(x).elbo == log_prob(x)` and every importance weight
    equals p(x): the bounds can be checked against the truth.

    With config.n_components None, K is chosen by BIC (Schwarz 1978) when `fit` runs (the module docstring):
    until then the buffers have the shapes of one component; `fit` rebuilds them for the chosen K and replaces
    `config` by a copy whose n_components is that K, so the saved config rebuilds the fitted shapes (and a later
    `fit` keeps that K).
    """

    trains_by_gradient = False

    def __init__(self, config: MixtureConfig):
        super().__init__(config)
        self._allocate(config.n_components or 1, F64, None)
        self.register_buffer("fitted_examples", torch.zeros((), dtype=torch.int64))

    def _allocate(self, k: int, dtype: torch.dtype, device: torch.device | None) -> None:
        """(Re)register the buffers of K components: equal weights, zero means, identity covariances."""
        d = math.prod(self.config.data_shape)
        self.register_buffer("log_mixing_weights", torch.full((k,), -math.log(k), dtype=dtype, device=device))
        self.register_buffer("means", torch.zeros(k, d, dtype=dtype, device=device))
        if self.config.covariance == "full":
            self.register_buffer("scale_tril", torch.eye(d, dtype=dtype, device=device).repeat(k, 1, 1))
        else:
            self.register_buffer("variances", torch.ones(k, d, dtype=dtype, device=device))

    # -- parameters ---------------------------------------------------------------------------

    @property
    def params(self) -> MixtureParams:
        scale = self.scale_tril if self.config.covariance == "full" else self.variances
        return MixtureParams(self.log_mixing_weights, self.means, scale)

    def _store(self, params: MixtureParams, shift: Tensor, n: int) -> None:
        k = params.means.shape[0]
        if k != self.means.shape[0]:  # K was chosen by fit
            self._allocate(k, self.means.dtype, self.means.device)
        if self.config.n_components != k:
            self.config = replace(self.config, n_components=k)
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
        if x.shape[0] < (k or 1):
            raise ElboxError(f"mixture model: x has {x.shape[0]} examples, fewer than n_components={k or 1}")
        x = x.to(device=self.means.device, dtype=F64, copy=True)
        shift = x.mean(0)
        return x.sub_(shift), shift

    def _initial_params(self, x: Tensor, k: int, restart: int = 0) -> MixtureParams:
        """theta_0 of K components from seeds chosen by config.init (seeded seed + restart), on centered float64
        data x."""
        c = self.config
        n, d = x.shape
        generator = torch.Generator(device=x.device).manual_seed(c.seed + restart)
        if c.init == "kmeans++":
            seeds = kmeans_plus_plus(x, k, generator)
        else:
            seeds = torch.randperm(n, generator=generator, device=x.device)[:k]
        centers = x[seeds]
        distances = x.square().sum(1, keepdim=True) - 2 * x @ centers.T + centers.square().sum(1)
        q = torch.nn.functional.one_hot(distances.argmin(1), k).to(x.dtype)
        # what a center that gets no point keeps (possible only with duplicated data): an isotropic
        # Gaussian with the average variance of the data
        variance = x.square().mean() + c.covariance_floor
        if c.covariance == "full":
            scale = variance.sqrt() * torch.eye(d, dtype=x.dtype, device=x.device).repeat(k, 1, 1)
        else:
            scale = variance.expand(k, d).clone()
        fallback = MixtureParams(torch.zeros(k, dtype=x.dtype, device=x.device), centers, scale)
        return m_step(x, q, fallback, c.covariance, c.covariance_floor)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set the parameters to theta_0, the EM starting point that `fit(x)` uses (for a given n_components)."""
        if self.config.n_components is None:
            raise ElboxError("mixture model: initialize needs n_components; with None, fit(x) chooses it")
        x, shift = self._centered_data(x)
        self._store(self._initial_params(x, self.config.n_components), shift, x.shape[0])

    @torch.no_grad()
    def fit(self, x: Tensor, callback: Callback | None = None) -> list[dict]:
        """Run EM on all of x from theta_0 (see `initialize`); returns one record per iteration, each also passed
        to callback as soon as its iteration ends.

        Record t: {"iteration": t, "elbo": ELBO(q_t, theta_t), the mean ELBO with q_t from the E-step
        and theta_t after the M-step, "log_likelihood": mean log p(x_n; theta_t), "time_s": seconds
        this iteration took}, nats per example (a density on the data space: no -D ln 256 offset).
        The last record also has "converged": whether EM stopped because the ELBO improved by less
        than tol (never with tol = 0, which runs all max_iter iterations). With n_init > 1 the records of every
        run follow each other, each with "restart": r, and the model keeps the run of the highest final
        log-likelihood.

        With n_components None, K is chosen by BIC (module docstring): the EM records of every candidate K follow
        each other, each with "n_components": K, then one record {"method": a one-line account of the choice,
        "chosen_components": K, "criterion": "bic", "log_likelihood": the chosen fit's, "candidates": [{
        "n_components", "parameters", "bic"}, ...]}. Its BIC values are in the units of x (N examples, natural
        logarithms); their differences, which decide, are the same in any units.
        """
        x, shift = self._centered_data(x)
        if self.config.n_components is not None:
            params, records, _ = self._fit_components(x, self.config.n_components, callback, False)
        else:
            params, records = self._select_components(x, callback)
        self._store(params, shift, x.shape[0])
        return records

    def candidate_components(self, n: int) -> list[int]:
        """The K that n_components=None tries on N examples: those of CANDIDATE_COMPONENTS with at least D + 1 rows
        per component (full covariances) or 2 (diag), and always K = 1."""
        rows = self.num_dims + 1 if self.config.covariance == "full" else 2
        return [k for k in CANDIDATE_COMPONENTS if k == 1 or n >= k * rows]

    def _select_components(self, x: Tensor, callback: Callback | None) -> tuple[MixtureParams, list[dict]]:
        """EM for every candidate K on centered data x; (the params of the lowest BIC, all records)."""
        n, d = x.shape
        records, candidates, best = [], [], None
        for k in self.candidate_components(n):
            params, em_records, mean_log_likelihood = self._fit_components(x, k, callback, True)
            records += em_records
            value = bic(mean_log_likelihood, n, k, d, self.config.covariance)
            candidates.append(
                {"n_components": k, "parameters": free_parameters(k, d, self.config.covariance), "bic": value}
            )
            if best is None or value < best[0]:  # keep only the best fit so far (memory: K D^2 numbers each)
                best = value, k, params, mean_log_likelihood
        _, k, params, mean_log_likelihood = best
        tried = [c["n_components"] for c in candidates]
        largest = "; the largest tried: a larger n_components may fit better" if k == tried[-1] > 1 else ""
        record = {
            "method": f"BIC chose {k} component{'s' if k > 1 else ''} of {', '.join(map(str, tried))}{largest}",
            "chosen_components": k,
            "criterion": "bic",
            "log_likelihood": mean_log_likelihood,
            "candidates": candidates,
        }
        records.append(record)
        if callback is not None:
            callback(record)
        return params, records

    def _fit_components(
        self, x: Tensor, k: int, callback: Callback | None, tag: bool
    ) -> tuple[MixtureParams, list[dict], float]:
        """EM with K components from n_init starts on centered data x: (the params of the highest final mean
        log-likelihood, the records of every run (with tag, each has "n_components": K), that log-likelihood)."""
        restarts = self.config.n_init
        runs = [
            self._run_em(
                x,
                self._initial_params(x, k, r),
                callback,
                {**({"n_components": k} if tag else {}), **({"restart": r} if restarts > 1 else {})},
            )
            for r in range(restarts)
        ]
        params, _, log_likelihood = max(runs, key=lambda run: run[2])
        return params, [record for _, records, _ in runs for record in records], log_likelihood

    def _run_em(
        self, x: Tensor, params: MixtureParams, callback: Callback | None, tags: dict
    ) -> tuple[MixtureParams, list[dict], float]:
        """EM from params on centered data x until convergence or max_iter: (final params, records, each with
        the entries of tags, the final mean log-likelihood in the units of x: the callback may change the
        records' values, e.g. add an offset)."""
        c = self.config
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
            record = {
                "iteration": iteration,
                "elbo": elbo,
                "log_likelihood": log_likelihood,
                "time_s": time.perf_counter() - start,
                **tags,
            }
            converged = c.tol > 0 and elbo - previous_elbo < c.tol
            previous_elbo = elbo
            if converged or iteration == c.max_iter:
                record["converged"] = converged
            records.append(record)
            if callback is not None:
                callback(record)
            if converged:
                break
        return params, records, log_likelihood

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
        callers clamp for display (elbox.io.plots does).
        """
        check_count(n)
        self._check_fitted()
        z = torch.multinomial(self.log_mixing_weights.exp(), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.num_dims, generator=generator, dtype=self.means.dtype, device=self.means.device)
        if self.config.covariance == "full":
            noise = torch.empty_like(eps)
            for k in range(self.means.shape[0]):  # not a hot path: one matmul per component
                rows = z == k
                noise[rows] = eps[rows] @ self.scale_tril[k].T
        else:
            noise = eps * self.variances[z].sqrt()
        return (self.means[z] + noise).reshape(n, *self.config.data_shape)

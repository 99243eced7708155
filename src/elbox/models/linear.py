"""Linear-Gaussian latent model: probabilistic PCA (isotropic noise) and factor analysis (diagonal noise).

    p(z) = N(0, I_d),   p(x|z) = N(W z + b, Psi),   Psi = diag(sigma^2)   (sigma scalar or per dimension)

Everything is exact, so this model is the ground truth the bounds are checked against:

    log p(x) = log N(x; b, C),  C = W W^T + Psi
    p(z|x)   = N(m, S),         S = M^-1,  M = I + W^T Psi^-1 W,  m = S W^T Psi^-1 (x - b)

With r = x - b, Woodbury (C^-1 r = Psi^-1 (r - W m)) and the matrix determinant lemma
(det C = det Psi det M) give, with one d x d Cholesky factor of M and O(N D d) work:

    r^T C^-1 r = ||r - W m||^2_{Psi^-1} + ||m||^2      (a sum of two non-negative terms: no cancellation)
    log det C  = sum_i log psi_i + log det M

The encoder q(z|x) is either the exact posterior (encoder="exact", full covariance) or an amortized
diagonal Gaussian (encoder="amortized"): q(z|x) = N(A (x - b) + c, diag(softplus(s)^2)). For a Gaussian q
the ELBO is analytic:

    E_q log p(x|z) = -1/2 [ D log 2 pi + sum_i log psi_i + ||r - W m_q||^2_{Psi^-1} + tr(W^T Psi^-1 W S_q) ]
    KL(q || p(z))  = 1/2 [ tr S_q + ||m_q||^2 - d - log det S_q ]
    log p(x) - ELBO = KL(q || p(z|x))   (exact_gap, analytic)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import MultivariateNormal

from elbox.core.bounds import LOG_2PI, ELBOTerms, check_count, kl_full_gaussians, standard_normal_log_prob
from elbox.core.errors import ElboxError
from elbox.core.nets import inverse_softplus
from elbox.core.options import check_options, option
from elbox.data.spaces import model_data_space
from elbox.models.base import (
    DATA_SHAPE_LIMITS,
    MAX_WIDTH,
    Callback,
    LatentVariableModel,
    check_data_shape,
    register_model,
)

NOISE_MODELS = ("isotropic", "diagonal")
ENCODERS = ("exact", "amortized")
FITS = ("closed-form", "elbo")


@dataclass
class LinearGaussianConfig:
    data_shape: tuple[int, ...] = option(
        (1, 28, 28), "shape of one example, e.g. (1, 28, 28) or (50,)", **DATA_SHAPE_LIMITS
    )
    latent_dim: int = option(20, "latent dimensions (fewer than the data dimensions)", minimum=1, maximum=MAX_WIDTH)
    noise: str = option(
        "isotropic",
        "observation noise: isotropic, one sigma (probabilistic PCA), or diagonal, a sigma "
        "per dimension (factor analysis)",
        choices=NOISE_MODELS,
    )
    encoder: str = option(
        "amortized",
        "q(z|x): the exact posterior, or an amortized diagonal Gaussian (linear mean, learned std)",
        choices=ENCODERS,
    )
    fit: str = option(
        "closed-form",
        "maximum likelihood in closed form (EM for factor analysis), or gradient ascent on the ELBO",
        choices=FITS,
    )

    def __post_init__(self):
        check_options(self)
        check_data_shape(self.data_shape)
        x_dim = math.prod(self.data_shape)
        if not self.latent_dim < x_dim:
            raise ElboxError(f"latent_dim must be smaller than the data dimension {x_dim}, got {self.latent_dim}")


@register_model("linear", LinearGaussianConfig)
class LinearGaussian(LatentVariableModel):
    """x = W z + b + noise, z ~ N(0, I_d), noise ~ N(0, diag(sigma^2)). Exact log p(x) and p(z|x).

    Parameters: W [x_dim, z_dim], b [x_dim], log_sigma ([] isotropic or [x_dim] diagonal); with the
    amortized encoder also A [z_dim, x_dim], c [z_dim], s [z_dim] (q's std is softplus(s)).
    Initialization (the starting point of fit="elbo"): W ~ 0.01 N(0, 1), b = 0, log_sigma = 0, and the
    amortized encoder set to the best diagonal q for those parameters (see match_encoder_to_posterior).
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        noise: str = "isotropic",
        encoder: str = "exact",
        *,
        config: LinearGaussianConfig | None = None,
    ):
        if config is None:
            check_count(x_dim, "x_dim", minimum=2)
            config = LinearGaussianConfig(data_shape=(x_dim,), latent_dim=z_dim, noise=noise, encoder=encoder)
        elif (math.prod(config.data_shape), config.latent_dim, config.noise, config.encoder) != (
            x_dim,
            z_dim,
            noise,
            encoder,
        ):
            raise ElboxError("LinearGaussian arguments disagree with its config; build it with from_config")
        super().__init__(config)
        self.trains_by_gradient = config.fit == "elbo"  # by gradient ascent on the ELBO, else by fit(x)
        self.x_dim, self.z_dim = x_dim, z_dim
        self.W = nn.Parameter(0.01 * torch.randn(x_dim, z_dim))
        self.b = nn.Parameter(torch.zeros(x_dim))
        self.log_sigma = nn.Parameter(torch.zeros(() if noise == "isotropic" else (x_dim,)))
        if encoder == "amortized":
            self.A = nn.Parameter(torch.zeros(z_dim, x_dim))
            self.c = nn.Parameter(torch.zeros(z_dim))
            self.s = nn.Parameter(torch.zeros(z_dim))
            self.match_encoder_to_posterior()

    @classmethod
    def from_config(cls, config: LinearGaussianConfig) -> LinearGaussian:
        return cls(math.prod(config.data_shape), config.latent_dim, config.noise, config.encoder, config=config)

    @property
    def data_space(self) -> str:
        return model_data_space("continuous", self.config.data_shape, "the linear model")

    # -- shapes ----------------------------------------------------------------------------------

    def _flatten(self, x: Tensor, what: str = "x", cast: bool = True) -> Tensor:
        """[N, *data_shape] or [N, x_dim] -> [N, x_dim], in the parameters' dtype when cast."""
        if not isinstance(x, Tensor):
            raise ElboxError(f"{what} must be a tensor, got {type(x).__name__}")
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.x_dim:
            raise ElboxError(
                f"{what} has shape {list(x.shape)}; expected [N, {self.x_dim}] or [N, "
                f"{', '.join(map(str, self.config.data_shape))}]"
            )
        x = x.reshape(x.shape[0], self.x_dim)
        return x.to(self.W.dtype) if cast else x

    def _unflatten(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.config.data_shape)

    # -- the generative model and its exact posterior --------------------------------------------

    @property
    def noise_variance(self) -> Tensor:
        """psi = sigma^2 per data dimension [x_dim]."""
        return torch.exp(2 * self.log_sigma).expand(self.x_dim)

    def _posterior_precision_cholesky(self) -> Tensor:
        """Lower Cholesky factor of M = I + W^T Psi^-1 W, the posterior precision [d, d]."""
        precision = torch.eye(self.z_dim, dtype=self.W.dtype, device=self.W.device)
        precision = precision + self.W.T @ (self.W / self.noise_variance.unsqueeze(1))
        return torch.linalg.cholesky(precision)

    def _posterior_mean(self, r: Tensor, chol_m: Tensor) -> Tensor:
        """m = M^-1 W^T Psi^-1 r for residuals r = x - b [N, D]; returns [N, d]."""
        projected = (r / self.noise_variance) @ self.W  # rows: W^T Psi^-1 r
        return torch.cholesky_solve(projected.T, chol_m).T

    def _posterior_params(self, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(mean [N, d], scale_tril of S [d, d], Cholesky factor of M [d, d]) of p(z|x)."""
        chol_m = self._posterior_precision_cholesky()
        # S = M^-1 = L^-T L^-1; re-factor it as a lower-triangular scale (d x d, cheap)
        scale_tril = torch.linalg.cholesky(torch.cholesky_inverse(chol_m))
        return self._posterior_mean(r, chol_m), scale_tril, chol_m

    def posterior(self, x: Tensor) -> MultivariateNormal:
        """The exact p(z|x) = N(S W^T Psi^-1 (x - b), S), S = (I + W^T Psi^-1 W)^-1; batch shape [N]."""
        mean, scale_tril, _ = self._posterior_params(self._flatten(x) - self.b)
        return MultivariateNormal(mean, scale_tril=scale_tril)

    def _log_lik_constant(self) -> Tensor:
        """-1/2 (D log 2 pi + sum_i log psi_i): the z-independent part of log p(x|z)."""
        return -0.5 * (self.x_dim * LOG_2PI + 2 * self.log_sigma.expand(self.x_dim).sum())

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log N(x; b, W W^T + Psi) [N], in O(N D d) by Woodbury and the determinant lemma."""
        r = self._flatten(x) - self.b
        chol_m = self._posterior_precision_cholesky()
        m = self._posterior_mean(r, chol_m)
        mahalanobis = ((r - m @ self.W.T).square() / self.noise_variance).sum(-1) + m.square().sum(-1)
        logdet_m = 2 * chol_m.diagonal().log().sum()
        return self._log_lik_constant() - 0.5 * (logdet_m + mahalanobis)

    # -- the encoder q(z|x) ------------------------------------------------------------------------

    def _q_params(self, r: Tensor) -> tuple[Tensor, Tensor]:
        """q(z|x) for residuals r = x - b: (mean [N, d], scale_tril [d, d], shared by all examples)."""
        if self.config.encoder == "exact":
            mean, scale_tril, _ = self._posterior_params(r)
            return mean, scale_tril
        mean = r @ self.A.T + self.c
        return mean, torch.diag_embed(F.softplus(self.s))

    @torch.no_grad()
    def match_encoder_to_posterior(self) -> None:
        """Set the amortized encoder to the best diagonal q, argmin KL(q || p(z|x)), for the current W, b, sigma.

        The exact posterior's mean is linear in x: A = M^-1 W^T Psi^-1, c = 0. For a Gaussian target
        N(m, M^-1) the diagonal q minimizing KL(q || p) has mean m and variances 1 / M_ii (the diagonal of
        the target's precision, not of its covariance), so std_i = M_ii^-1/2. No-op for encoder="exact".
        """
        if self.config.encoder != "amortized":
            return
        chol_m = self._posterior_precision_cholesky()
        self.A.copy_(torch.cholesky_solve((self.W / self.noise_variance.unsqueeze(1)).T, chol_m))
        self.c.zero_()
        precision_diag = (chol_m.square()).sum(-1)  # M_ii = sum_j L_ij^2
        self.s.copy_(inverse_softplus(precision_diag.rsqrt()))

    @torch.no_grad()
    def initialize_from_data(self, x: Tensor) -> None:
        """Optional start for fit="elbo": b = the data mean (W, log_sigma untouched), encoder re-matched."""
        x = self._flatten(x, "training data", cast=False)
        if x.shape[0] < 1:
            raise ElboxError("training data is empty")
        self.b.copy_(_mean_and_covariance(x, 8192, covariance=False)[0])
        self.match_encoder_to_posterior()

    # -- the model interface ---------------------------------------------------------------------

    def elbo(self, x: Tensor, n_samples: int = 1) -> ELBOTerms:
        """The analytic ELBO (exact, no sampling): E_q log p(x|z) and KL(q || N(0, I)) in closed form.

        n_samples is checked and otherwise ignored: the expectation is computed exactly, which is what
        every Monte Carlo estimate would converge to. For sampled values use log_weights (its mean is
        the ELBO). Differentiable in all parameters.
        """
        check_count(n_samples, "n_samples")
        r = self._flatten(x) - self.b
        mean_q, scale_q = self._q_params(r)
        cov_q = scale_q @ scale_q.T
        psi = self.noise_variance
        # E_q ||r - W z||^2_{Psi^-1} = ||r - W m_q||^2_{Psi^-1} + tr(W^T Psi^-1 W S_q)
        squared_error = ((r - mean_q @ self.W.T).square() / psi).sum(-1)
        trace = (self.W.T @ (self.W / psi.unsqueeze(1)) * cov_q).sum()
        reconstruction = self._log_lik_constant() - 0.5 * (squared_error + trace)
        logdet_q = 2 * scale_q.diagonal().log().sum()
        kl = 0.5 * (cov_q.trace() + mean_q.square().sum(-1) - self.z_dim - logdet_q)
        return ELBOTerms(reconstruction=reconstruction, kl={"z": kl})

    def exact_gap(self, x: Tensor) -> Tensor:
        """log p(x) - ELBO(x) = KL(q(z|x) || p(z|x)) [N], analytic (zero up to rounding for encoder="exact")."""
        r = self._flatten(x) - self.b
        mean_q, scale_q = self._q_params(r)
        post_mean, post_scale, _ = self._posterior_params(r)
        return kl_full_gaussians(mean_q, scale_q, post_mean, post_scale)

    def log_weights(self, x: Tensor, k: int) -> Tensor:
        return self.log_weights_sampler(x)(k)

    def log_weights_sampler(self, x: Tensor) -> Callable[[int], Tensor]:
        """Encode x once; the returned function draws n samples z ~ q(z|x) and gives
        log p(x|z) + log p(z) - log q(z|x) [n, B], with log p(x|z) computed from the residual x - W z - b."""
        r = self._flatten(x) - self.b
        mean_q, scale_q = self._q_params(r)
        psi = self.noise_variance
        constant = self._log_lik_constant()
        log_q_constant = -0.5 * self.z_dim * LOG_2PI - scale_q.diagonal().log().sum()

        def draw(n: int) -> Tensor:
            check_count(n)
            eps = torch.randn(n, *mean_q.shape, dtype=mean_q.dtype, device=mean_q.device)
            z = mean_q + eps @ scale_q.T  # [n, B, d]
            log_px_given_z = constant - 0.5 * ((r - z @ self.W.T).square() / psi).sum(-1)
            log_q = log_q_constant - 0.5 * eps.square().sum(-1)
            return log_px_given_z + standard_normal_log_prob(z) - log_q

        return draw

    # -- what elbox.evaluation.tighten needs -----------------------------------------------------------------

    def posterior_params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation [N, d] of the amortized diagonal q(z|x)."""
        if self.config.encoder != "amortized":
            raise ElboxError(
                'this linear model\'s q is the exact full-covariance posterior; tightening needs encoder="amortized"'
            )
        mean, scale_tril = self._q_params(self._flatten(x) - self.b)
        return mean, scale_tril.diagonal().expand_as(mean)

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x, z) = log N(x; W z + b, diag sigma^2) + log N(z; 0, I) for z [S, B, d]; returns [S, B]."""
        r = self._flatten(x) - self.b
        log_px_given_z = self._log_lik_constant() - 0.5 * ((r - z @ self.W.T).square() / self.noise_variance).sum(-1)
        return log_px_given_z + standard_normal_log_prob(z)

    def encoder_parameters(self) -> list[nn.Parameter]:
        if self.config.encoder != "amortized":
            return []
        return [self.A, self.c, self.s]

    def encode(self, x: Tensor) -> Tensor:
        """Mean of q(z|x) [N, d] (the exact posterior mean for encoder="exact")."""
        return self._q_params(self._flatten(x) - self.b)[0]

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and marginal variances (the covariance diagonal) of q(z|x), each [N, d]."""
        mean, scale_tril = self._q_params(self._flatten(x) - self.b)
        return mean, scale_tril.square().sum(-1).expand_as(mean)

    def reconstruct(self, x: Tensor) -> Tensor:
        """W E_q[z] + b, shaped [N, *data_shape]."""
        return self._unflatten(self.encode(x) @ self.W.T + self.b)

    def sample(self, n: int, mean: bool = False, temperature: float = 1.0) -> Tensor:
        """Draws x = W z + b + sigma * eps, z ~ N(0, temperature^2 I), shaped [n, *data_shape].

        mean=True leaves out the observation noise (returns W z + b). Values are not clipped to [0, 1].
        """
        check_count(n)
        z = temperature * torch.randn(n, self.z_dim, dtype=self.W.dtype, device=self.W.device)
        x = z @ self.W.T + self.b
        if not mean:
            x = x + self.noise_variance.sqrt() * torch.randn_like(x)
        return self._unflatten(x)

    # -- maximum-likelihood fit without gradients ------------------------------------------------

    @torch.no_grad()
    def fit(
        self,
        x: Tensor,
        callback: Callback | None = None,
        max_iterations: int = 1000,
        tolerance: float = 1e-6,
        chunk_size: int = 8192,
    ) -> list[dict]:
        """Maximum-likelihood W, b, sigma on data x [N, ...]; returns records with the mean log p(x) per example,
        each also passed to callback as soon as it is computed.

        - noise="isotropic" (PPCA): closed form (Tipping & Bishop 1999). With the sample covariance's
          eigenvalues l_1 >= ... >= l_D and eigenvectors U: b = mean, sigma^2 = mean of l_{d+1..D},
          W = U_d (L_d - sigma^2 I)^1/2. One record.
        - noise="diagonal" (factor analysis): no closed form; EM from the PPCA solution, one record per
          iteration, until the mean log-likelihood improves by less than `tolerance` nats or after
          max_iterations. EM never decreases the likelihood.
        Noise variances are floored at 1e-6 x that dimension's data variance (and at 1e-12; PPCA's single
        sigma^2 at the largest of these floors), so constant dimensions keep a finite density. The fit runs in float64,
        chunked over examples (chunk_size). Afterwards the amortized encoder, if any, is the best diagonal q
        (match_encoder_to_posterior). The log-likelihoods are of x as given (no dequantization offset).
        """
        check_count(max_iterations, "max_iterations")
        if not tolerance >= 0:
            raise ElboxError(f"tolerance must be >= 0, got {tolerance!r}")
        check_count(chunk_size, "chunk_size")
        x = self._flatten(x, "training data", cast=False)
        if x.shape[0] < 2:
            raise ElboxError(f"training data needs at least 2 examples to fit a covariance, got {x.shape[0]}")
        if not torch.isfinite(x).all():
            raise ElboxError("training data contains NaN or infinite values")
        mean, cov = _mean_and_covariance(x, chunk_size)
        d = self.z_dim
        floor = torch.clamp(1e-6 * cov.diagonal(), min=1e-12)

        # PPCA closed form (also EM's starting point for factor analysis)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
        eigenvalues, eigenvectors = eigenvalues.flip(0).clamp(min=0), eigenvectors.flip(1)
        sigma2 = torch.clamp(eigenvalues[d:].mean(), min=floor.max())
        w = eigenvectors[:, :d] * (eigenvalues[:d] - sigma2).clamp(min=0).sqrt()
        psi = sigma2.expand(self.x_dim)
        records: list[dict] = []

        def emit(record: dict) -> None:
            records.append(record)
            if callback is not None:
                callback(record)

        if self.config.noise == "isotropic":
            emit({"method": "eigendecomposition", "log_likelihood": _gaussian_mean_log_likelihood(w, psi, cov)})
        else:
            # EM from the PPCA W, with each dimension's noise = its variance left unexplained by W W^T
            psi = torch.maximum(cov.diagonal() - w.square().sum(1), floor)
            log_lik = _gaussian_mean_log_likelihood(w, psi, cov)
            emit({"method": "em", "iteration": 0, "log_likelihood": log_lik})
            for iteration in range(1, max_iterations + 1):
                w, psi = _factor_analysis_em_step(w, psi, cov, floor)
                new_log_lik = _gaussian_mean_log_likelihood(w, psi, cov)
                emit({"method": "em", "iteration": iteration, "log_likelihood": new_log_lik})
                converged = new_log_lik - log_lik < tolerance
                log_lik = new_log_lik
                if converged:
                    break

        self.W.copy_(w)
        self.b.copy_(mean)
        self.log_sigma.copy_(0.5 * (psi[0] if self.config.noise == "isotropic" else psi).log())
        self.match_encoder_to_posterior()
        return records


# -- helpers for the fit (float64, D x D) ----------------------------------------------------------


def _mean_and_covariance(x: Tensor, chunk_size: int, covariance: bool = True) -> tuple[Tensor, Tensor | None]:
    """Mean [D] and maximum-likelihood (divide by N) covariance [D, D] in float64, two passes over chunks."""
    n = x.shape[0]
    mean = sum(x[i : i + chunk_size].double().sum(0) for i in range(0, n, chunk_size)) / n
    if not covariance:
        return mean, None
    cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for i in range(0, n, chunk_size):
        centered = x[i : i + chunk_size].double() - mean
        cov += centered.T @ centered
    return mean, cov / n


def _gaussian_mean_log_likelihood(w: Tensor, psi: Tensor, cov: Tensor) -> float:
    """Mean over the data of log N(x; mean, W W^T + Psi) = -1/2 [D log 2 pi + log det C + tr(C^-1 Sigma)].

    Woodbury: tr(C^-1 Sigma) = tr(Psi^-1 Sigma) - tr(M^-1 B^T Sigma B), B = Psi^-1 W; log det C = sum log psi + log det
    M.
    """
    b_mat = w / psi.unsqueeze(1)
    chol_m = torch.linalg.cholesky(torch.eye(w.shape[1], dtype=w.dtype, device=w.device) + w.T @ b_mat)
    trace = (cov.diagonal() / psi).sum() - (torch.cholesky_solve(b_mat.T @ cov @ b_mat, chol_m)).trace()
    logdet = psi.log().sum() + 2 * chol_m.diagonal().log().sum()
    return (-0.5 * (w.shape[0] * LOG_2PI + logdet + trace)).item()


def _factor_analysis_em_step(w: Tensor, psi: Tensor, cov: Tensor, floor: Tensor) -> tuple[Tensor, Tensor]:
    """One EM step for factor analysis from the sample covariance Sigma (Rubin & Thayer 1982).

    E-step: E[z|x] = beta (x - mean) with beta = M^-1 W^T Psi^-1; averaged over the data,
            E[z z^T] = M^-1 + beta Sigma beta^T and E[(x - mean) z^T] = Sigma beta^T.
    M-step: W = Sigma beta^T (M^-1 + beta Sigma beta^T)^-1,  Psi = diag(Sigma - W beta Sigma).
    """
    eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    chol_m = torch.linalg.cholesky(eye + w.T @ (w / psi.unsqueeze(1)))
    beta = torch.cholesky_solve((w / psi.unsqueeze(1)).T, chol_m)  # [d, D]
    cov_beta_t = cov @ beta.T  # Sigma beta^T [D, d]
    second_moment = torch.cholesky_inverse(chol_m) + beta @ cov_beta_t
    new_w = torch.linalg.solve(second_moment, cov_beta_t.T).T  # second_moment is symmetric
    new_psi = torch.maximum(cov.diagonal() - (new_w * cov_beta_t).sum(1), floor)
    return new_w, new_psi

"""Tests for elbox.core.bounds: Gaussian sampling and KLs, the ELBO, the IWAE bound, and a linear-Gaussian
latent model whose log p(x) and posterior are known in closed form."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, MultivariateNormal, Normal, kl_divergence

from elbox.core.bounds import (
    ELBOTerms,
    diag_gaussian_log_prob_from_noise,
    diag_gaussian_mixture_log_prob,
    gaussian_elbo,
    iwae_bound,
    kl_diag_gaussians,
    kl_full_gaussians,
    kl_monte_carlo,
    log_mean_exp,
    mean_and_stderr,
    mixture_components_direct,
    sample_diag_gaussian,
    standard_normal_log_prob,
)
from elbox.core.errors import ElboxError

F64 = torch.float64
LOG_2PI = math.log(2 * math.pi)


def random_spd_tril(d, batch=(), seed=0):
    """Cholesky factors of random SPD matrices A A^T + 0.5 I."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, d, d, generator=g, dtype=F64)
    cov = a @ a.transpose(-1, -2) + 0.5 * torch.eye(d, dtype=F64)
    return torch.linalg.cholesky(cov)


# ----------------------------------------------------------------------------------------------
# KL divergences


def test_kl_diag_gaussians_matches_torch():
    torch.manual_seed(0)
    mean_q = torch.randn(6, 4, dtype=F64) * 2
    std_q = torch.rand(6, 4, dtype=F64) * 3 + 0.05
    mean_p = torch.randn(6, 4, dtype=F64)
    std_p = torch.rand(6, 4, dtype=F64) * 2 + 0.1
    expected = kl_divergence(Normal(mean_q, std_q), Normal(mean_p, std_p))
    got = kl_diag_gaussians(mean_q, std_q, mean_p, std_p)
    assert got.shape == (6, 4)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # scalar (non-standard) p given as floats
    got_scalar = kl_diag_gaussians(mean_q, std_q, 0.7, 2.5)
    expected_scalar = kl_divergence(
        Normal(mean_q, std_q), Normal(torch.full_like(mean_q, 0.7), torch.full_like(std_q, 2.5))
    )
    torch.testing.assert_close(got_scalar, expected_scalar, rtol=1e-10, atol=1e-12)
    # default p = N(0, 1)
    got_std = kl_diag_gaussians(mean_q, std_q)
    expected_std = kl_divergence(Normal(mean_q, std_q), Normal(torch.zeros_like(mean_q), torch.ones_like(std_q)))
    torch.testing.assert_close(got_std, expected_std, rtol=1e-10, atol=1e-12)
    # KL(q || q) = 0 and KL >= 0
    torch.testing.assert_close(kl_diag_gaussians(mean_q, std_q, mean_q, std_q), torch.zeros_like(mean_q))
    assert (got >= 0).all()


@pytest.mark.parametrize("d", [1, 3, 5])
def test_kl_full_gaussians_matches_torch(d):
    torch.manual_seed(d)
    batch = (4,)
    mean_q = torch.randn(*batch, d, dtype=F64)
    mean_p = torch.randn(*batch, d, dtype=F64)
    l_q = random_spd_tril(d, batch, seed=10 + d)
    l_p = random_spd_tril(d, batch, seed=20 + d)
    expected = kl_divergence(MultivariateNormal(mean_q, scale_tril=l_q), MultivariateNormal(mean_p, scale_tril=l_p))
    got = kl_full_gaussians(mean_q, l_q, mean_p, l_p)
    assert got.shape == batch
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    assert (got > 0).all()
    # KL(q || q) = 0
    torch.testing.assert_close(
        kl_full_gaussians(mean_q, l_q, mean_q, l_q), torch.zeros(batch, dtype=F64), atol=1e-10, rtol=0
    )


def test_kl_full_gaussians_broadcasts_a_shared_p():
    torch.manual_seed(1)
    d = 3
    mean_q = torch.randn(5, d, dtype=F64)
    l_q = random_spd_tril(d, (5,), seed=3)
    mean_p = torch.randn(d, dtype=F64)
    l_p = random_spd_tril(d, (), seed=4)
    got = kl_full_gaussians(mean_q, l_q, mean_p, l_p)
    assert got.shape == (5,)
    for i in range(5):
        expected = kl_divergence(
            MultivariateNormal(mean_q[i], scale_tril=l_q[i]), MultivariateNormal(mean_p, scale_tril=l_p)
        )
        torch.testing.assert_close(got[i], expected, rtol=1e-9, atol=1e-10)


def test_kl_full_gaussians_reduces_to_diagonal():
    torch.manual_seed(2)
    d = 4
    mean_q, mean_p = torch.randn(3, d, dtype=F64), torch.randn(3, d, dtype=F64)
    std_q, std_p = torch.rand(3, d, dtype=F64) + 0.2, torch.rand(3, d, dtype=F64) + 0.3
    full = kl_full_gaussians(mean_q, torch.diag_embed(std_q), mean_p, torch.diag_embed(std_p))
    diag = kl_diag_gaussians(mean_q, std_q, mean_p, std_p).sum(-1)
    torch.testing.assert_close(full, diag, rtol=1e-10, atol=1e-12)


def test_kl_monte_carlo_agrees_with_analytic():
    torch.manual_seed(3)
    n = 20000
    # diagonal (Independent Normal) pair
    q = Independent(Normal(torch.randn(4, 3, dtype=F64), torch.rand(4, 3, dtype=F64) + 0.5), 1)
    p = Independent(Normal(torch.randn(4, 3, dtype=F64), torch.rand(4, 3, dtype=F64) + 0.8), 1)
    est, se = kl_monte_carlo(q, p, n)
    truth = kl_divergence(q, p)
    assert est.shape == se.shape == (4,)
    assert (se > 0).all()
    # tolerance: 4 standard errors of the MC mean (se computed by kl_monte_carlo from its samples;
    # test_kl_monte_carlo_stderr_is_the_spread_of_repeated_estimates checks that se is honest)
    assert ((est - truth).abs() < 4 * se).all(), (est, truth, se)
    # full-covariance pair
    mq, mp = torch.randn(2, 3, dtype=F64), torch.randn(2, 3, dtype=F64)
    q2 = MultivariateNormal(mq, scale_tril=random_spd_tril(3, (2,), seed=5))
    p2 = MultivariateNormal(mp, scale_tril=random_spd_tril(3, (2,), seed=6) * 2)
    est2, se2 = kl_monte_carlo(q2, p2, n)
    truth2 = kl_divergence(q2, p2)
    assert ((est2 - truth2).abs() < 4 * se2).all(), (est2, truth2, se2)


def test_kl_monte_carlo_stderr_is_the_spread_of_repeated_estimates():
    torch.manual_seed(4)
    q = Normal(torch.tensor(0.3, dtype=F64), torch.tensor(0.7, dtype=F64))
    p = Normal(torch.tensor(-0.5, dtype=F64), torch.tensor(1.3, dtype=F64))
    reps = [kl_monte_carlo(q, p, 200) for _ in range(400)]
    ests = torch.stack([e for e, _ in reps])
    mean_se = torch.stack([s for _, s in reps]).mean()
    # the empirical std of 400 estimates has relative error ~ 1/sqrt(2*399) ~ 3.5%; allow 15%
    assert abs(ests.std().item() / mean_se.item() - 1) < 0.15
    # q == p: every log ratio is zero
    est0, se0 = kl_monte_carlo(q, q, 50)
    assert est0.item() == 0 and se0.item() == 0


# ----------------------------------------------------------------------------------------------
# Sampling


def test_sample_diag_gaussian_shapes_and_moments():
    torch.manual_seed(5)
    mean = torch.tensor([[0.0, 3.0, -2.0], [1.0, -1.0, 10.0]], dtype=F64)
    std = torch.tensor([[1.0, 0.1, 2.0], [0.5, 4.0, 0.01]], dtype=F64)
    n = 20000
    z, eps = sample_diag_gaussian(mean, std, n)
    assert z.shape == eps.shape == (n, 2, 3)
    assert z.dtype == F64
    torch.testing.assert_close(z, mean + std * eps, rtol=0, atol=0)
    # sample mean: SE = std / sqrt(n)
    assert ((z.mean(0) - mean).abs() < 4 * std / math.sqrt(n)).all()
    # sample std of a normal: SE ~ std / sqrt(2 (n - 1))
    assert ((z.std(0) - std).abs() < 4 * std / math.sqrt(2 * (n - 1))).all()


def test_sample_diag_gaussian_generator_is_used():
    mean, std = torch.zeros(3), torch.ones(3)
    z1, _ = sample_diag_gaussian(mean, std, 5, generator=torch.Generator().manual_seed(7))
    z2, _ = sample_diag_gaussian(mean, std, 5, generator=torch.Generator().manual_seed(7))
    z3, _ = sample_diag_gaussian(mean, std, 5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(z1, z2)
    assert not torch.equal(z1, z3)


def test_sample_diag_gaussian_reparameterization_gradients():
    torch.manual_seed(6)
    mean = torch.randn(4, 3, dtype=F64, requires_grad=True)
    std = (torch.rand(4, 3, dtype=F64) + 0.1).requires_grad_()
    z, eps = sample_diag_gaussian(mean, std, 7)
    (z * 2).sum().backward()
    # dz/dmean = 1, dz/dstd = eps
    torch.testing.assert_close(mean.grad, torch.full_like(mean, 2.0 * 7))
    torch.testing.assert_close(std.grad, 2 * eps.detach().sum(0))


def test_gaussian_mixture_log_prob_matches_torch_distributions_and_is_accurate_in_float32():
    """The expanded-square mixture density equals MixtureSameFamily's in float64, for any batch shape; in float32,
    with VampPrior-like sizes (means ~3, variances down to e^-6, where the expanded terms reach 1e5), its error
    against the float64 value is no larger than the direct float32 formula's."""
    torch.manual_seed(0)
    means, stds = (
        3 * torch.randn(50, 40, dtype=torch.float64),
        (torch.rand(50, 40, dtype=torch.float64) * 8 - 6).div(2).exp(),
    )
    z = means[torch.randint(0, 50, (4, 30))] + 0.1 * torch.randn(4, 30, 40, dtype=torch.float64)
    mixture = MixtureSameFamily(
        Categorical(logits=torch.zeros(50, dtype=torch.float64)), Independent(Normal(means, stds), 1)
    )
    expected = mixture.log_prob(z)
    torch.testing.assert_close(diag_gaussian_mixture_log_prob(z, means, stds), expected, rtol=1e-12, atol=1e-9)
    direct = torch.logsumexp(mixture_components_direct(z.reshape(-1, 40), means, stds), -1) - math.log(50)  # MPS's path
    torch.testing.assert_close(direct.reshape(4, 30), expected, rtol=1e-12, atol=1e-9)
    got32 = diag_gaussian_mixture_log_prob(z.float(), means.float(), stds.float())
    assert got32.dtype == torch.float32 and got32.shape == (4, 30)
    direct32 = MixtureSameFamily(
        Categorical(logits=torch.zeros(50)), Independent(Normal(means.float(), stds.float()), 1)
    )
    direct_error = (direct32.log_prob(z.float()).double() - expected).abs().max()
    assert (got32.double() - expected).abs().max() <= max(direct_error, 1e-4)


def test_diag_gaussian_log_prob_from_noise_matches_normal():
    torch.manual_seed(7)
    mean = torch.randn(3, 5, dtype=F64) * 3
    std = torch.rand(3, 5, dtype=F64) * 2 + 0.01
    z, eps = sample_diag_gaussian(mean, std, 11)
    expected = Normal(mean, std).log_prob(z).sum(-1)
    got = diag_gaussian_log_prob_from_noise(eps, std)
    assert got.shape == (11, 3)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        standard_normal_log_prob(z), Normal(0.0, 1.0).log_prob(z).sum(-1), rtol=1e-10, atol=1e-10
    )


# ----------------------------------------------------------------------------------------------
# IWAE bound, log_mean_exp, mean_and_stderr


class SliceFeeder:
    """log_weights callable returning consecutive slices of a fixed [K, B] tensor."""

    def __init__(self, log_w):
        self.log_w = log_w
        self.pos = 0
        self.requests = []

    def __call__(self, n):
        self.requests.append(n)
        out = self.log_w[self.pos : self.pos + n]
        assert out.shape[0] == n, "iwae_bound asked for more samples than K"
        self.pos += n
        return out


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_iwae_bound_chunking_is_exact(dtype):
    torch.manual_seed(8)
    k, b = 37, 3
    log_w = (torch.randn(k, b, dtype=F64) * 30 - 500).to(dtype)  # wide spread, far from 0
    reference = torch.logsumexp(log_w.double(), 0) - math.log(k)
    for per_pass in [1, 4, 10, 36, 37, 1000]:
        feeder = SliceFeeder(log_w)
        got = iwae_bound(feeder, k, per_pass)
        assert got.dtype == F64
        assert got.shape == (b,)
        assert sum(feeder.requests) == k
        assert max(feeder.requests) <= per_pass
        torch.testing.assert_close(got, reference, rtol=1e-13, atol=1e-12)


def test_iwae_bound_k1_is_mean_log_weight_and_rejects_bad_k():
    log_w = torch.tensor([[-3.5, 2.0, -100.0]], dtype=F64)
    torch.testing.assert_close(iwae_bound(SliceFeeder(log_w), 1, 10), log_w[0])
    for bad in [0, -1]:
        with pytest.raises(ElboxError, match="K"):
            iwae_bound(SliceFeeder(log_w), bad, 10)


def test_log_mean_exp():
    torch.manual_seed(9)
    x = torch.randn(6, 4, dtype=F64)
    naive = x.exp().mean(0).log()
    torch.testing.assert_close(log_mean_exp(x, 0), naive, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_mean_exp(x, 1), x.exp().mean(1).log(), rtol=1e-12, atol=1e-12)
    # stable where exp overflows
    big = torch.tensor([1000.0, 1000.0, 1000.0], dtype=F64)
    assert log_mean_exp(big).item() == pytest.approx(1000.0, abs=1e-12)
    mixed = torch.tensor([1000.0, 1000.0 - math.log(3.0)], dtype=F64)  # mean = e^1000 (1 + 1/3) / 2
    assert log_mean_exp(mixed).item() == pytest.approx(1000.0 + math.log(2.0 / 3.0), abs=1e-10)


def test_mean_and_stderr_matches_numpy():
    rng = np.random.default_rng(0)
    values = rng.normal(3.0, 2.0, size=57)
    mean, se = mean_and_stderr(torch.tensor(values))
    assert mean == pytest.approx(np.mean(values), rel=1e-12)
    assert se == pytest.approx(np.std(values, ddof=1) / math.sqrt(57), rel=1e-12)
    # float32 input is averaged in float64
    values32 = values.astype(np.float32)
    mean32, se32 = mean_and_stderr(torch.tensor(values32))
    assert mean32 == pytest.approx(np.mean(values32.astype(np.float64)), rel=1e-12)
    assert se32 == pytest.approx(np.std(values32.astype(np.float64), ddof=1) / math.sqrt(57), rel=1e-12)
    m1, s1 = mean_and_stderr(torch.tensor([2.5]))
    assert m1 == 2.5 and math.isnan(s1)
    with pytest.raises(ElboxError):
        mean_and_stderr(torch.tensor([]))


# ----------------------------------------------------------------------------------------------
# ELBO plumbing


def test_gaussian_elbo_terms_and_errors():
    torch.manual_seed(10)
    mean = torch.randn(4, 2, dtype=F64)
    std = torch.rand(4, 2, dtype=F64) + 0.5
    seen = []

    def loglik(z):
        seen.append(z.shape)
        return -(z.square().sum(-1))

    terms = gaussian_elbo(mean, std, loglik, n_samples=3)
    assert isinstance(terms, ELBOTerms)
    assert seen == [(3, 4, 2)]
    assert terms.reconstruction.shape == (4,)
    assert set(terms.kl) == {"z"}
    # analytic KL to N(0, I), written out
    kl = 0.5 * (std.square() + mean.square() - 1 - std.square().log()).sum(-1)
    torch.testing.assert_close(terms.kl["z"], kl)
    torch.testing.assert_close(terms.kl_total, kl)
    torch.testing.assert_close(terms.elbo, terms.reconstruction - kl)
    assert terms.inexact_kl == frozenset()  # analytic: an exact KL
    assert gaussian_elbo(mean, std, loglik, analytic_kl=False).inexact_kl == {"z"}  # sampled: an estimate
    with pytest.raises(ElboxError):
        gaussian_elbo(mean, std, loglik, n_samples=0)


def test_elbo_terms_sum_several_kls():
    rec = torch.tensor([1.0, 2.0])
    terms = ELBOTerms(rec, {"a": torch.tensor([0.5, 0.25]), "b": torch.tensor([1.0, 3.0])})
    torch.testing.assert_close(terms.elbo, torch.tensor([-0.5, -1.25]))


# ----------------------------------------------------------------------------------------------
# Linear-Gaussian latent model:  p(z) = N(0, I_d),  p(x|z) = N(W z + b, s^2 I_D)
#   log p(x) = log N(x; b, W W^T + s^2 I)
#   p(z|x)   = N(m, S),  S = (I + W^T W / s^2)^-1,  m = S W^T (x - b) / s^2


class LinearGaussian:
    def __init__(self, w, b, s):
        self.w, self.b, self.s = w, b, s
        self.d_latent, self.d_data = w.shape[1], w.shape[0]

    def log_lik(self, x):
        """Callable z [..., B, d] -> log p(x|z) [..., B], written from the model."""

        def f(z):
            resid = x - (z @ self.w.T + self.b)
            return -0.5 * resid.square().sum(-1) / self.s**2 - self.d_data * (math.log(self.s) + 0.5 * LOG_2PI)

        return f

    def log_px(self, x):
        cov = self.w @ self.w.T + self.s**2 * torch.eye(self.d_data, dtype=F64)
        return MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x)

    def posterior(self, x):
        eye = torch.eye(self.d_latent, dtype=F64)
        cov = torch.linalg.inv(eye + self.w.T @ self.w / self.s**2)
        mean = (x - self.b) @ self.w @ cov.T / self.s**2  # rows: S W^T (x - b) / s^2
        return mean, cov

    def expected_log_lik(self, x, mean_q, std_q):
        """E_{N(mean_q, diag std_q^2)} log p(x|z), in closed form."""
        resid = x - mean_q @ self.w.T - self.b
        trace = (self.w.square() @ std_q.square().T).sum(0)  # tr(W diag(v) W^T) = sum_ij W_ij^2 v_j
        return -0.5 * self.d_data * math.log(2 * math.pi * self.s**2) - (resid.square().sum(-1) + trace) / (
            2 * self.s**2
        )

    def sample_x(self, n, gen):
        z = torch.randn(n, self.d_latent, generator=gen, dtype=F64)
        return z @ self.w.T + self.b + self.s * torch.randn(n, self.d_data, generator=gen, dtype=F64)

    def log_weights(self, x, mean_q, std_q):
        """Callable n -> [n, B] log p(x, z) - log q(z|x), z ~ q, written independently of elbox."""

        def f(n):
            eps = torch.randn(n, *mean_q.shape, dtype=F64)
            z = mean_q + std_q * eps
            log_prior = -0.5 * (z.square() + LOG_2PI).sum(-1)
            log_q = -0.5 * (eps.square() + LOG_2PI).sum(-1) - std_q.log().sum(-1)
            return self.log_lik(x)(z) + log_prior - log_q

        return f


D_LATENT, D_DATA, NOISE = 2, 5, 0.8


def orthogonal_columns_model():
    gen = torch.Generator().manual_seed(100)
    q, _ = torch.linalg.qr(torch.randn(D_DATA, D_LATENT, generator=gen, dtype=F64))
    w = q * torch.tensor([1.5, 0.7], dtype=F64)  # orthogonal columns -> W^T W and S diagonal
    b = torch.randn(D_DATA, generator=gen, dtype=F64) * 0.5
    return LinearGaussian(w, b, NOISE)


def general_model():
    gen = torch.Generator().manual_seed(200)
    w = torch.randn(D_DATA, D_LATENT, generator=gen, dtype=F64)
    w[:, 1] += 0.8 * w[:, 0]  # correlated columns -> a full (non-diagonal) posterior covariance
    b = torch.randn(D_DATA, generator=gen, dtype=F64) * 0.5
    return LinearGaussian(w, b, NOISE)


def test_linear_gaussian_true_posterior_gives_exact_log_px():
    torch.manual_seed(11)
    model = orthogonal_columns_model()
    x = model.sample_x(6, torch.Generator().manual_seed(1))
    post_mean, post_cov = model.posterior(x)
    off_diag = post_cov - torch.diag(post_cov.diagonal())
    assert off_diag.abs().max() < 1e-12
    post_std = post_cov.diagonal().sqrt().expand_as(post_mean)
    log_px = model.log_px(x)

    # every single-sample log weight log p(x, z) - log q(z|x) equals log p(x), for many z
    z, eps = sample_diag_gaussian(post_mean, post_std, 500)
    log_w = model.log_lik(x)(z) + standard_normal_log_prob(z) - diag_gaussian_log_prob_from_noise(eps, post_std)
    assert (log_w - log_px).abs().max() < 1e-6

    # Monte Carlo KL on the same draws: the ELBO estimate has zero variance, each call gives log p(x)
    for n in [1, 3]:
        for _ in range(5):
            terms = gaussian_elbo(post_mean, post_std, model.log_lik(x), n_samples=n, analytic_kl=False)
            assert (terms.elbo - log_px).abs().max() < 1e-6

    # analytic KL: the exact expectation (closed-form E_q log p(x|z)) is log p(x) ...
    exact_elbo = model.expected_log_lik(x, post_mean, post_std) - kl_diag_gaussians(post_mean, post_std).sum(-1)
    torch.testing.assert_close(exact_elbo, log_px, rtol=0, atol=1e-9)
    # ... and the MC estimate (whose reconstruction term does vary with z) matches it within SE
    n = 4000
    rec = model.log_lik(x)(sample_diag_gaussian(post_mean, post_std, n)[0])  # [n, B], for the SE
    se = rec.std(0) / math.sqrt(n)
    terms = gaussian_elbo(post_mean, post_std, model.log_lik(x), n_samples=n, analytic_kl=True)
    assert ((terms.elbo - log_px).abs() < 4 * se).all()

    # IWAE_K with the true posterior as proposal is exactly log p(x) for every K
    for k in [1, 10, 100]:
        bound = iwae_bound(model.log_weights(x, post_mean, post_std), k, 32)
        assert (bound - log_px).abs().max() < 1e-6


def test_linear_gaussian_full_posterior_identity():
    """With a general W the posterior covariance is full; log p(x) = E_q log p(x|z) - KL(q||p(z)) + KL(q||p(z|x))
    holds for any diagonal q, checked with kl_full_gaussians and the closed-form expected log-likelihood."""
    model = general_model()
    x = model.sample_x(4, torch.Generator().manual_seed(2))
    post_mean, post_cov = model.posterior(x)
    corr = post_cov[0, 1] / (post_cov[0, 0] * post_cov[1, 1]).sqrt()
    assert corr.abs() > 0.1  # really full
    gen = torch.Generator().manual_seed(3)
    mean_q = post_mean + 0.4 * torch.randn(post_mean.shape, generator=gen, dtype=F64)
    std_q = 0.3 + torch.rand(post_mean.shape, generator=gen, dtype=F64)
    kl_to_post = kl_full_gaussians(mean_q, torch.diag_embed(std_q), post_mean, torch.linalg.cholesky(post_cov))
    exact_elbo = model.expected_log_lik(x, mean_q, std_q) - kl_diag_gaussians(mean_q, std_q).sum(-1)
    torch.testing.assert_close(exact_elbo, model.log_px(x) - kl_to_post, rtol=0, atol=1e-9)
    assert (kl_to_post > 0.05).all()


@pytest.mark.parametrize("analytic_kl", [True, False])
def test_linear_gaussian_elbo_gap_is_kl_to_posterior(analytic_kl):
    torch.manual_seed(12)
    model = general_model()
    b = 4
    x = model.sample_x(b, torch.Generator().manual_seed(4))
    post_mean, post_cov = model.posterior(x)
    gen = torch.Generator().manual_seed(5)
    mean_q = post_mean + 0.5 * torch.randn(post_mean.shape, generator=gen, dtype=F64)
    std_q = 0.3 + torch.rand(post_mean.shape, generator=gen, dtype=F64)
    truth = model.log_px(x) - kl_full_gaussians(
        mean_q, torch.diag_embed(std_q), post_mean, torch.linalg.cholesky(post_cov)
    )

    # n independent single-sample ELBO estimates per example: tile the batch n times
    n = 4000
    xs = x.repeat(n, 1)
    terms = gaussian_elbo(
        mean_q.repeat(n, 1), std_q.repeat(n, 1), model.log_lik(xs), n_samples=1, analytic_kl=analytic_kl
    )
    values = terms.elbo.view(n, b)
    est, se = values.mean(0), values.std(0) / math.sqrt(n)
    # tolerance: 4 standard errors of the mean of n single-sample estimates
    assert ((est - truth).abs() < 4 * se).all(), (est, truth, se)
    # and the gap is real: the bound is below log p(x) by far more than the noise
    assert ((model.log_px(x) - est) > 10 * se).all()


def _iwae_repeats(model, x, mean_q, std_q, k, repeats):
    """[repeats, B] independent IWAE_K estimates (float64)."""
    xs = x.repeat(repeats, 1)
    out = iwae_bound(model.log_weights(xs, mean_q.repeat(repeats, 1), std_q.repeat(repeats, 1)), k, 250)
    return out.view(repeats, x.shape[0])


def test_linear_gaussian_iwae_approaches_log_px():
    torch.manual_seed(13)
    model = general_model()
    b = 4
    x = model.sample_x(b, torch.Generator().manual_seed(6))
    post_mean, post_cov = model.posterior(x)
    # a mismatched but wider diagonal proposal (so the importance weights have finite variance)
    mean_q = post_mean + 0.5 * post_cov.diagonal().sqrt()
    std_q = (1.5 * post_cov.diagonal().sqrt()).expand_as(post_mean).contiguous()
    log_px = model.log_px(x)

    ks = [1, 10, 100, 1000]
    n_repeats = {1: 4000, 10: 2000, 100: 400, 1000: 100}
    gaps, ses, per_k = {}, {}, {}
    for k in ks:
        repeats = n_repeats[k]
        vals = _iwae_repeats(model, x, mean_q, std_q, k, repeats)  # [R, B]
        per_k[k] = vals
        per_example_mean = vals.mean(0)
        per_example_se = vals.std(0) / math.sqrt(repeats)
        # mean gap over examples; its SE from the within-example spread over repeats (log p(x) is exact)
        gaps[k] = (log_px - per_example_mean).mean().item()
        ses[k] = (per_example_se.square().sum().sqrt() / b).item()
        # upper bound: per example, mean IWAE_K <= log p(x) + 4 SE
        assert (per_example_mean <= log_px + 4 * per_example_se).all()
    for k1, k2 in zip(ks[:-1], ks[1:]):
        # the gap shrinks (within 4 SE of the difference of two independent means) ...
        assert gaps[k1] - gaps[k2] > -4 * math.sqrt(ses[k1] ** 2 + ses[k2] ** 2), (gaps, ses)
    # ... strictly, beyond the noise, from K = 1 to 10 and from 10 to 1000
    for k1, k2 in [(1, 10), (10, 1000)]:
        assert gaps[k1] - gaps[k2] > 4 * math.sqrt(ses[k1] ** 2 + ses[k2] ** 2), (gaps, ses)
    assert gaps[1] > 0.2  # the K = 1 gap is a real KL(q || p(z|x))
    assert gaps[1000] < 0.05 * gaps[1], gaps

    # IWAE_1 computed by iwae_bound equals gaussian_elbo's expectation (ELBO = L_1): within SE
    repeats = 4000
    xs = x.repeat(repeats, 1)
    elbo_vals = gaussian_elbo(
        mean_q.repeat(repeats, 1), std_q.repeat(repeats, 1), model.log_lik(xs), analytic_kl=False
    ).elbo
    diff_se = math.sqrt(elbo_vals.var().item() / elbo_vals.numel() + per_k[1].var().item() / per_k[1].numel())
    assert abs(elbo_vals.mean().item() - per_k[1].mean().item()) < 4 * diff_se


def test_linear_gaussian_iwae_non_decreasing_in_k():
    torch.manual_seed(14)
    model = general_model()
    b = 8
    x = model.sample_x(b, torch.Generator().manual_seed(7))
    post_mean, post_cov = model.posterior(x)
    gen = torch.Generator().manual_seed(8)
    mean_q = post_mean + 0.3 * torch.randn(post_mean.shape, generator=gen, dtype=F64)
    std_q = (1.2 * post_cov.diagonal().sqrt()).expand_as(post_mean).contiguous()
    repeats = 100
    means, ses = [], []
    for k in [1, 2, 5, 20, 100]:
        vals = _iwae_repeats(model, x, mean_q, std_q, k, repeats)
        means.append(vals.mean().item())
        ses.append((vals.std() / math.sqrt(vals.numel())).item())
    for i in range(len(means) - 1):
        # non-decreasing within 4 SE of the difference of two independent means
        assert means[i + 1] - means[i] > -4 * math.sqrt(ses[i] ** 2 + ses[i + 1] ** 2), (means, ses)

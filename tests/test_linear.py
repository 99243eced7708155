"""Tests for elbox.models.linear: the linear-Gaussian latent model (PPCA / factor analysis).

Every exact quantity (log p(x), p(z|x), the ELBO with a Gaussian q, its gap) is checked against a dense
float64 computation written here independently; every estimator against the exact value within a
stated number of standard errors; the fits against the maximum-likelihood conditions.
"""

import json
import math

import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

import elbox.core.bounds
from elbox.core.bounds import iwae_bound, kl_full_gaussians
from elbox.core.errors import ElboxError
from elbox.core.options import config_to_dict
from elbox.io.checkpoint import load_weights, save_weights
from elbox.models.base import build_model
from elbox.models.linear import (  # registers "linear"
    LinearGaussian,
    LinearGaussianConfig,
)

F64 = torch.float64
LOG_2PI = math.log(2 * math.pi)
NOISES = ["isotropic", "diagonal"]


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: on a loaded 2-core machine, handing them between OpenMP threads made
    some tests 10-50x slower (measured). One intra-op thread, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# Helpers: random models and data, and dense float64 references written from the definitions


def random_model(noise="isotropic", encoder="exact", x_dim=7, z_dim=3, seed=0):
    """A float64 model with generic parameters; the amortized encoder gets random parameters too."""
    g = torch.Generator().manual_seed(seed)
    model = LinearGaussian(x_dim, z_dim, noise, encoder).double()
    with torch.no_grad():
        w = torch.randn(x_dim, z_dim, generator=g, dtype=F64)
        w[:, 1] += 0.8 * w[:, 0]  # correlated columns -> a full (non-diagonal) posterior covariance
        model.W.copy_(w)
        model.b.copy_(torch.randn(x_dim, generator=g, dtype=F64))
        model.log_sigma.copy_(0.3 * torch.randn(model.log_sigma.shape, generator=g, dtype=F64) - 0.2)
        if encoder == "amortized":
            model.A.copy_(0.3 * torch.randn(z_dim, x_dim, generator=g, dtype=F64))
            model.c.copy_(0.3 * torch.randn(z_dim, generator=g, dtype=F64))
            model.s.copy_(0.5 * torch.randn(z_dim, generator=g, dtype=F64))
    return model


def noise_variance(model):
    return torch.exp(2 * model.log_sigma.detach()) * torch.ones(model.x_dim, dtype=model.W.dtype)


def dense_covariance(model):
    w = model.W.detach()
    return w @ w.T + torch.diag(noise_variance(model))


def draw_data(w, b, sigma, n, seed):
    """x = W z + b + sigma * eps, written here without the model."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, w.shape[1], generator=g, dtype=F64)
    return z @ w.T + b + sigma * torch.randn(n, w.shape[0], generator=g, dtype=F64)


def dense_log_prob(model, x):
    """log N(x; b, C) from a dense D x D covariance: slogdet and a linear solve."""
    cov = dense_covariance(model).double()
    r = x.double() - model.b.detach().double()
    _, logdet = torch.linalg.slogdet(cov)
    mahalanobis = (r * torch.linalg.solve(cov, r.T).T).sum(-1)
    return -0.5 * (x.shape[1] * LOG_2PI + logdet + mahalanobis)


def bayes_posterior(model, x):
    """p(z|x) by conditioning the joint Gaussian of (z, x): mean W^T C^-1 (x - b), cov I - W^T C^-1 W."""
    w = model.W.detach()
    gain = torch.linalg.solve(dense_covariance(model), w).T  # W^T C^-1 (C symmetric)
    mean = (x - model.b.detach()) @ gain.T
    cov = torch.eye(w.shape[1], dtype=F64) - gain @ w
    return mean, cov


def q_params(model, x):
    """Mean [B, d] and std [d] of the amortized q, written from its definition."""
    mean = (x - model.b.detach()) @ model.A.detach().T + model.c.detach()
    return mean, torch.nn.functional.softplus(model.s.detach())


def set_q(model, mean_map, offset, std):
    with torch.no_grad():
        model.A.copy_(mean_map)
        model.c.copy_(offset)
        model.s.copy_(torch.log(torch.expm1(std)))  # softplus(s) = std


# ----------------------------------------------------------------------------------------------
# Exact quantities against dense computations


@pytest.mark.parametrize("noise", NOISES)
def test_log_prob_matches_dense_gaussian(noise):
    model = random_model(noise)
    x = draw_data(model.W.detach(), model.b.detach(), noise_variance(model).sqrt(), 9, seed=1)
    got = model.log_prob(x)
    assert got.shape == (9,) and got.dtype == F64
    torch.testing.assert_close(got, dense_log_prob(model, x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        got, MultivariateNormal(model.b.detach(), dense_covariance(model)).log_prob(x), rtol=1e-10, atol=1e-10
    )
    # far from the data too (large Mahalanobis distances)
    far = 20 * torch.randn(3, model.x_dim, generator=torch.Generator().manual_seed(2), dtype=F64)
    torch.testing.assert_close(model.log_prob(far), dense_log_prob(model, far), rtol=1e-10, atol=1e-8)


def test_log_prob_image_shaped_input_and_float32_at_784_dims():
    """[N, C, H, W] input is flattened; at D = 784 in float32 the Woodbury path agrees with the dense
    float64 value to float32 rounding (relative 1e-5 of |log p| ~ 10^3)."""
    torch.manual_seed(3)
    model = LinearGaussian.from_config(LinearGaussianConfig(data_shape=(1, 28, 28), latent_dim=16, noise="diagonal"))
    with torch.no_grad():
        model.W.normal_(0, 0.1)
        model.b.uniform_(0.2, 0.8)
        model.log_sigma.uniform_(math.log(0.03), math.log(0.2))
    x = model.sample(6).detach()
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32
    got = model.log_prob(x)
    assert got.shape == (6,)
    reference = dense_log_prob(model, x.reshape(6, -1).double())
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=0)
    torch.testing.assert_close(model.log_prob(x.reshape(6, 784)), got)


@pytest.mark.parametrize("noise", NOISES)
def test_posterior_matches_bayes_rule(noise):
    model = random_model(noise)
    x = draw_data(model.W.detach(), model.b.detach(), 1.0, 5, seed=4)
    post = model.posterior(x)
    assert isinstance(post, MultivariateNormal) and post.batch_shape == (5,) and post.event_shape == (3,)
    mean, cov = bayes_posterior(model, x)
    torch.testing.assert_close(post.mean, mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(post.covariance_matrix, cov.expand(5, 3, 3), rtol=1e-10, atol=1e-10)
    off_diagonal = cov - torch.diag(cov.diagonal())
    assert off_diagonal.abs().max() > 0.01  # the covariance really is full
    torch.testing.assert_close(model.encode(x), mean, rtol=1e-10, atol=1e-10)  # exact encoder: posterior mean


@pytest.mark.parametrize("noise", NOISES)
def test_elbo_with_exact_posterior_is_log_prob(noise):
    model = random_model(noise, "exact")
    x = draw_data(model.W.detach(), model.b.detach(), 1.0, 6, seed=5)
    terms = model.elbo(x)
    assert terms.reconstruction.shape == (6,) and set(terms.kl) == {"z"} and terms.kl["z"].shape == (6,)
    log_px = model.log_prob(x)
    torch.testing.assert_close(terms.elbo, log_px, rtol=1e-5, atol=0)
    assert (terms.elbo - log_px).abs().max() < 1e-10  # in fact exact to float64 rounding
    assert model.exact_gap(x).abs().max() < 1e-10
    # the KL term is KL(p(z|x) || N(0, I)), checked against torch
    post = model.posterior(x)
    standard = MultivariateNormal(torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64))
    torch.testing.assert_close(terms.kl["z"], kl_divergence(post, standard), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("noise", NOISES)
def test_amortized_gap_is_kl_to_posterior(noise):
    model = random_model(noise, "amortized")
    x = draw_data(model.W.detach(), model.b.detach(), 1.0, 6, seed=6)
    mean_q, std_q = q_params(model, x)
    torch.testing.assert_close(model.encode(x), mean_q, rtol=1e-12, atol=1e-12)
    post_mean, post_cov = bayes_posterior(model, x)
    kl_to_posterior = kl_full_gaussians(mean_q, torch.diag(std_q), post_mean, torch.linalg.cholesky(post_cov))
    assert (kl_to_posterior > 0.1).all()  # a real gap
    terms = model.elbo(x)
    gap = model.log_prob(x) - terms.elbo
    torch.testing.assert_close(gap, kl_to_posterior, rtol=1e-5, atol=0)
    torch.testing.assert_close(model.exact_gap(x), kl_to_posterior, rtol=1e-5, atol=0)
    # KL(q || N(0, I)) against torch
    q = Independent(Normal(mean_q, std_q.expand_as(mean_q)), 1)
    prior = Independent(Normal(torch.zeros_like(mean_q), torch.ones_like(mean_q)), 1)
    torch.testing.assert_close(terms.kl["z"], kl_divergence(q, prior), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("encoder", ["exact", "amortized"])
def test_analytic_elbo_matches_monte_carlo(encoder):
    torch.manual_seed(7)
    model = random_model("diagonal", encoder)
    x = draw_data(model.W.detach(), model.b.detach(), 1.0, 4, seed=8)
    terms = model.elbo(x, n_samples=5)  # n_samples is ignored: the value is exact
    torch.testing.assert_close(terms.elbo, model.elbo(x).elbo, rtol=0, atol=0)

    n = 20000
    log_w = model.log_weights(x, n)
    assert log_w.shape == (n, 4)
    if encoder == "exact":
        # q = p(z|x): every weight is p(x) exactly
        assert (log_w - model.log_prob(x)).abs().max() < 1e-9
        return
    # the mean of single-sample log weights is the ELBO: within 4 SE of the mean of n draws
    se = log_w.std(0) / math.sqrt(n)
    assert ((log_w.mean(0) - terms.elbo).abs() < 4 * se).all(), (log_w.mean(0), terms.elbo, se)

    # the reconstruction term alone, with log p(x|z) from torch's Normal on independent draws
    mean_q, std_q = q_params(model, x)
    z = mean_q + std_q * torch.randn(n, *mean_q.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    log_px_given_z = Normal(z @ model.W.detach().T + model.b.detach(), noise_variance(model).sqrt()).log_prob(x).sum(-1)
    se = log_px_given_z.std(0) / math.sqrt(n)
    assert ((log_px_given_z.mean(0) - terms.reconstruction).abs() < 4 * se).all()


# ----------------------------------------------------------------------------------------------
# Importance sampling


def iwae_repeats(model, x, k, repeats):
    """[repeats, B] independent IWAE_K estimates: the batch tiled `repeats` times, encoded once."""
    values = iwae_bound(model.log_weights_sampler(x.repeat(repeats, 1)), k, 250)
    assert values.dtype == F64
    return values.view(repeats, x.shape[0])


def test_iwae_converges_to_log_prob():
    torch.manual_seed(10)
    model = random_model("isotropic", "amortized", x_dim=6, z_dim=2)
    b = 4
    x = draw_data(model.W.detach(), model.b.detach(), noise_variance(model).sqrt(), b, seed=11)
    # q: the posterior mean shifted by half a posterior std, and 1.5x wider than its marginals,
    # so the importance weights have finite variance
    post = model.posterior(x[:1])
    post_std = post.covariance_matrix[0].diagonal().sqrt()
    model.match_encoder_to_posterior()
    set_q(model, model.A.detach().clone(), 0.5 * post_std, 1.5 * post_std)
    log_px = model.log_prob(x).detach()

    ks = [1, 10, 100, 1000]
    repeats = {1: 4000, 10: 1000, 100: 200, 1000: 50}
    gaps, ses = {}, {}
    with torch.no_grad():
        for k in ks:
            values = iwae_repeats(model, x, k, repeats[k])
            mean, se = values.mean(0), values.std(0) / math.sqrt(repeats[k])
            # a lower bound: per example, mean IWAE_K <= log p(x) + 4 SE
            assert (mean <= log_px + 4 * se).all(), (k, mean, log_px, se)
            # mean gap over examples; its SE from the spread over repeats (log p(x) is exact)
            gaps[k] = (log_px - mean).mean().item()
            ses[k] = (se.square().sum().sqrt() / b).item()
        # IWAE_1 = ELBO: the mean of the K = 1 estimates is the analytic ELBO within 4 SE
        assert abs(gaps[1] - model.exact_gap(x).mean().item()) < 4 * ses[1]
    assert gaps[1] > 0.2  # a real KL(q || p(z|x))
    for k1, k2 in zip(ks[:-1], ks[1:]):
        # monotone on average: the gap does not grow with K, within 4 SE of the difference of two means
        assert gaps[k1] - gaps[k2] > -4 * math.sqrt(ses[k1] ** 2 + ses[k2] ** 2), (gaps, ses)
    for k1, k2 in [(1, 10), (10, 1000)]:
        # ... and shrinks strictly, beyond that noise, from K = 1 to 10 and from 10 to 1000
        assert gaps[k1] - gaps[k2] > 4 * math.sqrt(ses[k1] ** 2 + ses[k2] ** 2), (gaps, ses)
    # converges: at K = 1000 the gap is within 4 SE of zero (its true value, ~Var(w) / 2K, is below 1% of gap_1)
    assert abs(gaps[1000]) < 0.01 * gaps[1] + 4 * ses[1000], (gaps, ses)


def test_bounds_iwae_helper_if_present():
    """elbox.core.bounds.iwae(model, x, k, max_samples_per_pass), once the integrator adds it."""
    iwae = getattr(elbox.core.bounds, "iwae", None)
    if iwae is None:
        pytest.skip("elbox.core.bounds.iwae not added yet")
    model = random_model("isotropic", "exact")
    x = draw_data(model.W.detach(), model.b.detach(), 1.0, 3, seed=12)
    values = iwae(model, x, 50, max_samples_per_pass=7)
    assert values.shape == (3,) and values.dtype == F64
    # with q = p(z|x) every weight is p(x): IWAE_K = log p(x) exactly, for any K and chunking
    torch.testing.assert_close(values, model.log_prob(x).detach(), rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# Shapes, sampling, reconstruction


def test_interface_shapes_and_sample_moments():
    torch.manual_seed(13)
    model = build_model(
        "linear", {"data_shape": [1, 2, 3], "latent_dim": 2, "noise": "diagonal", "encoder": "amortized"}
    )
    assert isinstance(model, LinearGaussian) and model.data_space == "continuous"
    assert model.W.shape == (6, 2) and model.b.shape == (6,) and model.log_sigma.shape == (6,)
    x = torch.rand(5, 1, 2, 3)
    assert model.encode(x).shape == (5, 2)
    recon = model.reconstruct(x)
    assert recon.shape == (5, 1, 2, 3)
    torch.testing.assert_close(recon.reshape(5, 6), model.encode(x) @ model.W.T + model.b)
    assert model.log_weights(x, 7).shape == (7, 5)
    assert model.log_weights_sampler(x)(3).shape == (3, 5)
    assert model.elbo(x).elbo.shape == (5,)

    # sample(n): draws of W z + b + noise, whose covariance is W W^T + Psi
    model = random_model("diagonal", x_dim=4, z_dim=2)
    n = 40000
    draws = model.sample(n).detach()
    assert draws.shape == (n, 4)
    cov = dense_covariance(model)
    # SE of a sample mean: sqrt(C_ii / n); of a sample covariance entry: sqrt((C_ij^2 + C_ii C_jj) / n)
    assert ((draws.mean(0) - model.b.detach()).abs() < 4 * (cov.diagonal() / n).sqrt()).all()
    se_cov = ((cov.square() + torch.outer(cov.diagonal(), cov.diagonal())) / n).sqrt()
    assert ((torch.cov(draws.T) - cov).abs() < 4 * se_cov).all()
    # mean=True leaves out the noise: covariance W W^T
    noiseless = model.sample(n, mean=True).detach()
    w = model.W.detach()
    assert torch.linalg.matrix_rank(noiseless - noiseless.mean(0)) == 2
    se_cov = (((w @ w.T).square() + torch.outer((w @ w.T).diagonal(), (w @ w.T).diagonal())) / n).sqrt()
    assert ((torch.cov(noiseless.T) - w @ w.T).abs() < 4 * se_cov + 1e-12).all()


# ----------------------------------------------------------------------------------------------
# Fitting


def ppca_truth():
    g = torch.Generator().manual_seed(14)
    w = torch.randn(10, 2, generator=g, dtype=F64) * torch.tensor([2.0, 1.0], dtype=F64)
    b = torch.randn(10, generator=g, dtype=F64)
    return w, b, 0.5


def full_gaussian_mle_log_likelihood(x):
    """Mean log-likelihood of the full-covariance Gaussian MLE: -1/2 (D log 2 pi + log det Sigma_hat + D)."""
    cov = torch.cov(x.T, correction=0)
    return -0.5 * (x.shape[1] * LOG_2PI + torch.linalg.slogdet(cov)[1] + x.shape[1]).item()


def mean_log_prob_gradients(model, x):
    model.zero_grad()
    model.log_prob(x).mean().backward()
    # the encoder (A, c, s) does not enter log p(x)
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def test_ppca_closed_form_is_the_maximum_likelihood_estimate():
    w_true, b_true, sigma_true = ppca_truth()
    n = 20000
    x = draw_data(w_true, b_true, sigma_true, n, seed=15)
    truth = LinearGaussian(10, 2).double()
    with torch.no_grad():
        truth.W.copy_(w_true), truth.b.copy_(b_true), truth.log_sigma.fill_(math.log(sigma_true))

    model = LinearGaussian(10, 2, "isotropic", "amortized").double()
    assert not model.trains_by_gradient
    records = model.fit(x.reshape(n, 1, 2, 5))  # image-shaped input is flattened
    assert len(records) == 1 and records[0]["method"] == "eigendecomposition"
    fitted = model.log_prob(x).mean().item()
    assert records[0]["log_likelihood"] == pytest.approx(fitted, rel=1e-10)
    # MLE: at least the generating parameters' likelihood on the training data ...
    assert fitted >= truth.log_prob(x).mean().item()
    # ... and a stationary point of the likelihood (gradient zero up to float64 rounding)
    for name, grad in mean_log_prob_gradients(model, x).items():
        assert grad.abs().max() < 1e-8, (name, grad)
    torch.testing.assert_close(model.b.detach(), x.mean(0), rtol=1e-12, atol=1e-12)

    # the fitted covariance matches the generating one within 4 SE of a sample covariance entry
    cov_true = w_true @ w_true.T + sigma_true**2 * torch.eye(10, dtype=F64)
    se = ((cov_true.square() + torch.outer(cov_true.diagonal(), cov_true.diagonal())) / n).sqrt()
    assert ((dense_covariance(model) - cov_true).abs() < 4 * se).all()

    # bounded by the full-covariance Gaussian MLE; for data that really are PPCA the likelihood-ratio
    # statistic 2 N (full - ppca) is chi^2 with df = 55 - 20 = 35 (mean 35, std sqrt(70)): allow 6 std
    full = full_gaussian_mle_log_likelihood(x)
    assert fitted <= full
    assert 2 * n * (full - fitted) < 35 + 6 * math.sqrt(70), 2 * n * (full - fitted)

    # the amortized encoder is the best diagonal q: mean map of p(z|x), variances 1 / M_ii
    post = model.posterior(x[:50])
    torch.testing.assert_close(model.encode(x[:50]), post.mean, rtol=1e-10, atol=1e-10)
    precision = torch.linalg.inv(post.covariance_matrix[0])
    std_q = torch.nn.functional.softplus(model.s.detach())
    torch.testing.assert_close(std_q, precision.diagonal().rsqrt(), rtol=1e-10, atol=1e-10)


def test_best_diagonal_q_has_precision_matched_variances():
    """KL(q || p) for diagonal q and Gaussian p is minimized at var_i = 1 / (S^-1)_ii (not S_ii)."""
    model = random_model("diagonal", "amortized", x_dim=6, z_dim=3)
    x = draw_data(model.W.detach(), model.b.detach(), 1.0, 5, seed=16)
    model.match_encoder_to_posterior()
    best = model.exact_gap(x).detach()
    assert (best > 1e-3).all()  # the posterior is correlated, so even the best diagonal q has a gap
    post_cov = model.posterior(x[:1]).covariance_matrix[0]
    a, std = model.A.detach().clone(), torch.nn.functional.softplus(model.s.detach())
    candidates = [
        (a, torch.zeros(3, dtype=F64), post_cov.diagonal().sqrt()),  # marginal variances
        (a, torch.zeros(3, dtype=F64), std * 1.05),
        (a, torch.zeros(3, dtype=F64), std * 0.95),
        (a, torch.full((3,), 0.05, dtype=F64), std),
        (a * 1.02, torch.zeros(3, dtype=F64), std),
    ]
    for mean_map, offset, other_std in candidates:
        set_q(model, mean_map, offset, other_std)
        assert (model.exact_gap(x) > best).all()


def test_factor_analysis_em():
    g = torch.Generator().manual_seed(17)
    w_true = torch.randn(8, 2, generator=g, dtype=F64)
    sigma_true = torch.linspace(0.2, 1.5, 8, dtype=F64)  # heterogeneous noise: FA, not PPCA
    b_true = torch.randn(8, generator=g, dtype=F64)
    n = 5000
    x = draw_data(w_true, b_true, sigma_true, n, seed=18)

    model = LinearGaussian(8, 2, "diagonal").double()
    seen = []
    records = model.fit(x, callback=lambda record: seen.append(dict(record)), tolerance=1e-12, max_iterations=2000)
    assert seen == records  # the callback gets each EM iteration's record as it is produced
    log_liks = [r["log_likelihood"] for r in records]
    assert records[0]["iteration"] == 0 and all(r["method"] == "em" for r in records)
    assert all(b >= a - 1e-12 for a, b in zip(log_liks, log_liks[1:]))  # EM never decreases the likelihood
    fitted = model.log_prob(x).mean().item()
    assert log_liks[-1] == pytest.approx(fitted, rel=1e-10)
    for name, grad in mean_log_prob_gradients(model, x).items():
        assert grad.abs().max() < 1e-5, (name, grad)  # EM converged to a stationary point

    truth = LinearGaussian(8, 2, "diagonal").double()
    with torch.no_grad():
        truth.W.copy_(w_true), truth.b.copy_(b_true), truth.log_sigma.copy_(sigma_true.log())
    assert fitted >= truth.log_prob(x).mean().item()
    ppca = LinearGaussian(8, 2, "isotropic").double()
    ppca.fit(x)
    assert fitted > ppca.log_prob(x).mean().item()  # diagonal noise nests isotropic noise
    assert fitted <= full_gaussian_mle_log_likelihood(x)
    # the noise levels are recovered: sampling error of a per-dimension variance ~ sqrt(2/n) ~ 2%; allow 15%
    torch.testing.assert_close(model.log_sigma.detach().exp(), sigma_true, rtol=0.15, atol=0)


def test_gradient_fit_increases_elbo_and_reduces_gap():
    torch.manual_seed(19)
    w_true, b_true, sigma_true = ppca_truth()
    x = draw_data(w_true[:6], b_true[:6], sigma_true, 256, seed=20)
    model = build_model("linear", {"data_shape": [6], "latent_dim": 2, "encoder": "amortized", "fit": "elbo"}).double()
    assert model.trains_by_gradient
    # start from a poor encoder so that there is a gap to close
    g = torch.Generator().manual_seed(21)
    set_q(
        model,
        0.5 * torch.randn(2, 6, generator=g, dtype=F64),
        torch.ones(2, dtype=F64),
        torch.full((2,), 0.3, dtype=F64),
    )
    with torch.no_grad():
        model.W.copy_(torch.randn(6, 2, generator=g, dtype=F64))
    start_elbo, start_gap = model.elbo(x).elbo.mean().item(), model.exact_gap(x).mean().item()

    model.initialize_from_data(x)
    torch.testing.assert_close(model.b.detach(), x.mean(0), rtol=1e-12, atol=1e-12)
    assert model.exact_gap(x).mean().item() < start_gap  # the encoder was re-matched to the posterior
    set_q(
        model,
        0.5 * torch.randn(2, 6, generator=g, dtype=F64),
        torch.ones(2, dtype=F64),
        torch.full((2,), 0.3, dtype=F64),
    )
    start_elbo, start_gap = model.elbo(x).elbo.mean().item(), model.exact_gap(x).mean().item()

    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(700):
        terms = model.elbo(x, n_samples=1)
        loss = -(terms.reconstruction - terms.kl_total).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        end_elbo, end_gap = model.elbo(x).elbo.mean().item(), model.exact_gap(x).mean().item()
        end_log_px = model.log_prob(x).mean().item()
    # measured: ELBO -123 -> -7.852, gap 104 -> 7e-5 nats per example; PPCA MLE -7.852
    assert end_elbo > start_elbo + 50, (start_elbo, end_elbo)
    assert end_gap < 1e-3 * start_gap, (start_gap, end_gap)
    assert end_elbo <= end_log_px
    # with a linear-Gaussian decoder the ELBO's optimum (diagonal q included) is the PPCA maximum
    # likelihood with no gap: the gradient fit reaches the closed form's log-likelihood
    ppca = LinearGaussian(6, 2).double()
    ppca.fit(x)
    assert end_log_px == pytest.approx(ppca.log_prob(x).mean().item(), abs=0.01)


# ----------------------------------------------------------------------------------------------
# Config, registry, checkpoints, bad input


def test_config_and_state_dict_round_trip(tmp_path):
    torch.manual_seed(22)
    values = {"data_shape": [1, 3, 3], "latent_dim": 2, "noise": "diagonal", "encoder": "amortized", "fit": "elbo"}
    model = build_model("linear", values)
    assert isinstance(model.config, LinearGaussianConfig) and model.config.data_shape == (1, 3, 3)
    assert dict(model.named_parameters()).keys() == {"W", "b", "log_sigma", "A", "c", "s"}
    exact = LinearGaussian(9, 2)
    assert dict(exact.named_parameters()).keys() == {"W", "b", "log_sigma"}
    assert exact.log_sigma.shape == () and exact.config == LinearGaussianConfig(
        data_shape=(9,), latent_dim=2, encoder="exact"
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()

    saved = json.loads(json.dumps(config_to_dict(model.config)))  # the config as written beside the weights
    copy = build_model("linear", saved)
    copy.load_state_dict(model.state_dict())
    save_weights(tmp_path / "model.safetensors", model)
    from_disk = build_model("linear", saved)
    load_weights(tmp_path / "model.safetensors", from_disk)
    x = torch.rand(4, 1, 3, 3)
    for other in (copy, from_disk):
        assert other.config == model.config
        torch.testing.assert_close(other.elbo(x).elbo, model.elbo(x).elbo, rtol=0, atol=0)
        torch.testing.assert_close(other.log_prob(x), model.log_prob(x), rtol=0, atol=0)
    # the scalar log_sigma of the isotropic model survives safetensors too
    iso = build_model("linear", {"data_shape": [5], "latent_dim": 1})
    with torch.no_grad():
        iso.log_sigma.fill_(-0.7)
    save_weights(tmp_path / "iso.safetensors", iso)
    iso_copy = build_model("linear", config_to_dict(iso.config))
    load_weights(tmp_path / "iso.safetensors", iso_copy)
    assert iso_copy.log_sigma.item() == pytest.approx(-0.7)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"noise": "full"}, "noise"),
        ({"encoder": "mlp"}, "encoder"),
        ({"fit": "sgd"}, "fit"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"latent_dim": 784}, "latent_dim"),
        ({"latent_dim": 2.5}, "latent_dim"),
        ({"latent_dim": True}, "latent_dim"),
        ({"data_shape": [1, 0, 28]}, "data_shape"),
        ({"data_shape": []}, "data_shape"),
        ({"data_shape": "28x28"}, "data_shape"),
        ({"hidden_dims": [10]}, "unknown"),
    ],
)
def test_bad_config_is_an_elbox_error(values, message):
    with pytest.raises(ElboxError, match=message):
        build_model("linear", values)


def test_bad_input_is_an_elbox_error():
    model = LinearGaussian(6, 2, encoder="amortized")
    for method in (model.log_prob, model.elbo, model.encode, model.reconstruct, model.exact_gap, model.posterior):
        with pytest.raises(ElboxError, match=r"x has shape \[4, 5\]"):
            method(torch.zeros(4, 5))
    with pytest.raises(ElboxError, match="x has shape"):
        model.log_prob(torch.zeros(6))  # no batch dimension
    with pytest.raises(ElboxError, match="n_samples"):
        model.elbo(torch.zeros(2, 6), n_samples=0)
    with pytest.raises(ElboxError, match="samples"):
        model.log_weights(torch.zeros(2, 6), 0)
    with pytest.raises(ElboxError, match="samples"):
        model.sample(0)
    with pytest.raises(ElboxError, match="at least 2 examples"):
        model.fit(torch.zeros(1, 6))
    with pytest.raises(ElboxError, match="NaN"):
        model.fit(torch.full((3, 6), math.nan))
    with pytest.raises(ElboxError, match="training data has shape"):
        model.fit(torch.zeros(3, 7))
    with pytest.raises(ElboxError, match="x_dim"):
        LinearGaussian(1, 1)
    with pytest.raises(ElboxError, match="latent_dim"):
        LinearGaussian(4, 4)
    with pytest.raises(ElboxError, match="noise"):
        LinearGaussian(4, 2, noise="spherical")

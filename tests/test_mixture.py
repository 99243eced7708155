"""Tests for elbox.models.mixture: EM recovers a known mixture, log_prob against an independent formula,
the ELBO never decreases, elbo == log_prob, responsibilities, the covariance floor, the config,
save/load, sampling, choosing the number of components by BIC."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load, save

import elbox
import elbox.models.mixture as mixture
import elbox.models.mixture_em as mixture_em
from elbox.core.bounds import iwae_bound
from elbox.core.errors import ElboxError
from elbox.core.options import config_to_dict
from elbox.io.checkpoint import load_weights, save_weights
from elbox.models.base import (
    ClosedFormFit,
    Encoder,
    ExactLikelihood,
    ImportanceWeighted,
    Reconstructs,
    build_model,
)
from elbox.models.estimates import iwae_per_example
from elbox.models.mixture import GaussianMixture, MixtureConfig

F64 = torch.float64
TRUE_WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
TRUE_MEANS = torch.tensor([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]], dtype=F64)
TRUE_COVS = torch.tensor([[[1.0, 0.5], [0.5, 1.0]], [[0.5, -0.2], [-0.2, 0.3]], [[2.0, 0.0], [0.0, 0.5]]], dtype=F64)


def draw_mixture(n, weights, means, covs, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.multinomial(weights, n, replacement=True, generator=g)
    eps = torch.randn(n, means.shape[1], generator=g, dtype=F64)
    x = means[z] + (torch.linalg.cholesky(covs)[z] @ eps.unsqueeze(-1)).squeeze(-1)
    return x, z


def separated_data(n=3000, seed=0, covs=TRUE_COVS):
    """Three components about 6 standard deviations apart in 2-D."""
    return draw_mixture(n, TRUE_WEIGHTS, TRUE_MEANS, covs, seed)[0]


def overlapping_data(n=1500, seed=0):
    """Three overlapping components in 5-D: EM needs many iterations."""
    g = torch.Generator().manual_seed(100 + seed)
    means = 1.5 * torch.randn(3, 5, generator=g, dtype=F64)
    a = torch.randn(3, 5, 5, generator=g, dtype=F64) / math.sqrt(5)
    covs = a @ a.transpose(1, 2) + 0.2 * torch.eye(5, dtype=F64)
    return draw_mixture(n, TRUE_WEIGHTS, means, covs, seed)[0]


def make(d=2, **options):
    config = {"data_shape": [d], "n_components": 3, "tol": 1e-8, "max_iter": 300, "covariance_floor": 1e-6}
    config.update(options)
    return build_model("mixture", config)


def numpy_mixture_log_prob(x, weights, means, covs):
    """log sum_k pi_k N(x; mu_k, Sigma_k) per row, written out with slogdet, solve and a max shift."""
    d = x.shape[1]
    terms = []
    for w, mu, cov in zip(weights, means, covs):
        diff = x - mu
        sign, logdet = np.linalg.slogdet(cov)
        assert sign > 0
        mahalanobis = np.einsum("nd,nd->n", diff, np.linalg.solve(cov, diff.T).T)
        terms.append(np.log(w) - 0.5 * (d * np.log(2 * np.pi) + logdet + mahalanobis))
    terms = np.stack(terms, 1)
    top = terms.max(1)
    return top + np.log(np.exp(terms - top[:, None]).sum(1))


def match_components(fitted_means, true_means):
    """order[j] = the fitted component nearest to true component j; must be a permutation."""
    order = torch.cdist(true_means, fitted_means).argmin(1)
    assert sorted(order.tolist()) == list(range(len(true_means)))
    return order


def interleaved(records):
    """L(theta_0) is not recorded; ELBO_1 <= L_1 <= ELBO_2 <= L_2 <= ..."""
    return np.array([v for r in records for v in (r["elbo"], r["log_likelihood"])])


def assert_never_decreases(records):
    values = interleaved(records)
    slack = mixture.ROUNDING_SLACK * (1 + np.abs(values[:-1]))
    assert np.all(np.diff(values) >= -slack), np.diff(values).min()


# ----------------------------------------------------------------------------------------------
# EM recovers a known mixture


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_em_recovers_a_known_mixture(covariance):
    covs = TRUE_COVS if covariance == "full" else torch.diag_embed(TRUE_COVS.diagonal(dim1=1, dim2=2))
    n = 3000
    x = separated_data(n, covs=covs)
    model = make(covariance=covariance)
    seen = []
    records = model.fit(x, callback=lambda record: seen.append(dict(record)))
    assert seen == records  # the callback gets each record, "converged" included, as its iteration ends
    assert records[-1]["converged"]
    order = match_components(model.means, TRUE_MEANS)
    weights = model.log_mixing_weights.exp()[order]
    means, fitted_covs = model.means[order], model.covariances()[order]
    # The components barely overlap, so EM's estimates are the per-component sample statistics, whose
    # standard errors are: weight sqrt(pi (1 - pi) / n); mean coordinate sqrt(S_ii / n_k);
    # covariance entry sqrt((S_ii S_jj + S_ij^2) / n_k), with n_k = n pi_k. Allow 4 standard errors.
    assert torch.all((weights - TRUE_WEIGHTS).abs() < 4 * (TRUE_WEIGHTS * (1 - TRUE_WEIGHTS) / n).sqrt())
    n_k = (n * TRUE_WEIGHTS)[:, None]
    variances = covs.diagonal(dim1=1, dim2=2)
    assert torch.all((means - TRUE_MEANS).abs() < 4 * (variances / n_k).sqrt())
    cov_se = ((variances[:, :, None] * variances[:, None, :] + covs.square()) / n_k[:, :, None]).sqrt()
    assert torch.all((fitted_covs - covs).abs() < 4 * cov_se)


def test_kmeans_plus_plus_seeds_one_point_per_separated_cluster():
    x, z = draw_mixture(3000, TRUE_WEIGHTS, TRUE_MEANS, TRUE_COVS, seed=0)
    for seed in range(5):
        seeds = mixture_em.kmeans_plus_plus(x, 3, torch.Generator().manual_seed(seed))
        assert sorted(z[seeds].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_log_prob_matches_an_independent_formula(covariance):
    model = make(d=5, n_components=3, covariance=covariance, max_iter=20)
    x = overlapping_data()
    records = model.fit(x)
    weights = model.log_mixing_weights.exp().numpy()
    expected = numpy_mixture_log_prob(x.numpy(), weights, model.means.numpy(), model.covariances().numpy())
    got = model.log_prob(x)
    assert got.shape == (x.shape[0],) and got.dtype == F64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-10)
    assert records[-1]["log_likelihood"] == pytest.approx(expected.mean(), abs=1e-10)


def test_chunked_matmuls_give_the_same_values(monkeypatch):
    model = make(d=5, max_iter=5)
    x = overlapping_data()
    model.fit(x)
    whole = model.log_prob(x)
    monkeypatch.setattr(mixture_em, "CHUNK_ELEMENTS", 7 * 3 * 5)  # 7 rows per chunk
    monkeypatch.setattr(mixture_em, "MIN_CHUNK_ROWS", 1)
    assert torch.allclose(model.log_prob(x), whole, rtol=0, atol=1e-12)
    refit = make(d=5, max_iter=5)
    refit.fit(x)
    assert torch.allclose(refit.means, model.means, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# EM as coordinate ascent on the ELBO


@pytest.mark.parametrize("covariance", ["full", "diag"])
@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_elbo_never_decreases(covariance, init):
    model = make(d=5, n_components=4, covariance=covariance, init=init, tol=0.0, max_iter=40, covariance_floor=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # fit warns if the ELBO drops
        records = model.fit(overlapping_data())
    assert len(records) == 40 and records[-1]["converged"] is False
    assert [r["iteration"] for r in records] == list(range(1, 41))
    assert_never_decreases(records)
    assert records[-1]["log_likelihood"] - records[0]["elbo"] > 0.01  # EM made real progress
    json.dumps(records)


def test_fit_warns_when_the_elbo_drops(monkeypatch):
    real_m_step = mixture.m_step

    def bad_m_step(x, q, previous, covariance, floor):
        params = real_m_step(x, q, previous, covariance, floor)
        return mixture_em.MixtureParams(params.log_mixing_weights, params.means + 3.0, params.scale)

    monkeypatch.setattr(mixture, "m_step", bad_m_step)
    with pytest.warns(RuntimeWarning, match="lowered the objective"):
        make(max_iter=2, tol=0.0).fit(separated_data(300))


def test_tol_stops_early_and_zero_runs_every_iteration():
    x = overlapping_data()
    loose = make(d=5, tol=1e-2, max_iter=200).fit(x)
    assert loose[-1]["converged"] and len(loose) < 200
    assert loose[-1]["elbo"] - loose[-2]["elbo"] < 1e-2 <= loose[-2]["elbo"] - loose[-3]["elbo"]
    assert len(make(d=5, tol=0.0, max_iter=7).fit(x)) == 7


def test_fit_is_deterministic_given_the_seed():
    x = overlapping_data()
    a, b = make(d=5, max_iter=10), make(d=5, max_iter=10)
    a.fit(x), b.fit(x)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_initialize_is_where_fit_starts():
    x = overlapping_data()
    model = make(d=5, n_components=4, max_iter=1, tol=0.0)
    model.initialize(x)
    start = model.log_prob(x).mean().item()
    records = model.fit(x)
    assert start <= records[0]["elbo"] <= records[0]["log_likelihood"]


# ----------------------------------------------------------------------------------------------
# The model interface


@pytest.fixture(scope="module")
def fitted_5d():
    model = make(d=5, max_iter=30)
    model.fit(overlapping_data())
    return model


def test_elbo_equals_log_prob(fitted_5d):
    x = overlapping_data(200, seed=1)
    terms = fitted_5d.elbo(x, n_samples=3)
    log_p = fitted_5d.log_prob(x)
    assert terms.reconstruction.shape == (200,) and set(terms.kl) == {"z"}
    assert torch.allclose(terms.elbo, log_p, rtol=0, atol=1e-10)
    assert torch.all(terms.kl["z"] >= -1e-12)
    # reconstruction = E_q log N(x; mu_z, Sigma_z) <= max_k log N(x; mu_k, Sigma_k)
    densities = mixture_em.component_log_densities(x, fitted_5d.params, "full")
    assert torch.all(terms.reconstruction <= densities.amax(1) + 1e-12)


def test_importance_weights_are_exact(fitted_5d):
    x = overlapping_data(50, seed=2)
    log_w = fitted_5d.log_weights(x, 8)
    assert log_w.shape == (8, 50)
    log_p = fitted_5d.log_prob(x)
    assert torch.allclose(log_w, log_p.expand(8, -1), rtol=0, atol=1e-10)
    assert torch.allclose(iwae_bound(lambda n: fitted_5d.log_weights(x, n), 20, 7), log_p, rtol=0, atol=1e-10)
    draw = fitted_5d.log_weights_sampler(x)
    assert torch.allclose(draw(3), log_p.expand(3, -1), rtol=0, atol=1e-10)
    # through the evaluator's IWAE path (which uses log_weights_sampler)
    assert torch.allclose(iwae_per_example(fitted_5d, x, 100, batch_size=16), log_p, rtol=0, atol=1e-10)


def test_encode_and_posterior(fitted_5d):
    x = overlapping_data(100, seed=3)
    q = fitted_5d.encode(x)
    assert q.shape == (100, 3)
    assert torch.all(q >= 0) and torch.allclose(q.sum(1), torch.ones(100, dtype=F64), rtol=0, atol=1e-12)
    posterior = fitted_5d.posterior(x)
    assert isinstance(posterior, torch.distributions.Categorical)
    assert torch.allclose(posterior.probs, q, atol=1e-12)
    # Bayes' rule by hand
    joint = mixture_em.component_log_densities(x, fitted_5d.params, "full") + fitted_5d.log_mixing_weights
    assert torch.allclose(q, torch.softmax(joint, 1), atol=1e-12)


def test_sample_moments_match_within_standard_errors(fitted_5d):
    n = 20000
    draws = fitted_5d.sample(n, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (n, 5) and draws.dtype == F64
    weights = fitted_5d.log_mixing_weights.exp()
    means, covs = fitted_5d.means, fitted_5d.covariances()
    mixture_mean = weights @ means
    centered = means - mixture_mean
    mixture_cov = (weights[:, None, None] * (covs + centered[:, :, None] * centered[:, None, :])).sum(0)
    se = (mixture_cov.diagonal() / n).sqrt()  # SE of each coordinate of the sample mean
    assert torch.all((draws.mean(0) - mixture_mean).abs() < 4 * se)
    # sample covariance entry = mean of (x_i - m_i)(x_j - m_j); its SE estimated from the same products
    centered_draws = draws - mixture_mean
    products = centered_draws[:, :, None] * centered_draws[:, None, :]
    cov_se = products.std(0) / math.sqrt(n)
    assert torch.all((products.mean(0) - mixture_cov).abs() < 4 * cov_se)


def test_protocol_capabilities(fitted_5d):
    assert fitted_5d.trains_by_gradient is False
    assert fitted_5d.data_space == "real"  # vectors (data_shape (5,)) are standardized real numbers
    assert isinstance(fitted_5d, GaussianMixture)
    for present in (ExactLikelihood, ImportanceWeighted, Encoder, ClosedFormFit):
        assert isinstance(fitted_5d, present)
    assert not isinstance(fitted_5d, Reconstructs)


# ----------------------------------------------------------------------------------------------
# Degenerate data: the covariance floor


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_floor_keeps_a_single_point_component_finite(covariance):
    x = torch.cat([separated_data(600), torch.tensor([[200.0, -200.0]], dtype=F64)])  # one far outlier
    floor = 1e-3
    model = make(n_components=4, covariance=covariance, covariance_floor=floor, tol=0.0, max_iter=20)
    records = model.fit(x)
    assert_never_decreases(records)
    outlier = torch.cdist(x[-1:], model.means).argmin()
    assert model.log_mixing_weights.exp()[outlier] == pytest.approx(1 / x.shape[0], rel=1e-6)
    assert torch.allclose(model.covariances()[outlier], floor * torch.eye(2, dtype=F64), atol=1e-9)
    assert torch.isfinite(model.log_prob(x)).all()


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_floor_bounds_the_covariance_of_duplicated_points(covariance):
    duplicates = torch.tensor([[3.0, 3.0]], dtype=F64).expand(50, 2)
    x = torch.cat([separated_data(600), duplicates])
    floor = 1e-2
    model = make(n_components=4, covariance=covariance, covariance_floor=floor, tol=0.0, max_iter=30)
    records = model.fit(x)
    assert_never_decreases(records)
    eigenvalues = torch.linalg.eigvalsh(model.covariances())
    assert torch.all(eigenvalues >= floor * (1 - 1e-9))
    collapsed = torch.cdist(duplicates[:1], model.means).argmin()
    assert torch.allclose(model.means[collapsed], duplicates[0], atol=1e-6)
    assert torch.allclose(model.covariances()[collapsed], floor * torch.eye(2, dtype=F64), atol=1e-6)
    assert torch.isfinite(model.log_prob(x)).all()


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_identical_points(init):
    x = torch.full((10, 2), 0.25, dtype=F64)
    model = make(n_components=3, init=init, covariance_floor=1e-3, tol=0.0, max_iter=5)
    model.fit(x)
    assert torch.isfinite(model.log_prob(x)).all()
    assert torch.isfinite(model.log_mixing_weights).all()
    assert torch.allclose(model.covariances(), 1e-3 * torch.eye(2, dtype=F64).expand(3, 2, 2), atol=1e-12)


def test_empty_component_keeps_its_parameters():
    x = torch.cat([torch.zeros(20, 2, dtype=F64), torch.ones(20, 2, dtype=F64)])
    previous = mixture_em.MixtureParams(
        torch.zeros(3, dtype=F64),
        torch.tensor([[0.0, 0.0], [1.0, 1.0], [9.0, 9.0]], dtype=F64),
        (2 * torch.eye(2, dtype=F64)).repeat(3, 1, 1),
    )
    q = torch.zeros(40, 3, dtype=F64)
    q[:20, 0] = 1
    q[20:, 1] = 1
    params = mixture_em.m_step(x, q, previous, "full", 1e-3)
    assert torch.equal(params.means[2], previous.means[2]) and torch.equal(params.scale[2], previous.scale[2])
    assert torch.isfinite(params.log_mixing_weights).all() and params.log_mixing_weights[2] < -700
    assert torch.allclose(params.log_mixing_weights[:2].exp(), torch.tensor([0.5, 0.5], dtype=F64))


# ----------------------------------------------------------------------------------------------
# Config, inputs, save/load


@pytest.mark.parametrize(
    "values, message",
    [
        ({"n_components": 0}, "n_components"),
        ({"n_components": 2.5}, "n_components"),
        ({"n_components": True}, "n_components"),
        ({"covariance": "tied"}, "covariance"),
        ({"init": "kmeans"}, "init"),
        ({"max_iter": 0}, "max_iter"),
        ({"tol": -1e-3}, "tol"),
        ({"tol": float("nan")}, "tol"),
        ({"covariance_floor": 0.0}, "covariance_floor"),
        ({"covariance_floor": -1.0}, "covariance_floor"),
        ({"covariance_floor": float("inf")}, "covariance_floor"),
        ({"seed": -1}, "seed"),
        ({"seed": "zero"}, "seed"),
        ({"data_shape": [0]}, "data_shape"),
        ({"data_shape": "28x28"}, "data_shape"),
        ({"components": 3}, "unknown"),
    ],
)
def test_bad_config_raises(values, message):
    with pytest.raises(ElboxError, match=message):
        build_model("mixture", values)


def test_config_defaults():
    c = MixtureConfig()
    assert (c.data_shape, c.n_components, c.covariance, c.init) == ((1, 28, 28), None, "full", "kmeans++")
    assert (c.max_iter, c.tol, c.covariance_floor, c.seed) == (100, 1e-4, 1e-3, 0)


def test_bad_input_raises(fitted_5d):
    with pytest.raises(ElboxError, match="fewer than n_components"):
        make(n_components=3).fit(separated_data(2))
    with pytest.raises(ElboxError, match="uint8"):
        fitted_5d.log_prob(torch.zeros(2, 5, dtype=torch.uint8))
    with pytest.raises(ElboxError, match="shape"):
        fitted_5d.log_prob(torch.zeros(2, 4))
    with pytest.raises(ElboxError, match="NaN"):
        make().fit(torch.full((10, 2), float("inf")))
    with pytest.raises(ElboxError, match="number of samples"):
        fitted_5d.elbo(torch.zeros(2, 5), n_samples=0)
    with pytest.raises(ElboxError, match="not fitted"):
        make().log_prob(torch.zeros(2, 2))
    with pytest.raises(ElboxError, match="not fitted"):
        make().sample(3)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_save_load_round_trip(covariance):
    model = make(d=5, covariance=covariance, max_iter=10)
    model.fit(overlapping_data())
    names = {"full": "scale_tril", "diag": "variances"}
    assert set(model.state_dict()) == {"log_mixing_weights", "means", names[covariance], "fitted_examples"}
    config = json.loads(json.dumps(config_to_dict(model.config)))
    weights = save({k: v.contiguous() for k, v in model.state_dict().items()})
    restored = build_model("mixture", config)
    assert restored.config == model.config
    restored.load_state_dict(load(weights))
    x = overlapping_data(100, seed=4)
    assert torch.equal(restored.log_prob(x), model.log_prob(x))


def test_n_init_keeps_the_best_of_its_runs():
    x = overlapping_data(n=600)
    singles = []
    for seed in range(3):
        model = GaussianMixture(MixtureConfig(data_shape=(x.shape[1],), n_components=4, seed=seed, max_iter=30))
        singles.append(model.fit(x)[-1]["log_likelihood"])
    best = GaussianMixture(MixtureConfig(data_shape=(x.shape[1],), n_components=4, seed=0, max_iter=30, n_init=3))
    records = best.fit(x)
    assert sorted({r["restart"] for r in records}) == [0, 1, 2]
    assert best.log_prob(x).mean().item() == pytest.approx(max(singles), abs=1e-9)


# ----------------------------------------------------------------------------------------------
# n_components=None: K chosen by BIC (Schwarz 1978)

TWO_WEIGHTS = torch.tensor([0.6, 0.4], dtype=F64)
TWO_MEANS = torch.tensor([[0.0, 0.0, 0.0], [4.0, 4.0, 0.0]], dtype=F64)
TWO_COVS = torch.tensor(
    [[[1.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 1.0]], [[0.5, 0.0, 0.0], [0.0, 2.0, -0.4], [0.0, -0.4, 1.0]]],
    dtype=F64,
)


def two_component_data(n=400, seed=0):
    """A known 2-component mixture in 3-D, full covariances, the means 4.9 to 6.3 standard deviations apart."""
    return draw_mixture(n, TWO_WEIGHTS, TWO_MEANS, TWO_COVS, seed)[0]


@pytest.fixture(scope="module")
def selected():
    """(model with n_components=None fitted on two_component_data(), its records, the records its callback got)."""
    model = build_model("mixture", {"data_shape": [3]})
    seen = []
    with warnings.catch_warnings():
        # K = 3 here has a component of 8 points near the covariance floor (module docstring)
        warnings.simplefilter("ignore", RuntimeWarning)
        records = model.fit(two_component_data(), callback=seen.append)
    return model, records, seen


def test_bic_chooses_the_true_number_of_components(selected):
    model, records, seen = selected
    choice = records[-1]
    assert seen == records and choice["chosen_components"] == 2 and choice["criterion"] == "bic"
    assert [c["n_components"] for c in choice["candidates"]] == list(mixture.CANDIDATE_COMPONENTS)
    bics = {c["n_components"]: c["bic"] for c in choice["candidates"]}
    # Margins: K = 1 misses a 5-standard-deviation split (about 0.5 nats x 400 rows). For K = 3 the likelihood-ratio
    # statistic 2 (log L_3 - log L_2) is about chi-square with 10 degrees of freedom (mean 10, standard deviation
    # 4.5) under the true 2-component model, against a penalty of 10 ln 400 = 60: 2 is chosen by about 11 standard
    # deviations (margins 26 to 57 over 20 data seeds, and 2 chosen for every seed).
    assert all(bics[2] < value - 20 for k, value in bics.items() if k != 2)
    # the chosen K is in the config and the buffers
    assert model.config.n_components == 2
    assert (
        model.means.shape == (2, 3) and model.scale_tril.shape == (2, 3, 3) and model.log_mixing_weights.shape == (2,)
    )
    assert choice["log_likelihood"] == pytest.approx(model.log_prob(two_component_data()).mean().item(), abs=1e-10)
    # the EM records of every candidate, each tagged with its K, before the choice
    assert {r["n_components"] for r in records[:-1]} == set(mixture.CANDIDATE_COMPONENTS)
    assert all("iteration" in r for r in records[:-1])
    json.dumps(records)


def test_bic_matches_a_hand_computation(selected):
    x = two_component_data()
    n = x.shape[0]
    bics = {c["n_components"]: c for c in selected[1][-1]["candidates"]}
    # the K = 2 candidate is the fit an explicit n_components=2 makes (same seed, same start)
    two = build_model("mixture", {"data_shape": [3], "n_components": 2})
    two.fit(x)
    log_l = numpy_mixture_log_prob(
        x.numpy(), two.log_mixing_weights.exp().numpy(), two.means.numpy(), two.covariances().numpy()
    ).sum()
    p = 1 + 2 * 3 + 2 * (3 * 4 // 2)  # one free weight, two 3-D means, two symmetric 3 x 3 covariances
    assert bics[2]["parameters"] == p == 19
    assert bics[2]["bic"] == pytest.approx(-2 * log_l + p * math.log(n), rel=1e-12)
    assert mixture_em.free_parameters(2, 3, "diag") == 1 + 2 * 3 + 2 * 3
    assert mixture_em.free_parameters(1, 3, "full") == 3 + 6


def test_the_choice_is_printed_in_one_line(selected, capsys):
    from elbox.training.messages import with_summaries

    with_summaries(None)(dict(selected[1][-1]))
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "BIC chose 2 components of 1, 2, 3, 4, 6, 8, 10" in err


def test_the_chosen_components_are_saved_and_loaded(selected, tmp_path):
    """As a run directory is written and read (elbox.io.checkpoint: config.json's model_config, then the weights checked
    against the shapes the config builds)."""
    model = selected[0]
    config = json.loads(json.dumps(config_to_dict(model.config)))
    assert config["n_components"] == 2
    save_weights(tmp_path / "model.safetensors", model)
    loaded = build_model("mixture", config)
    load_weights(tmp_path / "model.safetensors", loaded)
    assert loaded.config.n_components == 2 and loaded.means.shape == (2, 3)
    x = two_component_data(50, seed=1)
    assert torch.equal(loaded.log_prob(x), model.log_prob(x))


def test_a_run_records_the_chosen_components(tmp_path):
    x = two_component_data().float()
    run = elbox.fit("mixture", x, out=tmp_path / "run", progress=False, verbose=False)
    assert run.model.config.n_components == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model_config"]["n_components"] == 2
    assert run.config["model_config"]["n_components"] == 2
    assert elbox.load(tmp_path / "run").config.n_components == 2


def test_explicit_components_fit_as_before(selected):
    x = two_component_data()
    model = build_model("mixture", {"data_shape": [3], "n_components": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        records = model.fit(x)
    assert model.config.n_components == 3 and model.means.shape == (3, 3)
    assert all("n_components" not in r and "chosen_components" not in r for r in records)
    # the same EM run as the K = 3 candidate of the selection
    candidate = [r for r in selected[1] if r.get("n_components") == 3]

    def strip(record):
        return {k: v for k, v in record.items() if k not in ("time_s", "n_components")}

    assert [strip(r) for r in records] == [strip(r) for r in candidate]


def test_candidates_are_capped_by_the_rows_per_component():
    full = build_model("mixture", {"data_shape": [3]})
    assert full.candidate_components(3) == [1]  # K = 2 needs 2 x (3 + 1) = 8 rows
    assert full.candidate_components(8) == [1, 2]
    assert full.candidate_components(20) == [1, 2, 3, 4]
    assert full.candidate_components(40) == list(mixture.CANDIDATE_COMPONENTS)
    assert build_model("mixture", {"data_shape": [3], "covariance": "diag"}).candidate_components(5) == [1, 2]
    x = two_component_data(20)
    records = full.fit(x)
    assert [c["n_components"] for c in records[-1]["candidates"]] == [1, 2, 3, 4]
    assert full.config.n_components == records[-1]["chosen_components"]
    assert full.means.shape == (full.config.n_components, 3)


def test_unfitted_selecting_model():
    model = build_model("mixture", {"data_shape": [3]})
    assert model.config.n_components is None and model.means.shape == (1, 3)  # shapes of one component until fit
    with pytest.raises(ElboxError, match="initialize needs n_components"):
        model.initialize(two_component_data(20))
    with pytest.raises(ElboxError, match="not fitted"):
        model.log_prob(torch.zeros(2, 3))
    with pytest.raises(ElboxError, match="fewer than n_components=1"):
        model.fit(torch.zeros(0, 3, dtype=F64))
    # an older config with an explicit n_components (always an int) builds its shapes
    old = build_model("mixture", {"data_shape": [3], "n_components": 4, "covariance": "diag"})
    assert old.config.n_components == 4 and old.variances.shape == (4, 3)

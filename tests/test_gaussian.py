"""Tests for elbox.models.gaussian: the closed-form fit against numpy, log_prob against an independent
formula, the ridge, diag vs full, sample moments, the config and save/load through safetensors."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from elbox.core.errors import ElboxError
from elbox.core.options import config_to_dict
from elbox.models.base import (
    ClosedFormFit,
    Encoder,
    ExactLikelihood,
    ImportanceWeighted,
    LowerBounded,
    Reconstructs,
    build_model,
)
from elbox.models.gaussian import GaussianConfig, GaussianModel

DATA_SHAPE = (1, 2, 3)  # D = 6
D = 6


def correlated_data(n=2000, seed=0):
    """[n, 1, 2, 3] float64 data with a dense covariance and a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    mean = torch.linspace(-1, 2, D, dtype=torch.float64)
    x = mean + torch.randn(n, D, generator=g, dtype=torch.float64) @ mixing.T
    return x.reshape(n, *DATA_SHAPE)


def fitted(covariance="full", ridge=0.0, x=None):
    model = build_model("gaussian", {"data_shape": list(DATA_SHAPE), "covariance": covariance, "ridge": ridge})
    model.fit(correlated_data() if x is None else x)
    return model


def numpy_log_density(x, mean, cov):
    """log N(x; mean, cov) per row, written out with slogdet and solve."""
    diff = x - mean
    sign, logdet = np.linalg.slogdet(cov)
    assert sign > 0
    mahalanobis = np.einsum("nd,nd->n", diff, np.linalg.solve(cov, diff.T).T)
    return -0.5 * (x.shape[1] * np.log(2 * np.pi) + logdet + mahalanobis)


def covariance_of(model):
    if model.config.covariance == "full":
        return (model.scale_tril @ model.scale_tril.T).numpy()
    return np.diag(model.std.numpy() ** 2)


# ----------------------------------------------------------------------------------------------
# The fit


def test_mle_matches_numpy():
    x = correlated_data()
    flat = x.reshape(x.shape[0], -1).numpy()
    model = fitted(ridge=0.0, x=x)
    np.testing.assert_allclose(model.mean.numpy(), flat.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(covariance_of(model), np.cov(flat, rowvar=False, bias=True), rtol=0, atol=1e-12)
    assert int(model.fitted_examples) == x.shape[0]


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_ridge_is_added_to_the_diagonal(covariance):
    flat = correlated_data().reshape(-1, D).numpy()
    sample_cov = np.cov(flat, rowvar=False, bias=True)
    expected = sample_cov + 0.25 * np.eye(D) if covariance == "full" else np.diag(np.diag(sample_cov) + 0.25)
    np.testing.assert_allclose(covariance_of(fitted(covariance, ridge=0.25)), expected, rtol=0, atol=1e-12)


def test_diag_is_the_diagonal_of_full_and_scores_lower_on_training_data():
    full, diag = fitted("full", ridge=1e-3), fitted("diag", ridge=1e-3)
    np.testing.assert_allclose(covariance_of(diag), np.diag(np.diag(covariance_of(full))), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(full.mean.numpy(), diag.mean.numpy())
    # the full MLE maximizes the likelihood over a larger family (ridge = 0 for the exact statement)
    x = correlated_data()
    assert fitted("full", 0.0).log_prob(x).mean() > fitted("diag", 0.0).log_prob(x).mean() + 1.0


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_log_prob_matches_an_independent_formula(covariance):
    model = fitted(covariance, ridge=0.1)
    x = correlated_data(n=300, seed=1)
    expected = numpy_log_density(x.reshape(300, D).numpy(), model.mean.numpy(), covariance_of(model))
    got = model.log_prob(x)
    assert got.shape == (300,) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-10)
    # [N, D] input is the same as [N, *data_shape]; float32 input is accepted
    np.testing.assert_allclose(model.log_prob(x.reshape(300, D)).numpy(), expected, rtol=1e-12, atol=1e-10)
    assert torch.allclose(model.log_prob(x.float()), got, atol=1e-4)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_fit_record_is_the_mean_training_log_likelihood(covariance):
    x = correlated_data()
    model = build_model("gaussian", {"data_shape": list(DATA_SHAPE), "covariance": covariance, "ridge": 0.05})
    seen = []
    records = model.fit(x, callback=lambda record: seen.append(dict(record)))
    assert seen == records  # the callback gets each record as it is produced
    assert len(records) == 1 and records[0]["n_examples"] == x.shape[0]
    json.dumps(records)
    # the closed form D - ridge tr(Sigma^-1) for the mean Mahalanobis term
    assert records[0]["log_likelihood"] == pytest.approx(model.log_prob(x).mean().item(), abs=1e-10)


# ----------------------------------------------------------------------------------------------
# Sampling


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_sample_moments_match_within_standard_errors(covariance):
    model = fitted(covariance, ridge=0.1)
    n = 20000
    draws = model.sample(n, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (n, *DATA_SHAPE) and draws.dtype == torch.float64
    flat = draws.reshape(n, D).numpy()
    cov = covariance_of(model)
    variances = np.diag(cov)
    # SE of a sample mean: sqrt(var / n); of a sample covariance entry: sqrt((S_ii S_jj + S_ij^2) / n)
    mean_se = np.sqrt(variances / n)
    assert np.all(np.abs(flat.mean(0) - model.mean.numpy()) < 4 * mean_se)
    cov_se = np.sqrt((np.outer(variances, variances) + cov**2) / n)
    assert np.all(np.abs(np.cov(flat, rowvar=False, bias=True) - cov) < 4 * cov_se)


def test_samples_are_not_clamped():
    model = fitted("diag", ridge=0.0, x=correlated_data() * 10)
    draws = model.sample(500, generator=torch.Generator().manual_seed(0))
    assert draws.min() < 0 and draws.max() > 1


# ----------------------------------------------------------------------------------------------
# Protocol, save/load, config


def test_protocol_capabilities():
    model = fitted()
    assert model.trains_by_gradient is False
    assert model.data_space == "continuous"
    assert isinstance(model, ExactLikelihood) and isinstance(model, ClosedFormFit)
    for absent in (ImportanceWeighted, Encoder, Reconstructs, LowerBounded):  # no latent variable: no ELBO
        assert not isinstance(model, absent)
    assert isinstance(model, GaussianModel)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_save_load_round_trip(covariance):
    model = fitted(covariance, ridge=0.1)
    config = json.loads(json.dumps(config_to_dict(model.config)))  # tuples come back as lists
    weights = save({k: v.contiguous() for k, v in model.state_dict().items()})
    restored = build_model("gaussian", config)
    assert restored.config == model.config
    restored.load_state_dict(load(weights))
    x = correlated_data(n=50, seed=3)
    assert torch.equal(restored.log_prob(x), model.log_prob(x))
    assert int(restored.fitted_examples) == int(model.fitted_examples)


def test_unfitted_model_refuses():
    model = build_model("gaussian", {"data_shape": [4]})
    with pytest.raises(ElboxError, match="not fitted"):
        model.log_prob(torch.zeros(2, 4))
    with pytest.raises(ElboxError, match="not fitted"):
        model.sample(2)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"covariance": "spherical"}, "covariance"),
        ({"ridge": -1.0}, "ridge"),
        ({"ridge": float("nan")}, "ridge"),
        ({"ridge": "big"}, "ridge"),
        ({"data_shape": [0, 28]}, "data_shape"),
        ({"data_shape": []}, "data_shape"),
        ({"data_shape": [1.5]}, "data_shape"),
        ({"colour": 1}, "unknown"),
    ],
)
def test_bad_config_raises(values, message):
    with pytest.raises(ElboxError, match=message):
        build_model("gaussian", values)


def test_config_defaults():
    c = GaussianConfig()
    assert c.data_shape == (1, 28, 28) and c.covariance == "full" and c.ridge == 1e-3


def test_bad_input_raises():
    model = fitted()
    with pytest.raises(ElboxError, match="uint8"):
        model.log_prob(torch.zeros(2, *DATA_SHAPE, dtype=torch.uint8))
    with pytest.raises(ElboxError, match="shape"):
        model.log_prob(torch.zeros(2, 7))
    with pytest.raises(ElboxError, match="shape"):
        model.log_prob(torch.zeros(2, 3, 2, 1))
    with pytest.raises(ElboxError, match="NaN"):
        model.log_prob(torch.full((2, D), float("nan")))
    with pytest.raises(ElboxError, match="empty"):
        model.fit(torch.zeros(0, D))
    with pytest.raises(ElboxError, match="number of samples"):
        model.sample(0)


def test_singular_covariance_without_ridge_raises():
    x = correlated_data().reshape(-1, D).clone()
    x[:, 2] = 0.5  # a constant dimension
    with pytest.raises(ElboxError, match="singular"):
        fitted("full", ridge=0.0, x=x)
    with pytest.raises(ElboxError, match="constant"):
        fitted("diag", ridge=0.0, x=x)
    assert torch.isfinite(fitted("full", ridge=1e-3, x=x).log_prob(x)).all()

"""Real-valued vectors [N, D]: the standardizing 'real' data space, and the models that take vectors, with every
log p(x), bound and score in the data's original units (checked against closed forms on the unscaled data)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal

from elbox.core.errors import ElboxError
from elbox.data import (
    RealSpace,
    fit_real_space,
    get_data_space,
    model_data_space,
    space_from_record,
    space_record,
)
from elbox.evaluation.evaluator import evaluate
from elbox.io.run_config import TrainConfig
from elbox.models import build_model
from elbox.models.gaussian import GaussianConfig, GaussianModel
from elbox.models.mixture import GaussianMixture, MixtureConfig
from elbox.models.vae import VAEConfig
from elbox.training.trainer import Trainer

D = 5


def table(n: int = 600, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Correlated vectors [n, D] whose columns have very different offsets and scales (like a table's columns)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(D, D, generator=g, dtype=torch.float64)
    z = torch.randn(n, D, generator=g, dtype=torch.float64) @ mixing
    offsets = torch.tensor([100.0, -3.0, 0.01, 5e3, 0.0], dtype=torch.float64)
    scales = torch.tensor([10.0, 0.1, 1e-3, 300.0, 1.0], dtype=torch.float64)
    return (offsets + scales * z).to(dtype)


def mle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximum-likelihood mean and (1/N) covariance of x [N, D] in float64."""
    x = x.double()
    mean = x.mean(0)
    centered = x - mean
    return mean, centered.T @ centered / x.shape[0]


def standardized(x: torch.Tensor) -> tuple[RealSpace, torch.Tensor]:
    space = fit_real_space(x.split(64))
    return space, space.eval_data(x)


# ----------------------------------------------------------------------------------------------
# Exact models: log p(x) in original units against closed forms on the unscaled data


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_gaussian_log_prob_in_original_units(covariance):
    x = table()
    space, y = standardized(x)
    model = GaussianModel(GaussianConfig(data_shape=(D,), covariance=covariance, ridge=0.0))
    assert model.data_space == "real"
    model.fit(y)
    log_px = model.log_prob(y) + space.log_prob_offset(D)
    mean, cov = mle(x)
    truth = (
        MultivariateNormal(mean, cov) if covariance == "full" else Independent(Normal(mean, cov.diagonal().sqrt()), 1)
    ).log_prob(x.double())
    torch.testing.assert_close(log_px, truth, rtol=0, atol=1e-4)
    result = evaluate(model, y, log_prob_offset=space.log_prob_offset(D))
    assert result["nll_exact"] == pytest.approx(-truth.mean().item(), abs=1e-5)


def test_gaussian_ridge_is_a_ridge_on_the_standardized_data():
    """With the default ridge, the model is N(mean, S + ridge diag(std^2)) in the original units."""
    x = table()
    space, y = standardized(x)
    model = GaussianModel(GaussianConfig(data_shape=(D,)))
    model.fit(y)
    mean, cov = mle(x)
    truth = MultivariateNormal(mean, cov + model.config.ridge * torch.diag(space.std.square())).log_prob(x.double())
    torch.testing.assert_close(model.log_prob(y) + space.log_prob_offset(D), truth, rtol=0, atol=1e-4)


def test_one_component_mixture_log_prob_in_original_units():
    x = table()
    space, y = standardized(x)
    model = GaussianMixture(MixtureConfig(data_shape=(D,), n_components=1, max_iter=5))
    assert model.data_space == "real"
    model.fit(y)
    mean, cov = mle(x)
    # the covariance floor is added to the diagonal of the standardized data's covariance
    truth = MultivariateNormal(mean, cov + model.config.covariance_floor * torch.diag(space.std.square())).log_prob(
        x.double()
    )
    offset = space.log_prob_offset(D)
    torch.testing.assert_close(model.log_prob(y) + offset, truth, rtol=0, atol=1e-4)
    result = evaluate(model, y, log_prob_offset=offset, iw_samples=[1, 10])
    assert result["nll_exact"] == pytest.approx(-truth.mean().item(), abs=1e-5)
    assert result["elbo"] == pytest.approx(truth.mean().item(), abs=1e-5)  # q is the exact posterior


def test_scaling_the_data_shifts_log_p_by_the_log_determinant():
    x = table()
    space, y = standardized(x)
    space10, y10 = standardized(10 * x)
    assert space10.log_prob_offset(D) - space.log_prob_offset(D) == pytest.approx(-D * math.log(10), abs=1e-12)
    log_p = []
    for sp, data in ((space, y), (space10, y10)):
        model = GaussianModel(GaussianConfig(data_shape=(D,), ridge=0.0))
        model.fit(data)
        log_p.append(model.log_prob(data) + sp.log_prob_offset(D))
    torch.testing.assert_close(log_p[1] - log_p[0], torch.full_like(log_p[0], -D * math.log(10)), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Gradient-trained models on vectors, through the Trainer and the evaluator


def train(model_name: str, model_config: dict, x: torch.Tensor, epochs: int = 3) -> tuple:
    space = fit_real_space(x[:500].split(100))
    torch.manual_seed(0)
    model = build_model(model_name, model_config)
    assert model.data_space == space.name == "real"
    config = TrainConfig(epochs=epochs, batch_size=50, lr=3e-3, logger="none")
    trainer = Trainer(model, x[:500].float(), x[500:].float(), space, config, None, progress=False)
    record = trainer.fit()
    assert math.isfinite(record["val_elbo"]) and record["train_elbo"] > -1e6
    return model, space


def test_linear_model_trains_on_vectors_and_reports_original_units():
    x = table()
    model, space = train("linear", {"data_shape": [D], "latent_dim": 2, "fit": "elbo", "noise": "diagonal"}, x)
    y = space.eval_data(x[500:])
    offset = space.log_prob_offset(D)
    result = evaluate(model, y, log_prob_offset=offset, iw_samples=[1, 50])
    # the model is x = mean + std * (W z + b + noise): x ~ N(mean + std * b, diag(std) (W W^T + Psi) diag(std))
    with torch.no_grad():
        scale = torch.diag(space.std)
        cov_y = (model.W @ model.W.T + torch.diag(model.noise_variance)).double()
        truth = MultivariateNormal(space.mean + space.std * model.b.double(), scale @ cov_y @ scale).log_prob(
            x[500:].double()
        )
    assert result["nll_exact"] == pytest.approx(-truth.mean().item(), abs=1e-3)
    assert result["elbo"] <= -result["nll_exact"] + 1e-4  # a bound in the same units
    assert result["nll_iw"] == pytest.approx(result["nll_exact"], abs=0.5)


@pytest.mark.parametrize("likelihood", ["gaussian-learned", "gaussian"])
def test_vae_trains_on_vectors_and_bounds_shift_with_the_scaling(likelihood):
    x = table()
    config = {"data_shape": [D], "latent_dim": 2, "hidden_dims": [32], "likelihood": likelihood}
    config.update({"sigma": 0.5} if likelihood == "gaussian" else {})
    model, _ = train("vae", config, x)
    assert model.likelihood.real and model.decode(torch.zeros(3, 2)).shape == (3, 1, D)
    results = []
    for factor in (1.0, 10.0):  # the same standardized data, in other units: every number moves by -D log(factor)
        sp = fit_real_space((factor * x[:500]).split(100))
        results.append(
            evaluate(
                model, sp.eval_data(factor * x[500:]), log_prob_offset=sp.log_prob_offset(D), iw_samples=[10], seed=3
            )
        )
    for key in ("elbo", "reconstruction"):
        assert results[1][key] - results[0][key] == pytest.approx(-D * math.log(10), abs=1e-3)
    assert results[1]["nll_iw"] - results[0]["nll_iw"] == pytest.approx(D * math.log(10), abs=1e-3)
    assert results[0]["kl"] == pytest.approx(results[1]["kl"], abs=1e-4)
    # means and draws are real numbers, not clamped to an image's [0, 1]
    samples = model.sample(2000, mean=False)
    assert samples.shape == (2000, D) and (samples < 0).any() and (samples > 1).any()


# ----------------------------------------------------------------------------------------------
# Which models take vectors


def test_vector_space_rule():
    assert model_data_space("continuous", (D,), "x") == "real"
    assert model_data_space("continuous", (1, 4, 4), "x") == "continuous"
    assert model_data_space("binary", (1, 4, 4), "x") == "binary"
    with pytest.raises(ElboxError, match="the bernoulli likelihood models 8-bit images.*vectors go to"):
        model_data_space("binary", (D,), "the bernoulli likelihood")
    for name, values in [("gaussian", {}), ("mixture", {}), ("linear", {"latent_dim": 2})]:
        assert build_model(name, {"data_shape": [D], **values}).data_space == "real"
        assert build_model(name, {"data_shape": [1, 3, 3], **values}).data_space == "continuous"


@pytest.mark.parametrize("likelihood", ["bernoulli", "discretized-logistic", "categorical"])
def test_vae_refuses_image_likelihoods_on_vectors_at_config_time(likelihood):
    with pytest.raises(ElboxError, match=f"the {likelihood} likelihood models 8-bit images.*gaussian-learned"):
        VAEConfig(data_shape=(D,), likelihood=likelihood)


@pytest.mark.parametrize(
    "name, values, what",
    [
        ("vae", {"architecture": "conv", "likelihood": "gaussian"}, "the conv architecture"),
        ("hvae", {"likelihood": "gaussian"}, "the hvae"),
        ("hvae", {"hvae_type": "ladder", "likelihood": "gaussian"}, "the hvae"),
        ("diffusion", {}, "the diffusion model"),
    ],
)
def test_image_only_models_name_the_shape_they_take(name, values, what):
    with pytest.raises(
        ElboxError,
        match=f"{what} takes images: data_shape must be \\(channels, height, width\\), "
        r"got \(5,\); vectors \(D,\) go to the gaussian",
    ):
        build_model(name, {"data_shape": [D], **values})


def test_vae_data_shape_must_be_an_image_or_a_vector():
    with pytest.raises(ElboxError, match="for images or \\(D,\\) for vectors"):
        VAEConfig(data_shape=(4, 4), likelihood="gaussian")


# ----------------------------------------------------------------------------------------------
# The 'real' data space


def test_fit_real_space_streaming_equals_one_shot():
    x = table(1003, seed=1, dtype=torch.float32)
    space = fit_real_space(list(x.split(37)))  # uneven batches, the last one short
    torch.testing.assert_close(space.mean, x.double().mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(space.std, x.double().std(0, correction=0), rtol=1e-12, atol=0)
    from_numpy = fit_real_space(batch.numpy() for batch in x.split(500))  # a generator of NumPy arrays
    torch.testing.assert_close(from_numpy.std, space.std, rtol=1e-12, atol=0)
    y = space.eval_data(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double().mean(0), torch.zeros(D, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(y.double().std(0, correction=0), torch.ones(D, dtype=torch.float64), rtol=0, atol=1e-6)


def test_fit_real_space_names_the_constant_column():
    x = table(100)
    x[:, 2] = 0.1  # 0.1 is not a float64 sum-and-divide fixed point: a mean-based test would miss it
    with pytest.raises(ElboxError, match=r"column\(s\) 2 of the data are constant"):
        fit_real_space(x.split(7))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_fit_real_space_names_the_row_and_column_of_a_non_finite_value(bad):
    x = table(100)
    x[45, 3] = bad
    with pytest.raises(ElboxError, match="non-finite value .* in row 45, column 3"):
        fit_real_space(x.split(10))


@pytest.mark.parametrize(
    "batches, message",
    [
        ([], "from 0 example"),
        ([torch.ones(1, D)], "from 1 example"),
        ([torch.zeros(4, D, dtype=torch.uint8)], "float vectors"),
        ([torch.zeros(4, D, 2)], r"vectors \[B, D\], got shape \(4, 5, 2\)"),
        ([torch.randn(4, D), torch.randn(4, D + 1)], r"vectors \[B, 5\], got shape \(4, 6\)"),
        (["no"], "float vectors"),
    ],
)
def test_fit_real_space_bad_input(batches, message):
    with pytest.raises(ElboxError, match=message):
        fit_real_space(batches)


def test_real_space_transform_and_offset():
    space = RealSpace([1.0, -2.0, 0.0], [2.0, 0.5, 4.0])
    x = torch.tensor([[3.0, -2.0, 4.0], [1.0, -1.0, -8.0]])
    expected = torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, -2.0]])
    g = torch.Generator().manual_seed(0)
    assert torch.equal(space.eval_data(x, seed=1), expected)
    assert torch.equal(space.train_batch(x, g, part=(0, 2)), expected)  # no randomness; the trainer's part is accepted
    assert torch.equal(space.unstandardize(expected), x)
    assert space.log_prob_offset(3) == pytest.approx(-math.log(2 * 0.5 * 4))
    with pytest.raises(ElboxError, match="scales 3 dimensions, not 4"):
        space.log_prob_offset(4)
    with pytest.raises(ElboxError, match="expects a float tensor"):
        space.eval_data(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ElboxError, match=r"expects vectors \[N, 3\], got shape \(2, 4\)"):
        space.eval_data(torch.zeros(2, 4))
    x[1, 2] = math.nan
    with pytest.raises(ElboxError, match="in row 1, column 2"):
        space.eval_data(x)


def test_real_space_record_round_trip():
    space = fit_real_space(table().split(100))
    record = json.loads(json.dumps({"name": "my-table", **space_record(space)}))
    assert set(record) == {"name", "space", "scaling"} and record["space"] == "real"
    rebuilt = space_from_record(record)
    assert isinstance(rebuilt, RealSpace)
    assert torch.equal(rebuilt.mean, space.mean) and torch.equal(rebuilt.std, space.std)  # exact through JSON
    assert torch.equal(get_data_space("real", **space.to_record()).std, space.std)
    assert space_record(get_data_space("binary")) == {"space": "binary"}
    assert space_from_record({"space": "continuous"}).name == "continuous"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: get_data_space("real"), r"fitted to the training data.*\(got nothing\): build it with fit_real_space"),
        (lambda: get_data_space("binary", mean=[0.0]), "'binary' takes no parameters, got mean"),
        (lambda: space_from_record({"space": "real"}), "fitted to the training data"),
        (
            lambda: space_from_record({"space": "real", "scaling": {"mean": [0.0]}}),
            r"fitted to the training data.*\(got mean\)",
        ),
        (lambda: space_from_record({"space": "real", "scaling": [1]}), "must be a JSON object"),
        (lambda: space_from_record({"name": "x"}), "names no data space"),
        (
            lambda: space_from_record({"space": "real", "scaling": {"mean": [0.0, 1.0], "std": [1.0, 0.0]}}),
            "> 0.*column 1",
        ),
        (
            lambda: space_from_record({"space": "real", "scaling": {"mean": [0.0], "std": [1.0, 2.0]}}),
            "mean has 1 values",
        ),
        (lambda: space_from_record({"space": "real", "scaling": {"mean": ["a"], "std": [1.0]}}), "list of numbers"),
        (lambda: space_from_record({"space": "real", "scaling": {"mean": [], "std": []}}), "non-empty"),
        (lambda: RealSpace([0.0, float("nan")], [1.0, 1.0]), "mean is nan in column 1"),
    ],
)
def test_real_space_bad_records(call, message):
    with pytest.raises(ElboxError, match=message):
        call()


def test_numpy_float_tables_work_through_torch():
    x = np.random.default_rng(0).normal(size=(50, D)).astype(np.float32)
    space = fit_real_space([x])
    assert space.eval_data(torch.from_numpy(x)).shape == (50, D)

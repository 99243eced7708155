"""Encoder tightening and the gap split, checked on the linear-Gaussian model where log p(x) is exact."""

from __future__ import annotations

import pytest
import torch

from elbox.core.errors import ElboxError
from elbox.data import get_data_space, load_split
from elbox.evaluation.evaluator import evaluate
from elbox.evaluation.tighten import gap_split, refit_encoder
from elbox.models import LinearGaussian, build_model

SPACE = get_data_space("continuous")


@pytest.fixture(scope="module")
def perturbed_ppca():
    """PPCA fitted in closed form on the synthetic set (its W has orthogonal columns, so the exact posterior
    is a diagonal Gaussian), then with the amortized encoder's mean map knocked off the optimum."""
    torch.manual_seed(0)
    train, _ = load_split("synthetic", "train")
    model = build_model("linear", {"data_shape": (1, 28, 28), "latent_dim": 4, "encoder": "amortized"})
    model.fit(SPACE.eval_data(train, seed=0))
    with torch.no_grad():
        model.A.add_(0.02 * torch.randn_like(model.A))
    return model, train


def test_evaluate_reports_exact_nll_and_every_gap(perturbed_ppca):
    model, _ = perturbed_ppca
    test, _ = load_split("synthetic", "test")
    x = SPACE.eval_data(test[:100], seed=0)
    r = evaluate(model, x, iw_samples=[1, 10, 100])
    assert set(r["nll_iw_by_k"]) == {1, 10, 100}
    exact_gap = model.exact_gap(x).double().mean().item()
    # the ELBO is analytic here, so -ELBO - NLL_exact is the exact mean KL(q || p(z|x))
    assert r["gap_elbo"] == pytest.approx(exact_gap, rel=1e-3)
    assert r["gap_elbo"] > 1.0
    # IWAE tightens towards the exact NLL: the K = 100 gap is below the K = 1 gap, both >= 0 within 4 SE
    assert r["gap_iw_by_k"][100] < r["gap_iw_by_k"][1]
    assert r["gap_iw"] > -4 * r["gap_iw_stderr"]


def test_gap_split_finds_the_exact_posterior(perturbed_ppca):
    model, _ = perturbed_ppca
    test, _ = load_split("synthetic", "test")
    x = SPACE.eval_data(test[:40], seed=0)
    r = gap_split(model, x, steps=200, elbo_samples=200)
    assert r["log_px_source"] == "exact"
    # the best diagonal q is the exact posterior: the approximation gap vanishes (within 4 SE + 0.05 nats)
    assert abs(r["gap_approximation"]) < 4 * r["gap_approximation_stderr"] + 0.05
    # and the whole gap is amortization: the perturbed encoder is measurably off
    assert r["gap_amortization"] > 1.0
    assert r["gap_amortization"] == pytest.approx(r["gap_total"], abs=4 * r["gap_approximation_stderr"] + 0.05)


def test_refitting_the_encoder_never_increases_the_gap(perturbed_ppca):
    model, train = perturbed_ppca
    val, _ = load_split("synthetic", "validation")
    test, _ = load_split("synthetic", "test")
    val_x, test_x = SPACE.eval_data(val, seed=0), SPACE.eval_data(test, seed=0)
    refit, history = refit_encoder(model, train, val_x, SPACE, epochs=5, lr=1e-3)
    assert history[-1]["val_elbo"] > history[0]["val_elbo"]
    before = model.exact_gap(test_x).mean().item()
    after = refit.exact_gap(test_x).mean().item()
    assert after <= before and after < 0.2 * before
    # only the encoder moved
    for name in ("W", "b", "log_sigma"):
        assert torch.equal(getattr(refit, name), getattr(model, name))


def test_tightening_needs_an_amortized_gaussian_encoder():
    exact = LinearGaussian(10, 2, encoder="exact")
    with pytest.raises(ElboxError, match="amortized"):
        exact.posterior_params(torch.zeros(3, 10))

"""The printed evaluation table (elbox.evaluation.tables.format_table) for exact models and vectors: no bits/dim for
real vectors, no IWAE-K rows that merely repeat an exact log p(x), and the JSON result keeps every key."""

import json
import math

import pytest
import torch

from elbox.evaluation.evaluator import evaluate
from elbox.evaluation.tables import PRINTED_ZERO, format_table, iwae_equals_exact
from elbox.models import build_model

F64 = torch.float64


def two_clusters(n=300, d=3, seed=0):
    """Two Gaussian clusters 6 standard deviations apart, in d dimensions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    x[: n // 3] += 6.0
    return x


def rows(table):
    return [line.split("  ")[0] for line in table.splitlines()]


@pytest.fixture(scope="module")
def mixture_on_vectors():
    model = build_model("mixture", {"data_shape": [3], "n_components": 2})
    model.fit(two_clusters())
    return model


def test_exact_model_on_vectors_prints_no_bits_and_no_repeated_iwae(mixture_on_vectors):
    ks = [1, 10, 100]
    result = evaluate(mixture_on_vectors, two_clusters(100, seed=1).float(), iw_samples=ks)
    table = format_table(result)
    assert result["data_space"] == "real"
    assert "bits/dim" not in table and "bpd_" not in table
    assert "IWAE, K=" not in table and "NLL_K" not in table
    assert "NLL (exact)" in rows(table) and "ELBO" in rows(table) and "-ELBO - NLL_exact" in rows(table)
    assert "= NLL (exact) for K = 1, 10, 100" in table  # one row says why the IWAE rows are left out
    # the JSON result keeps every key its readers use (report, scripts, tests)
    for key in ("nll_exact", "elbo", "gap_elbo", "nll_iw", "nll_iw_by_k", "gap_iw_by_k", "bpd", "bpd_source"):
        assert key in result, key
    assert set(result["nll_iw_by_k"]) == set(ks)
    # the mixture's q is the exact posterior: every gap is float64 rounding, far below the printed precision
    assert all(abs(g) < 1e-9 for g in result["gap_iw_by_k"].values()) and abs(result["gap_elbo"]) < 1e-9


def test_the_table_of_a_saved_json_result(mixture_on_vectors):
    """`elbox evaluate --json` writes the result; elbox report formats it again with string keys."""
    result = json.loads(json.dumps(evaluate(mixture_on_vectors, two_clusters(50, seed=2).float(), iw_samples=[1, 4])))
    table = format_table(result)
    assert "bits/dim" not in table and "IWAE, K=" not in table and "K = 1, 4" in table


def test_an_older_result_without_data_space_keeps_its_bits_per_dim(mixture_on_vectors):
    result = evaluate(mixture_on_vectors, two_clusters(50, seed=3).float(), iw_samples=[1])
    del result["data_space"]
    assert "bits/dim" in format_table(result)


def test_exact_model_on_images_prints_bits_per_dim():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, 4, 4, generator=g)  # in [0, 1], like dequantized 8-bit images
    for name, config in (("gaussian", {}), ("mixture", {"n_components": 2, "covariance": "diag"})):
        model = build_model(name, {"data_shape": [1, 4, 4], **config})
        model.fit(x.double())
        assert model.data_space == "continuous"
        offset = -16 * math.log(256)
        result = evaluate(model, x, offset, iw_samples=[1, 10])
        table = format_table(result)
        assert "bits/dim" in rows(table) and result["bpd"] > 0, name
        assert result["bpd"] == pytest.approx(result["nll_exact"] / (16 * math.log(2)))
        assert "IWAE, K=" not in table  # the Gaussian has no latent; the mixture's IWAE rows equal log p(x)


def test_an_inexact_posterior_keeps_its_iwae_rows():
    torch.manual_seed(0)
    model = build_model("linear", {"data_shape": [3], "latent_dim": 1, "fit": "elbo"})
    with torch.no_grad():  # an untrained amortized q(z|x): far from the exact posterior
        for p in model.parameters():
            p.normal_()
    result = evaluate(model, two_clusters(100).float(), iw_samples=[1, 10])
    table = format_table(result)
    # the gap -ELBO - NLL_exact is the mean KL(q || p(z|x)); it is many standard errors above 0 here
    assert result["gap_elbo"] > 4 * result["gap_elbo_stderr"]
    assert not iwae_equals_exact(result)
    for row in ("NLL (IWAE, K=1)", "NLL (IWAE, K=10)", "NLL_K - NLL_exact (K=10)", "-ELBO - NLL_K (K=10)"):
        assert row in rows(table), row
    assert "bits/dim" not in table  # vectors all the same


@pytest.mark.parametrize(
    "gap, stderr, hidden", [(0.0, 0.0, True), (-1e-4, 2e-4, True), (2e-3, 1e-4, False), (1e-4, 1e-3, False)]
)
def test_iwae_rows_are_left_out_only_when_they_print_as_the_exact_value(gap, stderr, hidden):
    result = {
        "n_examples": 10,
        "nll_exact": 5.0,
        "nll_exact_stderr": 0.1,
        "nll_iw_by_k": {1: 5.0 + gap},
        "nll_iw_stderr_by_k": {1: 0.1},
        "gap_iw_by_k": {1: gap},
        "gap_iw_stderr_by_k": {1: stderr},
    }
    assert iwae_equals_exact(result) is hidden
    assert ("NLL (IWAE, K=1)" not in format_table(result)) is hidden
    assert PRINTED_ZERO == 5e-4  # half the last printed digit of 3-decimal nats

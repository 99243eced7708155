"""Anomaly scores and out-of-distribution detection (issue 29): each score against a direct computation from its
definition on small models, the detection metrics against hand-computed values and scikit-learn, the calibration of
the p-values, the command line, and its errors."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from conftest import two_tone_images
from PIL import Image
from scipy import stats

import elbox
from elbox.cli.main import main
from elbox.data import get_data_space
from elbox.data.spaces import perturbed_images
from elbox.evaluation.anomaly import AnomalyScorer, ScoreSettings, p_values, png_bits
from elbox.evaluation.detection import detection_metrics
from elbox.evaluation.inference import model_inputs
from elbox.evaluation.tighten import gaussian_q_elbo, likelihood_regret
from elbox.models import build_model

SHAPE = (1, 6, 6)
HVAES = {
    "markov": {"data_shape": list(SHAPE), "hvae_type": "markov", "latent_dims": [3, 2], "hidden_dims": [16]},
    "markov-3": {
        "data_shape": list(SHAPE),
        "hvae_type": "markov",
        "levels": 3,
        "latent_dims": [4, 3, 2],
        "hidden_dims": [16],
    },
    "mlp-ladder": {
        "data_shape": list(SHAPE),
        "hvae_type": "mlp-ladder",
        "latent_dims": [3, 2],
        "levels": 2,
        "hidden_dims": [16],
    },
    "skip": {"data_shape": list(SHAPE), "hvae_type": "skip", "latent_dims": [3, 2], "hidden_dims": [16]},
}


def images(n: int, seed: int = 0) -> torch.Tensor:
    return (torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)


def binary_images(n: int, seed: int = 0) -> torch.Tensor:
    return 255 * (torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) < 0.3).to(torch.uint8)


def hvae(kind: str):
    torch.manual_seed(0)
    return build_model("hvae", HVAES[kind]).eval()


def scorer(model, methods, **settings) -> AnomalyScorer:
    return AnomalyScorer(model, get_data_space(model.data_space), methods, ScoreSettings(**settings))


# -- LLR^{>k} ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(HVAES))
def test_llr_with_k_0_is_zero_and_llr_k_is_the_bound_difference(kind):
    model, x = hvae(kind), binary_images(5)
    assert torch.equal(
        scorer(model, ["llr"], iw_samples=7, llr_k=0).scores(x)["llr"], torch.zeros(5, dtype=torch.float64)
    )
    s = scorer(model, ["llr", "likelihood"], iw_samples=7, llr_k=model.config.levels)
    found = s.scores(x)
    # L^{>T}: every level from the prior, so log mean_s p(x|z_s), z_s ~ p(z): the prior-sampling estimate
    assert torch.isfinite(found["llr"]).all() and not torch.equal(found["llr"], torch.zeros(5, dtype=torch.float64))


def test_markov_bound_above_k_matches_a_direct_computation():
    """L^{>1} of a 2-level chain, one draw: z1 ~ q(z1|x), z2 ~ q(z2|z1), then z1' ~ p(z1|z2): log p(x|z1') +
    log p(z2) - log q(z2|z1)."""
    model, x = hvae("markov"), binary_images(4).float() / 255
    with torch.no_grad():
        torch.manual_seed(3)
        found = model.log_weights_above_sampler(x, 1)(1)[0]
        torch.manual_seed(3)
        mean1, std1 = model._posterior(0, x)
        z1 = mean1 + std1 * torch.randn(1, *mean1.shape)
        mean2, std2 = model._posterior(1, z1)
        z2 = mean2 + std2 * torch.randn_like(mean2)
        prior_mean, prior_std = model._prior(0, z2)
        z1_prior = prior_mean + prior_std * torch.randn_like(prior_mean)
        logits = model.decode(z1_prior)[:, :, 0]
        expected = (
            torch.distributions.Bernoulli(logits=logits).log_prob(x).flatten(2).sum(-1)
            + torch.distributions.Normal(0, 1).log_prob(z2).sum(-1)
            - torch.distributions.Normal(mean2, std2).log_prob(z2).sum(-1)
        )[0]
    assert torch.allclose(found, expected, atol=1e-4)


def test_skip_bound_above_1_matches_a_direct_computation():
    model, x = hvae("skip"), binary_images(4).float() / 255
    with torch.no_grad():
        torch.manual_seed(5)
        found = model.log_weights_above_sampler(x, 1)(2)
        torch.manual_seed(5)
        mean2, std2 = model.posterior_top(x)
        z2 = mean2 + std2 * torch.randn(2, *mean2.shape)
        prior_mean, prior_std = model.prior(1, z2)
        z1 = prior_mean + prior_std * torch.randn_like(prior_mean)
        logits = model.decode_levels(z1, z2)[:, :, 0]
        expected = (
            torch.distributions.Bernoulli(logits=logits).log_prob(x).flatten(2).sum(-1)
            + torch.distributions.Normal(0, 1).log_prob(z2).sum(-1)
            - torch.distributions.Normal(mean2, std2).log_prob(z2).sum(-1)
        )
    assert torch.allclose(found, expected, atol=1e-4)


# -- complexity, typicality, regret, background --------------------------------------------------------------------


def png_length(array: np.ndarray, mode: str | None = None) -> int:
    """Bytes of the PNG Pillow writes for an array (compression level 9)."""
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG", compress_level=9)
    return len(buffer.getvalue())


def test_png_bits_is_the_length_of_pillows_png_in_bits():
    x = images(3)
    for i in range(3):
        assert png_bits(x)[i].item() == 8 * png_length(x[i, 0].numpy())
    bits = x > 128
    assert png_bits(bits, one_bit=True)[2].item() == 8 * png_length(bits[2, 0].numpy())
    rgb = (torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    assert png_bits(rgb)[1].item() == 8 * png_length(rgb[1].permute(1, 2, 0).numpy(), "RGB")


def test_complexity_is_the_nll_in_bits_less_the_png_length_of_what_the_model_reads():
    model, x = hvae("markov"), images(4)  # grey images: a binary model reads their binarizations
    s = scorer(model, ["likelihood", "complexity"], iw_samples=5, binarizations=3)
    found = s.scores(x)
    rows, counts, _ = model_inputs(x, get_data_space("binary"), 0, 3)
    code = torch.tensor([8.0 * png_length(r[0].numpy().astype(bool)) for r in rows]).reshape(4, 3).mean(1)
    assert torch.allclose(found["complexity"], found["likelihood"] / math.log(2) - code, atol=1e-9)


def test_typicality_is_the_distance_to_the_reference_mean_nll():
    model = hvae("markov")
    reference, x = binary_images(30, seed=1), binary_images(6, seed=2)
    s = scorer(model, ["typicality"], iw_samples=5)
    s.fit_reference(reference)
    found = s.scores(x)["typicality"]
    entropy = -elbox.score(model, reference, iw_samples=5)[0].mean()  # the same per-example seeds as the scorer's
    nll = -elbox.score(model, x, iw_samples=5)[0]
    assert torch.allclose(found, (nll - entropy).abs(), atol=1e-9)


def test_the_likelihood_score_is_elbox_scores_negative_log_likelihood():
    model, x = hvae("skip"), images(5)
    found = scorer(model, ["likelihood"], iw_samples=6, binarizations=2).scores(x)["likelihood"]
    assert torch.equal(found, -elbox.score(model, x, iw_samples=6, binarizations=2)[0])


def test_regret_is_the_elbo_gain_of_a_per_example_q_and_never_negative():
    torch.manual_seed(0)
    model = build_model("vae", {"data_shape": list(SHAPE), "latent_dim": 2, "hidden_dims": [8]}).eval()
    x = binary_images(6).float() / 255
    torch.manual_seed(1)
    regret = likelihood_regret(model, x, steps=30)
    assert (regret >= 0).all() and (regret > 0).any()
    # by hand: the refit q, then both ELBOs on the same 64 draws
    from elbox.evaluation.tighten import REFIT_SAMPLES, optimize_per_example_q

    torch.manual_seed(1)
    mean, std = optimize_per_example_q(model, x, 30, 0.05, REFIT_SAMPLES)
    state = torch.random.get_rng_state()
    with torch.no_grad():
        fitted = gaussian_q_elbo(model, x, mean, std, 64)
        torch.random.set_rng_state(state)
        amortized = gaussian_q_elbo(model, x, *model.posterior_params(x), 64)
    assert torch.allclose(regret, (fitted - amortized).double(), atol=1e-4)


def test_an_examples_regret_does_not_depend_on_the_examples_refit_with_it():
    """The scorer refits many examples at once, each with draws from its own generator (SeededNoise): an example's
    regret alone equals its regret in a batch, up to float32 rounding of the batched products."""
    torch.manual_seed(0)
    model = build_model("vae", {"data_shape": list(SHAPE), "latent_dim": 2, "hidden_dims": [8]}).eval()
    x = images(5)  # grey images: 3 binarizations each
    together = scorer(model, ["regret"], regret_steps=20, binarizations=3).scores(x)["regret"]
    alone = torch.cat(
        [scorer(model, ["regret"], regret_steps=20, binarizations=3).scores(x[i : i + 1])["regret"] for i in (4, 0, 2)]
    )
    assert torch.allclose(alone, together[[4, 0, 2]], atol=1e-4)
    assert (together >= 0).all() and together.unique().numel() == 5


def test_background_score_is_the_log_likelihood_ratio():
    model = hvae("markov")
    torch.manual_seed(9)
    background = build_model("hvae", HVAES["markov"]).eval()
    x = images(4)
    s = AnomalyScorer(model, get_data_space("binary"), ["background"], ScoreSettings(iw_samples=4), background)
    expected = elbox.score(background, x, iw_samples=4)[0] - elbox.score(model, x, iw_samples=4)[0]
    assert torch.allclose(s.scores(x)["background"], expected, atol=1e-9)


def test_perturbation_replaces_about_rate_of_the_values_with_uniform_ones():
    x = torch.zeros(200, 1, 10, 10, dtype=torch.uint8)
    out = perturbed_images(x, 0.2, torch.Generator().manual_seed(0), None)
    # a value is changed with probability 0.2 * 255/256 (a uniform draw can be 0 again); s.e. of the fraction over
    # 20,000 values is sqrt(p (1 - p) / 20000) = 0.0028: 4 s.e.
    p = 0.2 * 255 / 256
    assert abs((out != 0).double().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / out.numel())
    assert out.max() > 250 and torch.equal(perturbed_images(x, 0.2, torch.Generator().manual_seed(0), None), out)


# -- metrics and p-values ------------------------------------------------------------------------------------------


def test_detection_metrics_match_hand_computed_values_and_scikit_learn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    inliers, outliers = torch.tensor([0.1, 0.4, 0.35]), torch.tensor([0.8, 0.3])
    m = detection_metrics(inliers, outliers, bootstrap=20)
    # AUROC = P(outlier > inlier) over the 6 pairs: 0.8 beats all 3, 0.3 beats 0.1 -> 4/6
    assert m["auroc"] == pytest.approx(4 / 6)
    # 80 % TPR needs both outliers flagged: threshold 0.3 flags the inliers 0.4 and 0.35 -> FPR 2/3; 95 % the same
    assert m["fpr80"] == pytest.approx(2 / 3) and m["fpr95"] == pytest.approx(2 / 3)
    # AP: ranked 0.8 (out), 0.4, 0.35, 0.3 (out), 0.1 -> precision at the two recalls 1 and 2/4: (1 + 0.5) / 2
    assert m["auprc"] == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 300), rng.normal(1, 1, 200)
    m = detection_metrics(torch.tensor(a), torch.tensor(b), bootstrap=50)
    labels = np.r_[np.zeros(300), np.ones(200)]
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, np.r_[a, b]))
    assert m["auprc"] == pytest.approx(average_precision_score(labels, np.r_[a, b]))
    # the bootstrap s.e. of an AUROC near 0.76 with 300 and 200 examples: about 0.02 (Hanley & McNeil 1982)
    assert 0.01 < m["auroc_stderr"] < 0.04


def test_p_values_count_the_reference_at_least_as_extreme():
    reference = torch.tensor([1.0, 2.0, 3.0, 4.0])
    found = p_values(torch.tensor([0.5, 2.0, 4.0, 9.0]), reference)
    assert torch.allclose(found, torch.tensor([5 / 5, 4 / 5, 2 / 5, 1 / 5], dtype=torch.float64))


def test_p_values_of_held_out_normal_data_are_uniform(tmp_path):
    """A Gaussian fitted to a table; held-out rows drawn like the reference. Their p-values are ranks among the
    reference's scores, so p is uniform exactly when the held-out scores and the reference's have one distribution:
    a two-sample Kolmogorov-Smirnov test (the one-sample test against U(0, 1) would ignore that all the p-values share
    one reference set). And p < 0.01 flags about 1 % of the held-out rows."""
    rng = np.random.default_rng(0)
    rows = rng.normal(0, 1, (10_000, 3)) @ np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 2.0]]) + 5
    for name, part in (("train", rows[:2000]), ("reference", rows[2000:6000]), ("held_out", rows[6000:])):
        (tmp_path / f"{name}.csv").write_text("a,b,c\n" + "\n".join(",".join(f"{v:.6f}" for v in r) for r in part))
    run = elbox.fit("gaussian", str(tmp_path / "train.csv"), out=tmp_path / "run", progress=False, verbose=False)
    methods, reference = ["likelihood", "typicality"], str(tmp_path / "reference.csv")
    scores, p, _ = elbox.anomaly_scores(
        run.directory, str(tmp_path / "held_out.csv"), methods, reference=reference, reference_limit=None
    )
    reference_scores, _, _ = elbox.anomaly_scores(
        run.directory, reference, methods, reference=reference, reference_limit=None
    )
    for method in methods:
        assert stats.ks_2samp(scores[method].numpy(), reference_scores[method].numpy()).pvalue > 0.01
        # the flagged fraction varies with the held-out rows (binomial, 4000) and with the reference's 99th
        # percentile (4000 rows): s.e. sqrt(2 * 0.01 * 0.99 / 4000) = 0.0022; within 3 s.e.
        assert abs((p[method] < 0.01).double().mean().item() - 0.01) < 3 * 0.0022


# -- elbox ood and elbox score --method ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hvae_run(tmp_path_factory):
    """A 2-level HVAE trained briefly on 8 x 8 images, and files of inliers and outliers."""
    root = tmp_path_factory.mktemp("ood")
    rng = np.random.default_rng(0)
    smooth = two_tone_images(rng, 600)  # the outliers are uniform noise
    np.save(root / "train.npy", smooth[:400])
    np.save(root / "inliers.npy", smooth[400:])
    np.save(root / "noise.npy", rng.integers(0, 256, (150, 8, 8), dtype=np.uint8))
    np.save(root / "other_shape.npy", rng.integers(0, 256, (20, 10, 10), dtype=np.uint8))
    np.save(root / "empty.npy", np.zeros((0, 8, 8), dtype=np.uint8))
    elbox.fit(
        "hvae",
        str(root / "train.npy"),
        out=root / "hvae",
        latent_dims=[4, 2],
        hidden_dims=[32],
        epochs=3,
        batch_size=50,
        beta_schedule="constant",
        progress=False,
        verbose=False,
        samples=False,
    )
    elbox.fit(
        "vae",
        str(root / "train.npy"),
        out=root / "vae",
        latent_dim=2,
        hidden_dims=[16],
        epochs=2,
        batch_size=50,
        progress=False,
        verbose=False,
        samples=False,
    )
    elbox.fit(
        "vae",
        str(root / "other_shape.npy"),
        out=root / "vae10",
        latent_dim=2,
        hidden_dims=[8],
        epochs=1,
        batch_size=10,
        progress=False,
        verbose=False,
        samples=False,
        validation_fraction=0,
    )
    return root


def test_ood_command_reports_every_applicable_score_and_writes_json_and_figure(hvae_run, capsys):
    root = hvae_run
    code = main(
        [
            "ood",
            str(root / "hvae"),
            "--outliers",
            str(root / "noise.npy"),
            "--inliers",
            str(root / "inliers.npy"),
            "--iw-samples",
            "4",
            "--bootstrap",
            "20",
            "--no-progress",
        ]
    )
    assert code == 0
    result = json.loads((root / "hvae" / "ood.json").read_text())
    assert set(result["methods"]) == {"likelihood", "complexity", "typicality", "llr"}
    for figures in result["methods"].values():
        assert {"auroc", "auroc_stderr", "auprc", "fpr80", "fpr95"} <= set(figures)
    # noise is far from smooth gradients: the likelihood tells them apart
    assert result["methods"]["likelihood"]["auroc"] > 0.9
    assert result["sets"]["outliers"]["n"] == 150 and result["sets"]["inliers"]["n"] == 200
    assert (root / "hvae" / "ood.png").read_bytes().startswith(b"\x89PNG")
    assert "AUROC" in capsys.readouterr().out
    # the report shows it: the table and the histograms
    assert main(["report", str(root / "hvae")]) == 0
    page = (root / "hvae" / "report.html").read_text()
    assert "Out-of-distribution detection" in page and "llr" in page
    assert (root / "hvae" / "report" / "out-of-distribution-detection.png").read_bytes().startswith(b"\x89PNG")


def test_score_with_methods_adds_scores_and_p_values_as_columns(hvae_run, tmp_path):
    root = hvae_run
    out = tmp_path / "scores.csv"
    assert (
        main(
            [
                "score",
                str(root / "hvae"),
                "--input",
                str(root / "noise.npy"),
                "--method",
                "llr",
                "complexity",
                "--iw-samples",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 150
    for method in ("llr", "complexity"):
        p = np.array([float(r[f"p_value_{method}"]) for r in rows])
        assert ((p > 0) & (p <= 1)).all()
        assert all(math.isfinite(float(r[f"anomaly_{method}"])) for r in rows)
    # the file is elbox's own: scoring again replaces it
    assert (
        main(["score", str(root / "hvae"), "--input", str(root / "noise.npy"), "--iw-samples", "2", "--out", str(out)])
        == 0
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--outliers", "{root}/other_shape.npy"], "shape"),
        (["--outliers", "{root}/empty.npy"], "is empty"),
        (["--outliers", "{root}/noise.npy", "--methods", "regret"], "regret measures how far a per-example q"),
        (["--outliers", "{root}/noise.npy", "--methods", "background"], "background needs a second run"),
        (
            ["--outliers", "{root}/noise.npy", "--methods", "llr", "--llr-k", "3"],
            "more than the model's 2 latent levels",
        ),
        (
            ["--outliers", "{root}/noise.npy", "--background", "{root}/vae10"],
            "background model takes examples of shape",
        ),
    ],
)
def test_ood_errors_are_one_clear_line(hvae_run, capsys, argv, message):
    argv = [a.format(root=hvae_run) for a in argv]
    code = main(
        [
            "ood",
            str(hvae_run / "hvae"),
            "--inliers",
            str(hvae_run / "inliers.npy"),
            *argv,
            "--iw-samples",
            "2",
            "--json",
            str(hvae_run / "error.json"),
        ]
    )
    err = capsys.readouterr().err
    assert code != 0 and message in err and err.count("\n") == 1, err
    assert not (hvae_run / "error.json").exists()


def test_llr_on_a_one_level_vae_says_which_models_it_needs(hvae_run, capsys):
    code = main(["score", str(hvae_run / "vae"), "--input", str(hvae_run / "noise.npy"), "--method", "llr"])
    err = capsys.readouterr().err
    assert code == 1 and "needs a hierarchical VAE (the hvae model)" in err


def test_vae_ood_includes_the_likelihood_regret(hvae_run):
    result = elbox.ood(
        hvae_run / "vae",
        str(hvae_run / "noise.npy"),
        inliers=str(hvae_run / "inliers.npy"),
        reference=str(hvae_run / "train.npy"),
        iw_samples=2,
        regret_steps=5,
        limit=20,
        bootstrap=5,
    )
    assert set(result["methods"]) == {"likelihood", "complexity", "typicality", "regret"}
    assert min(result["scores"]["regret"]["outliers"]["score"]) >= 0


def test_regret_applies_where_an_encoder_can_have_an_amortization_gap():
    """The linear model's best diagonal q is linear in x, which its encoder represents exactly: no regret to measure
    (it was AUROC 0.5 by construction)."""
    from elbox.evaluation.anomaly import applicable_methods, why_not_applicable

    shape = {"data_shape": [1, 4, 4], "latent_dim": 2}
    for encoder in ("exact", "amortized"):
        linear = build_model("linear", {**shape, "encoder": encoder})
        assert "regret" not in applicable_methods(linear)
        assert "linear in x" in why_not_applicable(linear, "regret")
    assert "regret" in applicable_methods(build_model("vae", {**shape, "hidden_dims": [8]}))

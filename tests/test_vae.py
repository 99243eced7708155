"""Tests for elbox.models.vae: shapes and ranges, the ELBO's estimators against each other, IWAE >= ELBO,
gradients, and the config."""

import dataclasses
import json
import math
import re

import pytest
import torch

from elbox.cli.main import main
from elbox.core.bounds import iwae_bound
from elbox.core.errors import ElboxError
from elbox.core.options import config_from_dict, config_to_dict
from elbox.models import VAE, VAEConfig, build_model
from elbox.models.likelihoods import LIKELIHOODS

F64 = torch.float64
DATA_SHAPE = (1, 8, 8)
LATENT = 3


def small_config(architecture="mlp", likelihood="bernoulli", **extra):
    return dict(
        data_shape=list(DATA_SHAPE),
        latent_dim=LATENT,
        hidden_dims=[16],
        architecture=architecture,
        **({"conv_channels": [4, 8]} if architecture == "conv" else {}),
        likelihood=likelihood,
        **extra,
    )


def make_model(architecture="mlp", likelihood="bernoulli", seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return build_model("vae", small_config(architecture, likelihood)).to(dtype)


def make_data(likelihood, b, seed=0, dtype=torch.float32):
    """A batch in the data space the likelihood expects."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 256, (b, *DATA_SHAPE), generator=g).to(dtype)
    space = LIKELIHOODS[likelihood].data_space
    if space == "binary":
        return (levels > 127).to(dtype)
    if space == "continuous":
        return (levels + torch.rand(levels.shape, generator=g, dtype=dtype)) / 256
    return levels / 255


ARCHS = ["mlp", "conv"]
NAMES = sorted(LIKELIHOODS)


# ----------------------------------------------------------------------------------------------
# Shapes, ranges, the ELBO decomposition


@pytest.mark.parametrize("architecture", ARCHS)
@pytest.mark.parametrize("likelihood", NAMES)
def test_interface_shapes_and_ranges(architecture, likelihood):
    model = make_model(architecture, likelihood)
    assert isinstance(model, VAE)
    assert model.data_space == LIKELIHOODS[likelihood].data_space
    b = 4
    x = make_data(likelihood, b)
    model.likelihood.check_data(x)

    terms = model.elbo(x)
    assert terms.reconstruction.shape == (b,)
    assert set(terms.kl) == {"z"} and terms.kl["z"].shape == (b,)
    assert terms.elbo.shape == (b,)
    assert torch.isfinite(terms.elbo).all()
    torch.testing.assert_close(terms.elbo, terms.reconstruction - sum(terms.kl.values()))
    assert (terms.kl["z"] >= 0).all()

    terms3 = model.elbo(x, n_samples=3, analytic_kl=False)
    assert terms3.elbo.shape == (b,) and torch.isfinite(terms3.elbo).all()

    log_w = model.log_weights(x, 5)
    assert log_w.shape == (5, b)
    assert torch.isfinite(log_w).all()

    z = model.encode(x)
    assert z.shape == (b, LATENT)
    mean, std = model.posterior_params(x)
    torch.testing.assert_close(z, mean)
    assert (std >= model.config.min_std).all()

    recon = model.reconstruct(x)
    assert recon.shape == x.shape
    assert recon.min() >= 0 and recon.max() <= 1

    for as_mean in (True, False):
        samples = model.sample(6, mean=as_mean)
        assert samples.shape == (6, *DATA_SHAPE)
        assert torch.isfinite(samples).all()
        assert samples.min() >= 0 and samples.max() <= 1
    model.likelihood.check_data(model.sample(6, mean=False))  # draws lie in the data space
    with pytest.raises(ElboxError):
        model.sample(0)


@pytest.mark.parametrize("architecture", ARCHS)
def test_analytic_kl_is_the_diagonal_gaussian_formula(architecture):
    model = make_model(architecture, "gaussian", dtype=F64)
    x = make_data("gaussian", 5, dtype=F64)
    mean, std = model.posterior_params(x)
    expected = 0.5 * (std.square() + mean.square() - 1 - 2 * std.log()).sum(-1)
    torch.testing.assert_close(model.elbo(x).kl["z"], expected, rtol=1e-12, atol=1e-12)


def test_reconstruction_term_is_likelihood_at_posterior_samples():
    """With a (near-)deterministic posterior, the reconstruction term is log p(x | z = mean)."""
    model = make_model("mlp", "gaussian", dtype=F64)
    model.config.min_std = 1e-12
    x = make_data("gaussian", 4, dtype=F64)
    with torch.no_grad():
        last = model.encoder[-1][-1]  # final Linear layer: std = softplus(raw) + min_std
        last.weight[LATENT:] = 0
        last.bias[LATENT:] = -60.0  # softplus(-60) ~ 1e-26
    mean, std = model.posterior_params(x)
    assert std.max() < 2e-12
    expected = model.likelihood.log_prob(model.decode(mean), x)
    torch.testing.assert_close(model.elbo(x, n_samples=2).reconstruction, expected, rtol=1e-10, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# Estimators against each other (fixed model, fixed seed)


def per_example_elbo_draws(model, x, n, analytic_kl):
    """[n, B] independent single-sample ELBO estimates: the batch tiled n times, one draw per row."""
    reps = (n,) + (1,) * (x.dim() - 1)
    with torch.no_grad():
        return model.elbo(x.repeat(*reps), n_samples=1, analytic_kl=analytic_kl).elbo.view(n, x.shape[0])


def mean_se(values):
    """Per-example mean over dim 0 and its standard error std / sqrt(n)."""
    return values.mean(0), values.std(0) / math.sqrt(values.shape[0])


@pytest.mark.parametrize("architecture, likelihood", [("mlp", "bernoulli"), ("mlp", "gaussian"), ("conv", "bernoulli")])
def test_analytic_and_monte_carlo_kl_agree(architecture, likelihood):
    model = make_model(architecture, likelihood, seed=1, dtype=F64)
    x = make_data(likelihood, 4, seed=1, dtype=F64)
    torch.manual_seed(2)
    n = 3000
    analytic, se_a = mean_se(per_example_elbo_draws(model, x, n, analytic_kl=True))
    mc, se_m = mean_se(per_example_elbo_draws(model, x, n, analytic_kl=False))
    # tolerance: 4 standard errors of the difference of two independent means
    assert ((analytic - mc).abs() < 4 * (se_a.square() + se_m.square()).sqrt()).all(), (analytic, mc, se_a, se_m)
    # the two really are different estimators (the MC KL has its own noise)
    with torch.no_grad():
        t1 = model.elbo(x, analytic_kl=False)
    mean, std = model.posterior_params(x)
    analytic_kl = 0.5 * (std.square() + mean.square() - 1 - 2 * std.log()).sum(-1)
    assert not torch.allclose(t1.kl["z"], analytic_kl)


@pytest.mark.parametrize("architecture, likelihood", [("mlp", "bernoulli"), ("conv", "discretized-logistic")])
def test_mean_log_weight_is_the_elbo(architecture, likelihood):
    model = make_model(architecture, likelihood, seed=3, dtype=F64)
    x = make_data(likelihood, 4, seed=3, dtype=F64)
    torch.manual_seed(4)
    n = 3000
    with torch.no_grad():
        log_w = model.log_weights(x, n)
    lw_mean, lw_se = mean_se(log_w)
    elbo, elbo_se = mean_se(per_example_elbo_draws(model, x, n, analytic_kl=True))
    # tolerance: 4 standard errors of the difference of two independent means
    assert ((lw_mean - elbo).abs() < 4 * (lw_se.square() + elbo_se.square()).sqrt()).all(), (
        lw_mean,
        elbo,
        lw_se,
        elbo_se,
    )


def test_log_weights_formula():
    """log w = log p(x|z) + log N(z; 0, I) - log N(z; mean, std^2) for the z the model drew (same seed)."""
    model = make_model("mlp", "gaussian-learned", seed=5, dtype=F64)
    x = make_data("gaussian-learned", 3, seed=5, dtype=F64)
    torch.manual_seed(6)
    with torch.no_grad():
        log_w = model.log_weights(x, 7)
        mean, std = model.posterior_params(x)
    torch.manual_seed(6)
    z = mean + std * torch.randn(7, *mean.shape, dtype=F64)
    normal = torch.distributions.Normal
    with torch.no_grad():
        expected = (
            model.likelihood.log_prob(model.decode(z), x)
            + normal(0.0, 1.0).log_prob(z).sum(-1)
            - normal(mean, std).log_prob(z).sum(-1)
        )
    torch.testing.assert_close(log_w, expected, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("architecture, likelihood", [("mlp", "bernoulli"), ("conv", "gaussian")])
def test_iwae_is_above_the_elbo(architecture, likelihood):
    model = make_model(architecture, likelihood, seed=7, dtype=F64)
    b = 4
    x = make_data(likelihood, b, seed=7, dtype=F64)
    torch.manual_seed(8)
    repeats, k = 20, 50
    reps = (repeats,) + (1,) * (x.dim() - 1)
    x_rep = x.repeat(*reps)
    with torch.no_grad():
        iwae = iwae_bound(lambda n: model.log_weights(x_rep, n), k, 25).view(repeats, b)  # [R, B]
    elbo = per_example_elbo_draws(model, x, 1000, analytic_kl=True)  # [N, B]
    gap = iwae.mean() - elbo.mean()
    # SE of the difference of the two means over examples, from the within-example spreads
    se = math.sqrt(((iwae.var(0) / repeats).sum() + (elbo.var(0) / elbo.shape[0]).sum()).item()) / b
    assert gap > -4 * se, (gap, se)
    # at random initialization the posterior is far from the truth: the gain is well beyond the noise
    assert gap > 4 * se, (gap, se)


# ----------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("architecture", ARCHS)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian-learned"])
def test_gradients_reach_encoder_and_decoder(architecture, likelihood):
    model = make_model(architecture, likelihood, seed=9)
    x = make_data(likelihood, 4, seed=9)
    for analytic_kl in (True, False):
        model.zero_grad(set_to_none=True)
        (-model.elbo(x, analytic_kl=analytic_kl).elbo.mean()).backward()
        for part in (model.encoder, model.decoder):
            grads = [p.grad for p in part.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert all(g.abs().sum() > 0 for g in grads)
        if likelihood == "gaussian-learned":
            assert model.likelihood.raw_sigma.grad is not None
            assert model.likelihood.raw_sigma.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# Config


def test_unknown_config_key_is_rejected():
    with pytest.raises(ElboxError, match="latent_dimension"):
        build_model("vae", {**small_config(), "latent_dimension": 5})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("latent_dim", 0, "latent_dim"),
        ("latent_dim", -3, "latent_dim"),
        ("architecture", "transformer", "architecture"),
        ("hidden_dims", [16, 0], "hidden_dims"),
        ("min_std", 0.0, "min_std"),
        ("data_shape", [8, 8], "data_shape"),
        ("conv_channels", [], "conv_channels"),
    ],
)
def test_invalid_config_values_are_rejected(key, value, message):
    config = {**small_config("conv"), key: value}
    with pytest.raises(ElboxError, match=message):
        build_model("vae", config)


def test_bad_names_are_rejected():
    with pytest.raises(ElboxError, match="poisson"):
        build_model("vae", small_config(likelihood="poisson"))
    with pytest.raises(ElboxError, match="vq-vae"):
        build_model("vq-vae", small_config())
    with pytest.raises(ElboxError):
        build_model("vae", {**small_config(), "activation": "sigmoidish"})
    with pytest.raises(ElboxError):
        build_model("vae", {**small_config("conv"), "data_shape": [1, 6, 6]})  # not divisible by 4
    with pytest.raises(ElboxError):
        config_from_dict(VAEConfig, [("latent_dim", 3)])


def test_config_round_trip():
    config = VAEConfig(
        data_shape=(3, 16, 16),
        latent_dim=7,
        hidden_dims=[64, 32],
        architecture="conv",
        conv_channels=[8, 16],
        activation="gelu",
        likelihood="discretized-logistic",
        n_mixtures=2,
        min_std=1e-3,
    )
    values = config_to_dict(config)
    assert values["latent_dim"] == 7 and values["n_mixtures"] == 2 and "likelihood_options" not in values
    assert config_from_dict(VAEConfig, values) == config
    # through JSON (tuples become lists)
    restored = config_from_dict(VAEConfig, json.loads(json.dumps(values)))
    assert restored == config
    assert restored.data_shape == (3, 16, 16)
    # every field survives
    for field in dataclasses.fields(VAEConfig):
        assert getattr(restored, field.name) == getattr(config, field.name)
    model = build_model("vae", json.loads(json.dumps(values)))
    assert model.config == config
    assert model.likelihood.n_mixtures == 2
    assert model.decode(torch.zeros(2, 7)).shape == (2, 6, 3, 16, 16)


def test_non_integer_latent_dim_is_rejected():
    with pytest.raises(ElboxError, match="latent_dim"):
        build_model("vae", {**small_config(), "latent_dim": 2.5})


def test_null_likelihood_options_is_rejected():
    with pytest.raises(ElboxError, match="likelihood_options"):
        build_model("vae", {**small_config(), "likelihood_options": None})


def test_likelihood_options_of_older_configs_become_fields():
    """Configs written before sigma and n_mixtures were fields kept them in "likelihood_options"."""
    model = build_model(
        "vae", {**small_config(), "likelihood": "discretized-logistic", "likelihood_options": {"n_mixtures": 3}}
    )
    assert model.config.n_mixtures == 3 and model.likelihood.n_mixtures == 3


@pytest.mark.parametrize("prior, inexact", [("standard", []), ("vamp", ["z"])])
def test_elbo_terms_say_whether_the_kl_is_exact(prior, inexact):
    """The standard prior's KL is analytic; the VampPrior's is the single-sample estimate log q - log p."""
    torch.manual_seed(0)
    model = build_model("vae", {"latent_dim": 3, "hidden_dims": [8], "data_shape": (1, 8, 8), "prior": prior})
    x = (torch.rand(2, 1, 8, 8) < 0.3).float()
    assert model.elbo(x).inexact_kl == model.inexact_kl_terms == set(inexact)
    assert model.importance_samples(x, 2).terms.inexact_kl == set(inexact)


@pytest.mark.parametrize(
    "options, enabling, message",
    [
        ({"sigma": 0.5}, {"likelihood": "gaussian"}, "sigma=0.5 applies to likelihood gaussian only, not bernoulli"),
        ({"n_mixtures": 3}, {"likelihood": "discretized-logistic"}, "n_mixtures=3 applies to likelihood discretized"),
        ({"ar_kernel": 5}, {"likelihood": "bernoulli-ar"}, "ar_kernel=5 applies to likelihood bernoulli-ar only"),
        ({"pseudo_inputs": 10}, {"prior": "vamp"}, "pseudo_inputs=10 applies to prior vamp only, not standard"),
        ({"conv_channels": [8]}, {"architecture": "conv"}, "conv_channels=[8] applies to architecture conv only"),
    ],
)
def test_options_the_other_settings_ignore_are_refused(options, enabling, message, capsys):
    """An option that the chosen settings would ignore is refused (option's used_with), in Python and on the command
    line; the setting that uses it accepts it."""
    with pytest.raises(ElboxError, match=re.escape(message)):
        VAEConfig(**options)
    VAEConfig(**options, **enabling)
    ((name, value),) = options.items()
    flag = ["--" + name.replace("_", "-"), *map(str, value if isinstance(value, list) else [value])]
    assert main(["train", "vae", *flag, "--out", "unused"]) == 1
    assert message in capsys.readouterr().err


def test_runs_of_format_version_2_drop_the_options_their_settings_ignored():
    """Version 2 accepted sigma with a bernoulli likelihood silently (it had no effect): such a run loads without it."""
    from elbox.io.checkpoint import checked_run_config

    run = {
        "format_version": 2,
        "model": "vae",
        "model_config": small_config(sigma=0.5, pseudo_inputs=7),
        "data": {"space": "binary"},
        "train": {},
    }
    config = checked_run_config(run, "run")["model_config"]
    assert (config["sigma"], config["pseudo_inputs"]) == (0.1, 500)
    with pytest.raises(ElboxError, match="sigma=0.5 applies to likelihood gaussian only"):
        checked_run_config({**run, "format_version": 3}, "run")

"""Hierarchical VAEs: the Markovian chain and the top-down ladder."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_trainer
from torch.distributions import Independent, MultivariateNormal, Normal

from elbox.cli.main import main
from elbox.core.bounds import diag_gaussian_mixture_log_prob, kl_diag_gaussians, kl_monte_carlo, mean_and_stderr
from elbox.core.errors import ElboxError
from elbox.evaluation.evaluator import evaluate
from elbox.io.checkpoint import load_weights
from elbox.models import LadderHVAE, MarkovHVAE, MLPLadderHVAE, build_model
from elbox.models.estimates import elbo_per_example, iwae_by_k_per_example
from elbox.models.hvae import HVAE, Draws

# 8x8 images keep the convolutional tests fast: levels at 2x2 (top two) and 4x4
TINY_LADDER = {"hvae_type": "ladder", "levels": 3, "channels": 16, "latent_channels": 2, "data_shape": (1, 8, 8)}
SMALL_LADDER = {"hvae_type": "ladder", "levels": 3, "channels": 8, "latent_channels": 2}  # 28x28, for training
TINY_MLP_LADDER = {
    "hvae_type": "mlp-ladder",
    "levels": 3,
    "latent_dims": [4, 3, 2],  # z1 (next to x) first: the top level has 2
    "hidden_dims": [24, 16],
    "data_shape": (1, 8, 8),
}
LADDERS = [TINY_LADDER, TINY_MLP_LADDER]


def binary_images(n: int, seed: int = 0, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, size, size, generator=g) < 0.3).float()


def perturb(model: torch.nn.Module, scale: float, seed: int) -> None:
    """Add noise to every parameter, so that priors and posteriors differ from their initialization."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------------------------
# Markovian HVAE


def test_markov_with_one_level_is_the_vae():
    vae = build_model("vae", {"latent_dim": 6, "hidden_dims": [32, 16], "data_shape": (1, 8, 8)})
    hvae = build_model(
        "hvae",
        {
            "hvae_type": "markov",
            "levels": 1,
            "latent_dims": [6],
            "hidden_dims": [32, 16],
            "data_shape": (1, 8, 8),
            "activation": vae.config.activation,
        },
    )
    assert isinstance(hvae, MarkovHVAE)
    renamed = {
        k.replace("encoder.", "encoders.0.", 1).replace("decoder.", "decoders.0.", 1): v
        for k, v in vae.state_dict().items()
    }
    hvae.load_state_dict(renamed)  # strict: the same parameters, nothing more
    x = binary_images(20)
    torch.manual_seed(5)
    a = vae.elbo(x, n_samples=3)
    torch.manual_seed(5)
    b = hvae.elbo(x, n_samples=3)
    torch.testing.assert_close(b.reconstruction, a.reconstruction, rtol=0, atol=0)
    torch.testing.assert_close(b.kl["z1"], a.kl["z"], rtol=0, atol=0)
    torch.testing.assert_close(b.elbo, a.elbo, rtol=0, atol=0)


def linear_gaussian_markov(sigma_x: float = 0.5) -> MarkovHVAE:
    """Two-level Markov HVAE whose generative model is linear-Gaussian: z_2 ~ N(0, I),
    z_1 = A z_2 + a + s * eps, x = W z_1 + b + sigma_x * eps (constant s: its weights are zeroed)."""
    torch.manual_seed(0)
    model = build_model(
        "hvae",
        {
            "hvae_type": "markov",
            "levels": 2,
            "latent_dims": [3, 2],
            "hidden_dims": [],
            "data_shape": (1, 1, 4),
            "likelihood": "gaussian",
            "sigma": sigma_x,
        },
    ).double()
    with torch.no_grad():
        model.decoders[1][-1].weight[3:].zero_()  # p(z_1|z_2): the std half does not depend on z_2
    return model


def exact_log_prob(model: MarkovHVAE, x: torch.Tensor, sigma_x: float) -> torch.Tensor:
    """log p(x) of the linear-Gaussian model: x ~ N(b + W a, W (A A^T + diag s^2) W^T + sigma_x^2 I)."""
    p_z1 = model.decoders[1][-1]
    A, a = p_z1.weight[:3], p_z1.bias[:3]
    s = torch.nn.functional.softplus(p_z1.bias[3:]) + model.config.min_std
    W, b = model.decoders[0][-1].weight, model.decoders[0][-1].bias
    cov = W @ (A @ A.T + torch.diag(s**2)) @ W.T + sigma_x**2 * torch.eye(4, dtype=W.dtype)
    return MultivariateNormal(b + W @ a, covariance_matrix=cov).log_prob(x.flatten(1))


@torch.no_grad()
def test_linear_gaussian_two_levels_elbo_below_log_px_and_iwae_approaches_it():
    sigma_x = 0.5
    model = linear_gaussian_markov(sigma_x)
    torch.manual_seed(1)
    x = model.sample(300, mean=False)
    log_px = exact_log_prob(model, x, sigma_x)
    elbo = model.elbo(x, n_samples=200).elbo
    gap_elbo, gap_elbo_se = mean_and_stderr(log_px - elbo)
    assert gap_elbo > 10 * gap_elbo_se  # the ELBO is strictly below log p(x)
    bounds = iwae_by_k_per_example(model, x, [1, 10, 100, 5000], batch_size=300)
    gaps = {k: mean_and_stderr(log_px - v) for k, v in bounds.items()}
    # every IWAE-K is a lower bound (within 4 standard errors) and the gap shrinks as K grows
    assert all(g > -4 * se for g, se in gaps.values())
    assert gaps[1][0] > gaps[10][0] > gaps[100][0] > gaps[5000][0]
    assert gaps[5000][0] < 0.2 * gap_elbo


# ----------------------------------------------------------------------------------------------
# Ladder HVAE


@pytest.mark.parametrize("config", LADDERS)
def test_ladder_prior_starts_at_standard_normal(config):
    model = build_model("hvae", config)
    for _, _, mu_p, std_p in model.level_distributions(binary_images(4)):
        assert torch.equal(mu_p, torch.zeros_like(mu_p))
        torch.testing.assert_close(std_p, torch.full_like(std_p, 1 + model.config.min_std))


@pytest.mark.parametrize("posterior", ["residual", "precision"])
@pytest.mark.parametrize("config", LADDERS)
def test_ladder_analytic_kl_per_level_matches_monte_carlo(config, posterior):
    torch.manual_seed(0)
    model = build_model("hvae", {**config, "posterior": posterior}).double()
    perturb(model, 0.3 if config["hvae_type"] == "ladder" else 1.0, seed=1)  # a KL > 0.1 nats at every level
    x = binary_images(3).double()
    torch.manual_seed(7)
    levels = model.level_distributions(x)
    torch.manual_seed(7)
    _, kl_from_draw, _ = model.draw(model.prepare(x), x, 1)  # the same draw: its per-level KL is the analytic one
    for (mu_q, std_q, mu_p, std_p), name in zip(levels, model.level_names[::-1]):
        analytic = kl_diag_gaussians(mu_q, std_q, mu_p, std_p).flatten(1).sum(1)
        torch.testing.assert_close(kl_from_draw[name][0], analytic)
        event_dims = mu_q.dim() - 1  # (C, H, W) maps or vectors
        q, p = Independent(Normal(mu_q, std_q), event_dims), Independent(Normal(mu_p, std_p), event_dims)
        estimate, stderr = kl_monte_carlo(q, p, 20000)
        assert analytic.min() > 0.1  # a non-trivial KL at every level
        assert ((estimate - analytic).abs() < 4 * stderr).all(), (name, estimate, analytic, stderr)


@pytest.mark.parametrize(
    "config",
    [
        TINY_LADDER,
        {**TINY_LADDER, "posterior": "precision"},
        TINY_MLP_LADDER,
        {**TINY_MLP_LADDER, "posterior": "precision"},
        {"hvae_type": "markov", "levels": 3, "latent_dims": [8, 4, 2], "hidden_dims": [32], "data_shape": (1, 8, 8)},
        {
            "hvae_type": "markov",
            "levels": 2,
            "latent_dims": [4, 2],
            "hidden_dims": [32],
            "data_shape": (1, 8, 8),
            "top_prior": "vamp",
            "pseudo_inputs": 5,
        },
    ],
)
@torch.no_grad()
def test_log_weights_average_to_the_elbo(config):
    """E_q[log w] = ELBO: the Monte Carlo log weights and the ELBO terms (analytic KLs) agree within 4 standard
    errors."""
    torch.manual_seed(0)
    model = build_model("hvae", config).double()
    perturb(model, 0.02, seed=2)
    x = binary_images(2).double()
    log_w = model.log_weights(x, 4000)
    elbo = model.elbo(x, n_samples=4000).elbo
    stderr = log_w.std(0) / math.sqrt(log_w.shape[0])
    assert ((log_w.mean(0) - elbo).abs() < 4 * stderr + 1e-9).all()


def test_precision_weighted_posterior_is_the_normalized_product_of_gaussians():
    """q is proportional to N(a, b^2) N(mu_p, s_p^2): log q(z) - log N(z; a, b^2) - log N(z; mu_p, s_p^2) is the same
    for every z, and q is narrower than the prior."""
    model = build_model("hvae", {**TINY_LADDER, "posterior": "precision"}).double()
    g = torch.Generator().manual_seed(0)
    raw, mu_p = (
        torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64),
        torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64),
    )
    std_p = torch.rand(3, 2, 2, 2, generator=g, dtype=torch.float64) + 0.2
    mu_q, std_q = model._posterior(raw, mu_p, std_p)
    a, b = raw.chunk(2, dim=1)
    b = torch.nn.functional.softplus(b + math.log(math.e - 1)) + model.config.min_std
    z = torch.randn(50, *mu_q.shape, generator=g, dtype=torch.float64)
    log_ratio = Normal(mu_q, std_q).log_prob(z) - Normal(a, b).log_prob(z) - Normal(mu_p, std_p).log_prob(z)
    torch.testing.assert_close(log_ratio, log_ratio[:1].expand_as(log_ratio))
    assert (std_q < std_p).all() and (std_q < b).all()


def test_stl_and_dreg_forms_are_refused():
    model = build_model("hvae", TINY_LADDER)
    with pytest.raises(ElboxError, match="not available for hierarchical VAEs"):
        model.log_weights(binary_images(2), 3, detach_posterior_params=True)


TINY_MARKOV = {"hvae_type": "markov", "levels": 2, "latent_dims": [4, 2], "hidden_dims": [16], "data_shape": (1, 8, 8)}
TINY_VAMP = {**TINY_MARKOV, "top_prior": "vamp", "pseudo_inputs": 3}


@pytest.mark.parametrize("config", [*LADDERS, TINY_MARKOV, TINY_VAMP])
def test_importance_samples_are_the_log_weights_and_train_every_parameter(config):
    """The IWAE training objective's draws: the same log weights as log_weights for the same seed, and its gradient
    reaches every parameter that the ELBO's gradient reaches."""
    torch.manual_seed(0)
    model = build_model("hvae", config)
    perturb(model, 0.02, seed=2)
    x = binary_images(3)
    torch.manual_seed(1)
    samples = model.importance_samples(x, 5)
    torch.manual_seed(1)
    torch.testing.assert_close(samples.log_w, model.log_weights(x, 5))
    assert samples.log_w.shape == (5, 3) and samples.z is None
    assert set(samples.terms.kl) == set(model.level_names)

    def gradient_reached(objective):
        model.zero_grad()
        objective.backward()
        return {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    reached_by_elbo = gradient_reached(model.elbo(x).elbo.mean())
    reached_by_iwae = gradient_reached(torch.logsumexp(model.importance_samples(x, 5).log_w, 0).mean())
    assert reached_by_elbo and reached_by_elbo <= reached_by_iwae
    assert ("pseudo_inputs" in reached_by_elbo) == (config.get("top_prior") == "vamp")


@torch.no_grad()
def test_vamp_prior_is_the_mixture_of_top_posteriors_at_the_pseudo_inputs():
    """log p(z_T) = log (1/K) sum_k N(z_T; m_k, s_k^2), with (m_k, s_k) the top level of level_moments at pseudo-input
    u_k; at temperature 0 the samples are the K components' means decoded along the prior's chain of means."""
    torch.manual_seed(0)
    model = build_model("hvae", TINY_VAMP).double()
    perturb(model, 0.3, seed=4)
    mean, var = model.level_moments(model.pseudo_inputs)["z2"]
    z = torch.randn(50, 2, dtype=torch.float64)
    components = Normal(mean, var.sqrt()).log_prob(z[:, None, :]).sum(-1)  # [50, K]
    expected = torch.logsumexp(components, 1) - math.log(3)
    torch.testing.assert_close(diag_gaussian_mixture_log_prob(z, *model.vamp_components()), expected)

    samples = model.sample(60, temperature=1e-12).flatten(1)
    z1_means = model._prior(0, mean)[0]
    decoded = model.likelihood.mean(model.decode(z1_means)).flatten(1)
    distances = torch.cdist(samples, decoded)  # every sample is one of the K decoded component means
    assert (distances.min(1).values < 1e-6).all()
    assert distances.argmin(1).unique().numel() > 1  # and more than one component is drawn


@pytest.mark.parametrize("config", LADDERS)
def test_sample_temperature_per_level(config):
    torch.manual_seed(0)
    model = build_model("hvae", config)
    perturb(model, 0.05, seed=3)
    torch.manual_seed(1)
    a = model.sample(8, temperature=[1.0, 1.0, 1.0])
    torch.manual_seed(1)
    b = model.sample(8)
    torch.testing.assert_close(a, b)
    torch.manual_seed(1)
    cold = model.sample(8, temperature=1e-6)
    torch.manual_seed(2)
    cold2 = model.sample(8, temperature=1e-6)
    torch.testing.assert_close(
        cold, cold2, atol=1e-4, rtol=0
    )  # at temperature -> 0 samples stop depending on the noise
    assert not torch.allclose(a, model.sample(8))
    with pytest.raises(ElboxError, match="one temperature or one per level"):
        model.sample(2, temperature=[1.0, 0.5])
    with pytest.raises(ElboxError, match="> 0"):
        model.sample(2, temperature=0.0)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"hvae_type": "markov", "levels": 2, "latent_dims": [4]}, "latent_dims"),
        ({"hvae_type": "ladder", "levels": 2, "level_downsample": [4, 3]}, "powers of 2"),
        ({"hvae_type": "ladder", "levels": 2, "level_downsample": [4, 2]}, "must not decrease"),
        ({"hvae_type": "ladder", "levels": 2, "level_downsample": [4]}, "one factor per level"),
        ({"hvae_type": "mlp-ladder", "levels": 2, "latent_dims": [4, 8, 16]}, "latent_dims"),
        ({"hvae_type": "mlp-ladder", "hidden_dims": []}, "at least one hidden width"),
        ({"hvae_type": "tree"}, "unknown hvae_type"),
        ({"hvae_type": "markov", "levels": 0}, "levels must be a whole number between 1 and 100"),
        ({"hvae_type": "ladder", "posterior": "mean-field"}, "unknown posterior"),
        ({"pseudo_inputs": 10}, "pseudo_inputs=10 applies to top_prior vamp only"),
        ({"hvae_type": "mlp-ladder", "top_prior": "vamp"}, "top_prior is an option of hvae_type markov or skip"),
        ({"posterior": "precision"}, "posterior is an option of hvae_type mlp-ladder or ladder, not of this hvae"),
        ({"top_prior": "flow"}, "unknown top_prior"),
    ],
)
def test_bad_configs_are_refused(bad, message):
    with pytest.raises(ElboxError, match=message):
        build_model("hvae", bad)


def test_ladder_levels_share_resolutions_and_report_per_level():
    model = build_model("hvae", {**TINY_LADDER, "levels": 4})
    assert isinstance(model, LadderHVAE) and model.config.level_downsample == [2, 2, 4, 4]  # z1 (next to x) first
    means = model.encode_levels(binary_images(5))
    assert {k: v.shape[1] for k, v in means.items()} == {"z4": 2 * 4, "z3": 2 * 4, "z2": 2 * 16, "z1": 2 * 16}
    result = evaluate(model, binary_images(20), iw_samples=[1, 5], batch_size=10)
    assert set(result["kl_by_group"]) == set(result["active_units_by_level"]) == {"z1", "z2", "z3", "z4"}
    assert result["elbo"] == pytest.approx(result["reconstruction"] - sum(result["kl_by_group"].values()))


def test_mlp_ladder_shapes_and_every_level_sees_x():
    """Latent sizes per level as configured (z1 next to x first), the deepest bottom-up features go to the top level,
    and every level's posterior depends on x (its gradient with respect to x is non-zero)."""
    torch.manual_seed(0)
    model = build_model("hvae", TINY_MLP_LADDER)
    assert isinstance(model, MLPLadderHVAE)
    assert build_model("hvae", {"hvae_type": "mlp-ladder", "levels": 3}).config.latent_dims == [32, 16, 8]
    x = binary_images(4).requires_grad_()
    features = model.prepare(x)
    assert torch.equal(features[0], model.bottom_up[2](model.bottom_up[1](model.bottom_up[0](model.stem(x)))))
    levels = model.level_distributions(x)
    assert [mu_q.shape for mu_q, *_ in levels] == [torch.Size([4, d]) for d in (2, 3, 4)]
    for mu_q, std_q, _, _ in levels:
        (grad,) = torch.autograd.grad(mu_q.sum() + std_q.sum(), x, retain_graph=True)
        assert grad.abs().sum() > 0


def test_each_ladder_level_reads_its_own_bottom_up_features():
    """Changing the features of level i changes the posterior of level i and leaves every level above it as it was."""
    torch.manual_seed(0)
    model = build_model("hvae", TINY_MLP_LADDER)
    perturb(model, 0.1, seed=4)
    x = binary_images(3)

    def posterior_means(features):
        levels, _ = model.posterior_path(features, 1, means=True)
        return [level.q[0] for level in levels]

    features = model.prepare(x)
    before = posterior_means(features)
    for i in range(len(features)):
        changed = [f + 1.0 if j == i else f for j, f in enumerate(features)]
        after = posterior_means(changed)
        assert all(torch.equal(a, b) for a, b in zip(after[:i], before[:i]))
        assert not torch.allclose(after[i], before[i])


def test_options_of_another_type_are_refused_and_recipes_follow_the_type():
    from elbox.io.run_config import train_defaults

    with pytest.raises(ElboxError, match="channels is an option of hvae_type ladder, not of this hvae"):
        build_model("hvae", {"channels": 32})  # the default type is skip
    with pytest.raises(ElboxError, match="latent_dims is an option of hvae_type markov or skip or conv-skip or mlp"):
        build_model("hvae", {"hvae_type": "ladder", "latent_dims": [4, 4, 4]})
    with pytest.raises(ElboxError, match="unknown hvae model config fields"):
        build_model("hvae", {"hvae_type": "ladder", "widths": [4]})  # an option of no type
    markov, ladder = build_model("hvae", {"hvae_type": "markov"}), build_model("hvae", {"hvae_type": "mlp-ladder"})
    assert (markov.config.activation, ladder.config.activation) == ("gelu", "relu")
    assert isinstance(markov.encoders[0][1][1], torch.nn.GELU)
    assert build_model("hvae", {"hvae_type": "markov", "activation": "relu"}).config.activation == "relu"
    assert build_model("hvae", {}).config.hvae_type == "skip"  # the default, measured (benchmarks/hvae_default.py)
    with pytest.raises(ElboxError, match="unknown activation 'gated'"):
        build_model("hvae", {"hvae_type": "mlp-ladder", "activation": "gated"})  # residual blocks take a function
    assert (
        train_defaults("hvae", {})["epochs"] == 115
        and train_defaults("hvae", {"hvae_type": "markov"})["epochs"] == 140
        and train_defaults("hvae", {"hvae_type": "mlp-ladder"})["batch_size"] == 256
    )
    assert train_defaults("hvae", {"hvae_type": "ladder"}) == {}


def test_each_type_declares_its_real_defaults_on_the_command_line(capsys):
    """`elbox train hvae --hvae-type T --help` lists T's options only, each with its default (not "none" standing
    for a default described in prose), and an option of another type gets a message that names its type."""
    for hvae_type, expected in [
        ("markov", "--hidden-dims H [H ...]  widths of every MLP transition (default: 512 512)"),
        ("markov", "--levels T  number of latent levels (default: 2)"),
        ("mlp-ladder", "--levels T  number of latent levels (default: 3)"),
        ("skip", "--latent-dims D [D ...]  latent size per level, z1 (next to x) first (default: 40 each)"),
        ("skip", "--levels T  number of latent levels (conv-skip: 2) (default: 2)"),
        ("mlp-ladder", "--activation {relu,gelu,silu,tanh,elu,softplus} activation of the MLPs (default: relu)"),
        ("ladder", "--channels CHANNELS"),
    ]:
        with pytest.raises(SystemExit):
            main(["train", "hvae", "--hvae-type", hvae_type, "--help"])
        help_text = " ".join(capsys.readouterr().out.split("hvae model:")[1].split())  # the model's options
        assert " ".join(expected.split()) in help_text
        assert "(default: none)" not in help_text.replace("softplus + min_std (default: none)", "")
        assert ("--channels" in help_text) == (hvae_type == "ladder")
    assert main(["train", "hvae", "--hvae-type", "skip", "--posterior", "precision", "--out", "x"]) == 1
    assert "--posterior is an option of hvae_type mlp-ladder or ladder" in capsys.readouterr().err


def test_runs_of_format_version_2_load_with_one_config_per_type():
    """Version 2 configs held every type's options (other types' at their defaults, or the legacy hidden_dims and
    activation) and listed the ladders' levels top first: they load as the type's config, levels z1 first."""
    from elbox.io.checkpoint import checked_run_config

    old = {
        "hvae_type": "mlp-ladder",
        "levels": 3,
        "latent_dims": [2, 3, 4],
        "hidden_dims": [24, 16],
        "activation": "relu",
        "channels": 64,
        "latent_channels": 8,
        "level_downsample": [],
        "top_prior": "standard",
        "pseudo_inputs": 100,
        "logvar_bounds": None,
        "weight_init": "default",
        "sigma": 0.5,  # ignored by the bernoulli likelihood, accepted silently by version 2
        "data_shape": [1, 8, 8],
    }
    run = {"format_version": 2, "model": "hvae", "model_config": old, "data": {"space": "binary"}, "train": {}}
    config = checked_run_config(run, "run")
    assert config["format_version"] == 3 and config["model_config"]["latent_dims"] == [4, 3, 2]
    assert "channels" not in config["model_config"] and config["model_config"]["sigma"] == 0.1
    assert torch.equal(
        torch.tensor(build_model("hvae", config["model_config"]).config.latent_dims), torch.tensor([4, 3, 2])
    )
    ladder = {**TINY_LADDER, "level_downsample": [4, 4, 2], "hidden_dims": [512], "activation": "relu"}
    run = {"format_version": 2, "model": "hvae", "model_config": ladder, "data": {"space": "binary"}, "train": {}}
    assert checked_run_config(run, "run")["model_config"]["level_downsample"] == [2, 4, 4]


# ----------------------------------------------------------------------------------------------
# Training


def train_run(tmp_path, model_config, steps=50, **train_options):
    """Train an HVAE (seed 0) for one epoch of `steps` steps of 8 images: (the training records, the trainer)."""
    trainer = make_trainer(
        tmp_path,
        "hvae",
        model_config,
        n_train=8 * steps,
        n_val=40,
        epochs=1,
        batch_size=8,
        log_every=1,
        **train_options,
    )
    trainer.fit()
    return [r for r in trainer.records if r["kind"] == "train"], trainer


@pytest.mark.parametrize(
    "config, free_bits",
    [(SMALL_LADDER, 0.1), ({"hvae_type": "markov", "levels": 2, "latent_dims": [8, 4], "hidden_dims": [32]}, 0.0)],
)
def test_same_seed_gives_identical_losses_over_50_steps(tmp_path, config, free_bits):
    options = dict(
        ema_decay=0.99,
        beta_schedule="linear",
        warmup_epochs=0.5,
        free_bits=free_bits,
        grad_clip=50.0,
        lr_schedule="cosine",
    )
    a, _ = train_run(tmp_path / "a", config, **options)
    b, _ = train_run(tmp_path / "b", config, **options)
    assert len(a) == 50
    assert [r["objective"] for r in a] == [r["objective"] for r in b]
    assert [r["kl/z2"] for r in a] == [r["kl/z2"] for r in b]


def test_the_iwae_objective_trains_an_hvae_and_dreg_is_refused_up_front(tmp_path):
    markov = {"hvae_type": "markov", "levels": 2, "latent_dims": [8, 4], "hidden_dims": [32]}
    records, _ = train_run(
        tmp_path / "iwae", markov, steps=30, objective="iwae", iw_samples=4, beta_schedule="constant"
    )
    objectives = [r["objective"] for r in records]
    assert len(objectives) == 30 and all(math.isfinite(v) for v in objectives)
    assert sum(objectives[-5:]) > sum(objectives[:5])  # 30 steps of Adam from initialization improve the bound
    with pytest.raises(ElboxError, match="dreg estimator is not available for the MarkovHVAE"):
        train_run(
            tmp_path / "dreg",
            markov,
            steps=2,
            objective="iwae",
            iw_samples=4,
            estimator="dreg",
            beta_schedule="constant",
        )


def test_free_bits_are_refused_where_some_terms_are_not_kls(tmp_path):
    """Free bits floor KL divergences: refused where a term is a single-sample log q - log p (the Markov chain below
    its top, a VampPrior level), accepted where every term is a KL (the skip HVAE and a one-level chain)."""
    with pytest.raises(ElboxError, match="terms z1 are single-sample log q - log p"):
        train_run(
            tmp_path, {"hvae_type": "markov", "levels": 2, "latent_dims": [8, 4], "hidden_dims": [32]}, free_bits=0.5
        )
    skip = {"hvae_type": "skip", "latent_dims": [4, 3], "hidden_dims": [16]}
    with pytest.raises(ElboxError, match="terms z2 are single-sample"):
        train_run(tmp_path / "vamp", {**skip, "top_prior": "vamp", "pseudo_inputs": 4}, free_bits=0.5)
    for i, config in enumerate([skip, {"hvae_type": "markov", "levels": 1, "latent_dims": [4], "hidden_dims": [16]}]):
        records, _ = train_run(tmp_path / str(i), config, steps=2, free_bits=0.5)
        assert records and all(math.isfinite(r["loss"]) for r in records if "loss" in r)


def test_updates_above_the_gradient_threshold_are_skipped_and_counted(tmp_path):
    records, trainer = train_run(tmp_path, SMALL_LADDER, steps=10, grad_skip_threshold=1e-6)
    assert trainer.skipped_large_grad == 10 and records == []
    epoch = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert epoch["skipped_large_grad"] == 10
    torch.manual_seed(0)  # the seed train_run builds its model with: the initial weights, which no update changed
    initial = build_model("hvae", SMALL_LADDER)
    for (name, p), q in zip(trainer.model.named_parameters(), initial.parameters()):
        assert torch.equal(p, q), name


def test_ema_weights_are_validated_and_saved(tmp_path):
    _, trainer = train_run(tmp_path, SMALL_LADDER, steps=10, ema_decay=0.9)
    saved = build_model("hvae", SMALL_LADDER)
    load_weights(tmp_path / "model.safetensors", saved)
    for (name, p), q in zip(trainer.ema.module.named_parameters(), saved.parameters()):
        assert torch.equal(p, q), name
    moved = [not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), trainer.ema.module.parameters())]
    assert any(moved)  # the EMA lags the trained weights
    # validation scores the EMA weights: the same seed gives the same value as scoring them directly
    assert trainer.eval_model is trainer.ema.module
    torch.manual_seed(3)
    validated = trainer.validate()["val_elbo"]
    torch.manual_seed(3)
    direct = elbo_per_example(saved, trainer.val_x, trainer.config.eval_batch_size)["elbo"].mean().item()
    assert validated == pytest.approx(direct, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# CLI


@pytest.mark.parametrize(
    "flags",
    [
        ["--hvae-type", "markov", "--levels", "2", "--latent-dims", "6", "3", "--hidden-dims", "32"],
        [
            "--hvae-type",
            "markov",
            "--levels",
            "2",
            "--latent-dims",
            "6",
            "3",
            "--hidden-dims",
            "32",
            "--top-prior",
            "vamp",
            "--pseudo-inputs",
            "4",
        ],
        [
            "--hvae-type",
            "ladder",
            "--levels",
            "2",
            "--channels",
            "8",
            "--latent-channels",
            "2",
            "--posterior",
            "precision",
        ],
        [
            "--hvae-type",
            "mlp-ladder",
            "--levels",
            "2",
            "--latent-dims",
            "6",
            "3",
            "--hidden-dims",
            "32",
            "--free-bits",
            "0.1",
        ],
    ],
)
def test_cli_trains_evaluates_and_samples_both_families(tmp_path, capsys, flags):
    out = tmp_path / "run"
    train = [
        "train",
        "--data",
        "synthetic",
        "--model",
        "hvae",
        *flags,
        "--epochs",
        "1",
        "--limit-train",
        "200",
        "--ema-decay",
        "0.9",
        "--warmup-epochs",
        "1",
        "--beta-schedule",
        "linear",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(train) == 0
    assert main(["evaluate", str(out), "--iw-samples", "1", "10", "--limit", "20", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "[z1]" in printed and "[z2]" in printed and "active[z2]" in printed
    assert ("KL[z1]" in printed) == (flags[1] != "markov")  # markov lower levels are log q - log p estimates
    result = json.loads((out / "eval-test.json").read_text())
    assert set(result["kl_by_group"]) == {"z1", "z2"}
    assert main(["sample", str(out), "--n", "4", "--temperature", "0.8", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["sample", str(out), "--n", "4", "--temperature", "0.8", "0.5", "--out", str(tmp_path / "t.png")]) == 0
    assert main(["sample", str(out), "--n", "4", "--temperature", "1", "1", "1"]) == 1
    assert "one temperature or one per level" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The interface every HVAE type implements, and which of its terms are exact KLs


def test_every_hvae_type_implements_the_abstract_interface():
    declared = {"prepare", "draw", "draw_above", "level_moments", "decode_from_means", "ancestral_params"}
    assert declared <= HVAE.__abstractmethods__
    assert {"markov", "ladder", "mlp-ladder", "skip", "conv-skip"} <= set(HVAE.types)
    for hvae_type, cls in HVAE.types.items():
        assert not cls.__abstractmethods__, hvae_type
    with pytest.raises(TypeError, match="abstract"):
        HVAE(build_model("hvae", TINY_MLP_LADDER).config)
    model = build_model("hvae", TINY_MLP_LADDER)
    x = binary_images(2)
    draws = model.draw(model.prepare(x), x, 3)
    assert isinstance(draws, Draws) and draws.log_w.shape == draws.log_px.shape == (3, 2)


@pytest.mark.parametrize(
    "config, inexact",
    [
        (TINY_MLP_LADDER, []),
        ({"hvae_type": "markov", "levels": 3, "latent_dims": [6, 4, 3], "hidden_dims": [16]}, ["z1", "z2"]),
        ({"hvae_type": "markov", "levels": 1, "latent_dims": [4], "hidden_dims": [16]}, []),
        (
            {"hvae_type": "markov", "levels": 2, "latent_dims": [6, 4], "hidden_dims": [16], "top_prior": "vamp"},
            ["z1", "z2"],
        ),
        ({"hvae_type": "skip", "latent_dims": [4, 3], "hidden_dims": [16]}, []),
        ({"hvae_type": "skip", "latent_dims": [4, 3], "hidden_dims": [16], "top_prior": "vamp"}, ["z2"]),
        (
            {"hvae_type": "skip", "levels": 3, "latent_dims": [4, 3, 2], "hidden_dims": [16], "top_prior": "vamp"},
            ["z3"],
        ),
        ({"hvae_type": "conv-skip", "latent_dims": [4, 3], "hidden_dims": [16], "top_prior": "vamp"}, ["z2"]),
    ],
)
def test_elbo_terms_name_the_levels_that_are_not_exact_kls(config, inexact):
    torch.manual_seed(0)
    model = build_model("hvae", {"data_shape": (1, 8, 8), **config})
    x = binary_images(2)
    assert model.elbo(x).inexact_kl == model.inexact_kl_terms == set(inexact)
    assert model.importance_samples(x, 2).terms.inexact_kl == set(inexact)

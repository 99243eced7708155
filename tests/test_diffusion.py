"""Variational diffusion model: schedules, the ELBO's three terms against closed forms, discrete vs continuous
time, the three parameterizations, the learned schedule's variance gradient, sampling and the CLI.

Statistical checks use fixed seeds and a tolerance of 4 standard errors of the Monte Carlo mean."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from elbox.cli.main import main
from elbox.core.bounds import mean_and_stderr
from elbox.core.errors import ElboxError
from elbox.models import build_model
from elbox.models.diffusion_parts import alpha_sigma, encode_8bit, window_half_width
from elbox.models.schedules import SCHEDULES, CosineSchedule, LinearBetaSchedule, build_schedule

GAMMA_MIN, GAMMA_MAX = -10.0, 6.0
MEAN, STD = 0.1, 0.5  # the Gaussian data x ~ N(MEAN, STD^2 I)
SHAPE = (1, 4, 4)
D = 16


class PluggedDenoiser(nn.Module):
    """A given noise prediction eps_fn(z_t, gamma_t) read in the model's parameterization. The model's denoiser gets
    c = (gamma - gamma_min)/(gamma_max - gamma_min), and the model adds its skip (DiffusionModel.skip) to the
    denoiser's output, so this returns the parameterization's value minus the skip."""

    def __init__(self, model, eps_fn):
        super().__init__()
        self.parameterization, self.skip, self.eps_fn = model.config.parameterization, model.skip, eps_fn

    def forward(self, z, cond):
        gamma = GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * cond
        eps = self.eps_fn(z, gamma)
        alpha, sigma = alpha_sigma(gamma.reshape(-1, 1, 1, 1))
        value = (
            eps
            if self.parameterization == "eps"
            else (z - sigma * eps) / alpha
            if self.parameterization == "x0"
            else -eps / sigma
        )
        return value - self.skip(z, alpha)


def optimal_eps(mean: float = MEAN, std: float = STD):
    """E[eps | z_t] for x ~ N(mean, std^2 I), z_t = alpha x + sigma eps."""

    def eps_fn(z, gamma):
        alpha, sigma = alpha_sigma(gamma.reshape(-1, 1, 1, 1))
        x_hat = mean + alpha * std**2 / (alpha**2 * std**2 + sigma**2) * (z - alpha * mean)
        return (z - alpha * x_hat) / sigma

    return eps_fn


def gaussian_model(parameterization: str = "eps", eps_fn=None, timesteps: int = 0):
    model = build_model(
        "diffusion",
        {
            "data_shape": SHAPE,
            "schedule": "linear",
            "gamma_min": GAMMA_MIN,
            "gamma_max": GAMMA_MAX,
            "parameterization": parameterization,
            "timesteps": timesteps,
            "channels": [4],
            "fourier_features": False,
        },
    )
    model.denoiser = PluggedDenoiser(model, eps_fn or optimal_eps())
    return model.eval()


def gaussian_data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return MEAN + STD * torch.randn(n, *SHAPE, generator=g)


def snr(gamma):
    return math.exp(-gamma)


def closed_form_continuous_diffusion() -> float:
    """E[L_inf] = 1/2 D int_{SNR_min}^{SNR_max} s^2/(1 + v s^2) dv for the optimal denoiser (MMSE per dim)."""
    return 0.5 * D * (math.log1p(snr(GAMMA_MIN) * STD**2) - math.log1p(snr(GAMMA_MAX) * STD**2))


def closed_form_discrete_diffusion(timesteps: int) -> float:
    """E[L_T] = sum_i 1/2 (SNR(s_i) - SNR(t_i)) D mmse(SNR(t_i)), mmse(v) = s^2/(1 + v s^2), linear gamma."""
    gamma = lambda t: GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * t  # noqa: E731
    total = 0.0
    for i in range(1, timesteps + 1):
        v_t, v_s = snr(gamma(i / timesteps)), snr(gamma((i - 1) / timesteps))
        total += 0.5 * (v_s - v_t) * D * STD**2 / (1 + v_t * STD**2)
    return total


def closed_form_prior() -> float:
    alpha_sq, sigma_sq = 1 / (1 + math.exp(GAMMA_MAX)), 1 / (1 + math.exp(-GAMMA_MAX))
    return 0.5 * D * (alpha_sq * (MEAN**2 + STD**2) + sigma_sq - math.log(sigma_sq) - 1)


# ----------------------------------------------------------------------------------------------
# Gaussian data with the optimal denoiser


def test_continuous_diffusion_term_matches_the_closed_form():
    torch.manual_seed(0)
    model = gaussian_model()
    x = gaussian_data(40000, seed=1)
    with torch.no_grad():
        loss, _ = model.diffusion_loss(x, torch.rand(x.shape[0]))
    mean, se = mean_and_stderr(loss.double())
    assert abs(mean - closed_form_continuous_diffusion()) < 4 * se, (mean, se, closed_form_continuous_diffusion())


def test_prior_term_matches_closed_form_and_torch_distributions():
    model = gaussian_model()
    x = gaussian_data(40000, seed=2)
    prior = model.prior_kl(x)
    alpha, sigma = alpha_sigma(torch.tensor(GAMMA_MAX))
    reference = kl_divergence(Normal(alpha * x, sigma), Normal(0.0, 1.0)).flatten(1).sum(-1)
    torch.testing.assert_close(prior, reference, rtol=1e-5, atol=1e-6)
    mean, se = mean_and_stderr(prior.double())
    assert abs(mean - closed_form_prior()) < 4 * se


def test_gaussian_elbo_matches_closed_form_and_is_below_the_exact_log_likelihood():
    """With a continuous Gaussian decoder p(x|z_0) = N(z_0/alpha_0, e^{gamma_0}) (E log p = -D/2 (log 2 pi + gamma_0 +
    1)), the ELBO of Gaussian data with the optimal denoiser: the model's prior + diffusion terms match the closed form,
    and the bound lies below E log N(x; m, s^2), by a small margin (endpoint effects)."""
    torch.manual_seed(3)
    model = gaussian_model()
    x = gaussian_data(40000, seed=4)
    with torch.no_grad():
        rate = model.prior_kl(x) + model.diffusion_loss(x, torch.rand(x.shape[0]))[0]
    reconstruction = -0.5 * D * (math.log(2 * math.pi) + GAMMA_MIN + 1)
    elbo_closed = reconstruction - closed_form_prior() - closed_form_continuous_diffusion()
    elbo_mc, se = mean_and_stderr(reconstruction - rate.double())
    log_p = -0.5 * D * (math.log(2 * math.pi * STD**2) + 1)
    assert abs(elbo_mc - elbo_closed) < 4 * se
    assert elbo_closed < log_p
    assert log_p - elbo_closed < 0.01 * D  # nats: the continuous-time bound is nearly tight for the optimal denoiser


def test_discrete_time_approaches_continuous_time_as_steps_grow():
    continuous = closed_form_continuous_diffusion()
    gaps = [closed_form_discrete_diffusion(t) - continuous for t in (10, 100, 1000)]
    assert all(g > 0 for g in gaps) and gaps[0] > gaps[1] > gaps[2]  # fewer steps: a larger loss, a looser bound
    assert gaps[2] < 0.01 * continuous
    torch.manual_seed(5)
    x = gaussian_data(4000, seed=6)
    for timesteps in (10, 100):
        model = gaussian_model(timesteps=timesteps)
        with torch.no_grad():  # the model's exact sum over steps, and its single-step estimator
            summed = model.diffusion_sum(x, timesteps).double()
            single = model.diffusion_loss(x, torch.rand(x.shape[0]))[0].double()
        for values in (summed, single):
            mean, se = mean_and_stderr(values)
            assert abs(mean - closed_form_discrete_diffusion(timesteps)) < 4 * se, (timesteps, mean, se)


def _random_eps(z, gamma):
    """A fixed, imperfect noise prediction that depends on z and gamma (for the equivalence checks)."""
    g = gamma.reshape(-1, 1, 1, 1)
    return 0.7 * torch.tanh(z * (1 + 0.1 * g)) + 0.05 * g


@pytest.mark.parametrize("timesteps", [0, 20])
def test_the_three_parameterizations_give_the_same_elbo(timesteps):
    x = torch.randint(0, 256, (64, *SHAPE)) / 255
    results = {}
    for p in ("eps", "x0", "score"):
        model = gaussian_model(p, _random_eps, timesteps)
        torch.manual_seed(7)
        with torch.no_grad():
            terms = model.elbo(x, n_samples=3)
        results[p] = torch.stack([terms.reconstruction, terms.kl["prior"], terms.kl["diffusion"]])
    torch.testing.assert_close(results["x0"], results["eps"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results["score"], results["eps"], rtol=1e-4, atol=1e-4)
    assert results["eps"][2].mean() > 1  # a non-trivial diffusion term was compared


# ----------------------------------------------------------------------------------------------
# Terms against independent computations


# eps_scale 40: pixels' own bins fall outside the window, so the full softmax runs
@pytest.mark.parametrize(
    "gamma_min, eps_scale", [(-13.3, 1.0), (-10.0, 1.0), (-6.0, 1.0), (-2.0, 1.0), (-13.3, 40.0), (-6.0, 40.0)]
)
def test_reconstruction_matches_an_independent_categorical(gamma_min, eps_scale):
    """The windowed softmax (window_half_width) equals the full 256-way categorical, value and gradients."""
    model = build_model("diffusion", {"data_shape": SHAPE, "channels": [4], "gamma_min": gamma_min})
    torch.manual_seed(8)
    x = torch.randint(0, 256, (64, *SHAPE)) / 255
    x[0] = 0.0  # both ends of the grid, where the window is shifted inwards
    x[1] = 1.0
    k = (x * 255).round().long()
    x_enc, eps = encode_8bit(x), eps_scale * torch.randn(64, *SHAPE)
    x_enc.requires_grad_(True)
    got = model.reconstruction_log_prob(x_enc, k, eps)
    got_grads = torch.autograd.grad(got.sum(), [x_enc, *model.schedule.parameters()], allow_unused=True)
    gamma_0, _ = model.schedule.endpoints()
    u = x_enc + torch.exp(gamma_0 / 2) * eps  # z_0 / alpha_0
    grid = (torch.arange(256) + 0.5) / 128 - 1
    log_p = Normal(u[..., None].double(), torch.exp(gamma_0 / 2).double()).log_prob(grid.double()).log_softmax(-1)
    expected = log_p.gather(-1, k[..., None]).squeeze(-1).flatten(1).sum(-1)
    expected_grads = torch.autograd.grad(expected.sum(), [x_enc, *model.schedule.parameters()], allow_unused=True)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-3)
    assert [g is None for g in got_grads] == [e is None for e in expected_grads] and got_grads[1] is not None
    for g, e in zip(got_grads, expected_grads):
        if g is not None:
            torch.testing.assert_close(
                g.double(), e.double(), rtol=1e-3, atol=1e-4 * e.abs().max().item()
            )  # float32 vs float64
    assert torch.allclose(encode_8bit(torch.tensor([0.0, 1.0])), torch.tensor([-255 / 256, 255 / 256]))


def test_reconstruction_window_holds_all_but_a_negligible_mass():
    """Outside the window the grid values carry < e^-30 of the softmax mass, at every gamma_0 up to full width."""
    for gamma_0 in [-13.3, -12.0, -10.0, -8.0, -6.0, -4.0]:
        half = window_half_width(torch.tensor(gamma_0))
        sigma = math.exp(gamma_0 / 2)
        grid = (torch.arange(256, dtype=torch.float64) + 0.5) / 128 - 1
        u = torch.linspace(-1.2, 1.2, 2001, dtype=torch.float64)  # beyond the grid's ends too
        log_w = -0.5 * ((u[:, None] - grid) / sigma) ** 2
        nearest = ((u + 1) * 128 - 0.5).round().long()
        start = (nearest - half).clamp(0, max(0, 256 - 2 * half - 1))
        inside = (torch.arange(256) >= start[:, None]) & (torch.arange(256) <= start[:, None] + 2 * half)
        outside_share = (log_w.masked_fill(inside, -math.inf).logsumexp(-1) - log_w.logsumexp(-1)).max()
        assert outside_share < -30, (gamma_0, half, outside_share)


# ----------------------------------------------------------------------------------------------
# Schedules


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("low, high", [(-13.3, 5.0), (-30.0, 10.0)])
def test_schedules_run_from_gamma_min_to_gamma_max_increasing_with_exact_slopes(name, low, high):
    schedule = build_schedule(name, low, high, timesteps=0).double()
    t = torch.linspace(0, 1, 201, dtype=torch.float64, requires_grad=True)
    gamma, slope = schedule.gamma_and_slope(t)
    assert gamma[0].item() == pytest.approx(low, abs=1e-5) and gamma[-1].item() == pytest.approx(high, abs=1e-5)
    assert (gamma.diff() > 0).all()
    (autograd_slope,) = torch.autograd.grad(gamma.sum(), t)
    torch.testing.assert_close(slope.detach(), autograd_slope, rtol=1e-6, atol=1e-6)


def test_cosine_and_linear_beta_schedules_are_ddpms():
    tau = torch.tensor([0.05, 0.3, 0.6, 0.9], dtype=torch.float64)
    gamma, _ = CosineSchedule(-13.3, 5.0).gamma_f(tau)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    alpha_bar = torch.tensor([f(s) / f(0) for s in tau.tolist()], dtype=torch.float64)
    torch.testing.assert_close(torch.sigmoid(-gamma), alpha_bar, rtol=1e-9, atol=0)
    # linear beta: DDPM's discrete product over 1000 steps vs its continuous-time limit
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)
    steps = torch.tensor([100, 300, 600, 900])
    gamma, _ = LinearBetaSchedule(-9.0, 9.0).gamma_f(steps.double() / 1000)
    torch.testing.assert_close(torch.sigmoid(-gamma).log(), alpha_bar[steps - 1].log(), rtol=0.01, atol=0.001)


def test_learned_net_schedule_interior_gets_the_variance_gradient():
    """In continuous time, the monotone net's interior receives the gradient of sum_i L_i^2 / (2 B mean L) (VDM's
    variance minimization) instead of the ELBO's; the endpoints keep the ELBO gradient."""
    torch.manual_seed(9)
    model = build_model("diffusion", {"data_shape": SHAPE, "schedule": "learned-net", "channels": [4]}).train()
    nn.init.normal_(model.denoiser.conv_out.weight, std=0.1)
    x = torch.randint(0, 256, (32, *SHAPE)) / 255
    interior = [model.schedule.w1, model.schedule.w2, model.schedule.b2, model.schedule.w3]
    ends = [model.schedule.gamma_start, model.schedule.log_width]

    def diffusion_terms():
        torch.manual_seed(10)
        t = model.sample_times(1, x.shape[0], x.device).reshape(-1)
        return model.diffusion_loss(encode_8bit(x), t)[0]

    loss = diffusion_terms()  # hooks on: the gradient of mean L reaching the interior is rescaled
    got_interior = torch.autograd.grad(loss.mean(), interior, retain_graph=True)
    got_ends = torch.autograd.grad(loss.mean(), ends)
    model.schedule.interior_fits_variance = False
    loss = diffusion_terms()
    weight = (loss / loss.mean()).detach()
    expected_interior = torch.autograd.grad((weight * loss).mean(), interior, retain_graph=True)
    expected_ends = torch.autograd.grad(loss.mean(), ends)
    for got, expected in zip(got_interior + got_ends, expected_interior + expected_ends):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5)  # float32, different summation order
    assert any(g.abs().sum() > 0 for g in got_interior)


# ----------------------------------------------------------------------------------------------
# Model, training surrogate, sampling, config


def test_simple_loss_is_a_training_surrogate_and_the_reported_terms_stay_the_elbo():
    config = {"data_shape": SHAPE, "channels": [4], "schedule": "linear"}
    x = torch.randint(0, 256, (8, *SHAPE)) / 255
    terms = {}
    for loss in ("elbo", "simple"):
        torch.manual_seed(11)
        model = build_model("diffusion", {**config, "loss": loss})
        torch.manual_seed(12)
        terms[loss] = model.elbo(x)
    assert terms["elbo"].objective is None
    torch.testing.assert_close(terms["simple"].elbo, terms["elbo"].elbo)
    assert not torch.allclose(terms["simple"].objective, terms["simple"].elbo)
    with pytest.raises(ElboxError, match="simple loss"):
        build_model("diffusion", {**config, "loss": "simple", "schedule": "learned-linear"})


def test_every_bound_is_the_one_vlb_and_its_terms_are_exact_kls():
    """elbo is vlb's Monte Carlo form, elbo_for_evaluation in discrete time its exact sum over steps (refused in
    continuous time); the prior and diffusion terms are KLs (ELBOTerms.inexact_kl is empty)."""
    x = torch.randint(0, 256, (3, *SHAPE)) / 255
    model = build_model("diffusion", {"data_shape": SHAPE, "channels": [4], "timesteps": 4}).eval()
    for a, b in [
        (lambda: model.elbo(x, 2), lambda: model.vlb(x, 2)),
        (lambda: model.elbo_for_evaluation(x, 2), lambda: model.vlb(x, all_steps=True)),
    ]:
        torch.manual_seed(3)
        first = a()
        torch.manual_seed(3)
        second = b()
        assert torch.equal(first.elbo, second.elbo) and first.inexact_kl == second.inexact_kl == frozenset()
    with pytest.raises(ElboxError, match="discrete-time"):
        model.vlb(x, timesteps=0, all_steps=True)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "score"])
def test_ancestral_samples_of_the_optimal_denoiser_have_the_data_distribution(parameterization):
    """Gaussian data N(0.1, 0.2^2) on the 8-bit grid: with the optimal denoiser and many steps, samples have the
    data's mean and variance (tolerance: 4 standard errors plus the 256-step discretization, about 3%)."""
    mean, std = 0.1, 0.2
    model = gaussian_model(parameterization, optimal_eps(mean, std))
    torch.manual_seed(14)
    k = model.sample(2000, steps=256) * 255
    x = ((2 * k + 1) / 256 - 1).flatten().double()
    n = x.numel()
    assert abs(x.mean() - mean) < 4 * std / math.sqrt(n) + 0.005
    assert abs(x.var() / std**2 - 1) < 4 * math.sqrt(2 / n) + 0.03


def test_variance_gradient_only_in_continuous_time_training():
    model = build_model("diffusion", {"data_shape": SHAPE, "schedule": "learned-net", "channels": [4]})
    x = encode_8bit(torch.randint(0, 256, (8, *SHAPE)) / 255)
    for train, timesteps, hooked in [(True, None, True), (False, None, False), (True, 10, False)]:
        model.train(train)
        shape, _ = model.schedule.shape_and_slope(torch.rand(8))
        calls = []
        original = model._fit_interior_to_variance
        model._fit_interior_to_variance = lambda *a, calls=calls: calls.append(a)
        model.diffusion_loss(x, torch.rand(8), timesteps)
        model._fit_interior_to_variance = original
        assert bool(calls) == hooked, (train, timesteps)


def test_bad_input_and_odd_widths():
    model = build_model("diffusion", {"data_shape": SHAPE, "channels": [5, 3]})  # odd widths work
    assert model.elbo(torch.randint(0, 256, (2, *SHAPE)) / 255).elbo.isfinite().all()
    for bad in (torch.full((2, *SHAPE), 1.5), torch.full((2, *SHAPE), 0.5), torch.full((2, *SHAPE), math.nan)):
        with pytest.raises(ElboxError, match="8-bit data"):
            model.elbo(bad)
    with pytest.raises(ElboxError, match="gamma_min must be a number >= -30 and <= 30"):
        build_model("diffusion", {"data_shape": SHAPE, "gamma_min": -40.0})


def test_sampling_gives_8bit_images_with_any_number_of_steps():
    model = build_model("diffusion", {"data_shape": SHAPE, "channels": [4, 8]})
    torch.manual_seed(13)
    for steps in (1, 7):
        images = model.sample(5, steps=steps)
        assert images.shape == (5, *SHAPE)
        k = images * 255
        assert torch.allclose(k, k.round(), atol=1e-4) and images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"timesteps": -1}, "timesteps"),
        ({"schedule": "quadratic"}, "unknown schedule"),
        ({"gamma_min": 5.0, "gamma_max": 1.0}, "gamma_min < gamma_max"),
        ({"parameterization": "v"}, "parameterization"),
        ({"channels": []}, "channels"),
    ],
)
def test_bad_configs_are_refused(bad, message):
    with pytest.raises(ElboxError, match=message):
        build_model("diffusion", {"data_shape": SHAPE, **bad})


@pytest.mark.parametrize("extra", [[], ["--timesteps", "10", "--schedule", "cosine", "--parameterization", "x0"]])
def test_cli_trains_evaluates_and_samples_a_diffusion_model(tmp_path, capsys, extra):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                "diffusion",
                "--data",
                "synthetic",
                "--epochs",
                "1",
                "--limit-train",
                "64",
                "--batch-size",
                "32",
                "--unet-channels",
                "4",
                "8",
                "--out",
                str(run),
                "--no-progress",
                *extra,
            ]
        )
        == 0
    )
    assert main(["evaluate", str(run), "--limit", "20", "--elbo-samples", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "bpd_diffusion" in out and "bpd_prior" in out and "bpd_recon" in out
    result = json.loads((run / "eval-test.json").read_text())
    parts = sum(result[f"bpd_{name}"] for name in ("recon", "prior", "diffusion"))
    assert result["bpd_source"] == "ELBO" and result["bpd"] == pytest.approx(parts, rel=1e-6)
    assert ("exact" in result["elbo_protocol"]) == bool(extra)
    assert main(["sample", str(run), "--steps", "3", "--n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    assert main(["sample", str(run), "--temperature", "0.5"]) == 1
    assert "--temperature" in capsys.readouterr().err

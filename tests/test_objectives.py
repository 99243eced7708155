"""Training objectives: the IWAE objective and its gradient estimators (reparam, STL, DReG), free bits, the
cyclical beta schedule, and the trainer run with each of them.

The estimator tests use a linear-Gaussian VAE, p(z) = N(0, I), p(x|z) = N(W z + b, s^2 I), built as a VAE
with hidden_dims=[] (a single Linear layer each way) and the fixed-sigma gaussian likelihood, so that the
posterior p(z|x) and the ELBO are known in closed form. Run with -s to see the measured gradient variances.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_trainer

from elbox.core.bounds import (
    DETACHED_POSTERIOR_ESTIMATORS,
    ELBOTerms,
    dreg_reweight_latent_gradient,
    free_bits_kl,
    iwae_objective,
    kl_diag_gaussians,
)
from elbox.core.errors import ElboxError
from elbox.data import get_data_space, load_split
from elbox.io.run_config import TrainConfig
from elbox.models import build_model
from elbox.models.base import LatentVariableModel
from elbox.training.objectives import (
    beta_at,
    elbo_training_objective,
    iwae_training_objective,
)
from elbox.training.trainer import Trainer

F64 = torch.float64
ESTIMATORS = ["reparam", "stl", "dreg"]

# linear-Gaussian model sizes and noise
D_DATA, D_LATENT, NOISE = 5, 2, 0.8


def linear_gaussian_vae() -> tuple[LatentVariableModel, torch.Tensor, torch.Tensor]:
    """A float64 VAE that is exactly a linear-Gaussian model, with its encoder set to the true posterior.

    W has orthogonal columns, so the posterior N(m, S), S = (I + W^T W / s^2)^-1, m = S W^T (x - b) / s^2,
    is diagonal with a constant covariance: the encoder's Linear layer represents it exactly.
    Returns (model, W, b).
    """
    model = build_model(
        "vae",
        dict(
            data_shape=[1, 1, D_DATA],
            latent_dim=D_LATENT,
            hidden_dims=[],
            likelihood="gaussian",
            likelihood_options={"sigma": NOISE},
        ),
    ).to(F64)
    gen = torch.Generator().manual_seed(100)
    q, _ = torch.linalg.qr(torch.randn(D_DATA, D_LATENT, generator=gen, dtype=F64))
    w = q * torch.tensor([1.5, 0.7], dtype=F64)
    b = 0.5 * torch.randn(D_DATA, generator=gen, dtype=F64)
    decoder, encoder = model.decoder[0], model.encoder[1][0]
    post_cov = torch.linalg.inv(torch.eye(D_LATENT, dtype=F64) + w.T @ w / NOISE**2)
    gain = post_cov @ w.T / NOISE**2  # m = gain (x - b)
    post_std = post_cov.diagonal().sqrt()
    with torch.no_grad():
        decoder.weight.copy_(w)
        decoder.bias.copy_(b)
        encoder.weight.zero_()
        encoder.weight[:D_LATENT] = gain
        encoder.bias[:D_LATENT] = -gain @ b
        # std = softplus(raw) + min_std  ->  raw = log(expm1(std - min_std))
        encoder.bias[D_LATENT:] = torch.log(torch.expm1(post_std - model.config.min_std))
    return model, w, b


def linear_gaussian_data(w: torch.Tensor, b: torch.Tensor, n: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(n, D_LATENT, generator=gen, dtype=F64)
    x = z @ w.T + b + NOISE * torch.randn(n, D_DATA, generator=gen, dtype=F64)
    return x.view(n, 1, 1, D_DATA)


def mismatch_encoder(model: LatentVariableModel) -> None:
    """Move q away from the posterior: shift the means and widen the standard deviations."""
    with torch.no_grad():
        model.encoder[1][0].bias += 0.5


class ReplicatedLinear(torch.nn.Module):
    """`copies` independent copies of a Linear layer applied in one call: rows [..., copies, per_copy, in]
    (flattened) use copy r's own weight slice, so one backward gives each copy's gradient separately."""

    def __init__(self, layer: torch.nn.Linear, copies: int, per_copy: int):
        super().__init__()
        self.copies, self.per_copy = copies, per_copy
        self.weight = torch.nn.Parameter(layer.weight.detach().expand(copies, *layer.weight.shape).clone())
        self.bias = torch.nn.Parameter(layer.bias.detach().expand(copies, *layer.bias.shape).clone())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        rows = h.view(-1, self.copies, self.per_copy, h.shape[-1])
        out = torch.einsum("krbi,roi->krbo", rows, self.weight) + self.bias[:, None]
        return out.reshape(h.shape[0], -1)


def repeated_gradients(model, x, k, estimator, repeats, seed=0):
    """[repeats, n] flattened encoder and decoder gradients of the batch-mean objective, one row per
    independent draw of the estimator.

    The linear-Gaussian VAE is replicated `repeats` times in one batch (the data tiled, every copy with its
    own parameters), so a single backward pass gives `repeats` independent gradient draws. The same seed for
    every estimator gives the same draws: common random numbers, so estimators are compared draw by draw.
    """
    replica = copy.deepcopy(model)
    b = x.shape[0]
    replica.encoder = torch.nn.Sequential(torch.nn.Flatten(), ReplicatedLinear(model.encoder[1][0], repeats, b))
    replica.decoder = ReplicatedLinear(model.decoder[0], repeats, b)
    torch.manual_seed(seed)
    objective, _ = iwae_training_objective(replica, x.repeat(repeats, 1, 1, 1), k, estimator)
    # sum over copies of each copy's batch mean: copy r's parameters get copy r's gradient
    objective.view(repeats, b).mean(1).sum().backward()
    encoder, decoder = replica.encoder[1], replica.decoder
    enc = torch.cat([encoder.weight.grad.flatten(1), encoder.bias.grad.flatten(1)], 1)
    dec = torch.cat([decoder.weight.grad.flatten(1), decoder.bias.grad.flatten(1)], 1)
    return enc, dec


def small_vae(seed=0, dtype=F64):
    torch.manual_seed(seed)
    return build_model("vae", dict(data_shape=[1, 8, 8], latent_dim=3, hidden_dims=[16])).to(dtype)


def binary_batch(b=6, dtype=F64):
    gen = torch.Generator().manual_seed(0)
    return (torch.rand(b, 1, 8, 8, generator=gen) > 0.5).to(dtype)


def flat_grad(output, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(output, params, retain_graph=True)])


# ----------------------------------------------------------------------------------------------
# IWAE objective: values


def test_iwae_k1_reparam_is_the_mc_kl_elbo_with_the_same_samples_and_gradient():
    model, x = small_vae(), binary_batch()
    params = list(model.parameters())
    torch.manual_seed(5)
    elbo = model.elbo(x, n_samples=1, analytic_kl=False).elbo
    elbo_grad = flat_grad(elbo.mean(), params)
    torch.manual_seed(5)  # the same eps: both draw randn((1, B, d))
    iwae, _ = iwae_training_objective(model, x, 1, "reparam")
    iwae_grad = flat_grad(iwae.mean(), params)
    torch.testing.assert_close(iwae, elbo, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(iwae_grad, elbo_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [1, 7])
def test_stl_and_dreg_have_the_reparam_value(k):
    model, x = small_vae(), binary_batch()
    values = {}
    for estimator in ESTIMATORS:
        torch.manual_seed(6)
        values[estimator], terms = iwae_training_objective(model, x, k, estimator)
    for estimator in ["stl", "dreg"]:
        # identical draws; log q differs only by rounding ((z - mean) / std instead of eps)
        torch.testing.assert_close(values[estimator], values["reparam"], rtol=1e-12, atol=1e-10)
    # the reporting terms: reconstruction averaged over the K draws, analytic KL
    mean, std = model.posterior_params(x)
    torch.testing.assert_close(terms.kl["z"], kl_diag_gaussians(mean, std).sum(-1))
    assert terms.reconstruction.shape == (x.shape[0],)


def test_iwae_objective_is_log_mean_exp_and_bad_estimator_is_rejected():
    log_w = torch.tensor([[-1.0, 3.0], [2.0, 3.0], [0.5, 3.0]], dtype=F64)
    expected = log_w.exp().mean(0).log()
    torch.testing.assert_close(iwae_objective(log_w), expected)
    model, x = small_vae(), binary_batch()
    with pytest.raises(ElboxError, match="estimator 'rws'"):
        iwae_training_objective(model, x, 3, "rws")
    with pytest.raises(ElboxError, match="K must be >= 1"):
        iwae_training_objective(model, x, 0, "reparam")


def test_log_weights_keep_their_values_with_detached_posterior_params():
    model, x = small_vae(), binary_batch()
    torch.manual_seed(7)
    plain = model.log_weights(x, 5)
    torch.manual_seed(7)
    detached = model.log_weights(x, 5, detach_posterior_params=True)
    torch.testing.assert_close(detached, plain, rtol=1e-12, atol=1e-10)


def test_dreg_hook_checks_shapes_and_skips_tensors_without_grad():
    with pytest.raises(ElboxError, match="z must be"):
        dreg_reweight_latent_gradient(torch.zeros(3, 2, 4), torch.zeros(2, 3))
    dreg_reweight_latent_gradient(torch.zeros(3, 2, 4), torch.zeros(3, 2))  # no grad: nothing to do


# ----------------------------------------------------------------------------------------------
# Gradient estimators on the linear-Gaussian model


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_replicated_gradients_match_the_plain_model(estimator):
    # the test helper itself: one copy, the same draws -> the plain model's gradient
    model, w, b = linear_gaussian_vae()
    x = linear_gaussian_data(w, b)
    mismatch_encoder(model)
    enc, dec = repeated_gradients(model, x, 10, estimator, repeats=1, seed=3)
    torch.manual_seed(3)
    objective, _ = iwae_training_objective(model, x, 10, estimator)
    torch.testing.assert_close(enc[0], flat_grad(objective.mean(), list(model.encoder.parameters())))
    torch.testing.assert_close(dec[0], flat_grad(objective.mean(), list(model.decoder.parameters())))


def test_stl_and_dreg_encoder_gradients_vanish_at_the_true_posterior():
    # q = p(z|x) makes log w = log p(x) constant in z, so d log w / dz = 0: STL and DReG give exactly zero
    # encoder gradient on every draw (zero variance), while reparam keeps a zero-mean score term.
    model, w, b = linear_gaussian_vae()
    x = linear_gaussian_data(w, b)
    for k in [1, 10]:
        grads = {est: repeated_gradients(model, x, k, est, repeats=20)[0] for est in ESTIMATORS}
        assert grads["stl"].abs().max() < 1e-10 and grads["dreg"].abs().max() < 1e-10, k
        assert grads["reparam"].abs().max() > 1e-2, k


def test_k1_estimators_match_the_exact_elbo_gradient():
    # K = 1: all three are unbiased for the ELBO gradient, which is closed-form here:
    # ELBO = -D/2 log(2 pi s^2) - (||x - W m - b||^2 + sum_ij W_ij^2 std_j^2) / (2 s^2) - KL(q || N(0, I)).
    model, w, b = linear_gaussian_vae()
    x = linear_gaussian_data(w, b)
    mismatch_encoder(model)
    params = list(model.encoder.parameters()) + list(model.decoder.parameters())
    weight, bias = model.decoder[0].weight, model.decoder[0].bias
    mean, std = model.posterior_params(x)
    resid = x.flatten(1) - mean @ weight.T - bias
    spread = std.square() @ weight.square().T  # [B, D]: sum_j W_dj^2 std_j^2
    expected_log_lik = -0.5 * D_DATA * math.log(2 * math.pi * NOISE**2) - (resid.square() + spread).sum(-1) / (
        2 * NOISE**2
    )
    exact_elbo = expected_log_lik - kl_diag_gaussians(mean, std).sum(-1)
    exact = flat_grad(exact_elbo.mean(), params)

    repeats = 2000
    for estimator in ESTIMATORS:
        enc, dec = repeated_gradients(model, x, 1, estimator, repeats)
        grads = torch.cat([enc, dec], 1)
        se = grads.std(0) / math.sqrt(repeats)
        # every coordinate within 4 standard errors of the mean of `repeats` draws (or 1e-9 where the SE is 0)
        assert ((grads.mean(0) - exact).abs() <= 4 * se + 1e-9).all(), (estimator, (grads.mean(0) - exact) / se)


def test_gradient_variance_and_unbiasedness_at_k10():
    model, w, b = linear_gaussian_vae()
    x = linear_gaussian_data(w, b)
    mismatch_encoder(model)
    k, repeats = 10, 2000
    enc, dec = {}, {}
    for estimator in ESTIMATORS:
        enc[estimator], dec[estimator] = repeated_gradients(model, x, k, estimator, repeats)
    # total variance: sum over the 24 encoder coordinates (Linear 5 -> 4) of the variance over repeats
    total_var = {est: enc[est].var(0).sum().item() for est in ESTIMATORS}
    decoder_var = {est: dec[est].var(0).sum().item() for est in ESTIMATORS}
    print(
        f"\nencoder-gradient variance, linear-Gaussian VAE, K={k}, B={x.shape[0]}, {repeats} repeats, "
        f"summed over {enc['reparam'].shape[1]} coordinates: "
        + ", ".join(f"{est} {total_var[est]:.4g}" for est in ESTIMATORS)
        + f"  (reparam/stl {total_var['reparam'] / total_var['stl']:.1f}x, "
        + f"reparam/dreg {total_var['reparam'] / total_var['dreg']:.1f}x)"
        + "\ndecoder-gradient variance: "
        + ", ".join(f"{est} {decoder_var[est]:.4g}" for est in ESTIMATORS)
    )
    # Variance: measured (seeded) reductions are about 4x (STL) and 60x (DReG). A variance estimated from 2000
    # draws has a relative standard error of roughly sqrt(2/1999) ~ 3% (more for heavy tails), so requiring 2x
    # and 10x leaves a wide margin over the noise while still failing if an estimator loses its reduction.
    assert total_var["stl"] < total_var["reparam"] / 2
    assert total_var["dreg"] < total_var["reparam"] / 10

    # Unbiasedness: DReG and reparam estimate the same gradient of IWAE_K. Paired per draw (same seeds), the
    # mean difference per coordinate must be within 4 standard errors of the paired difference.
    diff = enc["dreg"] - enc["reparam"]
    z_dreg = diff.mean(0) / (diff.std(0) / math.sqrt(repeats))
    assert z_dreg.abs().max() < 4, z_dreg
    # The same test has the power to see a bias: STL is biased for K > 1 (Tucker et al. 2018), and it is
    # far outside 4 SE here.
    diff = enc["stl"] - enc["reparam"]
    z_stl = diff.mean(0) / (diff.std(0) / math.sqrt(repeats))
    print(
        f"max |paired z| vs reparam over encoder coordinates: dreg {z_dreg.abs().max():.2f}, stl "
        f"{z_stl.abs().max():.1f}"
    )
    assert z_stl.abs().max() > 10, z_stl

    # Decoder gradients: the estimators change only the encoder's gradient, so with the same draws the
    # decoder gradients agree draw by draw (to rounding), hence also in expectation.
    for estimator in ["stl", "dreg"]:
        torch.testing.assert_close(dec[estimator], dec["reparam"], rtol=1e-9, atol=1e-12)


def test_dreg_in_float32_on_a_nonlinear_vae_has_finite_gradients_for_every_parameter():
    model, x = small_vae(dtype=torch.float32), binary_batch(dtype=torch.float32)
    torch.manual_seed(8)
    objective, _ = iwae_training_objective(model, x, 5, "dreg")
    objective.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# ----------------------------------------------------------------------------------------------
# Free bits


def test_free_bits_kl_averages_over_the_batch_before_the_floor():
    kl = {"a": torch.tensor([0.0, 4.0]), "b": torch.tensor([1.0, 1.0])}
    # group a: mean 2 > 1.5 -> 2; group b: mean 1 < 1.5 -> 1.5 (a per-example max would give 1.5 + 4 for a)
    assert free_bits_kl(kl, 1.5).item() == pytest.approx(3.5)
    assert free_bits_kl(kl, 0.0).item() == pytest.approx(3.0)
    for bad in [-0.1, math.inf, math.nan]:
        with pytest.raises(ElboxError, match="free bits"):
            free_bits_kl(kl, bad)


def test_free_bits_above_the_kl_leave_no_kl_gradient():
    model, x = small_vae(), binary_batch()
    params = list(model.parameters())
    torch.manual_seed(9)
    terms = model.elbo(x)
    assert terms.kl_total.mean() < 100
    floored = elbo_training_objective(terms, beta=1.0, free_bits=100.0)
    # the value is reconstruction - lambda, and the gradient is the reconstruction's alone
    torch.testing.assert_close(floored, terms.reconstruction.mean() - 100.0)
    torch.testing.assert_close(flat_grad(floored, params), flat_grad(terms.reconstruction.mean(), params))
    # below the KL the floor is inactive: the ordinary ELBO gradient
    low = elbo_training_objective(terms, beta=1.0, free_bits=1e-6)
    torch.testing.assert_close(flat_grad(low, params), flat_grad(terms.elbo.mean(), params))


def small_trainer(tmp_path, seed=0, epochs=1, **train_options):
    """A small VAE on 400 training images, 4 steps of 100 per epoch."""
    return make_trainer(
        tmp_path,
        "vae",
        {"latent_dim": 3, "hidden_dims": [32]},
        seed=seed,
        epochs=epochs,
        batch_size=100,
        log_every=2,
        **train_options,
    )


def small_run(tmp_path, seed=0, epochs=1, **train_options):
    trainer = small_trainer(tmp_path, seed, epochs, **train_options)
    return trainer, trainer.fit()


def first_step(trainer):
    """The trainer's first step on a fixed batch with fixed draws."""
    train, _ = load_split("synthetic", "train")
    x = trainer.space.train_batch(train[:100], torch.Generator().manual_seed(0))
    torch.manual_seed(10)
    return trainer.training_step(x, beta=1.0)


def test_free_bits_do_not_change_the_reported_elbo(tmp_path):
    # the same model (seeded build), batch and draws; only the objective differs
    values = {fb: first_step(small_trainer(tmp_path / str(fb), free_bits=fb)) for fb in [0.0, 1000.0]}
    plain, floored = values[0.0], values[1000.0]
    assert floored["elbo"] == plain["elbo"] and floored["kl"] == plain["kl"]
    assert plain["objective"] == pytest.approx(plain["elbo"].item(), rel=1e-6)
    # the objective is reconstruction - lambda, far below the ELBO
    assert floored["objective"] == pytest.approx(floored["reconstruction"].item() - 1000.0, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Cyclical beta schedule


def test_cyclical_beta_schedule():
    config = TrainConfig(beta=0.8, beta_schedule="cyclical", cycle_epochs=2, cycle_ramp_fraction=0.5)
    # 10 steps per epoch: cycles of 20 steps, beta rises over the first 10 of each, then holds 0.8
    expected = {0: 0.0, 5: 0.4, 9: 0.72, 10: 0.8, 15: 0.8, 19: 0.8, 20: 0.0, 25: 0.4, 30: 0.8, 45: 0.4}
    for step, beta in expected.items():
        assert beta_at(config, step, 10) == pytest.approx(beta, abs=1e-12), step
    # a fractional cycle length and a full-length ramp: 1.5 epochs x 4 steps = 6 steps per cycle
    config = TrainConfig(beta=1.0, beta_schedule="cyclical", cycle_epochs=1.5, cycle_ramp_fraction=1.0)
    assert [beta_at(config, s, 4) for s in range(8)] == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 0, 1 / 6])


def test_cyclical_cycle_shorter_than_two_steps_is_rejected(tmp_path):
    # 4 steps per epoch: a quarter-epoch cycle is 1 step, which would hold beta at 0 forever
    with pytest.raises(ElboxError, match="at least 2"):
        small_trainer(tmp_path, beta_schedule="cyclical", cycle_epochs=0.25)


def test_cyclical_training_logs_beta_and_unweighted_elbo(tmp_path):
    trainer, last = small_run(tmp_path, epochs=2, beta_schedule="cyclical", cycle_epochs=1, cycle_ramp_fraction=0.5)
    train_records = [r for r in trainer.records if r["kind"] == "train"]
    # 4 steps per epoch and per cycle, beta rising over 2 steps; records at steps 2 and 4 hold the betas of
    # steps 1 and 3 (counted from 0): 0.5 and 1, in both epochs
    assert [r["beta"] for r in train_records] == pytest.approx([0.5, 1.0, 0.5, 1.0])
    assert last["train_elbo"] == pytest.approx(last["train_reconstruction"] - last["train_kl"], rel=1e-6)


# ----------------------------------------------------------------------------------------------
# The trainer with the IWAE objective


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_trainer_runs_each_estimator_reproducibly(tmp_path, estimator):
    options = dict(objective="iwae", iw_samples=4, estimator=estimator)
    trainer, a = small_run(tmp_path / "a", seed=2, epochs=2, **options)
    _, b = small_run(tmp_path / "b", seed=2, epochs=2, **options)
    for key in ["val_elbo", "train_elbo", "train_objective", "train_kl"]:
        assert math.isfinite(a[key]) and a[key] == b[key], key
    assert a["skipped_steps"] == 0 and a["step"] == 2 * trainer.steps_per_epoch
    # the reported ELBO is the true one (reconstruction - KL); the objective is the IWAE_4 estimate, logged apart
    assert a["train_elbo"] == pytest.approx(a["train_reconstruction"] - a["train_kl"], rel=1e-6)
    assert all("objective" in r for r in trainer.records if r["kind"] == "train")


def test_trainer_reports_the_same_values_for_every_estimator(tmp_path):
    # the same model, batch and draws: the estimators change gradients only, not the logged numbers
    first = {
        est: first_step(small_trainer(tmp_path / est, objective="iwae", iw_samples=3, estimator=est))
        for est in ESTIMATORS
    }
    for estimator in ["stl", "dreg"]:
        for key in ["objective", "elbo", "reconstruction", "kl"]:
            assert first[estimator][key].item() == pytest.approx(first["reparam"][key].item(), rel=1e-6), (
                estimator,
                key,
            )
        assert first[estimator]["grad_norm"] != first["reparam"]["grad_norm"]
    # IWAE_3 >= ELBO in expectation; on this batch of 100 examples the gap is about 0.9 nats, far above its MC noise
    assert first["reparam"]["objective"] > first["reparam"]["elbo"]


def test_iwae_objective_needs_importance_samples(tmp_path):
    class NoImportanceSamples(LatentVariableModel):
        def __init__(self):
            super().__init__(None)
            self.weight = torch.nn.Parameter(torch.zeros(1))

    train, _ = load_split("synthetic", "train")
    with pytest.raises(ElboxError, match="importance_samples"):
        Trainer(
            NoImportanceSamples(),
            train[:10],
            train[:10],
            get_data_space("binary"),
            TrainConfig(objective="iwae", iw_samples=2),
            tmp_path,
            progress=False,
        )


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(objective="vimco"), "unknown objective"),
        (dict(objective="iwae", estimator="rws"), "unknown estimator"),
        (dict(objective="iwae", iw_samples=0), "iw_samples"),
        (dict(objective="iwae", iw_samples=2.5), "iw_samples"),
        (dict(free_bits=-1.0), "free_bits"),
        (dict(free_bits=math.nan), "free_bits"),
        (dict(beta_schedule="cyclical"), "cycle_epochs > 0"),
        (dict(beta_schedule="cyclical", cycle_epochs=2, cycle_ramp_fraction=0.0), "cycle_ramp_fraction"),
        (dict(beta_schedule="cyclical", cycle_epochs=2, cycle_ramp_fraction=1.5), "cycle_ramp_fraction"),
        (dict(cycle_epochs=-1.0), "cycle_epochs"),
        (dict(objective="iwae", iw_samples=5, beta=0.5), "beta=0.5"),
        (dict(objective="iwae", iw_samples=5, free_bits=1.0), "free_bits=1.0"),
        (dict(objective="iwae", iw_samples=5, beta_schedule="linear", warmup_epochs=1), "beta_schedule='linear'"),
        (dict(objective="iwae", iw_samples=5, n_samples=2), "n_samples=2"),
        (dict(iw_samples=5), "iwae objective only"),
        (dict(estimator="dreg"), "iwae objective only"),
    ],
)
def test_bad_objective_config(bad, message):
    with pytest.raises(ElboxError, match=message):
        TrainConfig(**bad)


def test_defaults_train_the_plain_elbo():
    config = TrainConfig()
    assert (config.objective, config.iw_samples, config.estimator, config.free_bits) == ("elbo", 1, "reparam", 0.0)
    terms = ELBOTerms(torch.tensor([-3.0, -5.0]), {"z": torch.tensor([1.0, 2.0])})
    assert elbo_training_objective(terms, 1.0).item() == pytest.approx(-5.5)
    assert elbo_training_objective(terms, 0.5).item() == pytest.approx(-4.75)
    assert DETACHED_POSTERIOR_ESTIMATORS == ("stl", "dreg")

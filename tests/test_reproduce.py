"""What the published Fashion-MNIST models need (issue 28): gated dense layers, bounded log-variances, He
initialization, the VampPrior on the VAE, the two-level HVAE with skip paths, early stopping, per-tensor gradient
normalization and the 50,000 / 10,000 split. Small models and data made by the tests (the split: the real files)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import interrupt_second_validation
from torch.distributions import Bernoulli, Normal

import elbox
from elbox.core.nets import GatedDense, initialize_weights, mlp
from elbox.models import build_model
from elbox.training.trainer import Trainer

SHAPE = [1, 6, 6]
SKIP = {
    "data_shape": SHAPE,
    "hvae_type": "skip",
    "latent_dims": [3, 2],
    "hidden_dims": [16],
    "logvar_bounds": [-6.0, 2.0],
}


def binary(n: int, seed: int = 0) -> torch.Tensor:
    return (torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) < 0.3).float()


def test_gated_dense_is_a_linear_layer_times_a_sigmoid_gate():
    torch.manual_seed(0)
    layer, x = GatedDense(5, 4), torch.randn(3, 5)
    (w, v), (b, c) = layer.linear.weight.chunk(2), layer.linear.bias.chunk(2)
    expected = (x @ w.T + b) * torch.sigmoid(x @ v.T + c)
    assert torch.allclose(layer(x), expected)
    net = mlp(784, [300, 300], 80, "gated")
    assert sum(p.numel() for p in net.parameters()) == 2 * (784 * 300 + 300) + 2 * (300 * 300 + 300) + 300 * 80 + 80


def test_he_initialization_draws_weights_with_variance_two_over_fan_in():
    torch.manual_seed(0)
    net = mlp(400, [300], 200, "relu")
    initialize_weights(net, "he")
    weight = net[0].weight
    # the sample variance of n = 120,000 normal draws has a relative standard error of sqrt(2 / n) = 0.4 %
    assert weight.var().item() == pytest.approx(2 / 400, rel=5 * math.sqrt(2 / weight.numel()))


def test_bounded_log_variances_stay_in_their_bounds():
    model = build_model("vae", {"data_shape": SHAPE, "latent_dim": 2, "hidden_dims": [8], "logvar_bounds": [-6.0, 2.0]})
    with torch.no_grad():
        model.encoder[-1][-1].bias.fill_(100.0)  # raw log-variances far above the bound
        _, std = model.posterior_params(binary(4))
    assert torch.allclose(std, torch.full_like(std, math.exp(1.0)))


@pytest.mark.parametrize(
    "model, options",
    [
        ("hvae", SKIP),
        ("hvae", {**SKIP, "top_prior": "vamp", "pseudo_inputs": 7}),
        ("hvae", {**SKIP, "levels": 3, "latent_dims": [3, 2, 2]}),
        ("hvae", {**SKIP, "data_shape": [1, 8, 8], "hvae_type": "conv-skip"}),
        ("vae", {"data_shape": SHAPE, "latent_dim": 2, "hidden_dims": [8], "prior": "vamp", "pseudo_inputs": 5}),
    ],
)
def test_the_elbo_is_the_mean_log_weight_and_iwae_rises_with_k(model, options):
    torch.manual_seed(0)
    m = build_model(model, options).eval()
    conv = m.config.data_shape[1] != 6  # the conv-skip model on 8 x 8 images: its 64-channel convolutions cost more
    x = (torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.3).float() if conv else binary(3)
    n = 2_000 if conv else 20_000
    with torch.no_grad():
        elbo = m.elbo(x, n).elbo
        log_w = m.log_weights(x, n)
    stderr = log_w.std(0) / math.sqrt(n)  # the ELBO's own draws add as much again: 5 s.e. of the difference
    assert ((elbo - log_w.mean(0)).abs() < 5 * math.sqrt(2) * stderr).all()
    # IWAE_K from n / K independent groups of K draws each, with the standard error over the groups
    groups = [torch.logsumexp(log_w.reshape(-1, k, 3), 1) - math.log(k) for k in (1, 10, 100)]
    iwae, se = [g.mean(0) for g in groups], [g.std(0) / math.sqrt(g.shape[0]) for g in groups]
    for lower, higher in ((0, 1), (1, 2)):
        rise = iwae[higher] - iwae[lower]
        assert (rise > -3 * (se[lower].square() + se[higher].square()).sqrt()).all()  # never falls beyond 3 s.e.
    assert (iwae[1] - iwae[0]).mean() > 3 * (se[0].square() + se[1].square()).sqrt().mean()  # and rises from K = 1


@pytest.mark.parametrize("activation", ["relu", "gated"])
def test_skip_hvae_log_weights_match_torch_distributions_term_by_term(activation):
    # by hand, q(z1|x,z2)'s joint network runs on the concatenation; the model splits its first layer (x's half once)
    torch.manual_seed(0)
    m = build_model("hvae", {**SKIP, "activation": activation}).eval()
    x = binary(4)
    with torch.no_grad():
        torch.manual_seed(1)
        log_px, kl, log_w = m.draw(m.prepare(x), x, 5)
        torch.manual_seed(1)  # the same draws, again, by hand: z2 ~ q(z2|x), then z1 ~ q(z1|x,z2)
        raw2 = m.encoder_z2(x)
        q2 = Normal(raw2[:, :2], (0.5 * raw2[:, 2:].clamp(-6, 2)).exp())
        z2 = q2.loc + q2.scale * torch.randn(5, 4, 2)
        h1 = torch.cat([m.encoder_z1.a(x.flatten(1)).expand(5, -1, -1), m.encoder_z1.b(z2)], -1)
        raw1 = m.encoder_z1.joint(h1)
        q1 = Normal(raw1[..., :3], (0.5 * raw1[..., 3:].clamp(-6, 2)).exp())
        z1 = q1.loc + q1.scale * torch.randn_like(q1.loc)
        raw_p1 = m.prior_z1(z2)
        p1 = Normal(raw_p1[..., :3], (0.5 * raw_p1[..., 3:].clamp(-6, 2)).exp())
        logits = m.decoder(z1.reshape(-1, 3), z2.reshape(-1, 2)).reshape(5, 4, *SHAPE)
        expected_px = Bernoulli(logits=logits).log_prob(x).flatten(2).sum(-1)
        expected_w = (
            expected_px
            + p1.log_prob(z1).sum(-1)
            + Normal(0, 1).log_prob(z2).sum(-1)
            - q1.log_prob(z1).sum(-1)
            - q2.log_prob(z2).sum(-1)
        )
    assert torch.allclose(log_px, expected_px, atol=1e-4) and torch.allclose(log_w, expected_w, atol=1e-4)
    analytic = torch.distributions.kl_divergence(q1, p1).sum(-1)
    assert torch.allclose(kl["z1"], analytic, atol=1e-5)


@pytest.mark.parametrize(
    "name, config",
    [
        ("hvae", {**SKIP, "top_prior": "vamp", "pseudo_inputs": 7}),
        ("vae", {"data_shape": SHAPE, "latent_dim": 2, "hidden_dims": [8], "prior": "vamp", "pseudo_inputs": 7}),
        (
            "markov",
            {
                "data_shape": SHAPE,
                "hvae_type": "markov",
                "latent_dims": [3, 2],
                "top_prior": "vamp",
                "pseudo_inputs": 7,
            },
        ),
    ],
)
def test_vamp_components_are_encoded_once_per_importance_sampling_stream(name, config):
    """A sampler's passes share the pseudo-inputs' posteriors (encoding them costs as much as a pass of samples), and
    its log weights equal those with log p(z) recomputed from the pseudo-inputs on every draw."""
    torch.manual_seed(0)
    m = build_model("hvae" if name == "markov" else name, config).eval()
    x = binary(4)
    encoder = {"hvae": lambda: m.encoder_z2, "vae": lambda: m.encoder, "markov": lambda: m.encoders[0]}[name]()
    calls = []
    encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        torch.manual_seed(1)
        draw = m.log_weights_sampler(x)
        log_w = torch.cat([draw(3), draw(3), draw(2)])
        assert calls.count(7) == 1  # the pseudo-inputs, once for three passes
        torch.manual_seed(1)
        if name == "markov":  # prepare() on every pass recomputes the components
            expected = torch.cat([m.draw(m.prepare(x), x, n).log_w for n in (3, 3, 2)])
        elif name == "hvae":
            (mean, std), x_parts, _ = m.prepare(x)
            recomputed = lambda z: m.vamp.log_prob(m.posterior_top, z)  # noqa: E731
            prepared = ((mean, std), x_parts, recomputed)
            expected = torch.cat([m.draw(prepared, x, n).log_w for n in (3, 3, 2)])
        else:
            mean, std = m.posterior_params(x)
            expected = torch.cat([m._draw_log_weights(x, mean, std, n, False, m.prior_log_prob)[2] for n in (3, 3, 2)])
    torch.testing.assert_close(log_w, expected)


def test_three_level_skip_hvae_log_weights_match_torch_distributions_term_by_term():
    """z3 ~ q(z3|x), z2 ~ q(z2|x,z3), z1 ~ q(z1|x,z2); log w = log p(x|z1,z2) + log p(z1|z2) + log p(z2|z3) + log p(z3)
    - the three log q; each level's KL term is the analytic KL at the drawn level above."""
    torch.manual_seed(0)
    m = build_model("hvae", {**SKIP, "levels": 3, "latent_dims": [3, 2, 2]}).eval()
    x = binary(4)

    def gaussian(raw, d):
        return Normal(raw[..., :d], (0.5 * raw[..., d:].clamp(-6, 2)).exp())

    def joined(net, z):
        return net.joint(torch.cat([net.a(x.flatten(1)).expand(5, -1, -1), net.b(z)], -1))

    with torch.no_grad():
        torch.manual_seed(1)
        log_px, kl, log_w = m.draw(m.prepare(x), x, 5)
        torch.manual_seed(1)
        q3 = gaussian(m.encoder_z3(x), 2)
        z3 = q3.loc + q3.scale * torch.randn(5, 4, 2)
        q2 = gaussian(joined(m.encoder_z2, z3), 2)
        z2 = q2.loc + q2.scale * torch.randn_like(q2.loc)
        q1 = gaussian(joined(m.encoder_z1, z2), 3)
        z1 = q1.loc + q1.scale * torch.randn_like(q1.loc)
        p3, p2, p1 = Normal(torch.zeros(2), torch.ones(2)), gaussian(m.prior_z2(z3), 2), gaussian(m.prior_z1(z2), 3)
        logits = m.decoder(z1.reshape(-1, 3), z2.reshape(-1, 2)).reshape(5, 4, *SHAPE)
        expected_px = Bernoulli(logits=logits).log_prob(x).flatten(2).sum(-1)
        pairs = ((p1, q1, z1), (p2, q2, z2), (p3, q3, z3))
        expected_w = expected_px + sum(p.log_prob(z).sum(-1) - q.log_prob(z).sum(-1) for p, q, z in pairs)
    assert torch.allclose(log_px, expected_px, atol=1e-4) and torch.allclose(log_w, expected_w, atol=1e-4)
    for name, (p, q, _) in zip(("z1", "z2", "z3"), pairs):
        analytic = torch.distributions.kl_divergence(q, p).sum(-1)
        assert torch.allclose(kl[name], analytic.expand_as(kl[name]), atol=1e-5)


def test_the_published_models_have_the_reference_parameter_counts():
    """Tomczak & Welling's networks, counted from their layer sizes: the 2-level HVAE has 2,431,024 parameters, the
    VAE with a 500-component VampPrior 1,508,864 (392,000 of them the pseudo-inputs), the ConvHVAE 2,210,861."""
    nets = {"logvar_bounds": [-6.0, 2.0], "weight_init": "he", "activation": "gated"}
    hvae = build_model("hvae", {"data_shape": [1, 28, 28], "hvae_type": "skip", **nets})
    vae = build_model(
        "vae",
        {
            "data_shape": [1, 28, 28],
            "latent_dim": 40,
            "hidden_dims": [300, 300],
            "prior": "vamp",
            "pseudo_inputs": 500,
            **nets,
        },
    )
    assert sum(p.numel() for p in hvae.parameters()) == 2_431_024
    assert sum(p.numel() for p in vae.parameters()) == 1_508_864
    conv = build_model("hvae", {"data_shape": [1, 28, 28], "hvae_type": "conv-skip", **nets})
    assert sum(p.numel() for p in conv.parameters()) == 2_210_861


def test_every_row_config_is_a_valid_run_config_of_the_protocol():
    """benchmarks/reproduce/ROW.json, as `elbox train --config` reads it: the protocol's batch 100, lr 5e-4, 50,000 /
    10,000 split, early stopping with patience 51, gated 300-unit layers and 40-dimensional latents."""
    from elbox.io.checkpoint import checked_run_config

    root = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce"
    rows = sorted(root.glob("*.json"))
    assert {p.stem for p in rows} >= {"vae", "vae-vamp", "hvae", "hvae-vamp", "convhvae", "hvae-iwae", "hvae-vamp-iwae"}
    for path in rows:
        config = checked_run_config(json.loads(path.read_text()), str(path))
        train, model = config["train"], config["model_config"]
        assert (train["batch_size"], train["lr"], train["patience"]) == (100, 5e-4, 51), path
        assert config["data"]["validation_size"] == 10_000 and model["activation"] == "gated", path
        assert model.get("latent_dims", [model.get("latent_dim")] * 2) == [40, 40], path


def stopped(patience: int, val_elbos: list[float], warmup: float = 0.0, val_iwaes: list[float] | None = None):
    config = SimpleNamespace(
        patience=patience,
        warmup_epochs=warmup,
        beta_schedule="linear" if warmup else "constant",
        objective="elbo" if val_iwaes is None else "iwae",
        iw_samples=1 if val_iwaes is None else 5,
    )
    records = [{"kind": "epoch", "epoch": i + 1, "val_elbo": v} for i, v in enumerate(val_elbos)]
    for record, value in zip(records, val_iwaes or []):
        record["val_iwae"] = value
    return Trainer.stopped_early.fget(SimpleNamespace(records=records, config=config))


def test_early_stopping_counts_epochs_without_improvement_after_the_warm_up():
    assert stopped(2, [-10, -9, -9.5]) is None
    assert stopped(2, [-10, -9, -9.5, -9.2]) == 2  # two epochs after the best, none better
    assert stopped(2, [-10, -9, -9.5, -8, -8.5]) is None  # a better epoch restarts the count
    assert stopped(2, [-10, -9, -9.5, -9.2], warmup=3) is None  # epochs inside the warm-up do not count
    assert stopped(2, [-10, -9, -9.5, -9.2, -9.3], warmup=3) == 2
    # under the iwae objective the IWAE-K bound picks the best epoch, not the ELBO (which peaks at epoch 2 here)
    assert stopped(2, [-10, -9, -9.5, -9.8], val_iwaes=[-9.0, -8.6, -8.4, -8.5]) is None
    assert stopped(2, [-10, -9, -9.5, -9.8, -9.9], val_iwaes=[-9.0, -8.6, -8.4, -8.5, -8.45]) == 3
    # a run validated before val_iwae existed (a record lacks it) keeps choosing by the ELBO
    assert stopped(2, [-10, -9, -9.5, -9.8], val_iwaes=[-9.0, -8.6, -8.4]) == 2


def test_the_iwae_objective_validates_and_keeps_its_best_epoch_by_the_iwae_bound(tiny_images, tmp_path, monkeypatch):
    """Each validated epoch of the iwae objective records val_iwae (the elbo objective none), and best.safetensors
    holds the epoch with the highest val_iwae: here val_iwae is replaced by minus the ELBO, so that the two bounds
    would pick different epochs."""
    assert "val_iwae" not in quick_fit(tiny_images, None, epochs=1).history[-1]
    validate = Trainer.validate

    def reversed_iwae(self):
        record = validate(self)
        assert math.isfinite(record["val_iwae"])
        return {**record, "val_iwae": -record["val_elbo"]}

    monkeypatch.setattr(Trainer, "validate", reversed_iwae)
    weights_by_epoch = {}

    def keep_weights(record):
        weights_by_epoch[record["epoch"]] = (tmp_path / "iwae" / "model.safetensors").read_bytes()

    options = {"epochs": 4, "lr": 0.05, "objective": "iwae", "iw_samples": 5}
    run = quick_fit(tiny_images, tmp_path / "iwae", callback=keep_weights, **options)
    epochs = [r for r in run.history if r["kind"] == "epoch"]
    by_iwae, by_elbo = (max(epochs, key=lambda r: r[k])["epoch"] for k in ("val_iwae", "val_elbo"))
    assert by_iwae != by_elbo
    assert (tmp_path / "iwae" / "best.safetensors").read_bytes() == weights_by_epoch[by_iwae]


def test_init_from_starts_from_a_runs_result_and_refuses_another_model(tiny_images, tmp_path):
    """--init-from: a new run (here fine-tuning with the iwae objective at a tiny learning rate) starts from the
    first run's best weights; a run of other model options is refused, naming them."""
    first = quick_fit(tiny_images, tmp_path / "first", epochs=6, lr=0.05, patience=2)
    start = elbox.load(tmp_path / "first", weights="best").state_dict()
    tuned = quick_fit(
        tiny_images,
        tmp_path / "tuned",
        epochs=1,
        lr=1e-9,
        objective="iwae",
        iw_samples=3,
        init_from=str(first.directory),
    )
    for name, value in tuned.model.state_dict().items():
        torch.testing.assert_close(value, start[name], atol=1e-6, rtol=0)
    recorded = json.loads((tmp_path / "tuned" / "config.json").read_text())["train"]["init_from"]
    assert recorded == str(first.directory.resolve())
    with pytest.raises(elbox.ElboxError, match="--init-from .*other latent_dim;"):
        elbox.fit("vae", tiny_images, latent_dim=3, hidden_dims=[8], batch_size=16, init_from=str(first.directory))
    shutil.rmtree(first.directory)  # resuming needs only the run's own checkpoint
    assert elbox.resume(tmp_path / "tuned", epochs=2, verbose=False, progress=False).history[-1]["epoch"] == 2


@pytest.fixture
def tiny_images(tmp_path):
    """96 random 8-bit images in an .npy file (a run on a file can be evaluated from its directory)."""
    import numpy as np

    path = tmp_path / "images.npy"
    np.save(path, (torch.rand(96, *SHAPE, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy())
    return path


def quick_fit(images, out, **options):
    return elbox.fit(
        "vae",
        images,
        out=out,
        latent_dim=2,
        hidden_dims=[8],
        batch_size=16,
        verbose=False,
        progress=False,
        samples=False,
        **options,
    )


def test_an_early_stopped_run_keeps_and_evaluates_its_best_epoch_and_resumes_bit_for_bit(
    tiny_images, tmp_path, monkeypatch
):
    options = {"epochs": 30, "lr": 0.05, "patience": 2}
    whole = quick_fit(tiny_images, tmp_path / "whole", **options)
    epochs = [r for r in whole.history if r["kind"] == "epoch"]
    best = max(epochs, key=lambda r: r["val_elbo"])
    assert epochs[-1]["epoch"] == best["epoch"] + 2 < 30  # stopped two epochs after its best

    def evaluated(**weights):
        result = elbox.evaluate(tmp_path / "whole", iw_samples=[1], **weights)
        return {k: v for k, v in result.items() if k != "time_s"}

    assert evaluated() == evaluated(weights="best") != evaluated(weights="last")  # early stopping: the best weights
    with pytest.raises(elbox.ElboxError, match="stopped early"):
        elbox.resume(tmp_path / "whole", verbose=False, progress=False)

    validate = Trainer.validate
    interrupt_second_validation(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        quick_fit(tiny_images, tmp_path / "cut", **options)
    monkeypatch.setattr(Trainer, "validate", validate)
    resumed = elbox.resume(tmp_path / "cut", verbose=False, progress=False)
    strip = ("epoch_time_s", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in strip} for r in resumed.history] == [
        {k: v for k, v in r.items() if k not in strip} for r in whole.history
    ]
    assert (tmp_path / "cut" / "best.safetensors").read_bytes() == (
        tmp_path / "whole" / "best.safetensors"
    ).read_bytes()


def test_normalized_gradients_reach_the_optimizer_with_unit_norm(tiny_images, monkeypatch):
    norms = []
    step = torch.optim.Adam.step

    def record(self, *args, **kwargs):
        norms.extend(p.grad.norm().item() for group in self.param_groups for p in group["params"] if p.grad is not None)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", record)
    quick_fit(tiny_images, None, epochs=1, normalize_gradients=True)
    assert norms and all(n == pytest.approx(1.0, abs=1e-5) for n in norms)


def test_the_50000_10000_split_holds_out_the_last_10000_training_images(tmp_path):
    from elbox.data import load_split

    everything, _ = load_split("fashion-mnist", "train-full")
    train, _ = load_split("fashion-mnist", "train", validation_size=10_000)
    validation, _ = load_split("fashion-mnist", "validation", validation_size=10_000)
    assert torch.equal(train, everything[:50_000]) and torch.equal(validation, everything[50_000:])
    run = elbox.fit(
        "gaussian",
        "fashion-mnist",
        validation_size=10_000,
        limit_train=200,
        out=tmp_path / "g",
        verbose=False,
        progress=False,
    )
    record = json.loads((tmp_path / "g" / "config.json").read_text())["data"]
    assert record["validation_size"] == 10_000 and record["validation"] == "last 10000 of the official training set"
    assert run.validation_data.shape[0] == 10_000
    with pytest.raises(elbox.ElboxError, match="validation_size must be between 1 and 59999"):
        load_split("fashion-mnist", "train", validation_size=60_000)

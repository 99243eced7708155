"""The training loop: reproducibility, beta schedules, non-finite steps."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import make_trainer

from elbox.core.errors import ElboxError
from elbox.data import load_split
from elbox.io.checkpoint import STATE_FILE, STATE_IN_EPOCH_FILE, WEIGHTS_FILE, load_training_state
from elbox.io.run_config import TrainConfig
from elbox.training.objectives import beta_at
from elbox.training.optimizer import make_optimizer


def small_run(tmp_path, seed=0, epochs=2, **train_options):
    """Train a small VAE on 400 images, 4 steps of 100 per epoch: (the trainer, its last epoch's record)."""
    trainer = make_trainer(
        tmp_path,
        "vae",
        {"latent_dim": 3, "hidden_dims": [32]},
        seed=seed,
        epochs=epochs,
        batch_size=100,
        log_every=2,
        **train_options,
    )
    return trainer, trainer.fit()


def test_same_seed_gives_identical_runs(tmp_path):
    _, a = small_run(tmp_path / "a", seed=3)
    _, b = small_run(tmp_path / "b", seed=3)
    _, c = small_run(tmp_path / "c", seed=4)
    assert a["val_elbo"] == b["val_elbo"] and a["train_elbo"] == b["train_elbo"]
    assert a["val_elbo"] != c["val_elbo"]


def test_training_improves_the_validation_elbo(tmp_path):
    trainer, last = small_run(tmp_path, epochs=4)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert epochs[-1]["val_elbo"] > epochs[0]["val_elbo"]
    assert any(r["kind"] == "train" for r in records)
    assert last["step"] == 4 * trainer.steps_per_epoch


def test_linear_beta_warmup():
    config = TrainConfig(beta=0.5, beta_schedule="linear", warmup_epochs=2)
    assert beta_at(config, 0, 10) == 0.0
    assert beta_at(config, 10, 10) == pytest.approx(0.25)
    assert beta_at(config, 20, 10) == 0.5 and beta_at(config, 99, 10) == 0.5
    assert beta_at(TrainConfig(beta=0.7), 0, 10) == 0.7


def test_reported_elbo_is_unweighted_during_warmup(tmp_path):
    # beta = 0 in the objective must not change the reported ELBO = reconstruction - KL
    _, last = small_run(tmp_path, epochs=1, beta=0.0)
    assert last["train_elbo"] == pytest.approx(last["train_reconstruction"] - last["train_kl"], rel=1e-6)


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path):
    trainer, _ = small_run(tmp_path, epochs=1, max_nonfinite=3)
    with torch.no_grad():
        for p in trainer.model.decoder.parameters():
            p.fill_(float("nan"))
    encoder_before = {k: v.clone() for k, v in trainer.model.encoder.state_dict().items()}
    with pytest.raises(ElboxError, match="3 of the last 6 steps had a non-finite loss"):
        trainer.train_epoch(2)
    assert trainer.skipped_steps == 3
    # no update was applied: the finite encoder weights are untouched by the skipped steps
    for k, v in trainer.model.encoder.state_dict().items():
        assert torch.equal(v, encoder_before[k]), k
    # the last good checkpoint (after epoch 1) is intact and finite
    tensors, state = load_training_state(tmp_path / STATE_FILE)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("model."))


@pytest.mark.parametrize("checkpoint_minutes", [0, 1e-9])
def test_divergence_never_overwrites_the_last_good_checkpoint(tmp_path, checkpoint_minutes):
    """Nor does a state saved within the diverging epoch (--checkpoint-minutes) stay behind to resume from."""
    trainer, _ = small_run(tmp_path, epochs=1, checkpoint_minutes=checkpoint_minutes)
    good_weights, good_state = (tmp_path / WEIGHTS_FILE).read_bytes(), (tmp_path / STATE_FILE).read_bytes()
    trainer.config = dataclasses.replace(trainer.config, epochs=3)
    trainer.start_epoch = 2
    trainer.optimizer.param_groups[0]["lr"] = 1e30  # as --lr 1e30 would: weights blow up, steps turn non-finite
    with pytest.raises(ElboxError, match=r"diverged.*last good checkpoint, epoch 1, is in") as error:
        trainer.fit()
    assert "--lr SMALLER" in str(error.value)
    assert (tmp_path / WEIGHTS_FILE).read_bytes() == good_weights and (tmp_path / STATE_FILE).read_bytes() == good_state
    assert not (tmp_path / STATE_IN_EPOCH_FILE).exists()


def test_a_run_that_diverges_in_its_first_epoch_after_a_state_within_it_saves_nothing(tmp_path):
    trainer = make_trainer(
        tmp_path, "vae", {"latent_dim": 3, "hidden_dims": [32]}, batch_size=20, lr=1e30, checkpoint_minutes=1e-9
    )
    saved, save = [], trainer.save_within_epoch

    def save_and_look(*args):
        save(*args)
        saved.append((tmp_path / STATE_IN_EPOCH_FILE).exists())

    trainer.save_within_epoch = save_and_look
    with pytest.raises(ElboxError, match="no epoch finished with finite values"):
        trainer.fit()
    assert any(saved) and not any(
        (tmp_path / name).exists() for name in (STATE_FILE, STATE_IN_EPOCH_FILE, WEIGHTS_FILE)
    )


def test_a_run_that_diverges_at_once_saves_no_weights(tmp_path):
    with pytest.raises(ElboxError, match="no epoch finished with finite values"):
        small_run(tmp_path, epochs=2, lr=1e30)
    assert not (tmp_path / WEIGHTS_FILE).exists() and not (tmp_path / STATE_FILE).exists()


def test_non_finite_steps_are_counted_across_epochs_and_resumes(tmp_path):
    trainer, _ = small_run(tmp_path, epochs=1, max_nonfinite=5)
    trainer.recent_nonfinite.extend([True] * 4)  # four of the last steps failed, below the limit of 5
    tensors, state = trainer.training_state(1)
    resumed, _ = small_run(tmp_path / "other", epochs=1, max_nonfinite=5)
    resumed.restore(tensors, state)
    assert list(resumed.recent_nonfinite) == list(trainer.recent_nonfinite)
    with torch.no_grad():
        for p in resumed.model.decoder.parameters():
            p.fill_(float("nan"))
    with pytest.raises(ElboxError, match="5 of the last 9 steps"):
        resumed.train_epoch(2)
    assert resumed.skipped_steps == 1  # the first failed step of the new epoch reached the limit


def test_weight_decay_is_decoupled_and_survives_resume(tmp_path):
    """--weight-decay w makes Adam AdamW: a first step with a zero gradient (no Adam update) shrinks every weight by
    exactly (1 - lr * w); a resumed run accepts the saved optimizer settings, and one without the decay refuses them."""
    trainer, _ = small_run(tmp_path / "decay", epochs=1, weight_decay=0.5, lr=1e-2)
    assert [(g["weight_decay"], g["decoupled_weight_decay"]) for g in trainer.optimizer.param_groups] == [(0.5, True)]
    model = torch.nn.Linear(3, 2)
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for b, p in zip(before, model.parameters()):
        torch.testing.assert_close(p.detach(), b * (1 - 1e-2 * 0.5))
    resumed = make_trainer(
        tmp_path / "decay",
        "vae",
        {"latent_dim": 3, "hidden_dims": [32]},
        epochs=1,
        batch_size=100,
        log_every=2,
        weight_decay=0.5,
        lr=1e-2,
    )
    resumed.restore(*load_training_state(tmp_path / "decay" / STATE_FILE))
    assert resumed.start_epoch == 2
    plain = make_trainer(
        tmp_path / "plain",
        "vae",
        {"latent_dim": 3, "hidden_dims": [32]},
        epochs=1,
        batch_size=100,
        log_every=2,
        lr=1e-2,
    )
    with pytest.raises(ElboxError, match="does not fit|other training settings"):
        plain.restore(*load_training_state(tmp_path / "decay" / STATE_FILE))


@pytest.mark.parametrize(
    "bad",
    [
        dict(epochs=0),
        dict(batch_size=0),
        dict(lr=0),
        dict(beta_schedule="cosine"),
        dict(n_samples=0),
        dict(weight_decay=-0.1),
        dict(weight_decay=2.0),
    ],
)
def test_bad_train_config(bad):
    with pytest.raises(ElboxError):
        TrainConfig(**bad)


def test_gradient_clipping_bounds_the_global_norm(tmp_path):
    trainer, _ = small_run(tmp_path, epochs=1, grad_clip=1e-3)
    train, _ = load_split("synthetic", "train")
    x = trainer.space.train_batch(train[:100], trainer.generator)
    values = trainer.training_step(x, beta=1.0)
    clipped = torch.nn.utils.get_total_norm([p.grad for p in trainer.model.parameters()])
    assert values["grad_norm"] > 1e-2  # the raw norm was well above the threshold ...
    assert clipped <= 1e-3 * (1 + 1e-5)  # ... and the applied gradient is clipped to it


@pytest.mark.parametrize(
    "name, config", [("vae", {"latent_dim": 4, "hidden_dims": [64]}), ("diffusion", {"channels": [8, 16]})]
)
def test_bf16_autocast_trains_with_float32_weights_and_bounds(tmp_path, name, config):
    """--precision bf16: the first step's loss is within bf16 rounding (1 %) of the float32 one, the weights and
    Adam's moments stay float32, and validation is computed in float32."""
    train, _ = load_split("synthetic", "train")
    losses = {}
    for precision in ("fp32", "bf16"):
        trainer = make_trainer(
            tmp_path / precision, name, config, n_train=64, n_val=32, epochs=1, batch_size=32, precision=precision
        )
        x = trainer.space.train_batch(train[:32], torch.Generator().manual_seed(0))
        torch.manual_seed(1)
        losses[precision] = trainer.training_step(x, 1.0)["elbo"].item()
        record = trainer.fit()
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
        assert all(v.dtype == torch.float32 for s in trainer.optimizer.state.values() for v in s.values() if v.dim())
        assert math.isfinite(record["val_elbo"])
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.01)


def test_ema_decay_warms_up():
    """The EMA after n updates follows e_n = d_n e_(n-1) + (1 - d_n) w_n with d_n = min(decay, n / (9 + n)) (the decay
    after n - 1 earlier updates), starting from the first weights: the early, nearly random weights fade quickly."""
    from torch.optim.swa_utils import AveragedModel

    from elbox.training.optimizer import ema_update_with_warmup

    model = torch.nn.Linear(1, 1, bias=False)
    ema = AveragedModel(model, multi_avg_fn=ema_update_with_warmup(0.9), use_buffers=True)
    expected = None
    for n in range(1, 40):
        with torch.no_grad():
            model.weight.fill_(float(n))
        ema.update_parameters(model)
        d = min(0.9, n / (9 + n))
        expected = float(n) if expected is None else d * expected + (1 - d) * n
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)

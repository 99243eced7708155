"""Progress on every long job (training with a run ETA, validation, sampling, tighten), the quick-run options
(max_steps, val_limit, val_every, samples) and the lines a run prints."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import interrupt_in_epoch, make_trainer
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

import elbox
from elbox.cli.main import main
from elbox.core.errors import ElboxError
from elbox.core.progress import sample_with_progress, step_bar, time_left
from elbox.data import get_data_space, load_split
from elbox.evaluation import tighten
from elbox.io.checkpoint import BEST_WEIGHTS_FILE, STATE_FILE, WEIGHTS_FILE, load_training_state
from elbox.io.run_config import TrainConfig
from elbox.models import build_model
from elbox.training.trainer import Trainer
from elbox.training.workflows import run_settings

TINY_VAE = {"latent_dim": 2, "hidden_dims": [16]}
TINY_DIFFUSION = {"channels": [4], "timesteps": 8}


def bar_lines(err: str, label: str) -> list[str]:
    """The states a tqdm bar drew on stderr (it rewrites its line with \\r) whose text starts with label."""
    return [part for line in err.split("\n") for part in line.split("\r") if part.startswith(label)]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_time_s")} for r in records]


# -- progress ----------------------------------------------------------------------------------------------------


def test_time_left_is_the_mean_pace_times_the_steps_left():
    assert time_left(10.0, 5, 20) == "00:40"
    assert time_left(10.0, 0, 20) == "?"
    assert time_left(3600.0, 1, 1) == "1:00:00"


def test_training_shows_the_run_eta_and_validation_progress(tmp_path, capsys):
    elbox.fit(
        "vae",
        "synthetic",
        out=tmp_path / "run",
        epochs=2,
        batch_size=100,
        limit_train=300,
        samples=False,
        verbose=False,
        **TINY_VAE,
    )
    err = capsys.readouterr().err
    epoch_2 = bar_lines(err, "epoch 2/2 (run ETA ")
    assert epoch_2 and "3/3" in epoch_2[-1]  # the second epoch's bar, finished, with the whole run's ETA
    assert any(line.startswith("epoch 1/2 (run ETA ?)") for line in bar_lines(err, "epoch 1/2"))  # no pace yet
    assert any("200/200" in line for line in bar_lines(err, "ELBO"))  # the 200 validation examples
    elbox.fit(
        "vae",
        "synthetic",
        out=tmp_path / "quiet",
        epochs=1,
        limit_train=200,
        samples=False,
        verbose=False,
        progress=False,
        **TINY_VAE,
    )
    assert capsys.readouterr().err == ""


def test_diffusion_sampling_reports_its_steps_and_draws_the_same_images():
    torch.manual_seed(0)
    model = build_model("diffusion", {"data_shape": (1, 8, 8), **TINY_DIFFUSION})
    seen = []
    torch.manual_seed(1)
    quiet = model.sample(3, steps=5)
    torch.manual_seed(1)
    reported = model.sample(3, steps=5, on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 5) for i in range(1, 6)]
    assert torch.equal(quiet, reported)


def test_sample_with_progress_draws_a_bar_for_a_diffusion_model_only(capsys):
    torch.manual_seed(0)
    diffusion = build_model("diffusion", {"data_shape": (1, 8, 8), **TINY_DIFFUSION})
    assert sample_with_progress(diffusion, 2, True).shape == (2, 1, 8, 8)
    assert any("8/8" in line for line in bar_lines(capsys.readouterr().err, "sampling 2"))
    vae = build_model("vae", {"data_shape": (1, 8, 8), **TINY_VAE})
    assert sample_with_progress(vae, 2, True).shape == (2, 1, 8, 8)
    assert capsys.readouterr().err == ""
    with step_bar("off", enabled=False) as on_step:
        on_step(1, 2)
    assert capsys.readouterr().err == ""


def test_a_diffusion_run_shows_training_validation_and_samples_progress(tmp_path, capsys):
    elbox.fit(
        "diffusion",
        "synthetic",
        out=tmp_path / "run",
        epochs=1,
        batch_size=32,
        limit_train=64,
        val_limit=40,
        verbose=False,
        **TINY_DIFFUSION,
    )
    err = capsys.readouterr().err
    assert any("2/2" in line for line in bar_lines(err, "epoch 1/1 (run ETA"))
    assert any("40/40" in line for line in bar_lines(err, "ELBO"))
    assert any("8/8" in line for line in bar_lines(err, "sampling 64"))  # samples.png, T = 8 steps
    assert (tmp_path / "run" / "samples.png").is_file()


def test_tighten_shows_each_stage_and_refits_on_a_subset_tied_to_the_limit(tmp_path, capsys, monkeypatch):
    elbox.fit(
        "vae",
        "synthetic",
        out=tmp_path / "run",
        epochs=1,
        limit_train=200,
        samples=False,
        verbose=False,
        progress=False,
        **TINY_VAE,
    )
    assert tighten.refit_size(50) == 5000 and tighten.refit_size(1000) == 10_000 and tighten.refit_size(None) is None
    monkeypatch.setattr(tighten, "REFIT_MIN_EXAMPLES", 60)
    capsys.readouterr()
    result = tighten.tighten_run(
        str(tmp_path / "run"), torch.device("cpu"), limit=5, steps=4, refit_epochs=2, iw_samples=10, elbo_samples=4
    )
    err = capsys.readouterr().err
    assert result["refit_examples"] == 60  # max(10 * 5, 60) of the 1000 training images
    assert "on the first 60 training examples" in err and "on 60 validation images" in err
    assert any("1/1" in line for line in bar_lines(err, "refit epoch 2/2"))  # 60 images: one batch of 128
    assert any("5/5" in line for line in bar_lines(err, "IWAE-10"))
    assert any("4/4" in line for line in bar_lines(err, "per-example q (5 examples)"))


# -- quick runs --------------------------------------------------------------------------------------------------


def test_max_steps_ends_the_run_inside_an_epoch(tmp_path):
    capped = make_trainer(tmp_path / "capped", "vae", TINY_VAE, n_train=400, epochs=5, batch_size=100, max_steps=6)
    last = capped.fit()
    assert capped.step == 6 and last["epoch"] == 2 and last["kind"] == "epoch" and math.isfinite(last["val_elbo"])
    assert [r["epoch"] for r in capped.records if r["kind"] == "epoch"] == [1, 2]
    assert load_training_state(tmp_path / "capped" / STATE_FILE)[1]["step"] == 6
    # the first epoch is the uncapped run's first epoch, bit for bit
    full = make_trainer(tmp_path / "full", "vae", TINY_VAE, n_train=400, epochs=1, batch_size=100)
    full.fit()
    assert without_timing(full.records) == without_timing(capped.records[: len(full.records)])


def test_a_capped_run_is_complete_for_resume(tmp_path):
    elbox.fit(
        "vae",
        "synthetic",
        out=tmp_path / "run",
        epochs=5,
        max_steps=3,
        limit_train=200,
        batch_size=100,
        samples=False,
        verbose=False,
        progress=False,
        **TINY_VAE,
    )
    with pytest.raises(ElboxError, match=r"complete: its 3 steps \(max_steps\)"):
        elbox.resume(tmp_path / "run", progress=False, verbose=False)


def test_resume_with_max_steps_and_val_every_is_bit_for_bit(tmp_path):
    def trainer(run_dir):  # 3 steps per epoch; epoch 3 is cut to 1 step by max_steps; a cosine schedule over 7 steps
        return make_trainer(
            run_dir,
            "vae",
            TINY_VAE,
            n_train=150,
            n_val=40,
            epochs=4,
            batch_size=50,
            lr=3e-3,
            lr_schedule="cosine",
            log_every=1,
            max_steps=7,
            val_every=2,
        )

    reference = trainer(tmp_path / "reference")
    reference.fit()
    assert [(r["kind"], r["epoch"], r["step"]) for r in reference.records if "epoch" in r and r["kind"] != "train"] == [
        ("train_epoch", 1, 3),
        ("epoch", 2, 6),
        ("epoch", 3, 7),
    ]
    crashed = trainer(tmp_path / "run")
    interrupt_in_epoch(crashed, 3)
    torch.manual_seed(12345)
    resumed = trainer(tmp_path / "run")
    resumed.restore(*load_training_state(tmp_path / "run" / STATE_FILE))
    resumed.fit()
    assert without_timing(resumed.records) == without_timing(reference.records)
    for file in (WEIGHTS_FILE, BEST_WEIGHTS_FILE):
        a, b = load_file(tmp_path / "reference" / file), load_file(tmp_path / "run" / file)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_val_every_checkpoints_each_epoch_and_moves_best_on_validated_epochs_only(tmp_path):
    trainer = make_trainer(tmp_path, "vae", TINY_VAE, n_train=200, epochs=3, batch_size=100, val_every=2)
    saved = []
    original = trainer.save

    def save_and_look(epoch, is_best):
        original(epoch, is_best)
        best = tmp_path / BEST_WEIGHTS_FILE
        saved.append(
            (
                epoch,
                is_best,
                best.exists() and best.stat().st_mtime_ns,
                load_training_state(tmp_path / STATE_FILE)[1]["epoch"],
            )
        )

    trainer.save = save_and_look
    trainer.fit()
    kinds = [(r["kind"], "val_elbo" in r) for r in trainer.records if r["kind"] != "train"]
    assert kinds == [("train_epoch", False), ("epoch", True), ("epoch", True)]
    assert [(epoch, state_epoch) for epoch, _, _, state_epoch in saved] == [(1, 1), (2, 2), (3, 3)]
    assert saved[0][1] is False and saved[0][2] is False  # no best.safetensors before the first validation
    assert saved[1][1] is True


def test_val_limit_validates_on_the_first_examples(tmp_path):
    limited = make_trainer(tmp_path / "a", "vae", TINY_VAE, n_val=100, val_limit=30).validate()
    first = make_trainer(tmp_path / "b", "vae", TINY_VAE, n_val=30).validate()
    whole = make_trainer(tmp_path / "c", "vae", TINY_VAE, n_val=100).validate()
    assert limited == first and limited != whole
    assert (
        make_trainer(tmp_path / "d", "vae", TINY_VAE, n_val=20, val_limit=500).validate()
        == make_trainer(tmp_path / "e", "vae", TINY_VAE, n_val=20).validate()
    )


def test_val_limit_on_streamed_validation_data(tmp_path):
    train, _ = load_split("synthetic", "train")
    val, _ = load_split("synthetic", "validation")
    records = []
    for data, limit in ((TensorDataset(val[:100]), 30), (TensorDataset(val[:30]), None)):
        torch.manual_seed(0)
        model = build_model("vae", {"data_shape": (1, 28, 28), **TINY_VAE})
        config = TrainConfig(val_limit=limit, eval_batch_size=10)
        records.append(
            Trainer(model, train[:100], data, get_data_space("binary"), config, None, progress=False).validate()
        )
    assert records[0] == records[1]


def test_no_samples_skips_samples_png(tmp_path):
    elbox.fit(
        "vae",
        "synthetic",
        out=tmp_path / "off",
        epochs=1,
        limit_train=200,
        samples=False,
        verbose=False,
        progress=False,
        **TINY_VAE,
    )
    assert not (tmp_path / "off" / "samples.png").exists()
    assert run_settings(tmp_path / "off" / "config.json")["samples"] is False


# -- messages ----------------------------------------------------------------------------------------------------


def test_mixture_lines_carry_units_and_match_the_data_space_of_the_final_value(tmp_path, capsys):
    run = elbox.fit("mixture", "synthetic", n_components=2, covariance="diag", max_iter=3, tol=0, progress=False)
    err = capsys.readouterr().err
    assert "(0 parameters)" not in err and "fitted in closed form or by EM" in err
    lines = [line for line in err.splitlines() if line.startswith("elbox: EM iteration")]
    assert len(lines) == 3 and all("nats per example" in line for line in lines)
    assert "validation log-likelihood" in err and "val_log_likelihood" not in err
    # the last iteration's training log-likelihood is the model's mean log p(x) on the training data, in the
    # 8-bit data's units (the -D ln 256 of the dequantized space included), as the validation value is
    train, _ = load_split("synthetic", "train")
    space = get_data_space("continuous")
    log_px = run.model.log_prob(space.eval_data(train, seed=0)).mean().item() + space.log_prob_offset(28 * 28)
    last = next(r for r in run.history if r.get("iteration") == 3)
    assert last["log_likelihood"] == pytest.approx(log_px, rel=1e-6)
    assert f"{last['log_likelihood']:.2f}" in lines[-1]


def test_tighten_on_a_mixture_says_which_models_it_applies_to():
    mixture = build_model("mixture", {"data_shape": (1, 4, 4)})
    with pytest.raises(ElboxError) as error:
        tighten.check_tightenable(mixture)
    message = str(error.value)
    assert (
        "mixture" in message
        and "vae" in message
        and "posterior_params" not in message
        and "encoder_parameters" not in message
    )


def test_a_run_prints_no_raw_records(tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "vae",
                "--data",
                "synthetic",
                "--epochs",
                "1",
                "--limit-train",
                "200",
                "--latent-dim",
                "2",
                "--no-samples",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "mixture",
                "--data",
                "synthetic",
                "--n-components",
                "2",
                "--covariance",
                "diag",
                "--out",
                str(tmp_path / "mixture"),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    lines = [part.strip() for line in (captured.out + captured.err).split("\n") for part in line.split("\r")]
    assert not [line for line in lines if line.startswith(("{", "fit:")) or "kind" in line or "val_" in line]
    assert sum(line.startswith("elbox: trained") for line in lines) == 2


def test_the_iwae_bar_moves_with_each_pass_of_samples_not_each_batch(monkeypatch):
    from elbox.models import estimates as evaluation

    updates: list[float] = []

    class Recorder(evaluation.tqdm):
        def update(self, n=1):
            updates.append(n)
            return super().update(n)

    monkeypatch.setattr(evaluation, "tqdm", Recorder)
    torch.manual_seed(0)
    model = build_model("vae", {"latent_dim": 2, "hidden_dims": [8], "data_shape": (1, 4, 4)})
    x = torch.bernoulli(torch.full((6, 1, 4, 4), 0.5))
    per_sample = evaluation.elements_per_sample(model)
    # one batch of 6 examples; 10 samples per pass under this bound: K = 100 takes 10 passes
    bounds = evaluation.iwae_by_k_per_example(
        model, x, [100], batch_size=6, max_decoder_elements=6 * 10 * per_sample, progress=True
    )
    assert bounds[100].shape == (6,)
    assert len(updates) == 10 and math.isclose(sum(updates), 6)

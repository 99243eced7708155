"""Checkpoints and resume: bit-exact continuation, refusal of pickles and mismatched files, SIGKILL at random
moments."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import interrupt_in_epoch, make_trainer
from safetensors.torch import load_file, save_file

from elbox.cli.main import main
from elbox.core.errors import ElboxError
from elbox.io.checkpoint import (
    BEST_WEIGHTS_FILE,
    METRICS_FILE,
    STATE_FILE,
    STATE_IN_EPOCH_FILE,
    WEIGHTS_FILE,
    load_run,
    load_training_state,
    resume_state_file,
    save_training_state,
)
from elbox.io.run_config import TrainConfig
from elbox.models import build_model
from elbox.training.trainer import Trainer

TIMING_KEYS = ("images_per_s", "epoch_time_s")

MODELS = {
    "vae": {"data_shape": (1, 28, 28), "latent_dim": 4, "hidden_dims": [32]},
    "hvae": {"data_shape": (1, 28, 28), "hvae_type": "markov", "levels": 2, "latent_dims": [4, 2], "hidden_dims": [32]},
    "diffusion": {"data_shape": (1, 28, 28), "channels": [4, 8], "schedule": "learned-net"},
}


def stateful_trainer(name: str, run_dir: Path, epochs: int = 3, **options) -> Trainer:
    """A trainer with every kind of state a resume must restore: an EMA, a cosine learning rate and (but for the
    diffusion model) a beta warmup; 3 steps per epoch."""
    warmup = name != "diffusion"
    return make_trainer(
        run_dir,
        name,
        MODELS[name],
        n_train=150,
        n_val=40,
        epochs=epochs,
        batch_size=50,
        lr=3e-3,
        ema_decay=0.9,
        lr_schedule="cosine",
        log_every=1,
        beta_schedule="linear" if warmup else "constant",
        warmup_epochs=1 if warmup else 0,
        **options,
    )


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_resume_continues_bit_for_bit(tmp_path, name):
    reference = stateful_trainer(name, tmp_path / "reference")
    reference.fit()

    crashed = stateful_trainer(name, tmp_path / "run")
    interrupt_in_epoch(crashed, 3)
    torch.manual_seed(12345)  # the resumed process starts with other random state
    resumed = stateful_trainer(name, tmp_path / "run")
    resumed.restore(*load_training_state(tmp_path / "run" / STATE_FILE))
    assert resumed.start_epoch == 3
    resumed.fit()

    assert without_timing(resumed.records) == without_timing(reference.records)
    assert len([r for r in resumed.records if r["kind"] == "train"]) == 9  # every step's terms compared
    for file in (WEIGHTS_FILE, BEST_WEIGHTS_FILE):
        a, b = load_file(tmp_path / "reference" / file), load_file(tmp_path / "run" / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def interrupt_at_step(trainer: Trainer, step: int) -> None:
    """Run trainer.fit() as if the process were killed as optimizer step `step` (counted from 0) starts."""
    original = trainer.training_step

    def crash(x, beta):
        if trainer.step == step:
            raise KeyboardInterrupt
        return original(x, beta)

    trainer.training_step = crash
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_resume_within_an_epoch_continues_bit_for_bit(tmp_path, name):
    """checkpoint_minutes near 0 saves the training state after every step but an epoch's last; a run killed in its
    second epoch after one step resumes after that step and ends as the uninterrupted run, to the last bit."""
    assert TrainConfig().checkpoint_minutes == 10  # the README's "every 10 minutes"
    every_step = dict(checkpoint_minutes=1e-9)
    reference = stateful_trainer(name, tmp_path / "reference", **every_step)
    reference.fit()

    crashed = stateful_trainer(name, tmp_path / "run", **every_step)
    interrupt_at_step(crashed, 4)  # 3 steps an epoch: after the first of epoch 2
    tensors, state = load_training_state(resume_state_file(tmp_path / "run"))
    assert state["epoch"] == 1 and state["step"] == 4 and state["partial_epoch"]["batches"] == 1
    torch.manual_seed(12345)  # the resumed process starts with other random state
    resumed = stateful_trainer(name, tmp_path / "run", **every_step)
    resumed.restore(tensors, state)
    assert resumed.start_epoch == 2 and resumed.resume_progress.batches == 1
    resumed.fit()

    assert without_timing(resumed.records) == without_timing(reference.records)
    for file in (WEIGHTS_FILE, BEST_WEIGHTS_FILE):
        a, b = load_file(tmp_path / "reference" / file), load_file(tmp_path / "run" / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_state_within_an_epoch_leaves_the_epochs_files_and_checks_its_progress(tmp_path):
    trainer = stateful_trainer("vae", tmp_path, checkpoint_minutes=1e-9)
    interrupt_at_step(trainer, 4)
    assert resume_state_file(tmp_path) == tmp_path / STATE_IN_EPOCH_FILE
    tensors, state = load_training_state(tmp_path / STATE_IN_EPOCH_FILE)
    # the epoch's files stay epoch 1's; the state within epoch 2 holds the weights after step 4
    assert json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[-1])["epoch"] == 1
    assert load_training_state(tmp_path / STATE_FILE)[1]["epoch"] == 1
    weights = load_file(tmp_path / WEIGHTS_FILE)
    assert not all(torch.equal(weights[k], tensors[f"ema.module.{k}"]) for k in weights)
    for broken, message in (
        ({**state["partial_epoch"], "epoch": 3}, "partial_epoch is of epoch 3, not 2"),
        ({**state["partial_epoch"], "batches": -1}, "partial_epoch's batches must be a whole number from 1 to 2"),
        ({**state["partial_epoch"], "batches": 1000}, "partial_epoch's batches must be a whole number from 1 to 2"),
        ({**state["partial_epoch"], "examples": 51}, "partial_epoch's examples must be a whole number from 0 to 50"),
        ({**state["partial_epoch"], "sums": {"elbo": "x"}}, "partial_epoch's sums must map names to finite numbers"),
        ({**state["partial_epoch"], "sums": {"elbo": 10**400}}, "partial_epoch's sums must map names to finite"),
        ({**state["partial_epoch"], "sums": {}}, "partial_epoch's sums and interval do not fit its examples"),
        ({**state["partial_epoch"], "seconds": 10**400}, "partial_epoch's seconds must be a number >= 0"),
        ({"epoch": 2}, "partial_epoch must be a JSON object with the keys"),
    ):
        fresh = stateful_trainer("vae", tmp_path / "other", checkpoint_minutes=1e-9)
        with pytest.raises(ElboxError, match=message):
            fresh.restore(tensors, {**state, "partial_epoch": broken})
    no_saves = stateful_trainer("vae", tmp_path / "epochs", checkpoint_minutes=0)
    interrupt_at_step(no_saves, 4)
    assert not (tmp_path / "epochs" / STATE_IN_EPOCH_FILE).exists()
    # an epoch's end removes the state within it; one a crash left just before is older, and not resumed from
    resumed = stateful_trainer("vae", tmp_path, checkpoint_minutes=1e-9)
    resumed.restore(tensors, state)
    resumed.fit()
    assert not (tmp_path / STATE_IN_EPOCH_FILE).exists()
    save_training_state(tmp_path / STATE_IN_EPOCH_FILE, tensors, state)
    assert resume_state_file(tmp_path) == tmp_path / STATE_FILE


def test_skipped_steps_do_not_put_off_the_state_within_an_epoch(tmp_path):
    """Every step of this run is skipped (gradient norm above a tiny threshold); the state is still saved between
    its batches."""
    trainer = stateful_trainer("vae", tmp_path, checkpoint_minutes=1e-9, grad_skip_threshold=1e-12)
    interrupt_at_step(trainer, 5)
    assert trainer.skipped_large_grad == 5
    assert load_training_state(tmp_path / STATE_IN_EPOCH_FILE)[1]["partial_epoch"]["batches"] == 2


def test_ctrl_c_names_a_state_within_an_epoch_only_while_it_is_the_newer(tmp_path):
    """A state within an epoch older than the last epoch's (a crash between the two writes) is not the one --resume
    takes, so Ctrl-C does not name it."""
    from elbox.cli.session import TRAINING_RUN, interrupted

    trainer = stateful_trainer("vae", tmp_path, epochs=2, checkpoint_minutes=1e-9)
    interrupt_at_step(trainer, 4)
    TRAINING_RUN[:] = [str(tmp_path)]
    assert "holds epoch 1 (the last finished) and a training state within epoch 2, after its batch 1" in interrupted(
        ["train"]
    )
    save_training_state(tmp_path / STATE_FILE, *trainer.training_state(2))
    assert "within epoch" not in interrupted(["train"])


def test_best_checkpoint_holds_the_best_validation_epoch(tmp_path):
    trainer = stateful_trainer("vae", tmp_path, epochs=3)
    best = {}
    original = trainer.save

    def save_and_remember(epoch, is_best):
        original(epoch, is_best)
        if is_best:
            best.update(epoch=epoch, weights={k: v.clone() for k, v in trainer.eval_model.state_dict().items()})

    trainer.save = save_and_remember
    trainer.fit()
    epochs = [r for r in trainer.records if r["kind"] == "epoch"]
    assert best["epoch"] == max(epochs, key=lambda r: r["val_elbo"])["epoch"]
    saved = load_file(tmp_path / BEST_WEIGHTS_FILE)
    assert all(torch.equal(saved[k], best["weights"][k]) for k in saved)


class _RunsCode:
    """Unpickling this creates a marker file: the payload of a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_checkpoint_is_refused_and_its_code_never_runs(tmp_path):
    assert (
        main(
            [
                "train",
                "--data",
                "synthetic",
                "--epochs",
                "1",
                "--limit-train",
                "100",
                "--latent-dim",
                "2",
                "--hidden-dims",
                "16",
                "--out",
                str(tmp_path / "run"),
                "--no-progress",
            ]
        )
        == 0
    )
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"weights": _RunsCode(marker)})
    for file in (WEIGHTS_FILE, STATE_FILE):
        (tmp_path / "run" / file).write_bytes(payload)
    torch.save({"x": _RunsCode(marker)}, tmp_path / "torch_save.safetensors")  # torch's zip-pickle format too
    with pytest.raises(ElboxError, match="not a safetensors file"):
        load_run(tmp_path / "run")
    with pytest.raises(ElboxError, match="not a safetensors file"):
        load_training_state(tmp_path / "run" / STATE_FILE)
    with pytest.raises(ElboxError, match="not a safetensors file"):
        load_training_state(tmp_path / "torch_save.safetensors")
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 1
    assert main(["evaluate", str(tmp_path / "run"), "--limit", "10", "--no-progress"]) == 1
    assert not marker.exists()


def test_bad_training_states_get_a_clear_error(tmp_path):
    trainer = stateful_trainer("vae", tmp_path, epochs=1)
    trainer.fit()
    tensors, state = load_training_state(tmp_path / STATE_FILE)
    path = tmp_path / "bad.safetensors"

    def check(tensors, state, match, metadata=None):
        if metadata is None:
            save_training_state(path, tensors, state)
        else:
            save_file(tensors, path, metadata=metadata)
        with pytest.raises(ElboxError, match=match):
            stateful_trainer("vae", tmp_path / "other", epochs=1).restore(*load_training_state(path))

    wrong_shape = dict(tensors, **{"model.decoder.0.weight": torch.zeros(3, 3)})
    check(wrong_shape, state, "shape")
    check({k: v for k, v in tensors.items() if k != "rng.torch"}, state, "incomplete")
    check({k: v for k, v in tensors.items() if not k.startswith("model.")}, state, "missing")
    check(tensors, dict(state, train_config=dict(state["train_config"], lr=1.0)), "other training settings")
    check(
        tensors, state, "format version", metadata={"elbox_training_state": json.dumps(state), "format_version": "99"}
    )
    check(tensors, state, "malformed JSON", metadata={"elbox_training_state": "{", "format_version": "1"})
    raw = (tmp_path / STATE_FILE).read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(ElboxError, match="corrupt"):
        load_training_state(path)


def test_resume_refuses_other_options_and_finished_runs(tmp_path, capsys):
    run = str(tmp_path / "run")
    args = [
        "train",
        "--data",
        "synthetic",
        "--epochs",
        "1",
        "--limit-train",
        "100",
        "--latent-dim",
        "2",
        "--hidden-dims",
        "16",
    ]
    assert main([*args, "--out", run, "--no-progress"]) == 0
    assert main(["train", "--resume", run, "--lr", "0.1"]) == 1
    assert "drop --lr" in capsys.readouterr().err
    assert main(["train", "--resume", run, "--no-progress"]) == 1
    assert "complete" in capsys.readouterr().err
    assert main([*args, "--out", run]) == 1
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 1


# ----------------------------------------------------------------------------------------------
# SIGKILL at random moments

KILLS = 20


def _train_command(run: Path, resume: bool) -> list[str]:
    if resume:
        return [sys.executable, "-m", "elbox", "train", "--resume", str(run), "--no-progress"]
    return [
        sys.executable,
        "-m",
        "elbox",
        "train",
        "--data",
        "synthetic",
        "--epochs",
        "40",
        "--limit-train",
        "100",
        "--batch-size",
        "50",
        "--latent-dim",
        "4",
        "--hidden-dims",
        "64",
        "--ema-decay",
        "0.9",
        "--lr-schedule",
        "cosine",
        "--out",
        str(run),
        "--no-progress",
    ]


def _kill_when(process: subprocess.Popen, run: Path, during_write: bool, rng: random.Random) -> bool | None:
    """Once the process has started training (its first stderr line), SIGKILL it either as soon as a checkpoint
    temporary file appears (during_write) or after a random delay. Returns whether a temporary file existed at
    the kill, or None if the process exited first."""
    process.first_line = process.stderr.readline().decode()
    deadline = time.monotonic() + (3.0 if during_write else rng.uniform(0.0, 0.6))
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None
        if during_write and any(name.endswith(".tmp") for name in os.listdir(run)):
            break
        time.sleep(0.0002 if during_write else 0.005)
    writing = any(name.endswith(".tmp") for name in os.listdir(run))
    process.send_signal(signal.SIGKILL)
    process.wait()
    return writing


def _assert_same_run(reference: Path, run: Path) -> None:
    a = [json.loads(line) for line in (reference / METRICS_FILE).read_text().splitlines()]
    b = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    assert without_timing(a) == without_timing(b)
    wa, wb = load_file(reference / WEIGHTS_FILE), load_file(run / WEIGHTS_FILE)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_training_survives_repeated_sigkill(tmp_path):
    """Kill training with SIGKILL at random moments (every other kill as soon as a checkpoint write has begun) and
    resume each time: no file on disk ever fails to load, and every run ends identical, to the last bit, to an
    uninterrupted one. A run that completes before enough kills is checked and followed by a fresh one."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    reference = tmp_path / "reference"
    subprocess.run(_train_command(reference, resume=False), env=env, check=True, capture_output=True)

    rng = random.Random(0)
    kills = kills_during_writes = runs = 0
    run = tmp_path / "run0"
    while True:
        process = subprocess.Popen(
            _train_command(run, resume=(run / "config.json").exists()),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if kills >= KILLS:
            _, err = process.communicate()
            writing = None
        else:
            writing = _kill_when(process, run, during_write=kills % 2 == 1, rng=rng)
            err = (process.first_line.encode() + process.stderr.read()) if writing is None else b""
        if writing is None:  # exited by itself: the run completed (or was complete when killed last)
            assert process.returncode == 0 or b"is complete" in err, err.decode()
            _assert_same_run(reference, run)
            runs += 1
            if kills >= KILLS:
                break
            run = tmp_path / f"run{runs}"
            continue
        kills += 1
        kills_during_writes += writing
        if (run / STATE_FILE).exists():  # nothing on disk may ever be unreadable
            load_training_state(run / STATE_FILE)
        if (run / WEIGHTS_FILE).exists():
            load_run(run)
    assert kills >= KILLS
    assert kills_during_writes >= 1, "no kill landed during a checkpoint write"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_pretrained_and_load_round_trip(tmp_path, name):
    import elbox

    torch.manual_seed(1)
    model = build_model(name, MODELS[name]).eval()
    elbox.save_pretrained(model, tmp_path / "m", data={"name": "synthetic"})
    loaded = elbox.load(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    x = torch.randint(0, 256, (4, 1, 28, 28)) / 255
    if model.data_space == "binary":
        x = x.round()
    torch.manual_seed(2)
    expected = model.elbo(x).elbo
    torch.manual_seed(2)
    torch.testing.assert_close(loaded.elbo(x).elbo, expected, rtol=0, atol=0)
    assert main(["evaluate", str(tmp_path / "m"), "--limit", "8", "--iw-samples", "2", "--no-progress"]) == 0

"""Hostile run metadata (issue 16): a run's config.json, the JSON state inside state.safetensors and its weights,
damaged as a hostile user would. Every command that reads them fails with one line naming the file and the field,
in bounded time, without changing the run's files; elbox.load raises ElboxError. Sizes that cannot fit in memory
are refused before anything is allocated."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli_expecting_error
from safetensors.torch import load_file, save_file

import elbox
from elbox.core.errors import ElboxError
from elbox.data import load_split
from elbox.io.checkpoint import STATE_METADATA_KEY, checked_run_config
from elbox.models import build_model

DEEP = "[" * 100_000 + "]" * 100_000  # json.loads raises RecursionError


class StopAfterOneEpoch(Exception):
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny VAE run of 2 epochs stopped after the first (so `train --resume` has work to do), and 4 images."""
    root = tmp_path_factory.mktemp("hostile-metadata")

    def stop(record: dict) -> None:
        raise StopAfterOneEpoch

    with pytest.raises(StopAfterOneEpoch):
        elbox.fit(
            "vae",
            "synthetic",
            out=root / "run",
            epochs=2,
            limit_train=64,
            batch_size=32,
            latent_dim=2,
            hidden_dims=[16],
            progress=False,
            verbose=False,
            callback=stop,
        )
    images = root / "x.npy"
    np.save(images, load_split("synthetic", "test")[0][:4].numpy())
    return {"run": root / "run", "images": images}


def copy_run(trained: dict[str, Path], tmp_path: Path) -> Path:
    run = tmp_path / "case" / "run"
    shutil.copytree(trained["run"], run)
    return run


def reading_commands(run: Path, images: Path) -> list[list]:
    """Every command that reads a run's config.json and weights, with cheap settings."""
    return [
        ["evaluate", run, "--iw-samples", "2", "--limit", "8", "--no-progress"],
        ["sample", run, "--n", "4", "--no-progress"],
        ["score", run, "--input", images, "--iw-samples", "2", "--no-progress"],
        ["encode", run, "--input", images, "--out", run.parent / "features.npz", "--no-progress"],
        ["report", run, "--no-progress"],
        ["reconstruct", run, "--n", "4", "--no-progress"],
        [
            "tighten",
            run,
            "--limit",
            "4",
            "--steps",
            "2",
            "--refit-epochs",
            "0",
            "--iw-samples",
            "2",
            "--elbo-samples",
            "2",
            "--no-progress",
        ],
    ]


# -- config.json ------------------------------------------------------------------------------------------------

RAW = "__raw_json__"


def setting(keys: list[str], value=None, raw: str | None = None):
    """A damage: config[keys...] = value, or the JSON text `raw` put there verbatim."""

    def damage(config: dict) -> str:
        *parents, last = keys
        for key in parents:
            config = config[key]
        config[last] = RAW if raw is not None else value
        return raw

    return damage


def removal(keys: list[str]):
    def damage(config: dict) -> None:
        *parents, last = keys
        for key in parents:
            config = config[key]
        del config[last]

    return damage


def whole_file(content: bytes):
    return lambda config: content


CONFIG_DAMAGE = {  # name: (damage, what the message must say)
    "data is 5": (setting(["data"], 5), "data"),
    "data lacks its space": (removal(["data", "space"]), "data space"),
    "data space garbage": (setting(["data", "space"], "garbage"), "unknown data space"),
    "data space a list": (setting(["data", "space"], ["binary"]), "data space"),
    "real scaling garbage": (setting(["data"], {"space": "real", "scaling": {"mean": ["a"], "std": [1]}}), "mean"),
    "real scaling huge number": (
        setting(["data"], raw='{"space": "real", "scaling": {"mean": [1%s], "std": [1]}}' % ("0" * 400)),
        "mean",
    ),
    "data name a number": (setting(["data", "name"], 5), "name"),
    "limit_train negative": (setting(["data", "limit_train"], -3), "limit_train"),
    "model a list": (setting(["model"], ["vae"]), "model"),
    "model unknown": (setting(["model"], "nope"), "unknown model"),
    "model name of a megabyte": (setting(["model"], "x" * 1_000_000), "unknown model"),
    "model_config a list": (setting(["model_config"], []), "model_config"),
    "model_config unknown field": (setting(["model_config", "bogus"], 1), "bogus"),
    "latent_dim 10**12": (setting(["model_config", "latent_dim"], 10**12), "latent_dim"),
    "latent_dim a string": (setting(["model_config", "latent_dim"], "abc"), "latent_dim"),
    "latent_dim 1.5": (setting(["model_config", "latent_dim"], 1.5), "latent_dim"),
    "latent_dim true": (setting(["model_config", "latent_dim"], True), "latent_dim"),
    "hidden_dims [10**12]": (setting(["model_config", "hidden_dims"], [10**12]), "hidden_dims"),
    "hidden_dims of 100,000 layers": (setting(["model_config", "hidden_dims"], [16] * 100_000), "hidden_dims"),
    "hidden_dims beyond memory together": (setting(["model_config", "hidden_dims"], [10**6] * 3), "memory"),
    "hidden_dims nested": (setting(["model_config", "hidden_dims"], raw="[" * 300 + "]" * 300), "hidden_dims"),
    "data_shape [1, 10**6, 10**6]": (setting(["model_config", "data_shape"], [1, 10**6, 10**6]), "data_shape"),
    "data_shape with a 0": (setting(["model_config", "data_shape"], [1, 0, 28]), "data_shape"),
    "data_shape of 10 dimensions": (setting(["model_config", "data_shape"], [1] * 10), "data_shape"),
    "seed abc": (setting(["train", "seed"], "abc"), "seed"),
    "seed 2**70": (setting(["train", "seed"], 2**70), "seed"),
    "seed of 5000 digits": (setting(["train", "seed"], raw="7" * 5000), "not valid JSON"),
    "epochs 1e999": (setting(["train", "epochs"], raw="1e999"), "epochs"),
    "epochs -5": (setting(["train", "epochs"], -5), "epochs"),
    "epochs 10**12": (setting(["train", "epochs"], 10**12), "epochs"),
    "batch_size 10**12": (setting(["train", "batch_size"], 10**12), "batch_size"),
    "lr NaN": (setting(["train", "lr"], raw="NaN"), "lr"),
    "lr a string": (setting(["train", "lr"], "0.1"), "lr"),
    "lr_schedule garbage": (setting(["train", "lr_schedule"], "garbage"), "lr_schedule"),
    "train unknown field": (setting(["train", "bogus"], 1), "bogus"),
    "train a list": (setting(["train"], [1]), "train"),
    "format_version a string": (setting(["format_version"], "2"), "format_version"),
    "format_version true": (setting(["format_version"], True), "format_version"),
    "format_version 0": (setting(["format_version"], 0), "format_version"),
    "format_version missing": (removal(["format_version"]), "format_version"),
    "format_version newer": (setting(["format_version"], 99), "newer"),
    "100,000-deep nesting": (whole_file(DEEP.encode()), "nested too deeply"),
    "100,000-deep nesting in a field": (setting(["model_config", "encoder"], raw=DEEP), "nested too deeply"),
    "non-UTF-8 bytes": (whole_file(b'{"format_version": 2, "model": "va\xff\xfe"}'), "UTF-8"),
    "a list": (whole_file(b"[]"), "JSON object"),
    "empty": (whole_file(b""), "not valid JSON"),
}


def damage_config(run: Path, damage) -> None:
    config = json.loads((run / "config.json").read_text())
    result = damage(config)
    if isinstance(result, bytes):
        (run / "config.json").write_bytes(result)
        return
    text = json.dumps(config)
    (run / "config.json").write_text(text.replace(json.dumps(RAW), result) if result is not None else text)


@pytest.mark.parametrize("name", list(CONFIG_DAMAGE))
def test_a_damaged_config_is_refused_by_every_command(trained, tmp_path, name):
    damage, says = CONFIG_DAMAGE[name]
    run = copy_run(trained, tmp_path)
    damage_config(run, damage)
    for argv in [*reading_commands(run, trained["images"]), ["train", "--resume", run, "--no-progress"]]:
        message = run_cli_expecting_error(argv, untouched=[tmp_path / "case"], seconds=30, match=says)
        assert len(message) < 400 and "config.json" in message, message
    with pytest.raises(ElboxError, match=says):
        elbox.load(run)


@pytest.mark.parametrize("name", list(CONFIG_DAMAGE))
def test_a_damaged_config_is_refused_by_train_config(trained, tmp_path, name):
    """`elbox train --config FILE --out NEW` reads the same file (elbox.training.workflows.run_settings)."""
    damage, says = CONFIG_DAMAGE[name]
    run = copy_run(trained, tmp_path)
    damage_config(run, damage)
    run_cli_expecting_error(
        ["train", "--config", run / "config.json", "--out", tmp_path / "case" / "new", "--no-progress"],
        untouched=[tmp_path / "case"],
        seconds=30,
        match=says,
    )
    assert not (tmp_path / "case" / "new").exists()


def test_checked_run_config_takes_the_saved_config_and_names_the_field(trained):
    config = json.loads((trained["run"] / "config.json").read_text())
    assert checked_run_config(config, "the config") is config
    config["train"]["epochs"] = -5
    with pytest.raises(ElboxError, match=r"^the config: train: epochs must be a whole number between 1 and .*got -5$"):
        checked_run_config(config, "the config")


def test_sizes_beyond_the_machine_fail_before_any_allocation():
    for name, values, says in [
        ("vae", {"latent_dim": 10**12}, "latent_dim"),
        ("vae", {"hidden_dims": [10**12]}, "hidden_dims"),
        ("vae", {"data_shape": [1, 10**6, 10**6]}, "data_shape"),
        ("vae", {"hidden_dims": [10**6] * 3}, "memory"),
        ("diffusion", {"timesteps": 10**12}, "timesteps"),
        ("mixture", {"n_components": 10**12}, "n_components"),
        ("gaussian", {"data_shape": [10**5, 10**3]}, "memory"),
    ]:
        start = time.perf_counter()
        with pytest.raises(ElboxError, match=says) as caught:
            build_model(name, values)
        assert time.perf_counter() - start < 1.0 and len(str(caught.value)) < 200, str(caught.value)


# -- the training state ------------------------------------------------------------------------------------------


def field(key: str, value):
    def damage(state: dict):
        state[key] = value

    return damage


def entry(key: str, sub: str, value, index: int | None = None):
    def damage(state: dict):
        (state[key][index] if index is not None else state[key])[sub] = value

    return damage


def dropped(key: str):
    return lambda state: state.pop(key)


STATE_DAMAGE = {  # name: (damage of the state's JSON, or its raw metadata text, what the message must say)
    "step abc": (field("step", "abc"), "step"),
    "step 2**70": (field("step", 2**70), "step"),
    "epoch -1": (field("epoch", -1), "epoch"),
    "epoch 1.5": (field("epoch", 1.5), "epoch"),
    "skipped_steps null": (field("skipped_steps", None), "skipped_steps"),
    "step missing": (dropped("step"), "step"),
    "best_val_elbo a string": (field("best_val_elbo", "high"), "best_val_elbo"),
    "best_val_elbo NaN": (field("best_val_elbo", math.nan), "best_val_elbo"),
    "recent_nonfinite [2]": (field("recent_nonfinite", [2]), "recent_nonfinite"),
    "recent_nonfinite a string": (field("recent_nonfinite", "abc"), "recent_nonfinite"),
    "records 5": (field("records", 5), "records"),
    "records [1]": (field("records", [1]), "records"),
    "lr_scheduler garbage": (field("lr_scheduler", "garbage"), "lr_scheduler"),
    "lr_scheduler null": (field("lr_scheduler", None), "lr_scheduler"),
    "lr_scheduler T_max a string": (entry("lr_scheduler", "T_max", "x"), "T_max"),
    "lr_scheduler T_max 0": (entry("lr_scheduler", "T_max", 0), "T_max"),
    "lr_scheduler last_epoch -3": (entry("lr_scheduler", "last_epoch", -3), "last_epoch"),
    "lr_scheduler unknown entry": (entry("lr_scheduler", "evil", 1), "evil"),
    "optimizer_param_groups empty": (field("optimizer_param_groups", []), "optimizer_param_groups"),
    "optimizer_param_groups a dict": (field("optimizer_param_groups", {}), "optimizer_param_groups"),
    "lr abc": (entry("optimizer_param_groups", "lr", "abc", 0), "lr"),
    "lr negative": (entry("optimizer_param_groups", "lr", -1.0, 0), "lr"),
    "betas garbage": (entry("optimizer_param_groups", "betas", "x", 0), "betas"),
    "params of another model": (entry("optimizer_param_groups", "params", [0], 0), "params"),
    "train_config epochs -5": (entry("train_config", "epochs", -5), "epochs"),
    "train_config a list": (field("train_config", []), "train_config"),
    "metadata 100,000-deep": (lambda state: DEEP, "nested too deeply"),
    "metadata not JSON": (lambda state: "{", "malformed JSON"),
    "metadata a list": (lambda state: "[]", "JSON object"),
}


def damage_state(run: Path, damage=None, tensor_damage=None) -> None:
    path = run / "state.safetensors"
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    metadata = header["__metadata__"]
    tensors = load_file(path)
    if damage is not None:
        state = json.loads(metadata[STATE_METADATA_KEY])
        text = damage(state)
        metadata[STATE_METADATA_KEY] = text if isinstance(text, str) else json.dumps(state)
    if tensor_damage is not None:
        tensor_damage(tensors)
    save_file(tensors, path, metadata=metadata)


def test_the_undamaged_state_resumes(trained, tmp_path):
    """The checks accept what elbox writes: the copied run resumes and trains its second epoch."""
    run = copy_run(trained, tmp_path)
    damage_state(run, lambda state: None)  # rewritten as the damaged ones are
    resumed = elbox.resume(run, progress=False, verbose=False)
    assert [r["epoch"] for r in resumed.history if r["kind"] == "epoch"] == [1, 2]


@pytest.mark.parametrize("name", list(STATE_DAMAGE))
def test_a_damaged_training_state_is_refused_by_resume(trained, tmp_path, name):
    damage, says = STATE_DAMAGE[name]
    run = copy_run(trained, tmp_path)
    damage_state(run, damage)
    message = run_cli_expecting_error(
        ["train", "--resume", run, "--no-progress"], untouched=[tmp_path / "case"], seconds=30, match=says
    )
    assert "state.safetensors" in message and len(message) < 400, message


def poison(name: str, value: float):
    def damage(tensors: dict) -> None:
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = value

    return damage


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_training_state_with_non_finite_tensors_is_refused(trained, tmp_path, value):
    for name in ["model.decoder.0.weight", "optimizer.0.exp_avg"]:
        run = copy_run(trained, tmp_path / name)
        damage_state(run, tensor_damage=poison(name, value))
        run_cli_expecting_error(
            ["train", "--resume", run, "--no-progress"],
            untouched=[tmp_path / name / "case"],
            seconds=30,
            match=f"NaN or infinite values (tensor '{name}')",
        )


# -- weights -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, -math.inf])
def test_weights_with_non_finite_values_are_refused_by_every_command(trained, tmp_path, value):
    run = copy_run(trained, tmp_path)
    tensors = load_file(run / "model.safetensors")
    poison("encoder.1.2.bias", value)(tensors)
    save_file(tensors, run / "model.safetensors")
    for argv in reading_commands(run, trained["images"]):
        message = run_cli_expecting_error(
            argv, untouched=[tmp_path / "case"], seconds=30, match="NaN or infinite values (tensor 'encoder.1.2.bias')"
        )
        assert "model.safetensors" in message
    with pytest.raises(ElboxError, match="NaN or infinite"):
        elbox.load(run)
    assert torch.isfinite(load_file(trained["run"] / "model.safetensors")["encoder.1.2.bias"]).all()

"""CLI smoke tests on the tiny synthetic dataset, and the errors users see."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from PIL import Image

from elbox.cli.main import main

TRAIN = ["train", "--data", "synthetic", "--epochs", "1", "--hidden-dims", "64", "--latent-dim", "4", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vae"
    assert main([*TRAIN, "--out", str(out), "--seed", "1"]) == 0
    return out


def test_train_writes_a_complete_run(run_dir):
    for name in ("config.json", "model.safetensors", "metrics.jsonl", "samples.png"):
        assert (run_dir / name).is_file(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == "vae" and config["data"]["space"] == "binary"
    assert config["model_config"]["hidden_dims"] == [64]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 1 and epochs[0]["val_elbo"] < 0


def test_evaluate_reports_every_key(run_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["evaluate", str(run_dir), "--iw-samples", "20", "--limit", "50", "--json", str(out), "--no-progress"])
    assert code == 0
    result = json.loads(out.read_text())
    for key in (
        "elbo",
        "reconstruction",
        "kl",
        "nll_iw",
        "nll_iw_stderr",
        "iw_samples",
        "bpd",
        "active_units",
        "n_examples",
    ):
        assert key in result, key
    assert result["n_examples"] == 50 and result["iw_samples"] == 20
    assert result["elbo"] == pytest.approx(result["reconstruction"] - result["kl"])
    # IWAE-20 is a tighter bound than the ELBO on average: NLL below -ELBO (paired, 4 standard errors)
    assert result["nll_iw"] < -result["elbo"] + 4 * result["gap_elbo_iw_stderr"]
    assert "NLL (IWAE, K=20)" in capsys.readouterr().out


def test_sample_and_reconstruct_write_pngs(run_dir, tmp_path):
    assert main(["sample", str(run_dir), "--n", "16", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["reconstruct", str(run_dir), "--n", "8", "--out", str(tmp_path / "r.png")]) == 0
    sample, recon = Image.open(tmp_path / "s.png"), Image.open(tmp_path / "r.png")
    assert sample.size[0] > 28 * 4 and recon.size[1] > 28 * 2


def test_train_refuses_to_overwrite_a_run(run_dir, capsys):
    assert main([*TRAIN, "--out", str(run_dir)]) == 1
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "model.safetensors").unlink(), "has no model.safetensors"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 20), "corrupt"),
        (
            lambda d: (d / "config.json").write_text(
                json.dumps({"format_version": 99, "model": "vae", "model_config": {}, "data": {}})
            ),
            "newer",
        ),
    ],
)
def test_damaged_run_dir_gives_a_clear_error(run_dir, tmp_path, capsys, damage, message):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    damage(broken)
    assert main(["evaluate", str(broken), "--iw-samples", "2", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("elbox: error:") and message in err


def test_missing_run_dir(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [["evaluate", "x", "--iw-samples", "0"], ["train", "--out", "x", "--epochs", "-1"], ["train", "--bogus"]]
)
def test_impossible_values_exit_with_usage_error(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("elbox: error: ")


def test_console_entry_point_has_help_and_no_traceback(tmp_path):
    help_text = subprocess.run(
        [sys.executable, "-m", "elbox", "train", "vae", "--help"], capture_output=True, text=True
    )
    assert help_text.returncode == 0 and "--hidden-dims" in help_text.stdout
    failed = subprocess.run([sys.executable, "-m", "elbox", "evaluate", str(tmp_path)], capture_output=True, text=True)
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr and "run config" in failed.stderr


@pytest.mark.parametrize(
    "likelihood, space, offset_per_dim",
    [
        ("gaussian-learned", "continuous", -math.log(256)),
        ("discretized-logistic", "discrete", 0.0),
        ("categorical", "discrete", 0.0),
    ],
)
def test_eight_bit_likelihoods_end_to_end(tmp_path, likelihood, space, offset_per_dim):
    out = tmp_path / likelihood
    assert main([*TRAIN, "--out", str(out), "--likelihood", likelihood, "--limit-train", "200"]) == 0
    assert json.loads((out / "config.json").read_text())["data"]["space"] == space
    assert (
        main(
            ["evaluate", str(out), "--iw-samples", "5", "--limit", "20", "--json", str(out / "e.json"), "--no-progress"]
        )
        == 0
    )
    result = json.loads((out / "e.json").read_text())
    # a density on dequantized data gets -D ln 256 before it is called a log-probability of the 8-bit data
    assert result["log_prob_offset"] == pytest.approx(784 * offset_per_dim)
    assert result["bpd"] == pytest.approx(result["nll_iw"] / (784 * math.log(2)))
    assert result["bpd"] > 0


def test_tighten_reports_the_gap_split(run_dir, tmp_path, capsys):
    out = tmp_path / "tighten.json"
    argv = [
        "tighten",
        str(run_dir),
        "--limit",
        "10",
        "--steps",
        "5",
        "--refit-epochs",
        "1",
        "--iw-samples",
        "10",
        "--elbo-samples",
        "5",
        "--json",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["log_px_source"] == "IWAE-10"
    # the split adds up: total = approximation + amortization (same per-example numbers)
    assert result["gap_total"] == pytest.approx(result["gap_approximation"] + result["gap_amortization"])
    assert "amortization gap" in capsys.readouterr().out


def test_linear_model_end_to_end(tmp_path):
    out = tmp_path / "ppca"
    assert (
        main(
            [
                "train",
                "--model",
                "linear",
                "--data",
                "synthetic",
                "--latent-dim",
                "3",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "evaluate",
                str(out),
                "--iw-samples",
                "1",
                "10",
                "--limit",
                "30",
                "--json",
                str(out / "e.json"),
                "--no-progress",
            ]
        )
        == 0
    )
    result = json.loads((out / "e.json").read_text())
    for key in ("nll_exact", "gap_elbo", "nll_iw_by_k", "gap_iw_by_k", "elbo"):
        assert key in result, key
    assert set(result["nll_iw_by_k"]) == {"1", "10"}
    # PPCA's closed-form W has orthogonal columns, the best diagonal q is exact: no gap (float32 rounding)
    assert abs(result["gap_elbo"]) < 1e-2


@pytest.mark.parametrize(
    "model, extra", [("gaussian", ["--covariance", "diag"]), ("mixture", ["--components", "3", "--covariance", "diag"])]
)
def test_exact_density_models_end_to_end(tmp_path, model, extra):
    out = tmp_path / model
    assert main(["train", "--model", model, "--data", "synthetic", *extra, "--out", str(out), "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "fit" and records[-1]["val_log_likelihood"] < 0
    assert (
        main(
            [
                "evaluate",
                str(out),
                "--iw-samples",
                "1",
                "4",
                "--limit",
                "20",
                "--json",
                str(out / "e.json"),
                "--no-progress",
            ]
        )
        == 0
    )
    result = json.loads((out / "e.json").read_text())
    assert result["bpd"] == pytest.approx(result["nll_exact"] / (784 * math.log(2)))
    if model == "mixture":  # q is the exact posterior: the ELBO and every IWAE-K equal log p(x)
        assert abs(result["gap_elbo"]) < 1e-6 and abs(result["gap_iw"]) < 1e-6
    assert main(["sample", str(out), "--n", "4", "--out", str(out / "s.png")]) == 0
    assert main(["sample", str(out), "--draw"]) == 1

"""Training and evaluating on the user's own data, end to end: a folder of images from the command line, and tables
of real vectors from Python, with likelihoods in the data's original units."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import elbox
from elbox.cli.main import main
from elbox.core.errors import ElboxError
from elbox.data import space_from_record


def write_folder(root, n: int = 60, size: int = 8, seed: int = 0):
    """n grayscale PNGs of a bright square at a random place, in two subfolders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        image = np.full((size, size), 20, dtype=np.uint8)
        r, c = rng.integers(0, size - 3, 2)
        image[r : r + 4, c : c + 4] = 230
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return root


def write_table(path, n: int = 400, seed: int = 0, extra_text: bool = False):
    """A CSV of correlated real columns with offsets and scales far from 0 and 1 (and optionally a text column)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3))
    x = z @ np.array([[2.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 0.1]]) * np.array([300.0, 0.01, 5.0]) + np.array(
        [5000.0, -2.0, 0.5]
    )
    lines = ["a,b,c" + (",label" if extra_text else "")]
    lines += [",".join(f"{v:.10g}" for v in row) + (",x" if extra_text else "") for row in x]
    path.write_text("\n".join(lines) + "\n")
    return x


def test_vae_on_a_folder_of_images_from_the_command_line(tmp_path):
    folder = write_folder(tmp_path / "images")
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "vae",
                "--data",
                str(folder),
                "--epochs",
                "2",
                "--batch-size",
                "16",
                "--latent-dim",
                "2",
                "--hidden-dims",
                "16",
                "--workers",
                "1",
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    record = json.loads((run / "config.json").read_text())["data"]
    assert record["kind"] == "images" and record["path"] == str(folder.resolve()) and "held out" in record["validation"]
    assert (run / "samples.png").is_file()
    assert main(["evaluate", str(run), "--iw-samples", "1", "5", "--no-progress"]) == 0  # the run's validation images
    result = json.loads((run / "eval-validation.json").read_text())
    assert result["n_examples"] == 6 and result["split"] == "validation"  # 10 % of 60 held out
    assert (
        main(
            [
                "evaluate",
                str(run),
                "--data",
                str(folder),
                "--iw-samples",
                "2",
                "--json",
                str(tmp_path / "all.json"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "all.json").read_text())["n_examples"] == 60


def test_gaussian_on_a_table_reports_log_likelihood_in_the_original_units(tmp_path):
    train = write_table(tmp_path / "train.csv")
    write_table(tmp_path / "val.csv", n=50, seed=1)
    run = elbox.fit(
        "gaussian",
        str(tmp_path / "train.csv"),
        validation=str(tmp_path / "val.csv"),
        ridge=0.0,
        progress=False,
        verbose=False,
    )
    assert run.config["data"]["space"] == "real"
    result = elbox.evaluate(run, str(tmp_path / "train.csv"))
    mean = torch.tensor(train.mean(0))
    cov = torch.tensor(np.cov(train, rowvar=False, bias=True))
    expected = torch.distributions.MultivariateNormal(mean, cov).log_prob(torch.tensor(train)).mean().item()
    assert result["nll_exact"] == pytest.approx(-expected, abs=1e-4)  # nats per example, unscaled data


def test_mixture_and_vae_fit_a_table(tmp_path):
    write_table(tmp_path / "t.csv", extra_text=True)
    with pytest.raises(ElboxError, match="label"):  # a non-numeric column is named
        elbox.fit("gaussian", str(tmp_path / "t.csv"), progress=False, verbose=False)
    columns = ["a", "b", "c"]
    mixture = elbox.fit(
        "mixture", str(tmp_path / "t.csv"), columns=columns, n_components=2, progress=False, verbose=False
    )
    vae = elbox.fit(
        "vae",
        str(tmp_path / "t.csv"),
        columns=columns,
        likelihood="gaussian-learned",
        latent_dim=2,
        hidden_dims=[16],
        epochs=3,
        batch_size=32,
        progress=False,
        verbose=False,
    )
    for run in (mixture, vae):
        result = elbox.evaluate(run)  # the run's held-out rows
        assert result["data_space"] == "real" and math.isfinite(result["bpd"])
    rows = np.loadtxt(tmp_path / "t.csv", delimiter=",", skiprows=1, usecols=(0, 1, 2), max_rows=5)
    scores, _, estimate = elbox.score(vae.model, rows, iw_samples=5, space=space_from_record(vae.config["data"]))
    assert scores.shape == (5,) and torch.isfinite(scores).all() and "IWAE" in estimate


def test_bad_own_data_gets_one_clear_error(tmp_path, capsys):
    write_table(tmp_path / "t.csv")
    assert (
        main(["train", "diffusion", "--data", str(tmp_path / "t.csv"), "--out", str(tmp_path / "r"), "--no-progress"])
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("elbox: error:") and "image" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r" / "config.json").exists()
    write_folder(tmp_path / "few", n=10)
    assert main(["train", "vae", "--data", str(tmp_path / "few"), "--out", str(tmp_path / "r2"), "--no-progress"]) == 1
    assert "fewer than one batch" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert (
        main(["train", "vae", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r3"), "--no-progress"]) == 1
    )
    assert "elbox: error:" in capsys.readouterr().err


def test_table_run_from_the_command_line_evaluates_scores_and_reports(tmp_path, capsys):
    write_table(tmp_path / "t.csv")
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "mixture",
                "--data",
                str(tmp_path / "t.csv"),
                "--n-components",
                "2",
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "evaluate",
                str(run),
                "--data",
                str(tmp_path / "t.csv"),
                "--json",
                str(tmp_path / "e.json"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "original units" in capsys.readouterr().out
    assert (
        main(["score", str(run), "--input", str(tmp_path / "t.csv"), "--out", str(tmp_path / "s.csv"), "--no-progress"])
        == 0
    )
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 401
    assert main(["report", str(run)]) == 0 and (run / "report.html").is_file()

"""Every step after training works on the user's own data (issue 27): a run on a folder, an array or a table is
evaluated, scored, encoded, reconstructed and tightened, reading new input as the run read its own (image size,
table columns by name, standardization); and elbox never replaces or deletes a file it did not create. All data are
written by the tests."""

from __future__ import annotations

import fcntl
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import elbox
from elbox.cli.main import main
from elbox.core.errors import ElboxError

QUICK = ["--epochs", "1", "--batch-size", "16", "--latent-dim", "2", "--hidden-dims", "16", "--no-progress"]


def write_folder(root, n: int = 40, size: tuple[int, int] = (36, 40), seed: int = 0):
    """n grey PNGs of size (H, W) in two class subfolders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return root


def write_csv(path, columns: list[str], rows: np.ndarray, ids: list[str] | None = None):
    lines = [",".join((["id"] if ids else []) + columns)]
    lines += [",".join(([ids[i]] if ids else []) + [repr(float(v)) for v in row]) for i, row in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def table_rows(n: int = 300, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)) @ np.array([[2.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 0.5]]) + [50.0, -2.0, 7.0]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A VAE trained from the command line on 36x40 images resized to 32x32 (the README's one-number --image-size)."""
    root = tmp_path_factory.mktemp("folder")
    folder = write_folder(root / "images")
    run = root / "run"
    assert main(["train", "vae", "--data", str(folder), "--image-size", "32", "--out", str(run), *QUICK]) == 0
    return folder, run


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    """A Gaussian fitted on a table from the command line."""
    root = tmp_path_factory.mktemp("table")
    path = write_csv(root / "t.csv", ["a", "b", "c"], table_rows())
    run = root / "run"
    assert main(["train", "gaussian", "--data", str(path), "--out", str(run), "--no-progress"]) == 0
    return path, run


def error_of(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("elbox: error: ") and "\n" not in err, err
    return err


# -- the README's own example, and the run's preprocessing applied to new input -------------------------------------


def test_one_number_image_size_trains_at_that_size(folder_run):
    _, run = folder_run
    config = json.loads((run / "config.json").read_text())
    assert config["model_config"]["data_shape"] == [1, 32, 32] and config["data"]["image_size"] == [32, 32]
    assert elbox.load(run).preprocessing.image_size == (32, 32)


def test_score_and_encode_resize_new_files_as_the_run_did(folder_run, tmp_path, capsys):
    _, run = folder_run
    new = write_folder(tmp_path / "new", n=4, size=(50, 44), seed=1)  # another size: resized like the training files
    assert (
        main(
            [
                "score",
                str(run),
                "--input",
                str(new),
                "--iw-samples",
                "5",
                "--no-progress",
                "--out",
                str(tmp_path / "s.csv"),
            ]
        )
        == 0
    )
    rows = (tmp_path / "s.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[1].split(",")[1] == "a/001.png"
    assert main(["encode", str(run), "--input", str(new), "--out", str(tmp_path / "f.npz")]) == 0
    assert np.load(tmp_path / "f.npz")["mean"].shape == (4, 2)


def test_reconstruct_tighten_evaluate_and_report_a_folder_run(folder_run, capsys):
    _, run = folder_run
    assert main(["reconstruct", str(run), "--n", "4", "--no-progress"]) == 0
    assert (run / "reconstructions.png").is_file()
    assert (
        main(
            [
                "tighten",
                str(run),
                "--limit",
                "3",
                "--steps",
                "2",
                "--refit-epochs",
                "1",
                "--iw-samples",
                "4",
                "--elbo-samples",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    result = json.loads((run / "tighten-validation.json").read_text())  # own data: measured on the validation part
    assert result["n_examples"] == 3 and result["dataset"].endswith("images") and result["split"] == "validation"
    assert main(["evaluate", str(run), "--iw-samples", "1", "4", "--no-progress"]) == 0
    assert json.loads((run / "eval-validation.json").read_text())["split"] == "validation"
    assert main(["evaluate", str(run), "--iw-samples", "4", "--weights", "best", "--no-progress"]) == 0
    assert (run / "eval-validation-best.json").is_file()


def test_evaluate_a_run_fitted_on_an_array_in_memory():
    images = np.random.default_rng(0).integers(0, 256, (64, 1, 8, 8), dtype=np.uint8)
    run = elbox.fit(
        "vae",
        images,
        epochs=1,
        batch_size=16,
        latent_dim=2,
        hidden_dims=[8],
        verbose=False,
        progress=False,
        samples=False,
    )
    result = elbox.evaluate(run, iw_samples=[1, 4])
    assert result["split"] == "validation" and result["n_examples"] == 6  # the 10 % fit held out
    with pytest.raises(ElboxError, match="best weights"):
        elbox.evaluate(run, weights="best")


# -- tables: columns by name, the run's columns remembered, an ID column, standardization in float64 ----------------


def test_a_table_in_another_column_order_scores_the_same(table_run, tmp_path):
    path, run = table_run
    rows = table_rows()[:5]
    reordered = write_csv(tmp_path / "r.csv", ["c", "a", "b"], rows[:, [2, 0, 1]])
    given, _, _ = elbox.score(run, rows)
    by_name, _, _ = elbox.score(run, reordered)
    assert torch.equal(given, by_name)
    renamed = write_csv(tmp_path / "x.csv", ["a", "b", "z"], rows)
    with pytest.raises(ElboxError, match="has no column 'c'"):
        elbox.score(run, renamed)


def test_a_run_trained_with_columns_scores_the_original_table_with_ids(tmp_path, capsys):
    rows = table_rows()
    ids = [f"row-{i}" for i in range(len(rows))]
    path = write_csv(tmp_path / "t.csv", ["a", "b", "c"], rows, ids)
    run = tmp_path / "run"
    assert (
        main(["train", "gaussian", "--data", str(path), "--columns", "c", "a", "--out", str(run), "--no-progress"]) == 0
    )
    assert main(["score", str(run), "--input", str(path), "--id-column", "id", "--no-progress"]) == 0
    lines = (run / "scores.csv").read_text().splitlines()
    assert lines[0].startswith("index,name,log_likelihood_nats") and lines[1].split(",")[:2] == ["0", "row-0"]
    assert lines[1].split(",")[4] == ""  # no bits/dim for real vectors
    assert "bits/dim" not in capsys.readouterr().out
    values, names, _ = elbox.score(run, path, id_column="id")
    expected, _, _ = elbox.score(run, rows[:, [2, 0]])
    assert names[:2] == ["row-0", "row-1"] and torch.equal(values, expected)


def test_validation_table_with_other_column_names_is_refused(tmp_path):
    rows = table_rows()
    train = write_csv(tmp_path / "t.csv", ["a", "b", "c"], rows)
    validation = write_csv(tmp_path / "v.csv", ["x", "y", "z"], rows[:50])
    with pytest.raises(ElboxError, match="has no column 'a'"):
        elbox.fit("gaussian", train, validation=validation, verbose=False, progress=False)


def test_score_with_the_model_of_a_run_applies_its_standardization(table_run):
    _, run_dir = table_run
    rows = table_rows()[:4]
    model = elbox.load(run_dir)
    assert torch.equal(elbox.score(model, rows)[0], elbox.score(run_dir, rows)[0])
    fitted = elbox.fit(
        "gaussian", rows.repeat(20, 0) + np.random.default_rng(0).normal(size=(80, 3)), verbose=False, progress=False
    )
    assert elbox.score(fitted, rows)[0].shape == (4,) and elbox.score(fitted.model, rows)[0].shape == (4,)


def test_standardization_in_float64_keeps_tiny_spreads(tmp_path):
    """Data c*x + b (timestamps near 1.7e9 spreading over minutes) have the log-density of x shifted by -D ln c
    exactly: quantizing the columns to float32 (a step of 128 s at 1.7e9) before standardizing would move it by nats."""
    x = table_rows(400)
    c, b = 600.0, np.array([1.7e9, 1.7e9 + 3600, 4.2e9])
    fits = [elbox.fit("gaussian", data, verbose=False, progress=False) for data in (x, x * c + b)]
    first, second = (elbox.score(run, data)[0] for run, data in zip(fits, (x[:50], x[:50] * c + b)))
    assert torch.allclose(second - first, torch.full_like(first, -3 * math.log(c)), atol=1e-4)


def test_exact_scores_do_not_depend_on_the_batch(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 30)) @ rng.normal(size=(30, 30))
    run = elbox.fit("linear", x, latent_dim=5, verbose=False, progress=False)
    alone = torch.cat([elbox.score(run, x[i : i + 1])[0] for i in range(5)])
    batched, _, _ = elbox.score(run, x, batch_size=333)
    assert (alone - batched[:5]).abs().max() < 1e-9  # float64: far below the CSV's six decimals (float32: 6e-5)


# -- never replace or delete a file elbox did not create -------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["sample", "--out"],
        ["score", "--input", "IMAGES", "--iw-samples", "2", "--out"],
        ["encode", "--input", "IMAGES", "--out"],
        ["evaluate", "--iw-samples", "2", "--json"],
        ["reconstruct", "--n", "2", "--out"],
        ["report", "--out"],
    ],
)
def test_named_outputs_refuse_a_users_file_unless_overwrite(folder_run, tmp_path, capsys, command):
    folder, run = folder_run
    suffix = {
        "sample": ".png",
        "score": ".csv",
        "encode": ".npz",
        "evaluate": ".json",
        "reconstruct": ".png",
        "report": ".html",
    }[command[0]]
    notes = tmp_path / f"notes{suffix}"
    notes.write_text("my notes\n")
    argv = [
        command[0],
        str(run),
        *[str(folder / "a") if a == "IMAGES" else a for a in command[1:]],
        str(notes),
        "--no-progress",
    ]
    assert "--overwrite" in error_of(capsys, argv) and notes.read_text() == "my notes\n"
    assert main(argv + ["--overwrite"]) == 0 and notes.read_bytes() != b"my notes\n"
    assert main(argv) == 0  # elbox's own output is replaced without asking


def test_save_pretrained_writes_only_where_a_new_run_may_go(folder_run, tmp_path):
    _, run = folder_run
    model = elbox.load(run)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    with pytest.raises(ElboxError, match="not an earlier save_pretrained output"):
        elbox.save_pretrained(model, mine)
    assert (mine / "config.json").read_text() == '{"my": "settings"}' and not (mine / "model.safetensors").exists()
    before = (run / "config.json").read_bytes()
    with pytest.raises(ElboxError, match="cannot save the model"):
        elbox.save_pretrained(model, run)
    assert (run / "config.json").read_bytes() == before
    saved = elbox.save_pretrained(model, tmp_path / "pretrained")
    elbox.save_pretrained(model, saved)  # replaces its own earlier output
    assert elbox.load(saved).preprocessing.image_size == (32, 32)
    with pytest.raises(ElboxError, match="takes a model"):
        elbox.save_pretrained("notmodel", tmp_path / "x")
    with pytest.raises(ElboxError, match="cannot write the model"):
        elbox.save_pretrained(model, "/dev/null/x")


def test_a_refused_second_writer_leaves_the_running_run_whole(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")  # the first run's, written as it started
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the first run holds its directory
    try:
        with pytest.raises(ElboxError, match="in use by another elbox process"):
            elbox.fit("gaussian", table_rows(), out=out, verbose=False, progress=False)
    finally:
        os.close(fd)
    assert (out / "config.json").read_text() == "{}"


def test_resume_never_refits_a_finished_closed_form_linear_run(tmp_path):
    out = tmp_path / "run"
    elbox.fit("linear", table_rows(), latent_dim=1, out=out, verbose=False, progress=False)
    weights = (out / "model.safetensors").read_bytes()
    with pytest.raises(ElboxError, match="is complete"):
        elbox.resume(out, verbose=False, progress=False)
    assert (out / "model.safetensors").read_bytes() == weights


# -- the Python API checks the command line's ranges ------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda m: elbox.sample(m, 10**10), "n must be a whole number between 1 and 10000"),
        (lambda m: elbox.sample(m, 2, temperature=1e308), "temperature must be a number > 0 and <= 100"),
        (lambda m: elbox.evaluate(m, np.zeros((4, 1, 32, 32), np.uint8), limit=-1), "limit must be a whole number"),
        (lambda m: elbox.score(m, np.zeros((2, 1, 32, 32), np.uint8), iw_samples=10**12), "iw_samples must be"),
        (lambda m: elbox.evaluate(m, np.zeros((4, 1, 32, 32), np.uint8), split="tset"), "did you mean 'test'"),
    ],
)
def test_the_python_api_enforces_the_command_line_ranges(folder_run, call, fragment):
    model = elbox.load(folder_run[1])
    with pytest.raises(ElboxError, match=fragment.replace("(", r"\(")):
        call(model)


def test_load_on_an_unknown_device_is_one_error(folder_run):
    with pytest.raises(ElboxError, match="unknown device 'tpu'"):
        elbox.load(folder_run[1], device="tpu")


# -- runs that say what happened ---------------------------------------------------------------------------------------


@pytest.fixture
def torch_threads():
    """Commands set torch's thread count for the process: put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_warm_up_longer_than_the_run_is_one_warning_line(tmp_path, capsys):
    folder = write_folder(tmp_path / "images", n=20, size=(8, 8))
    assert (
        main(
            [
                "train",
                "hvae",
                "--data",
                str(folder),
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--no-progress",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and warnings[0].startswith(
        "elbox: warning: the run's 2 steps end inside its 5-epoch KL "
        "warm-up: the last step trains with beta = 0.1, not 1"
    ), err


def test_resume_with_epochs_extends_a_finished_run(tmp_path, capsys):
    folder = write_folder(tmp_path / "images", n=20, size=(8, 8))
    run = tmp_path / "run"
    assert main(["train", "vae", "--data", str(folder), *QUICK, "--out", str(run)]) == 0
    assert "--epochs N" in error_of(capsys, ["train", "--resume", str(run), "--no-progress"])
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["epoch", "extended", "epoch"] and records[1]["from_epochs"] == 1
    assert "drop --lr" in error_of(capsys, ["train", "--resume", str(run), "--epochs", "3", "--lr", "0.1"])
    assert "more than that" in error_of(capsys, ["train", "--resume", str(run), "--epochs", "2"])


def test_ctrl_c_names_the_last_saved_epoch_and_the_resume_command(tmp_path, capsys, monkeypatch):
    from conftest import interrupt_second_validation

    folder = write_folder(tmp_path / "images", n=20, size=(8, 8))
    run = tmp_path / "run"
    interrupt_second_validation(monkeypatch)
    assert main(["train", "vae", "--data", str(folder), *QUICK, "--epochs", "3", "--out", str(run)]) == 130
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(f"{run} holds epoch 1 (the last one saved); continue with: elbox train --resume {run}")
    )


def test_ctrl_c_within_an_epoch_names_the_state_and_resume_continues_after_its_batch(tmp_path, capsys, monkeypatch):
    from elbox.training.trainer import Trainer

    folder = write_folder(tmp_path / "images", n=40, size=(8, 8))
    run = tmp_path / "run"
    step = Trainer.training_step

    def interrupt_in_the_second_epoch(self, x, beta):
        if self.step == self.steps_per_epoch + 1:
            raise KeyboardInterrupt
        return step(self, x, beta)

    monkeypatch.setattr(Trainer, "training_step", interrupt_in_the_second_epoch)
    options = [*QUICK, "--epochs", "2", "--batch-size", "8", "--checkpoint-minutes", "1e-9"]
    assert main(["train", "vae", "--data", str(folder), *options, "--out", str(run)]) == 130
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            f"{run} holds epoch 1 (the last finished) and a training state within epoch 2, after its batch 1; "
            f"continue with: elbox train --resume {run}"
        )
    )
    monkeypatch.setattr(Trainer, "training_step", step)
    # how often a state is saved may change on resume (it changes no number), and config.json records it
    assert main(["train", "--resume", str(run), "--no-progress", "--checkpoint-minutes", "0"]) == 0
    assert f"resuming {run} within epoch 2 of 2, after its batch 1 (step " in capsys.readouterr().err
    assert [r["epoch"] for r in map(json.loads, (run / "metrics.jsonl").open()) if r["kind"] == "epoch"] == [1, 2]
    assert json.loads((run / "config.json").read_text())["train"]["checkpoint_minutes"] == 0
    assert "drop --lr" in error_of(capsys, ["train", "--resume", str(run), "--checkpoint-minutes", "1", "--lr", "1"])
    before = (run / "config.json").read_bytes()  # a change that fails a check changes nothing, the others neither
    with pytest.raises(ElboxError, match="checkpoint_minutes"):
        elbox.resume(run, epochs=3, checkpoint_minutes=-1, progress=False)
    assert (run / "config.json").read_bytes() == before


def test_the_thread_count_is_recorded_and_a_rerun_reproduces_bit_for_bit(tmp_path, capsys, torch_threads):
    """The same settings and thread count give the same numbers; another thread count sums float32 products in
    another order, so its numbers agree only to rounding."""
    folder = write_folder(tmp_path / "images", n=40, size=(8, 8))
    first, again, two = tmp_path / "first", tmp_path / "again", tmp_path / "two"
    assert (
        main(["train", "vae", "--data", str(folder), *QUICK, "--epochs", "2", "--threads", "1", "--out", str(first)])
        == 0
    )
    assert json.loads((first / "config.json").read_text())["system"]["threads"] == 1
    torch.set_num_threads(2)
    assert main(["train", "--config", str(first / "config.json"), "--out", str(again), "--no-progress"]) == 0
    assert "(1 threads)" in capsys.readouterr().err  # the recorded count, not the machine's
    timing = ("epoch_time_s", "images_per_s")
    assert [
        {k: v for k, v in json.loads(line).items() if k not in timing} for line in (first / "metrics.jsonl").open()
    ] == [{k: v for k, v in json.loads(line).items() if k not in timing} for line in (again / "metrics.jsonl").open()]
    assert (
        main(["train", "--config", str(first / "config.json"), "--threads", "2", "--out", str(two), "--no-progress"])
        == 0
    )
    ours, theirs = (json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])["val_elbo"] for d in (first, two))
    assert abs(ours - theirs) < 0.01 * abs(ours)


@pytest.mark.parametrize(
    "argv, hint",
    [
        (
            ["train", "vae", "--data", "fashion_mnist", "--out", "OUT"],
            "did you mean 'fashion-mnist'? (a built-in dataset)",
        ),
        (["train", "gmm", "--out", "OUT"], "did you mean 'mixture'?"),
        (["train", "vae", "--learning-rate", "0.1", "--out", "OUT"], "did you mean --lr?"),
    ],
)
def test_names_from_other_libraries_get_a_did_you_mean(tmp_path, capsys, monkeypatch, argv, hint):
    monkeypatch.chdir(tmp_path)
    assert hint in error_of(capsys, [str(tmp_path / "o") if a == "OUT" else a for a in argv])
    assert not (tmp_path / "o").exists()


def test_weights_too_large_for_float32_arithmetic_are_refused(folder_run, tmp_path):
    from safetensors.torch import load_file, save_file

    _, run = folder_run
    copy = tmp_path / "copy"
    elbox.save_pretrained(elbox.load(run), copy)
    tensors = load_file(copy / "model.safetensors")
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], 1e38)
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(ElboxError, match="beyond 1e\\+19 in magnitude"):
        elbox.load(copy)


def test_a_folder_run_says_why_its_images_are_binarized(tmp_path, capsys):
    folder = write_folder(tmp_path / "images", n=20, size=(8, 8))
    assert main(["train", "vae", "--data", str(folder), *QUICK, "--out", str(tmp_path / "run")]) == 0
    assert "binarized afresh in each batch" in capsys.readouterr().err


def test_samples_of_a_table_run_are_rows_in_the_columns_units(table_run, capsys):
    _, run = table_run
    assert main(["sample", str(run), "--n", "500", "--no-progress"]) == 0
    lines = (run / "samples.csv").read_text().splitlines()
    assert lines[0] == "elbox_sample,a,b,c" and len(lines) == 501
    values = np.array([[float(v) for v in line.split(",")[1:]] for line in lines[1:]])
    data = table_rows()
    stderr = data.std(0) / math.sqrt(500)
    assert (np.abs(values.mean(0) - data.mean(0)) < 5 * stderr * math.sqrt(2)).all()  # fitted mean, in original units
    assert main(["sample", str(run), "--n", "3", "--no-progress"]) == 0  # its own CSV is replaced
    assert elbox.sample(run, 4).shape == (4, 3)


@pytest.mark.parametrize(
    "name, content",
    [
        ("mine.csv", b"sample,gene1\nS1,0.5\n"),  # a user's table whose first column is called "sample"
        ("mine.json", b'{"model": "resnet50", "dataset": "imagenet"}'),
        ("mine.html", b"<!doctype html><p id='run-settings'>my page</p>"),
    ],
)
def test_files_that_merely_look_like_elbox_outputs_are_refused(folder_run, table_run, tmp_path, capsys, name, content):
    folder, run = folder_run
    path = tmp_path / name
    path.write_bytes(content)
    argv = {
        ".csv": ["score", str(table_run[1]), "--input", str(table_run[0]), "--out", str(path)],
        ".json": ["evaluate", str(run), "--iw-samples", "2", "--json", str(path)],
        ".html": ["report", str(run), "--out", str(path)],
    }[path.suffix]
    assert "--overwrite" in error_of(capsys, argv + ["--no-progress"]) and path.read_bytes() == content


def test_a_users_npz_with_a_names_array_is_refused(folder_run, tmp_path, capsys):
    folder, run = folder_run
    mine = tmp_path / "mine.npz"
    np.savez(mine, x=np.zeros(3), names=np.array(["a", "b", "c"]))
    before = mine.read_bytes()
    assert "--overwrite" in error_of(capsys, ["encode", str(run), "--input", str(folder / "a"), "--out", str(mine)])
    assert mine.read_bytes() == before


def test_outputs_an_earlier_elbox_left_unmarked_in_its_run_directory_are_replaced(folder_run, tmp_path):
    _, run = folder_run
    (run / "samples.png").write_bytes(b"\x89PNG\r\n\x1a\n an unmarked grid of an earlier elbox")
    assert main(["sample", str(run), "--n", "4", "--no-progress"]) == 0


def test_an_output_named_with_another_suffix_is_refused(folder_run, table_run, tmp_path, capsys):
    assert "name it FILE.csv" in error_of(capsys, ["sample", str(table_run[1]), "--out", str(tmp_path / "x.png")])
    assert "name it FILE.png" in error_of(capsys, ["sample", str(folder_run[1]), "--out", str(tmp_path / "x.csv")])
    assert not list(tmp_path.iterdir())


def test_an_id_column_keeps_its_text(table_run, tmp_path):
    rows = table_rows()[:3]
    path = write_csv(tmp_path / "ids.csv", ["a", "b", "c"], rows, ids=["00042", "1e5", "007"])
    _, names, _ = elbox.score(table_run[1], path, id_column="id")
    assert names == ["00042", "1e5", "007"]


def test_omp_num_threads_wins_over_the_recorded_count_with_a_warning(tmp_path, capsys, monkeypatch, torch_threads):
    folder = write_folder(tmp_path / "images", n=20, size=(8, 8))
    first = tmp_path / "first"
    assert main(["train", "vae", "--data", str(folder), *QUICK, "--threads", "2", "--out", str(first)]) == 0
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    capsys.readouterr()
    assert (
        main(["train", "--config", str(first / "config.json"), "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    )
    err = capsys.readouterr().err
    assert "(1 threads)" in err and "elbox: warning: the run trained with 2 threads" in err


def test_an_extended_run_does_not_repeat_an_outgrown_warm_up_warning(tmp_path, capsys):
    folder = write_folder(tmp_path / "images", n=20, size=(8, 8))
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "vae",
                "--data",
                str(folder),
                *QUICK,
                "--beta-schedule",
                "linear",
                "--warmup-epochs",
                "2",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    assert "KL warm-up" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--epochs", "4", "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_users_file_under_an_output_name_in_a_run_directory_is_refused(table_run, tmp_path, capsys):
    _, run = table_run
    (run / "samples.csv").write_text("my,own\n1,2\n")
    assert "--overwrite" in error_of(capsys, ["sample", str(run), "--n", "3"])
    assert (run / "samples.csv").read_text() == "my,own\n1,2\n"
    (run / "samples.csv").unlink()


def test_report_images_beside_a_named_page_are_never_a_users(folder_run, tmp_path, capsys):
    _, run = folder_run
    (tmp_path / "report").mkdir()
    mine = tmp_path / "report" / "samples.png"
    mine.write_bytes(b"my picture")
    assert "--overwrite" in error_of(capsys, ["report", str(run), "--out", str(tmp_path / "page.html")])
    assert mine.read_bytes() == b"my picture" and not (tmp_path / "page.html").exists()


@pytest.fixture(scope="module")
def own_runs(tmp_path_factory):
    """Runs on an .npy array file of images (a VAE) and on a table (an MLP VAE with a Gaussian likelihood), from the
    command line, with the inputs to give the commands."""
    root = tmp_path_factory.mktemp("own")
    images = np.random.default_rng(0).integers(0, 256, (48, 1, 8, 8), dtype=np.uint8)
    np.save(root / "images.npy", images)
    table = write_csv(root / "t.csv", ["a", "b", "c"], table_rows(200))
    runs = {"array": (root / "array", root / "images.npy"), "table": (root / "table", table)}
    assert main(["train", "vae", "--data", str(root / "images.npy"), "--out", str(runs["array"][0]), *QUICK]) == 0
    assert (
        main(
            [
                "train",
                "vae",
                "--data",
                str(table),
                "--likelihood",
                "gaussian-learned",
                "--out",
                str(runs["table"][0]),
                *QUICK,
            ]
        )
        == 0
    )
    return runs


@pytest.mark.parametrize("kind", ["array", "table"])
@pytest.mark.parametrize(
    "command",
    [
        ["evaluate", "--iw-samples", "1", "4"],
        ["score", "--input", "IN", "--iw-samples", "4"],
        ["encode", "--input", "IN", "--out", "OUT.npz"],
        ["sample", "--n", "4"],
        ["report"],
        ["tighten", "--limit", "3", "--steps", "2", "--refit-epochs", "1", "--iw-samples", "4", "--elbo-samples", "2"],
    ],
)
def test_every_command_runs_on_an_array_file_run_and_a_table_run(own_runs, kind, command, tmp_path):
    run, given = own_runs[kind]
    argv = [
        command[0],
        str(run),
        *[str(given) if a == "IN" else str(tmp_path / a) if a.startswith("OUT") else a for a in command[1:]],
        "--no-progress",
    ]
    assert main(argv) == 0
    if command[0] == "encode":
        features = np.load(tmp_path / "OUT.npz")
        assert (
            features["mean"].shape == (48 if kind == "array" else 200, 2)
            and features["variance"].shape == features["mean"].shape
        )


def test_evaluate_best_weights_are_the_best_checkpoint(own_runs):
    from elbox.io.checkpoint import load_weights

    run = own_runs["array"][0]
    best = elbox.evaluate(run, iw_samples=[4], weights="best")
    model = elbox.load(run)
    load_weights(run / "best.safetensors", model)
    direct = elbox.evaluate(model, own_validation(run), iw_samples=[4])
    timing = ("time_s", "split", "dataset")
    assert {k: v for k, v in best.items() if k not in timing} == {k: v for k, v in direct.items() if k not in timing}


def own_validation(run) -> torch.Tensor:
    from elbox.evaluation.runs import run_examples
    from elbox.io.checkpoint import read_run_config

    return run_examples(read_run_config(run), "validation", 0, None)


def test_the_python_api_takes_a_run_a_run_directory_or_a_model(own_runs):
    run_dir, images = own_runs["array"]
    model = elbox.load(run_dir)
    x = np.load(images)[:5]
    assert torch.equal(elbox.score(run_dir, x, iw_samples=4)[0], elbox.score(model, x, iw_samples=4)[0])
    assert np.array_equal(elbox.encode(run_dir, x)[0]["mean"], elbox.encode(model, x)[0]["mean"])
    assert torch.equal(elbox.sample(run_dir, 3), elbox.sample(model, 3))


def test_resume_with_epochs_from_python(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (40, 1, 8, 8), dtype=np.uint8)
    out = tmp_path / "run"
    np.save(tmp_path / "x.npy", images)
    elbox.fit(
        "vae",
        tmp_path / "x.npy",
        out=out,
        epochs=1,
        batch_size=16,
        latent_dim=2,
        hidden_dims=[8],
        verbose=False,
        progress=False,
        samples=False,
    )
    run = elbox.resume(out, epochs=2, verbose=False, progress=False)
    assert [r["epoch"] for r in run.history if r["kind"] == "epoch"] == [1, 2]
    assert json.loads((out / "config.json").read_text())["train"]["epochs"] == 2

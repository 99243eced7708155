"""elbox score: reading users' images (npy, npz, PNG folders), validation of every input, CSV output, OOM retries;
and property-based tests (hypothesis) that every file reader meets random or corrupted bytes with success or the
clear ElboxError, never an unhandled exception."""

from __future__ import annotations

import csv
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

import elbox
from elbox.cli.main import main
from elbox.core.errors import ElboxError
from elbox.data import get_data_space
from elbox.data.dataset_files import parse_cifar_batch, parse_idx
from elbox.data.formats import to_8bit_tensor
from elbox.data.user import read_images
from elbox.evaluation.inference import BINARIZATIONS, model_inputs, score_with_stderr
from elbox.io.checkpoint import load_training_state, load_weights, read_json
from elbox.models import build_model
from elbox.models.estimates import retry_on_out_of_memory

SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("score") / "run"
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
                "--batch-size",
                "50",
                "--latent-dim",
                "2",
                "--hidden-dims",
                "16",
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    return run


def images(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def scores(path: Path) -> list[float]:
    with open(path) as f:
        return [float(row["log_likelihood_nats"]) for row in csv.DictReader(f)]


def test_npy_npz_png_and_layouts_give_the_same_scores(run_dir, tmp_path):
    x = images()
    inputs = {
        "npy": (tmp_path / "x.npy", lambda p: np.save(p, x)),
        "npz": (tmp_path / "x.npz", lambda p: np.savez(p, images=x, labels=np.arange(6))),
        "float": (tmp_path / "f.npy", lambda p: np.save(p, x.astype(np.float32) / 255)),
        "nchw": (tmp_path / "c.npy", lambda p: np.save(p, x[:, None].astype(np.int64))),
        "nhwc": (tmp_path / "l.npy", lambda p: np.save(p, x[..., None])),
    }
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(x):
        Image.fromarray(image, mode="L").save(folder / f"img{i:02d}.png")
    results = {}
    for name, (path, write) in inputs.items():
        write(path)
        out = tmp_path / f"{name}.csv"
        assert (
            main(
                ["score", str(run_dir), "--input", str(path), "--iw-samples", "20", "--out", str(out), "--no-progress"]
            )
            == 0
        )
        results[name] = scores(out)
    out = tmp_path / "png.csv"
    assert (
        main(["score", str(run_dir), "--input", str(folder), "--iw-samples", "20", "--out", str(out), "--no-progress"])
        == 0
    )
    results["png"] = scores(out)
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["name"] == "img00.png"
    assert rows[0]["estimate"] == (
        "IWAE-20 lower bound; importance samples and binarization seeded per image from its "
        "pixels and seed 0; binary model: grey images scored by the mean over 16 "
        "binarizations (s.e. in column log_likelihood_stderr_nats)"
    )
    assert float(rows[0]["bits_per_dim"]) == pytest.approx(
        -float(rows[0]["log_likelihood_nats"]) / (784 * np.log(2)), rel=1e-5
    )
    assert len(results["npy"]) == 6 and all(v < 0 for v in results["npy"])
    for name, values in results.items():
        assert values == results["npy"], name


# ----------------------------------------------------------------------------------------------
# An image's score is its own: its randomness is seeded from its pixels and the seed


def test_an_image_scores_the_same_alone_in_any_file_at_any_position_format_batch_size_and_call(run_dir, tmp_path):
    model = elbox.load(run_dir)
    target, others = images(1, seed=1)[0], images(3, seed=2)

    def score(data, **options):
        values, stderr, _, _ = score_with_stderr(model, data, iw_samples=10, **options)
        return values.tolist(), stderr.tolist()

    (alone,), (alone_se,) = score(target[None])
    assert alone_se > 0  # grey: the mean over 16 binarizations, with its standard error
    for position in range(4):  # (b) inside a file of 4, at every position
        np.save(tmp_path / f"at{position}.npy", np.insert(others, position, target, axis=0))
        values, stderr = score(tmp_path / f"at{position}.npy")
        assert (values[position], stderr[position]) == (alone, alone_se), position
    folder = tmp_path / "pngs"  # (c) .npy (above), a PNG folder, one PNG file, grey stored as RGB
    folder.mkdir()
    for i, image in enumerate(np.insert(others, 3, target, axis=0)):
        Image.fromarray(image, mode="L").save(folder / f"{i}.png")
    Image.fromarray(target, mode="L").save(tmp_path / "one.png")
    Image.fromarray(np.repeat(target[..., None], 3, axis=-1), mode="RGB").save(tmp_path / "rgb.png")
    assert score(folder)[0][3] == alone
    assert score(tmp_path / "one.png")[0] == score(tmp_path / "rgb.png")[0] == score(target)[0] == [alone]
    torch.manual_seed(123)  # (d) every call, whatever the global generator's state, which stays as it was
    state = torch.random.get_rng_state()
    assert score(target[None]) == ([alone], [alone_se]) and torch.equal(torch.random.get_rng_state(), state)
    for batch_size in (1, 3):  # (e) any batch size
        assert score(folder, batch_size=batch_size)[0][3] == alone
    assert score(target[None], seed=1)[0] != [alone]  # the user's seed still matters
    out = tmp_path / "one.csv"  # the command line: one PNG file, its row
    assert (
        main(
            [
                "score",
                str(run_dir),
                "--input",
                str(tmp_path / "one.png"),
                "--iw-samples",
                "10",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    with open(out) as f:
        (row,) = list(csv.DictReader(f))
    assert row["name"] == "one.png" and float(row["log_likelihood_nats"]) == pytest.approx(alone, abs=1e-6)


def test_binary_images_are_scored_as_given_and_grey_ones_by_their_binarizations(run_dir):
    model = elbox.load(run_dir)
    grey = images(1, seed=1)
    binary = np.where(grey > 127, 255, 0).astype(np.uint8)
    values, stderr, _, estimate = score_with_stderr(model, np.concatenate([grey, binary]), iw_samples=10)
    assert stderr[0] > 0 and stderr[1].isnan()  # one estimate for the binary image: no standard error to give
    assert estimate.endswith("(s.e. in column log_likelihood_stderr_nats), binary images as given")
    alone, stderr, _, estimate = score_with_stderr(model, binary, iw_samples=10)
    assert alone[0] == values[1] and "binariz" not in estimate and stderr.isnan().all()
    single, _, _, _ = score_with_stderr(model, grey, iw_samples=10, binarizations=1)
    assert single[0] != score_with_stderr(model, grey, iw_samples=10)[0][0]


def test_the_binarization_standard_error_matches_the_spread_over_seeds(run_dir):
    """Each seed gives the mean over 16 binarizations of one grey image and its standard error; over 20 seeds the
    means scatter by that standard error. The sample s.d. of n = 20 draws has a relative standard error of
    1 / sqrt(2 (n - 1)) = 0.16; the test allows 4 of them."""
    model = elbox.load(run_dir)
    grey = images(1, seed=1)
    values, stderr = zip(
        *[
            (v.item(), e.item())
            for v, e, _, _ in (score_with_stderr(model, grey, iw_samples=5, seed=seed) for seed in range(20))
        ]
    )
    ratio = np.std(values, ddof=1) / np.sqrt(np.mean(np.square(stderr)))
    assert abs(ratio - 1) < 4 / np.sqrt(2 * 19), ratio


@pytest.mark.parametrize("model", ["diffusion", "diffusion-T", "gaussian"])
def test_elbo_and_exact_scores_belong_to_the_image_too(model):
    """The diffusion ELBO's time and noise draws (continuous time, and T = 10 steps) and the exact model's
    dequantization are seeded per image as well."""
    x = np.random.default_rng(0).integers(0, 256, (5, 8, 8), dtype=np.uint8)
    config = {"data_shape": [1, 8, 8], "channels": [4], "timesteps": 10 if model == "diffusion-T" else 0}
    if model == "gaussian":
        built = build_model("gaussian", {"data_shape": [1, 8, 8]})
        built.fit(get_data_space("continuous").eval_data(torch.from_numpy(x)[:, None].repeat(4, 1, 1, 1)))
    else:
        built = build_model("diffusion", config)
    values, stderr, _, estimate = score_with_stderr(built.eval(), x, elbo_samples=4)
    alone, _, _, _ = score_with_stderr(built, x[2:3], elbo_samples=4)
    # an exact log p(x) is computed in float64: no batch's float32 rounding shows (1e-9 nats: far below six decimals)
    assert values[2].item() == pytest.approx(alone.item(), abs=1e-9 if model == "gaussian" else 0)
    assert stderr.isnan().all()
    assert ("dequantization seeded per image" in estimate) == (model == "gaussian")
    assert ("ELBO draws seeded per image" in estimate) == (model != "gaussian")


def test_rgb_images_go_to_rgb_models_and_are_refused_by_grey_ones_with_the_shapes(run_dir, tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "rgb.png")
    model = build_model("vae", {"data_shape": [3, 8, 8], "latent_dim": 2, "hidden_dims": [8]}).eval()
    from_png, _, _ = elbox.score(model, tmp_path / "rgb.png", iw_samples=3)
    assert from_png.tolist() == elbox.score(model, rgb, iw_samples=3)[0].tolist()  # one image, channels last
    assert from_png.tolist() == elbox.score(model, rgb.transpose(2, 0, 1)[None], iw_samples=3)[0].tolist()
    grey = rgb[..., 0]  # a grey image to an RGB model: the same picture, repeated over the channels
    assert (
        elbox.score(model, grey, iw_samples=3)[0].tolist()
        == elbox.score(model, np.stack([grey] * 3), iw_samples=3)[0].tolist()
    )
    with pytest.raises(
        ElboxError,
        match=(
            r"^input array has RGB images \(image 0: shape \(3, 28, 28\)\); the model takes grayscale images \(1, "
            r"28, 28\)"
        ),
    ):
        elbox.score(elbox.load(run_dir), np.zeros((2, 3, 28, 28), np.uint8) + np.arange(3)[:, None, None])
    Image.fromarray(np.zeros((28, 28, 3), np.uint8) + np.arange(3, dtype=np.uint8), mode="RGB").save(tmp_path / "c.png")
    with pytest.raises(
        ElboxError, match=r"input .*c.png has RGB images .*the model takes grayscale images \(1, 28, 28\)"
    ):
        elbox.encode(elbox.load(run_dir), tmp_path / "c.png")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (input path, expected message fragment)."""
    cases = {}

    def add(name, filename, content, message):
        path = tmp_path / filename
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif callable(content):
            content(path)
        cases[name] = (path, message)

    marker = tmp_path / "pwned"
    add(
        "pickled object array",
        "obj.npy",
        lambda p: np.save(p, np.array([_RunsCode(marker)], dtype=object), allow_pickle=True),
        "pickled",
    )
    add("raw pickle", "raw.npy", pickle.dumps(_RunsCode(marker)), "pickled objects are never loaded")
    add("wrong shape", "shape.npy", lambda p: np.save(p, np.zeros((3, 32, 32), np.uint8)), "shape")
    add("NaN", "nan.npy", lambda p: np.save(p, np.full((2, 28, 28), np.nan)), "NaN")
    add("infinite", "inf.npy", lambda p: np.save(p, np.full((2, 28, 28), np.inf)), "NaN or infinite")
    add("above 255", "big.npy", lambda p: np.save(p, np.full((2, 28, 28), 300)), "0..255")
    add("negative", "neg.npy", lambda p: np.save(p, np.full((2, 28, 28), -1)), "0..255")
    add("float above 1", "f.npy", lambda p: np.save(p, np.full((2, 28, 28), 2.0)), "[0, 1]")
    add("float off the grid", "g.npy", lambda p: np.save(p, np.full((2, 28, 28), 0.1234)), "grid")
    add("empty", "empty.npy", lambda p: np.save(p, np.zeros((0, 28, 28), np.uint8)), "empty")
    add("strings", "str.npy", lambda p: np.save(p, np.array(["a", "b"])), "dtype")
    add("truncated npy", "trunc.npy", lambda p: p.write_bytes(_npy_bytes(images())[:300]), "truncated")
    add("corrupt npz", "bad.npz", b"PK\x03\x04 not really a zip", "corrupt")
    add("ambiguous npz", "two.npz", lambda p: np.savez(p, a=images(), b=images()), "name the images")
    add("unsupported type", "x.txt", b"1 2 3", "unsupported file type")
    add("missing", "nothing.npy", None, "does not exist")
    folder = tmp_path / "broken_pngs"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    cases["corrupt PNG"] = (folder, "not a readable PNG")
    folder = tmp_path / "mixed_pngs"
    folder.mkdir()
    Image.fromarray(images(1)[0]).save(folder / "a.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / "b.png")
    cases["PNGs of different sizes"] = (folder, "all must match")
    folder = tmp_path / "no_pngs"
    folder.mkdir()
    cases["folder without PNGs"] = (folder, "no .png files")
    return cases


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_every_bad_input_gets_one_clear_message_and_no_code_runs(run_dir, tmp_path, capsys):
    for name, (path, message) in _bad_inputs(tmp_path).items():
        assert main(["score", str(run_dir), "--input", str(path), "--no-progress"]) == 1, name
        err = capsys.readouterr().err
        assert err.startswith("elbox: error: ") and message in err and "Traceback" not in err, (name, err)
    assert not (tmp_path / "pwned").exists()


def test_binary_run_scores_binary_float_arrays(run_dir, tmp_path):
    x = (images() > 127).astype(np.float64)
    np.save(tmp_path / "b.npy", x)
    assert (
        main(
            [
                "score",
                str(run_dir),
                "--input",
                str(tmp_path / "b.npy"),
                "--iw-samples",
                "5",
                "--out",
                str(tmp_path / "b.csv"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert len(scores(tmp_path / "b.csv")) == 6


def test_out_of_memory_retries_with_smaller_chunks(capsys):
    calls = []

    def run(divisor):
        calls.append(divisor)
        if divisor < 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return divisor

    assert retry_on_out_of_memory(run, "evaluation") == 4 and calls == [1, 2, 4]
    assert "retrying" in capsys.readouterr().err
    with pytest.raises(ValueError):  # other errors are not retried
        retry_on_out_of_memory(lambda d: (_ for _ in ()).throw(ValueError("bug")), "evaluation")

    def never_fits(divisor):
        raise MemoryError

    with pytest.raises(ElboxError, match="out of memory even with the smallest chunks"):
        retry_on_out_of_memory(never_fits, "scoring")


# ----------------------------------------------------------------------------------------------
# Property-based: random and corrupted bytes into every reader

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _mutations():
    """Valid files of every kind, then cut, flipped or random: what a broken download or disk gives."""
    valid_npy = _npy_bytes(images(2))
    buffer = io.BytesIO()
    np.savez(buffer, x=images(2))
    valid_npz = buffer.getvalue()
    buffer = io.BytesIO()
    Image.fromarray(images(1)[0]).save(buffer, format="PNG")
    valid_png = buffer.getvalue()
    base = st.sampled_from([valid_npy, valid_npz, valid_png])
    truncated = st.tuples(base, st.integers(0, 2000)).map(lambda t: t[0][: t[1]])
    flipped = st.tuples(base, st.integers(0, 10**6), st.integers(1, 255)).map(
        lambda t: t[0][: t[1] % len(t[0])] + bytes([t[0][t[1] % len(t[0])] ^ t[2]]) + t[0][t[1] % len(t[0]) + 1 :]
    )
    return st.one_of(st.binary(max_size=3000), truncated, flipped)


@FUZZ
@given(data=_mutations(), suffix=st.sampled_from([".npy", ".npz", ".png"]))
def test_score_inputs_never_crash_on_corrupted_bytes(tmp_path, data, suffix):
    if suffix == ".png":
        folder = tmp_path / "pngs"
        folder.mkdir(exist_ok=True)
        (folder / "a.png").write_bytes(data)
        path = folder
    else:
        path = tmp_path / f"input{suffix}"
        path.write_bytes(data)
    try:
        array, _ = read_images(path)
        to_8bit_tensor(array, SHAPE, "input")
    except ElboxError:
        pass


@FUZZ
@given(
    array=arrays(
        dtype=st.sampled_from([np.uint8, np.int16, np.int64, np.float32, np.float64, np.bool_]),
        shape=st.sampled_from(
            [(0, 28, 28), (2, 28, 28), (2, 1, 28, 28), (2, 28, 28, 1), (2, 27, 28), (5,), (2, 3, 28, 28)]
        ),
    )
)
def test_score_validation_never_crashes_on_random_arrays(array):
    try:
        x = to_8bit_tensor(array, SHAPE, "input")
    except ElboxError:
        return
    assert x.dtype == torch.uint8 and x.shape[1:] == SHAPE


@FUZZ
@given(data=st.one_of(st.binary(max_size=2000), st.binary(max_size=64).map(lambda b: b"\x00\x00\x08\x03" + b)))
def test_idx_and_cifar_parsers_never_crash(data):
    for parse in (
        lambda: parse_idx(data, Path("x.idx")),
        lambda: parse_cifar_batch(data, Path("data_batch_1.bin"), (3, 32, 32), 1),
    ):
        try:
            parse()
        except ElboxError:
            pass


@FUZZ
@given(data=_mutations())
def test_checkpoint_and_config_readers_never_crash(tmp_path, data):
    path = tmp_path / "file"
    path.write_bytes(data)
    model = build_model("vae", {"latent_dim": 2, "hidden_dims": [4]})
    for read in (
        lambda: load_training_state(path),
        lambda: load_weights(path, model),
        lambda: read_json(path, "config"),
    ):
        try:
            read()
        except ElboxError:
            pass


@FUZZ
@given(cut=st.integers(0, 10**6), flip=st.integers(1, 255))
def test_corrupted_safetensors_files_never_crash(tmp_path, cut, flip):
    model = build_model("vae", {"latent_dim": 2, "hidden_dims": [4]})
    from elbox.io.checkpoint import save_weights

    path = tmp_path / "w.safetensors"
    save_weights(path, model)
    raw = bytearray(path.read_bytes())
    raw[cut % len(raw)] ^= flip
    path.write_bytes(bytes(raw))
    try:
        load_weights(path, model)
        load_training_state(path)
    except ElboxError:
        pass


@pytest.mark.parametrize(
    "model",
    [
        [],
        ["--model", "hvae", "--hvae-type", "markov", "--levels", "2", "--latent-dims", "3", "2", "--hidden-dims", "16"],
    ],
)
def test_encode_writes_posterior_means_and_variances(tmp_path, model):
    run = tmp_path / "run"
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
                "--batch-size",
                "50",
                "--latent-dim",
                "2",
                "--hidden-dims",
                "16",
                *model,
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    np.save(tmp_path / "x.npy", images())
    assert main(["encode", str(run), "--input", str(tmp_path / "x.npy"), "--out", str(tmp_path / "f.npz")]) == 0
    with np.load(tmp_path / "f.npz", allow_pickle=False) as npz:
        f = dict(npz)
    d = 2 if not model else 5
    assert f["mean"].shape == (6, d) and f["variance"].shape == (6, d) and (f["variance"] > 0).all()
    assert list(f["names"]) == [str(i) for i in range(6)]
    # what encode saw: 16 binarizations of each grey image, seeded from its pixels; the features are their mean
    x, counts, _ = model_inputs(torch.from_numpy(images())[:, None], get_data_space("binary"), 0, BINARIZATIONS)
    assert counts == [BINARIZATIONS] * 6
    means = elbox.load(run).encode(x).detach().reshape(6, BINARIZATIONS, d)
    torch.testing.assert_close(torch.from_numpy(f["mean"]), means.mean(1), rtol=1e-5, atol=1e-6)

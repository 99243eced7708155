"""Hostile inputs, second round: each case a user found. Bad input gets one ElboxError naming the input and the
problem, and good input is not silently changed: a .npz bomb under an address-space limit, validation data of
another shape, a diverging diffusion run, a damaged optimizer state, lying or mixed Datasets and meta tensors,
float64 vectors kept until they are standardized, the memory of training on an array in memory, a folder mixing
grey and colour images, validation fraction 0, and file names that are not UTF-8."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_trainer
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

import elbox
from elbox.core import system
from elbox.core.errors import ElboxError
from elbox.data import fit_real_space
from elbox.data.formats import open_array
from elbox.data.inputs import as_examples, held_out, run_data, training_data
from elbox.data.user import read_images
from elbox.data.user_arrays import VectorArray
from elbox.data.user_images import ImageFolder
from elbox.io.run_config import DataConfig
from elbox.models.diffusion_parts import FULL_WINDOW, window_half_width
from elbox.training.state import pack_training_state

RNG = np.random.default_rng(0)


def refused(call, *fragments: str) -> str:
    with pytest.raises(ElboxError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    return message


def zeros_npz(path: Path, shape: tuple[int, ...]) -> Path:
    """A compressed .npz whose one array "x" is uint8 zeros of `shape`: about 1 KB a MB on disk, written in pieces."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("x.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        left = math.prod(shape)
        while left:
            f.write(bytes(min(left, 1 << 20)))
            left -= min(left, 1 << 20)
    return path


# -- 1. .npz bombs ------------------------------------------------------------------------------------------------


def test_a_compressed_npz_is_checked_against_the_address_space_limit(tmp_path, monkeypatch):
    bomb = zeros_npz(tmp_path / "bomb.npz", (20, 1000, 1000))  # 20 MB inside, 20 KB on disk
    assert bomb.stat().st_size < 1 << 20
    monkeypatch.setattr(system, "address_space_limit", lambda: system.address_space_used() + (50 << 20))
    refused(lambda: open_array(bomb), "bomb.npz", "compressed", "address space", "float32", "store it uncompressed")


def test_a_compressed_npz_counts_its_float32_copy(tmp_path, monkeypatch):
    """20 MB of uint8 fit in 30 MB of free memory, but not with the 80 MB float32 copy the data space makes."""
    bomb = zeros_npz(tmp_path / "bomb.npz", (20, 1000, 1000))
    monkeypatch.setattr(system, "available_memory_bytes", lambda device: 30_000_000)
    refused(
        lambda: open_array(bomb),
        "bomb.npz",
        "100 MB in memory",
        "20 MB decompressed",
        "80 MB as float32",
        "30 MB of free memory",
    )
    monkeypatch.setattr(system, "available_memory_bytes", lambda device: 200_000_000)
    assert open_array(bomb).shape == (20, 1000, 1000)


def test_elbox_train_refuses_an_npz_bomb_under_ulimit_v(tmp_path):
    """A real address-space limit (ulimit -v) in a child process: one error line, not a MemoryError traceback."""
    bomb = zeros_npz(tmp_path / "bomb.npz", (150, 1000, 1000))  # 150 MB inside
    script = textwrap.dedent(f"""
        import resource, sys
        from elbox.cli.main import main
        from elbox.core.system import address_space_used
        resource.setrlimit(resource.RLIMIT_AS, (address_space_used() + (100 << 20), resource.RLIM_INFINITY))
        sys.exit(main(["train", "vae", "--data", {str(bomb)!r}, "--out", {str(tmp_path / "run")!r}, "--no-progress"]))
    """)
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("elbox: error: ") and "bomb.npz" in lines[0] and "address space" in lines[0], lines[0]


# -- 2. validation data of another shape -------------------------------------------------------------------------


def test_validation_data_of_another_shape_are_refused_up_front(tmp_path):
    train, val = RNG.integers(0, 256, (20, 8, 8), dtype=np.uint8), RNG.integers(0, 256, (5, 6, 6), dtype=np.uint8)
    refused(lambda: training_data(train, val), "validation data (given in memory)", "(1, 6, 6)", "(1, 8, 8)")
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "val.npy", val)
    refused(
        lambda: training_data(str(tmp_path / "train.npy"), str(tmp_path / "val.npy")),
        "val.npy",
        "train.npy",
        "(1, 6, 6)",
        "(1, 8, 8)",
    )
    np.save(tmp_path / "vectors.npy", RNG.normal(size=(5, 3)))
    refused(lambda: training_data(str(tmp_path / "train.npy"), str(tmp_path / "vectors.npy")), "(3,)", "(1, 8, 8)")
    _, given, _ = training_data(train, train[:4])  # the same shape passes
    assert len(given) == 4


# -- 3. a diverging diffusion run -------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [math.nan, math.inf, -math.inf, 1e30, -1e30, 1e3, -1e3, 40.0, -60.0])
def test_window_half_width_takes_any_gamma(gamma):
    half = window_half_width(torch.tensor(gamma))
    assert isinstance(half, int) and 1 <= half <= FULL_WINDOW
    if math.isnan(gamma) or gamma > 0:
        assert half == FULL_WINDOW  # the full softmax


def test_diffusion_with_a_huge_learning_rate_stops_with_the_divergence_message():
    with pytest.raises(ElboxError, match="diverged"):
        elbox.fit(
            "diffusion",
            "synthetic",
            lr=1e30,
            limit_train=64,
            batch_size=32,
            epochs=2,
            channels=[4],
            val_limit=32,
            samples=False,
            progress=False,
            verbose=False,
        )


# -- 4. a damaged optimizer state ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """The tensors and JSON state of a tiny VAE trained one epoch."""
    trainer = make_trainer(
        None,
        model_config={"latent_dim": 2, "hidden_dims": [8]},
        n_train=64,
        n_val=32,
        epochs=1,
        batch_size=32,
        logger="none",
    )
    trainer.fit()
    return pack_training_state(trainer, 1)


@pytest.mark.parametrize(
    "name, value, says",
    [
        ("optimizer.0.step", torch.zeros(7, 7), "'0.step' has shape (7, 7)"),
        ("optimizer.0.step", torch.tensor(3), "'0.step' has shape () torch.int64"),
        ("optimizer.0.step", torch.tensor(-2.0), "'0.step' is -2.0"),
        ("optimizer.0.exp_avg", None, "Adam keeps ['exp_avg', 'exp_avg_sq', 'step']"),
        ("optimizer.0.exp_avg_sq", torch.zeros(3), "'0.exp_avg_sq' has shape (3,)"),
        ("optimizer.1.exp_avg", "float64", "'1.exp_avg' has shape (8,) torch.float64"),
        ("optimizer.1.evil", torch.zeros(8), "'evil'"),
    ],
)
def test_a_damaged_optimizer_state_is_refused(packed, name, value, says):
    tensors, state = dict(packed[0]), json.loads(json.dumps(packed[1]))
    if value is None:
        del tensors[name]
    else:
        tensors[name] = tensors[name].double() if value == "float64" else value
    fresh = make_trainer(
        None,
        model_config={"latent_dim": 2, "hidden_dims": [8]},
        n_train=64,
        n_val=32,
        epochs=1,
        batch_size=32,
        logger="none",
    )
    refused(lambda: fresh.restore(tensors, state), "training state", says)


# -- 5. Datasets and tensors that are not what they seem ---------------------------------------------------------


class Items(Dataset):
    def __init__(self, items: list, length: int | None = None):
        self.items, self.length = items, len(items) if length is None else length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.items[i]


def test_datasets_of_mixed_shapes_or_lying_lengths_and_meta_tensors_are_refused():
    images = [torch.zeros(1, 8, 8, dtype=torch.uint8)] * 3
    refused(
        lambda: as_examples(Items([*images, torch.zeros(1, 6, 6, dtype=torch.uint8)]), "data"),
        "data",
        "item 3 has shape (1, 6, 6)",
        "item 0 (1, 8, 8)",
    )
    refused(lambda: as_examples(Items([*images, torch.zeros(1, 8, 8)]), "data"), "item 3", "float32", "uint8")
    refused(lambda: as_examples(Items(images, length=5), "data"), "says it has 5 items", "item 3 raised IndexError")
    refused(lambda: as_examples(Items(images * 2, length=4), "data"), "says it has 4 items", "item 4 exists too")
    refused(lambda: as_examples(torch.empty(4, 1, 8, 8, device="meta"), "data"), "data", "meta device", "(4, 1, 8, 8)")
    refused(lambda: as_examples(Items([torch.empty(1, 8, 8, device="meta")]), "data"), "item 0", "meta device")

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(images)

    refused(lambda: as_examples(Stream(), "data"), "map-style Dataset")
    pairs = as_examples(Items([(image + i, i) for i, image in enumerate(images)]), "data")  # (example, label) items
    assert pairs.shape == (3, 1, 8, 8) and pairs[:, 0, 0, 0].tolist() == [0, 1, 2]


# -- 6. float64 vectors ------------------------------------------------------------------------------------------


def timestamps(n: int = 400) -> np.ndarray:
    """Times near 1.7e9 s spanning an hour (float32's spacing there is 128 s) and a second, ordinary column."""
    return np.stack([1.7e9 + RNG.uniform(0, 3600, n), RNG.normal(size=n)], axis=1)


def test_vectors_stay_float64_until_standardized(tmp_path):
    x = timestamps()
    exact = (x - x.mean(0)) / x.std(0)
    np.save(tmp_path / "t.npy", x)
    rows = VectorArray(tmp_path / "t.npy")
    items = torch.stack(rows.__getitems__(list(range(len(x)))))
    in_memory = as_examples(x, "data")
    for vectors in (items, in_memory, torch.stack([rows[i] for i in range(len(x))])):
        assert vectors.dtype == torch.float64 and torch.equal(vectors, torch.from_numpy(x))
        space = fit_real_space(vectors.split(64))
        assert np.abs(space.eval_data(vectors).double().numpy() - exact).max() < 1e-5
    assert np.shares_memory(in_memory.numpy(), x)  # and not copied
    assert as_examples(x.astype(np.float32), "data").dtype == torch.float32  # float32 as it is
    assert as_examples(np.arange(6).reshape(3, 2), "data").dtype == torch.float64


# -- 7. memory of training on an array in memory ----------------------------------------------------------------

PEAK = """
import resource
import numpy as np
import elbox
def fit(images):
    elbox.fit("vae", images, latent_dim=2, hidden_dims=[16], max_steps=2, val_limit=200, samples=False, progress=False,
              verbose=False)
fit(np.zeros((1000, 28, 28), np.uint8))  # torch's libraries and lazy set-up: before the baseline
images = np.random.default_rng(0).integers(0, 256, (130_000, 28, 28), dtype=np.uint8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fit(images)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / images.nbytes)
"""


def test_training_on_an_array_in_memory_does_not_copy_it():
    """Peak RSS growth of elbox.fit on a 100 MB uint8 array, in a child process, after a warm-up fit: it was 2.0x the
    array (a uint8 copy, then copies of the training and the held-out part); index views of the array make it 0.05x."""
    done = subprocess.run([sys.executable, "-c", PEAK], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    growth = float(done.stdout.split()[-1])
    assert growth < 0.5, f"peak RSS grew by {growth:.2f}x the array"


def test_the_held_out_split_copies_no_examples():
    images = torch.from_numpy(RNG.integers(0, 256, (50, 1, 4, 4), dtype=np.uint8))
    train, val, n_val = held_out(as_examples(images.numpy(), "data"), 0.1, seed=3)
    assert n_val == 5 and len(train) == 45 and len(val) == 5
    assert train.examples.data_ptr() == val.examples.data_ptr() == images.data_ptr()
    order = torch.randperm(50, generator=torch.Generator().manual_seed(3))  # the seeded split as before
    assert torch.equal(as_examples(val, "v"), images[order[:5]])
    assert torch.equal(as_examples(train, "t"), images[order[5:]])
    assert torch.equal(torch.stack(train.__getitems__([0, 44])), images[order[[5, 49]]])
    assert torch.equal(train[-1], images[order[49]])


# -- 8. one colour image among grey ones --------------------------------------------------------------------------


def test_a_colour_image_among_grey_ones_is_warned_about(tmp_path):
    grey = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
    for name in ("a.png", "b.png", "d.png"):
        Image.fromarray(grey).save(tmp_path / name)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "c.png")
    with pytest.warns(UserWarning, match=r"1 of the 4 images .* in color \(the first: .*c\.png\).* 3 channels"):
        folder = ImageFolder(tmp_path)
    assert folder.shape == (3, 8, 8)
    (tmp_path / "c.png").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ImageFolder(tmp_path).shape == (1, 8, 8)  # all grey: nothing to say


# -- 9. validation fraction 0 -------------------------------------------------------------------------------------


def test_validation_fraction_zero_validates_on_the_training_data(tmp_path):
    assert DataConfig(validation_fraction=0).validation_fraction == 0
    refused(lambda: DataConfig(validation_fraction=1), "validation_fraction")
    refused(lambda: DataConfig(validation_fraction=-0.1), "validation_fraction")
    images = RNG.integers(0, 256, (10, 1, 4, 4), dtype=np.uint8)
    train, val, record = training_data(images, validation_fraction=0)
    assert len(train) == len(val) == 10 and torch.equal(as_examples(val, "v"), torch.from_numpy(images))
    assert record["validation"] == "none (fraction 0): the training data" and record["validation_fraction"] == 0
    np.save(tmp_path / "x.npy", images)
    train, val, record = training_data(str(tmp_path / "x.npy"), validation_fraction=0, limit_train=6)
    assert len(train) == len(val) == 6
    again_train, again_val, _ = run_data(record, seed=0)
    assert len(again_train) == len(again_val) == 6
    run = elbox.fit(
        "vae",
        str(tmp_path / "x.npy"),
        out=tmp_path / "run",
        validation_fraction=0,
        batch_size=5,
        latent_dim=2,
        hidden_dims=[8],
        max_steps=1,
        samples=False,
        progress=False,
        verbose=False,
    )
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert saved["validation"] == "none (fraction 0): the training data" and run.history[-1]["kind"] == "epoch"


# -- 10. file names that are not UTF-8 -------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="a file name of any bytes: Linux file systems take them")
def test_file_names_that_are_not_utf8_come_out_printable(tmp_path):
    grey = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "good.png")
    Image.fromarray(grey).save(os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9.png"))  # Latin-1, not UTF-8
    folder = ImageFolder(tmp_path)
    assert folder.names == ["caf\\xe9.png", "good.png"] and torch.equal(folder[0], folder[1])
    _, names = read_images(tmp_path)
    with open(tmp_path / "names.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([[name] for name in names])  # raised UnicodeEncodeError on a lone surrogate
    assert (tmp_path / "names.csv").read_text(encoding="utf-8").splitlines() == ["caf\\xe9.png", "good.png"]

"""Hostile files: every command that reads data fails with one `elbox: error:` line naming the file, in bounded time,
without a big allocation and without touching the input; `elbox report` skips damaged run files with a warning.

Each test writes its own tiny files: broken images, decompression and header bombs (IDX, .npy, .npz, PNG), broken
tables, symlink loops and FIFOs.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import struct
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli_expecting_error, snapshot
from PIL import Image

from elbox import data
from elbox.cli.main import main
from elbox.core.errors import ElboxError
from elbox.data import IDX_FILES, load_split
from elbox.present import run_files

TINY_TRAIN = [
    "--epochs",
    "1",
    "--limit-train",
    "64",
    "--batch-size",
    "32",
    "--hidden-dims",
    "8",
    "--latent-dim",
    "2",
    "--log-every",
    "1",
    "--device",
    "cpu",
    "--no-progress",
]


# ---------------------------------------------------------------------------
# Writing hostile files


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header (IHDR) declaring width x height grayscale pixels, followed by almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b"")


def gzip_bomb(prefix: bytes, zero_mb: int) -> bytes:
    """A gzip stream of `prefix` and then zero_mb MB of zeros, about 1 KB a MB: one compressed MB, repeated (a full
    flush makes each piece stand alone). Its CRC is wrong, which a reader that stops early never sees."""

    def deflate(payload: bytes) -> bytes:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        return compressor.compress(payload) + compressor.flush(zlib.Z_FULL_FLUSH)

    end = zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # the final, empty block
    return b"\x1f\x8b\x08\x00\0\0\0\0\x00\xff" + deflate(prefix) + deflate(bytes(1 << 20)) * zero_mb + end + bytes(8)


def npy_header(shape: tuple[int, ...]) -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return header.getvalue()


def folder(root: Path, name: str, files: dict[str, bytes]) -> Path:
    path = root / name
    path.mkdir()
    for file_name, content in files.items():
        (path / file_name).write_bytes(content)
    return path


def image_folders(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a folder of images, what the error must say)."""
    good = png_bytes(np.zeros((8, 8), np.uint8))
    jpeg = png_bytes(np.full((8, 8), 90, np.uint8), "JPEG")
    cases = {
        "empty file": (folder(root, "zero", {"a.png": b""}), "a.png is empty"),
        "cut PNG": (folder(root, "cut_png", {"a.png": good[:40]}), "a.png is not a readable PNG"),
        "cut JPEG": (folder(root, "cut_jpeg", {"a.jpg": jpeg[: len(jpeg) // 2]}), "a.jpg is not a readable JPEG"),
        "PNG bomb": (folder(root, "bomb", {"a.png": png_declaring(100_000, 100_000)}), "too large to decode"),
        "PNG over the warning limit": (folder(root, "big", {"a.png": png_declaring(12_000, 12_000)}), "too large"),
        "text named .png": (folder(root, "text", {"a.png": b"hello, world\n"}), "a.png is not a readable PNG"),
        "all unreadable": (folder(root, "all_bad", {"a.png": b"x", "b.png": b"y", "c.jpg": b"z"}), "a.png"),
    }
    loop = folder(root, "file_loop", {"a.png": good})
    os.symlink("x.png", loop / "x.png")  # a link to itself
    cases["a link to itself"] = (loop, "x.png")
    dir_loop = folder(root, "dir_loop", {"a.png": b"not an image"})
    os.symlink(".", dir_loop / "again")  # a folder that contains itself: never walked into
    os.symlink("../dir_loop", dir_loop / "up")
    cases["a folder linking to itself"] = (dir_loop, "a.png is not a readable PNG")
    fifo = folder(root, "fifo", {"a.png": good})
    os.mkfifo(fifo / "b.png")  # opening it would wait for a writer forever
    cases["a FIFO"] = (fifo, "b.png is not a regular file")
    return cases


def array_files(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (an .npy or .npz file, what the error must say)."""
    tera = npy_header((10**6, 1000, 1000))
    (root / "tera.npy").write_bytes(tera + bytes(64))
    with zipfile.ZipFile(root / "tera.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", tera + bytes(64))
    with zipfile.ZipFile(root / "expands.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", npy_header((4, 8, 8)) + bytes(8 << 20))  # 256 bytes declared, 8 MB inside
    (root / "empty.npy").write_bytes(b"")
    (root / "text.npy").write_text("1, 2, 3\n")
    return {
        "npy declaring 1 TB": (root / "tera.npy", "1 TB"),
        "npz declaring 1 TB": (root / "tera.npz", "1 TB"),
        "npz member expanding beyond its shape": (root / "expands.npz", "more bytes than its header's shape"),
        "empty npy": (root / "empty.npy", "empty.npy"),
        "text named .npy": (root / "text.npy", "text.npy"),
    }


def table_files(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a CSV or Parquet file, what the error must say)."""
    (root / "header.csv").write_text("a,b\n")
    (root / "ragged.csv").write_text("a,b\n1,2\n3,4,5\n")
    (root / "latin1.csv").write_bytes(b"caf\xe9,b\n1,2\n")
    (root / "long.csv").write_bytes(b"1" * (10 << 20))
    (root / "corrupt.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 4 + b"PAR1")
    return {
        "header only": (root / "header.csv", "no rows"),
        "ragged rows": (root / "ragged.csv", "ragged.csv is not a readable CSV"),
        "not UTF-8": (root / "latin1.csv", "latin1.csv"),
        "a 10 MB line": (root / "long.csv", "longer than 1 MB"),
        "corrupt Parquet": (root / "corrupt.parquet", "corrupt.parquet is not a readable Parquet"),
    }


# ---------------------------------------------------------------------------
# Commands that read data


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny trained vae run (synthetic data)."""
    run_dir = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "vae", "--data", "synthetic", "--out", str(run_dir), *TINY_TRAIN]) == 0
    return run_dir


def test_hostile_data_gives_one_line_for_every_command(run, tmp_path):
    images, arrays, tables = image_folders(tmp_path), array_files(tmp_path), table_files(tmp_path)
    for i, (name, (path, says)) in enumerate({**images, **arrays, **tables}.items()):
        out = tmp_path / f"run{i}"
        message = run_cli_expecting_error(
            ["train", "vae", "--data", path, "--out", out, *TINY_TRAIN], untouched=[path], seconds=30, match=says
        )
        assert str(path) in message, (name, message)
        assert not out.exists(), f"{name}: train left {sorted(p.name for p in out.iterdir())} in its run directory"
        run_cli_expecting_error(
            ["evaluate", run, "--data", path, "--iw-samples", "1", "--no-progress"],
            untouched=[path, run],
            seconds=30,
            match=says,
        )
        if path in [p for p, _ in tables.values()]:
            says = "is a table; the vae model takes 8-bit images"  # a model of images scores and encodes images only
        run_cli_expecting_error(
            ["score", run, "--input", path, "--iw-samples", "1", "--no-progress"],
            untouched=[path, run],
            seconds=30,
            match=says,
        )
        encoded = tmp_path / "encoded.npz"
        run_cli_expecting_error(
            ["encode", run, "--input", path, "--out", encoded, "--no-progress"],
            untouched=[path, run],
            seconds=30,
            match=says,
        )
        assert not encoded.exists()


def test_an_image_that_breaks_during_training_leaves_no_run_directory(tmp_path):
    rng = np.random.default_rng(0)
    images = folder(
        tmp_path, "images", {f"{i:02}.png": png_bytes(rng.integers(0, 256, (8, 8), np.uint8)) for i in range(12)}
    )
    whole = (images / "05.png").read_bytes()
    (images / "05.png").write_bytes(whole[: len(whole) * 2 // 3])  # the header reads, the pixels do not
    out = tmp_path / "run"
    run_cli_expecting_error(
        ["train", "vae", "--data", images, "--out", out, *TINY_TRAIN, "--batch-size", "4"],
        untouched=[images],
        seconds=60,
        match="05.png",
    )
    assert not out.exists()


# ---------------------------------------------------------------------------
# IDX decompression and header bombs, through the built-in dataset loader


def idx_header(*dims: int) -> bytes:
    return bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def write_mnist(directory: Path, train_images: bytes) -> Path:
    """MNIST's four files in `directory`, the training images being `train_images` (already gzipped)."""
    directory.mkdir(parents=True)
    for role, file_name in IDX_FILES.items():
        payload = idx_header(3) + bytes(3) if role.endswith("labels") else idx_header(3, 28, 28) + bytes(3 * 784)
        (directory / file_name).write_bytes(gzip.compress(payload))
    (directory / IDX_FILES["train-images"]).write_bytes(train_images)
    return directory / IDX_FILES["train-images"]


@pytest.mark.usefixtures("isolated_data")
def test_an_idx_gzip_bomb_is_refused_without_being_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("ELBOX_DATA", str(tmp_path / "datasets"))
    bomb = write_mnist(tmp_path / "datasets" / "mnist", gzip_bomb(idx_header(100, 28, 28), 256))  # 256 KB -> 256 MB
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ElboxError, match="decompression bomb") as info:
            load_split("mnist", "train")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(bomb) in str(info.value)
    assert peak < 16 << 20, f"reading the bomb took {peak >> 20} MB"  # the 78 KB it declares, not 256 MB
    data.clear_cache()
    out = tmp_path / "run"
    run_cli_expecting_error(
        ["train", "vae", "--data", "mnist", "--out", out, *TINY_TRAIN],
        untouched=[tmp_path / "datasets"],
        seconds=30,
        match=str(bomb),
    )
    assert not out.exists()


@pytest.mark.usefixtures("isolated_data")
def test_idx_headers_declaring_huge_dims_are_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setenv("ELBOX_DATA", str(tmp_path / "datasets"))
    huge = idx_header(2**32 - 1, 2**32 - 1, 2**32 - 1)
    bomb = write_mnist(tmp_path / "datasets" / "mnist", gzip.compress(huge + bytes(1000)))
    with pytest.raises(ElboxError, match="free memory") as info:
        load_split("mnist", "train")
    assert str(bomb) in str(info.value) and len(str(info.value)) < 300
    plain = bomb.with_name(bomb.name.removesuffix(".gz"))
    bomb.unlink()
    plain.write_bytes(huge + bytes(1000))  # uncompressed: its size is known before reading
    with pytest.raises(ElboxError, match="truncated"):
        data.dataset_files.read_idx(plain)
    shorter = idx_header(10, 28, 28) + bytes(10 * 784)
    bomb.write_bytes(gzip.compress(shorter[:-1]))
    with pytest.raises(ElboxError, match="truncated"):
        data.dataset_files.read_idx(bomb)
    bomb.write_bytes(gzip.compress(shorter + b"\0"))
    with pytest.raises(ElboxError, match="more than the 7840 bytes"):
        data.dataset_files.read_idx(bomb)
    bomb.write_bytes(gzip.compress(shorter))
    assert data.dataset_files.read_idx(bomb).shape == (10, 28, 28)


# ---------------------------------------------------------------------------
# elbox report on damaged run files


def damaged_copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def report(run_dir: Path, capsys) -> list[str]:
    """Run `elbox report RUN_DIR`; assert it succeeds and writes the report; return its stderr lines."""
    capsys.readouterr()
    assert main(["report", str(run_dir), "--device", "cpu"]) == 0
    assert (run_dir / "report.html").stat().st_size > 1000 and (run_dir / "report.md").is_file()
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_report_skips_damaged_metrics_eval_and_samples(run, tmp_path, capsys):
    run_dir = damaged_copy(run, tmp_path)
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines()
    assert any(json.loads(line)["kind"] == "train" for line in lines)
    damaged = [
        b'{"kind": "train", "step": 1, "elbo": NaN, "reconstruction": -5}',  # NaN
        b'{"kind": "epoch", "step": "2", "val_elbo": -5}',  # a wrong type
        b'{"kind": "epoch", "step": 2}',
        b"[1, 2]",
        b'"text"',
        b"\xff\xfe\x00 not UTF-8",
        b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than the parser's recursion
        b'{"kind": "train", "step": 1e999, "elbo": 1, "reconstruction": 1}',
    ]
    harmless = b'{"kind": ["odd"], "step": 1}'  # valid, and not plotted
    metrics.write_bytes(
        b"\n".join([lines[0], *damaged, harmless, *lines[1:]]) + b'\n{"kind": "epoch", "step": 3, "val_el'
    )
    (run_dir / "eval-test.json").write_text('{"n_examples": 5, "elbo": "abc", "elbo_stderr": 1}')
    (run_dir / "samples.png").write_text("not a picture")
    before = snapshot(metrics, run_dir / "eval-test.json")
    warnings = report(run_dir, capsys)
    assert len(warnings) == 3 and all(w.startswith("elbox: warning: ") for w in warnings), warnings
    assert f"elbox: warning: {metrics} line 2 has a bad elbo (nan) (and {len(damaged)} more lines); skipped" in warnings
    assert any("eval-test.json is damaged" in w and "quick evaluation" in w for w in warnings), warnings
    assert any("samples.png is not a PNG image" in w for w in warnings), warnings
    markdown = (run_dir / "report.md").read_text()
    assert "## Training curves" in markdown and "quick evaluation" in markdown and "## Samples" in markdown
    assert snapshot(metrics, run_dir / "eval-test.json") == before  # the report only reads them


def test_report_survives_unreadable_metrics(run, tmp_path, capsys):
    run_dir = damaged_copy(run, tmp_path)
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "metrics.jsonl").mkdir()  # not a file: unreadable
    (run_dir / "eval-test.json").write_text("[" * 100_000)
    warnings = report(run_dir, capsys)
    assert len(warnings) == 2 and all(w.startswith("elbox: warning: ") for w in warnings), warnings
    assert "eval-test.json is damaged" in warnings[0]
    assert f"cannot read {run_dir / 'metrics.jsonl'}" in warnings[1] and "no training curves" in warnings[1]
    assert "## Training curves" not in (run_dir / "report.md").read_text()


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2]",
        '{"n_examples": 5',
        "\udcff",
        "[" * 100_000,
        ('{"n_examples": 3, "elbo": 1, "elbo_stderr": 0, "reconstruction": 1, "kl": 0, "kl_by_group": 7}'),
        '{"n_examples": 3, "nll_iw_by_k": {"10": 1}}',
    ],
)
def test_a_damaged_evaluation_file_is_skipped_with_a_warning(tmp_path, capsys, text):
    path = tmp_path / "eval-test.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    assert run_files.saved_evaluation(path) is None
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith(f"elbox: warning: {path} is damaged"), warnings
    assert len(warnings[0]) < 300
    path.write_text('{"n_examples": 3, "bpd": 1.5, "bpd_stderr": 0.1, "bpd_source": "exact"}')
    assert run_files.saved_evaluation(path)["bpd"] == 1.5 and not capsys.readouterr().err

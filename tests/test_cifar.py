"""Tests for CIFAR-10 in elbox.data: the binary batch format, lookup, download and extraction, splits.

The files are tiny CIFAR-like batches written by the tests, under a test-only spec with small sizes.
"""

import dataclasses
import gzip
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from elbox import data
from elbox.core.errors import ElboxError
from elbox.data import (
    DATASETS,
    dataset_files,
    dataset_names,
    find_dataset_dir,
    load_split,
    sources,
)

RECORD = 1 + 3 * 32 * 32  # label byte + 1024 red + 1024 green + 1024 blue
TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
ALL_FILES = [*TRAIN_FILES, "test_batch.bin"]
TINY = dict(train_size=50, validation_size=10, test_size=20)  # 5 train batches of 10, a test batch of 20
BATCH_DIR = "cifar-10-batches-bin"


pytestmark = pytest.mark.usefixtures("isolated_data")


def tiny_cache(tmp_path) -> Path:
    return tmp_path / "cache" / "elbox" / "tiny-cifar"


# ---------------------------------------------------------------------------
# Helpers: tiny batch files and archives


def image(i: int) -> np.ndarray:
    """Image [3, 32, 32] for example i: red = i, green = pixel index mod 256, blue = 255 - i."""
    red = np.full(1024, i % 256)
    green = np.arange(1024) % 256
    blue = np.full(1024, 255 - i % 256)
    return np.stack([red, green, blue]).astype(np.uint8).reshape(3, 32, 32)


def batch_bytes(first: int, n: int) -> bytes:
    """n records for examples first..first+n-1, label = example % 10."""
    return b"".join(bytes([i % 10]) + image(i).tobytes() for i in range(first, first + n))


def tiny_batches() -> dict[str, bytes]:
    """Train examples 0..49 in five batches of 10; test examples 100..119."""
    files = {name: batch_bytes(10 * k, 10) for k, name in enumerate(TRAIN_FILES)}
    files["test_batch.bin"] = batch_bytes(100, 20)
    return files


def write_batches(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in tiny_batches().items():
        (directory / name).write_bytes(content)
    return directory


def add_member(tar: tarfile.TarFile, name: str, content: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(content) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(content) if kind == tarfile.REGTYPE else None)


def tiny_archive(members: dict[str, bytes] | None = None, extra=()) -> bytes:
    """A tar.gz laid out like cifar-10-binary.tar.gz: the batches plus the other official files."""
    buffer = io.BytesIO()
    members = {f"{BATCH_DIR}/{k}": v for k, v in tiny_batches().items()} if members is None else members
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in members.items():
            add_member(tar, name, content)
        add_member(tar, f"{BATCH_DIR}/batches.meta.txt", b"airplane\nautomobile\n")
        add_member(tar, f"{BATCH_DIR}/readme.html", b"<html></html>")
        for args in extra:
            add_member(tar, *args)
    return buffer.getvalue()


def register(monkeypatch, archive: bytes = b"", **changes) -> data.DatasetSpec:
    """A test-only copy of the cifar-10 spec with tiny sizes and the MD5 of `archive`."""
    spec = dataclasses.replace(
        DATASETS["cifar-10"],
        name="tiny-cifar",
        mirrors=("https://mirror.invalid/kriz/",),
        archive_md5={"cifar-10-binary.tar.gz": hashlib.md5(archive).hexdigest()},
        **TINY,
    )
    spec = dataclasses.replace(spec, **changes)
    monkeypatch.setitem(DATASETS, spec.name, spec)
    return spec


def serving(archive: bytes, opened: list):
    """A fake opener: serves `archive` for any URL, recording the URLs."""

    def opener(url):
        opened.append(url)
        return io.BytesIO(archive)

    return opener


# ---------------------------------------------------------------------------
# The spec


def test_cifar10_spec():
    spec = DATASETS["cifar-10"]
    assert "cifar-10" in dataset_names()
    assert spec.mirrors[0] + spec.archive == "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    assert spec.archive_md5 == {"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"}
    assert spec.archive_dir == BATCH_DIR and list(spec.files.values()) == ALL_FILES
    assert spec.image_shape == (3, 32, 32)
    sizes = (spec.train_size - spec.validation_size, spec.validation_size, spec.train_size, spec.test_size)
    assert sizes == (45000, 5000, 50000, 10000)
    # each official batch file holds 10000 records: 30,730,000 bytes
    for part in ("train", "test"):
        per_file = sources._part_size(spec, part) // len(sources._part_files(spec, part))
        assert per_file * RECORD == 30_730_000


# ---------------------------------------------------------------------------
# Reading a directory


@pytest.mark.parametrize("layout", ["direct", "batches-dir"])
def test_splits_from_user_dir(tmp_path, monkeypatch, layout):
    register(monkeypatch)
    root = tmp_path / "d"
    write_batches(root / BATCH_DIR if layout == "batches-dir" else root)
    assert find_dataset_dir("tiny-cifar", root) == (root / BATCH_DIR if layout == "batches-dir" else root)
    for name in ("load", "loads", "Unpickler"):  # the binary version needs no unpickling, ever
        monkeypatch.setattr(pickle, name, lambda *a, **k: pytest.fail("unpickled"))
    expected = {"train": range(0, 40), "validation": range(40, 50), "train-full": range(50), "test": range(100, 120)}
    for split, rows in expected.items():
        x, y = load_split("tiny-cifar", split, root)
        assert x.dtype == torch.uint8 and x.shape == (len(rows), 3, 32, 32) and x.is_contiguous()
        assert y.dtype == torch.int64 and y.tolist() == [i % 10 for i in rows]
        assert x[:, 0, 0, 0].tolist() == list(rows)  # validation = the last 10 of the training set
        for j in (0, len(rows) - 1):
            assert torch.equal(x[j], torch.from_numpy(image(rows[j])))  # channel planes, row-major


def test_files_read_once_and_copies_returned(tmp_path, monkeypatch):
    register(monkeypatch)
    root = write_batches(tmp_path / "d")
    reads = []
    original = dataset_files.read_bytes
    monkeypatch.setattr(dataset_files, "read_bytes", lambda p, kind: reads.append(p.name) or original(p, kind))
    x, _ = load_split("tiny-cifar", "train", root)
    load_split("tiny-cifar", "validation", root)
    assert sorted(reads) == TRAIN_FILES
    x.zero_()
    assert load_split("tiny-cifar", "train", root)[0][5, 0, 0, 0] == 5


def test_found_in_search_order_with_batches_dir(tmp_path, monkeypatch):
    register(monkeypatch)
    env = tmp_path / "env"
    write_batches(env / "tiny-cifar" / BATCH_DIR)  # as `tar xzf` leaves it in $ELBOX_DATA/<name>
    monkeypatch.setenv("ELBOX_DATA", str(env))
    assert find_dataset_dir("tiny-cifar", download=False) == env / "tiny-cifar" / BATCH_DIR


def test_user_dir_missing_file(tmp_path, monkeypatch):
    register(monkeypatch)
    root = write_batches(tmp_path / "d" / BATCH_DIR).parent
    (root / BATCH_DIR / "data_batch_3.bin").unlink()
    with pytest.raises(ElboxError) as info:
        load_split("tiny-cifar", "test", root)
    message = str(info.value)
    assert "missing data_batch_3.bin" in message and str(root / BATCH_DIR) in message
    assert "data_batch_2.bin" not in message


def load_error(root: Path, split: str = "train") -> str:
    data.clear_cache()
    with pytest.raises(ElboxError) as info:
        load_split("tiny-cifar", split, root)
    return str(info.value)


def test_structural_validation(tmp_path, monkeypatch):
    register(monkeypatch)
    root = write_batches(tmp_path / "d")
    path = root / "data_batch_2.bin"
    good = path.read_bytes()

    path.write_bytes(good[:-1])  # truncated
    message = load_error(root)
    assert str(path) in message and "truncated or corrupt" in message and f"{len(good) - 1} bytes" in message

    path.write_bytes(good[:-RECORD])  # whole records, one too few
    message = load_error(root)
    assert str(path) in message and "holds 9 records, expected 10" in message

    path.write_bytes(b"")
    assert "is empty" in load_error(root)

    bad_label = bytearray(good)
    bad_label[3 * RECORD] = 10
    path.write_bytes(bytes(bad_label))
    message = load_error(root)
    assert str(path) in message and "record 3 has label byte 10" in message

    path.write_bytes(good)
    (root / "test_batch.bin").write_bytes(batch_bytes(0, 19))
    message = load_error(root, "test")
    assert "test_batch.bin holds 19 records, expected 20" in message
    assert load_split("tiny-cifar", "train", root)[0].shape == (40, 3, 32, 32)  # train files are fine


def test_payload_checksum(tmp_path, monkeypatch):
    root = write_batches(tmp_path / "d")
    sha = {name: hashlib.sha256(content).hexdigest() for name, content in tiny_batches().items()}
    register(monkeypatch, payload_sha256=sha)
    load_split("tiny-cifar", "test", root)
    register(monkeypatch, payload_sha256=dict(sha, **{"test_batch.bin": "0" * 64}))
    message = load_error(root, "test")
    assert "wrong checksum" in message and str(root / "test_batch.bin") in message


# ---------------------------------------------------------------------------
# Download and extraction


def test_download_extracts_only_the_batches(tmp_path, monkeypatch):
    archive = tiny_archive(
        extra=[
            ("../escape.bin", b"x"),
            ("/tmp/absolute.bin", b"x"),
            (f"{BATCH_DIR}/../../escape2.bin", b"x"),
            (f"{BATCH_DIR}/link.bin", b"", tarfile.SYMTYPE, "/etc/passwd"),
        ]
    )
    spec = register(monkeypatch, archive)
    opened = []
    directory = find_dataset_dir("tiny-cifar", opener=serving(archive, opened))
    cache = tiny_cache(tmp_path)
    assert directory == cache / BATCH_DIR
    assert opened == [spec.mirrors[0] + "cifar-10-binary.tar.gz"]
    # only the six batch files: no archive, no temp files, no other members
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) == sorted(
        [BATCH_DIR, *(f"{BATCH_DIR}/{f}" for f in ALL_FILES)]
    )
    assert not (tmp_path / "escape.bin").exists() and not (tmp_path / "escape2.bin").exists()
    for name, content in tiny_batches().items():
        assert (directory / name).read_bytes() == content
    x, y = load_split("tiny-cifar", "validation")
    assert x.shape == (10, 3, 32, 32) and x[:, 0, 0, 0].tolist() == list(range(40, 50))
    opened.clear()  # a second lookup finds the cache and downloads nothing
    assert find_dataset_dir("tiny-cifar", opener=serving(archive, opened)) == directory and opened == []


def test_download_tries_mirrors_in_order(tmp_path, monkeypatch):
    archive = tiny_archive()
    register(monkeypatch, archive)
    opened = []

    def opener(url):
        opened.append(url)
        if "dead" in url:
            raise OSError("connection refused")
        return io.BytesIO(archive)

    mirrors = ["https://dead.invalid/", "https://alive.invalid/"]
    assert find_dataset_dir("tiny-cifar", mirrors=mirrors, opener=opener) == tiny_cache(tmp_path) / BATCH_DIR
    assert opened == [m + "cifar-10-binary.tar.gz" for m in mirrors]


def test_download_md5_mismatch_leaves_nothing(tmp_path, monkeypatch):
    archive = tiny_archive()
    register(monkeypatch, archive)
    tampered = tiny_archive(extra=[("extra", b"x")])
    with pytest.raises(ElboxError) as info:
        find_dataset_dir("tiny-cifar", opener=serving(tampered, []))
    message = str(info.value)
    assert "wrong checksum" in message and hashlib.md5(archive).hexdigest() in message
    assert hashlib.md5(tampered).hexdigest() in message
    assert list(tiny_cache(tmp_path).iterdir()) == []


def corrupt_archives() -> dict[str, bytes]:
    good = tiny_archive()
    return {
        "truncated": good[: len(good) // 2],
        "not gzip": b"this is not a gzip file" * 10,
        "gzip but not tar": gzip.compress(b"\x07" * 5000),
    }


@pytest.mark.parametrize("kind", list(corrupt_archives()))
def test_corrupt_archive_leaves_nothing(tmp_path, monkeypatch, kind):
    archive = corrupt_archives()[kind]
    register(monkeypatch, archive)  # the MD5 matches: the archive itself is bad
    with pytest.raises(ElboxError) as info:
        find_dataset_dir("tiny-cifar", opener=serving(archive, []))
    message = str(info.value)
    assert "corrupt gzip/tar archive" in message and str(tiny_cache(tmp_path) / "cifar-10-binary.tar.gz") in message
    assert list(tiny_cache(tmp_path).iterdir()) == []


def test_archive_missing_member(tmp_path, monkeypatch):
    members = {f"{BATCH_DIR}/{k}": v for k, v in tiny_batches().items() if k != "data_batch_4.bin"}
    archive = tiny_archive(members)
    register(monkeypatch, archive)
    with pytest.raises(ElboxError, match=f"is missing {BATCH_DIR}/data_batch_4.bin"):
        find_dataset_dir("tiny-cifar", opener=serving(archive, []))
    assert list(tiny_cache(tmp_path).iterdir()) == []


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_archive_link_member_refused(tmp_path, monkeypatch, kind):
    members = {f"{BATCH_DIR}/{k}": v for k, v in tiny_batches().items() if k != "test_batch.bin"}
    target = "/etc/passwd" if kind == tarfile.SYMTYPE else f"{BATCH_DIR}/data_batch_1.bin"
    archive = tiny_archive(members, extra=[(f"{BATCH_DIR}/test_batch.bin", b"", kind, target)])
    register(monkeypatch, archive)
    with pytest.raises(ElboxError, match="test_batch.bin is not a regular file"):
        find_dataset_dir("tiny-cifar", opener=serving(archive, []))
    assert list(tiny_cache(tmp_path).iterdir()) == []


def test_not_found_message(monkeypatch):
    with pytest.raises(ElboxError) as info:
        find_dataset_dir("cifar-10", download=False)
    message = str(info.value)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz" in message
    assert f"directly or in {BATCH_DIR}/" in message and "test_batch.bin" in message
    assert "apt-get" not in message

"""Tests for elbox.data: IDX reading, dataset lookup and download, splits, data spaces, batching."""

import dataclasses
import gzip
import hashlib
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from elbox import data
from elbox.core.errors import ElboxError
from elbox.data import (
    DATA_SPACES,
    DATASETS,
    IDX_FILES,
    dataset_files,
    find_dataset_dir,
    get_data_space,
    iterate_batches,
    load_split,
    read_idx,
    sources,
    spaces,
)

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------
# Helpers


def idx_bytes(array: np.ndarray, dtype_code: int = 0x08) -> bytes:
    header = bytes([0, 0, dtype_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, *, raw: bytes | None = None) -> Path:
    """Write an IDX file (gzipped if the name ends in .gz); `raw` overrides the content."""
    content = idx_bytes(array) if raw is None else raw
    path.write_bytes(gzip.compress(content) if path.name.endswith(".gz") else content)
    return path


pytestmark = pytest.mark.usefixtures("isolated_data")


TINY = dict(train_size=50, validation_size=10, test_size=20)


def tiny_arrays():
    """Image i is filled with value i (train) or 100 + i (test); label = i % 10."""
    n_train, n_test = TINY["train_size"], TINY["test_size"]
    train_x = np.repeat(np.arange(n_train, dtype=np.uint8), 28 * 28).reshape(n_train, 28, 28)
    test_x = np.repeat(np.arange(100, 100 + n_test, dtype=np.uint8), 28 * 28).reshape(n_test, 28, 28)
    return {
        "train-images": train_x,
        "train-labels": np.arange(n_train, dtype=np.uint8) % 10,
        "test-images": test_x,
        "test-labels": np.arange(n_test, dtype=np.uint8) % 10,
    }


def write_tiny_dataset(directory: Path, gz: bool = True) -> dict[str, str]:
    """Write the tiny dataset; return file name -> payload SHA-256."""
    directory.mkdir(parents=True, exist_ok=True)
    sha = {}
    for role, array in tiny_arrays().items():
        name = IDX_FILES[role] if gz else IDX_FILES[role].removesuffix(".gz")
        write_idx(directory / name, array)
        sha[IDX_FILES[role]] = hashlib.sha256(idx_bytes(array)).hexdigest()
    return sha


def register_tiny(monkeypatch, name="tiny", **changes) -> data.DatasetSpec:
    spec = data.DatasetSpec(
        name=name, mirrors=("http://example.invalid/tiny/",), archive_md5={}, payload_sha256={}, **TINY
    )
    spec = dataclasses.replace(spec, **changes)
    monkeypatch.setitem(DATASETS, name, spec)
    return spec


# ---------------------------------------------------------------------------
# IDX reading


@pytest.mark.parametrize("file_name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_read_idx_round_trip(tmp_path, file_name):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = read_idx(write_idx(tmp_path / file_name, array))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)


def expect_error(path, *words):
    with pytest.raises(ElboxError) as info:
        read_idx(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, message


def test_read_idx_missing(tmp_path):
    expect_error(tmp_path / "nope.gz", "not found")


def test_read_idx_empty(tmp_path):
    (tmp_path / "e").write_bytes(b"")
    expect_error(tmp_path / "e", "empty")
    (tmp_path / "e.gz").write_bytes(gzip.compress(b""))
    expect_error(tmp_path / "e.gz", "empty")


def test_read_idx_bad_magic(tmp_path):
    good = idx_bytes(np.zeros((2, 2), np.uint8))
    expect_error(write_idx(tmp_path / "m", None, raw=b"\x01" + good[1:]), "bad magic")


def test_read_idx_unsupported_dtype(tmp_path):
    raw = idx_bytes(np.zeros((2, 2), np.uint8), dtype_code=0x0D)
    expect_error(write_idx(tmp_path / "d.gz", None, raw=raw), "unsupported dtype", "0x0d")


def test_read_idx_truncated(tmp_path):
    good = idx_bytes(np.zeros((3, 4), np.uint8))
    expect_error(write_idx(tmp_path / "t.gz", None, raw=good[:-1]), "truncated")
    expect_error(write_idx(tmp_path / "h", None, raw=good[:6]), "truncated")  # inside the dims


def test_read_idx_trailing_bytes(tmp_path):
    good = idx_bytes(np.zeros((3, 4), np.uint8))
    expect_error(write_idx(tmp_path / "x", None, raw=good + b"\0\0"), "2 trailing bytes")


def test_read_idx_corrupt_gzip(tmp_path):
    compressed = gzip.compress(idx_bytes(np.arange(1000, dtype=np.uint8) % 7))
    (tmp_path / "cut.gz").write_bytes(compressed[: len(compressed) // 2])
    expect_error(tmp_path / "cut.gz", "corrupt gzip")
    flipped = bytearray(compressed)
    flipped[len(flipped) // 2] ^= 0xFF
    (tmp_path / "flip.gz").write_bytes(bytes(flipped))
    expect_error(tmp_path / "flip.gz", "corrupt gzip")
    (tmp_path / "plain.gz").write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    expect_error(tmp_path / "plain.gz", "not a gzip file")


# ---------------------------------------------------------------------------
# Dataset specs and lookup


def test_dataset_specs_complete():
    for name, spec in DATASETS.items():
        assert spec.name == name
        downloads = {spec.archive} if spec.archive else set(spec.files.values())
        assert set(spec.archive_md5) == downloads
        assert all(len(v) == 32 for v in spec.archive_md5.values())
        assert all(m.endswith("/") for m in spec.mirrors)
        if spec.format == data.IDX:
            assert set(spec.files.values()) == set(IDX_FILES.values()) and spec.image_shape == (1, 28, 28)
    assert set(DATASETS["fashion-mnist"].payload_sha256) == set(IDX_FILES.values())
    assert DATASETS["mnist"].mirrors[0].startswith("https://ossci-datasets")


def test_unknown_dataset_lists_names():
    with pytest.raises(ElboxError, match="unknown dataset 'cifar'.*fashion-mnist, mnist, cifar-10, synthetic"):
        load_split("cifar", "train")


def test_unknown_split():
    with pytest.raises(ElboxError, match="unknown split 'dev'.*validation"):
        load_split("synthetic", "dev")


def test_root_with_missing_files(tmp_path, monkeypatch):
    register_tiny(monkeypatch)
    write_tiny_dataset(tmp_path / "d")
    (tmp_path / "d" / IDX_FILES["test-labels"]).unlink()
    with pytest.raises(ElboxError) as info:
        find_dataset_dir("tiny", tmp_path / "d")
    assert str(tmp_path / "d") in str(info.value) and IDX_FILES["test-labels"] in str(info.value)
    assert IDX_FILES["train-images"] not in str(info.value)


def test_search_order(tmp_path, monkeypatch):
    register_tiny(monkeypatch)
    system, env, cache = tmp_path / "sys", tmp_path / "env", tmp_path / "cache" / "elbox" / "tiny"
    write_tiny_dataset(system / "tiny")
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIRS", [system])
    assert find_dataset_dir("tiny", download=False) == system / "tiny"
    write_tiny_dataset(cache, gz=False)  # uncompressed names are accepted too
    assert find_dataset_dir("tiny", download=False) == cache
    write_tiny_dataset(env)
    monkeypatch.setenv("ELBOX_DATA", str(env))
    assert find_dataset_dir("tiny", download=False) == env
    write_tiny_dataset(env / "tiny")
    assert find_dataset_dir("tiny", download=False) == env / "tiny"
    root = tmp_path / "root"
    write_tiny_dataset(root)
    assert find_dataset_dir("tiny", root) == root


def test_not_found_message_names_all_ways(tmp_path):
    empty_mirror = (tmp_path / "no-mirror").as_uri() + "/"
    with pytest.raises(ElboxError) as info:
        find_dataset_dir("fashion-mnist", mirrors=[empty_mirror])
    message = str(info.value)
    assert "--data-dir DIR" in message and "ELBOX_DATA" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert DATASETS["fashion-mnist"].mirrors[0] in message
    assert "fashion-mnist" in message
    # mnist has no Debian package, so it is not suggested
    with pytest.raises(ElboxError) as info:
        find_dataset_dir("mnist", download=False)
    assert "apt-get" not in str(info.value) and "ossci-datasets" in str(info.value)


def test_wrong_payload_checksum(tmp_path, monkeypatch):
    sha = write_tiny_dataset(tmp_path / "d")
    register_tiny(monkeypatch, payload_sha256=sha)
    load_split("tiny", "train", tmp_path / "d")  # correct checksums load
    data.clear_cache()
    bad = dict(sha, **{IDX_FILES["train-labels"]: "0" * 64})
    register_tiny(monkeypatch, payload_sha256=bad)
    with pytest.raises(ElboxError, match="wrong checksum") as info:
        load_split("tiny", "train", tmp_path / "d")
    assert str(tmp_path / "d" / IDX_FILES["train-labels"]) in str(info.value)


def test_structural_validation(tmp_path, monkeypatch):
    register_tiny(monkeypatch)
    write_tiny_dataset(tmp_path / "d")
    write_idx(tmp_path / "d" / IDX_FILES["test-labels"], np.zeros(19, np.uint8))
    with pytest.raises(ElboxError, match="20 images but 19 labels"):
        load_split("tiny", "test", tmp_path / "d")
    write_idx(tmp_path / "d" / IDX_FILES["test-images"], np.zeros((19, 28, 28), np.uint8))
    data.clear_cache()  # parsed arrays are cached per (directory, file)
    with pytest.raises(ElboxError, match="19 examples, expected 20"):
        load_split("tiny", "test", tmp_path / "d")
    write_idx(tmp_path / "d" / IDX_FILES["train-images"], np.zeros((50, 28, 27), np.uint8))
    with pytest.raises(ElboxError, match="shape"):
        load_split("tiny", "train", tmp_path / "d")


# ---------------------------------------------------------------------------
# Download


def make_mirror(tmp_path, monkeypatch, name="tiny"):
    """A file:// mirror holding the tiny dataset's .gz archives; registers their MD5s."""
    mirror = tmp_path / "mirror"
    write_tiny_dataset(mirror)
    md5 = {f: hashlib.md5((mirror / f).read_bytes()).hexdigest() for f in IDX_FILES.values()}
    spec = register_tiny(monkeypatch, name, archive_md5=md5, mirrors=(mirror.as_uri() + "/",))
    return mirror, spec


def test_download_via_file_mirror(tmp_path, monkeypatch):
    mirror, spec = make_mirror(tmp_path, monkeypatch)
    dead = (tmp_path / "dead").as_uri() + "/"
    opened = []

    def opener(url):
        opened.append(url)
        return sources._default_opener(url)

    directory = find_dataset_dir("tiny", mirrors=[dead, spec.mirrors[0]], opener=opener)
    assert directory == tmp_path / "cache" / "elbox" / "tiny"
    assert sorted(p.name for p in directory.iterdir()) == sorted(IDX_FILES.values())
    assert len(opened) == 8 and opened[0].startswith(dead)  # dead mirror tried first for each file
    x, y = load_split("tiny", "test")
    assert x.shape == (20, 1, 28, 28) and y.tolist() == [i % 10 for i in range(20)]
    # a second lookup finds the cache and downloads nothing
    opened.clear()
    assert find_dataset_dir("tiny", opener=opener) == directory and opened == []


def test_download_md5_mismatch_leaves_nothing(tmp_path, monkeypatch):
    mirror, spec = make_mirror(tmp_path, monkeypatch)
    name = IDX_FILES["train-images"]
    bad = dict(spec.archive_md5, **{name: "f" * 32})
    register_tiny(monkeypatch, archive_md5=bad, mirrors=spec.mirrors)
    with pytest.raises(ElboxError) as info:
        find_dataset_dir("tiny")
    message = str(info.value)
    assert spec.mirrors[0] + name in message
    assert "f" * 32 in message and spec.archive_md5[name] in message
    cache = tmp_path / "cache" / "elbox" / "tiny"
    assert list(cache.iterdir()) == []  # no partial or temp file


# ---------------------------------------------------------------------------
# Splits


def test_split_boundaries(tmp_path, monkeypatch):
    register_tiny(monkeypatch)
    write_tiny_dataset(tmp_path / "d")
    splits = {s: load_split("tiny", s, tmp_path / "d") for s in data.SPLITS}
    expected = {"train": range(0, 40), "validation": range(40, 50), "train-full": range(50), "test": range(100, 120)}
    for split, (x, y) in splits.items():
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert x.shape == (len(expected[split]), 1, 28, 28) and x.is_contiguous()
        assert x[:, 0, 0, 0].tolist() == list(expected[split])  # validation = the last 10
        assert y.tolist() == [i % 10 for i in expected[split]]


def test_default_split_sizes():
    spec = DATASETS["fashion-mnist"]
    assert (spec.train_size - spec.validation_size, spec.validation_size, spec.test_size) == (55000, 5000, 10000)


def test_arrays_read_once(tmp_path, monkeypatch):
    register_tiny(monkeypatch)
    write_tiny_dataset(tmp_path / "d")
    reads = []
    original = dataset_files.read_file_bytes
    monkeypatch.setattr(dataset_files, "read_file_bytes", lambda p: reads.append(p.name) or original(p))
    x_train, _ = load_split("tiny", "train", tmp_path / "d")
    load_split("tiny", "validation", tmp_path / "d")
    assert sorted(reads) == sorted([IDX_FILES["train-images"], IDX_FILES["train-labels"]])
    x_train.zero_()  # returned tensors are copies; the cache is untouched
    assert load_split("tiny", "train", tmp_path / "d")[0][5, 0, 0, 0] == 5


def test_synthetic_dataset():
    sizes = {"train": 1000, "validation": 200, "train-full": 1200, "test": 200}
    for split, n in sizes.items():
        x, y = load_split("synthetic", split)
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.uint8 and x.is_contiguous()
        assert y.shape == (n,) and y.dtype == torch.int64
        assert set(y.tolist()) == set(range(10))
    data.clear_cache()
    x2, y2 = load_split("synthetic", "test")
    assert torch.equal(x, x2) and torch.equal(y, y2)  # deterministic across regenerations
    assert 0 < x.float().mean() < 255


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_debian_fashion_mnist(monkeypatch):
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIRS", [DEBIAN_FASHION.parent])
    assert find_dataset_dir("fashion-mnist", download=False) == DEBIAN_FASHION
    x, y = load_split("fashion-mnist", "test")  # verifies the stored payload SHA-256s
    assert x.shape == (10000, 1, 28, 28) and y.bincount().tolist() == [1000] * 10


# ---------------------------------------------------------------------------
# Data spaces


def test_data_space_registry():
    assert set(DATA_SPACES) == {"binary", "continuous", "discrete", "real"}
    for name in ("binary", "continuous", "discrete"):  # 'real' needs its scaling (tests/test_vectors.py)
        assert get_data_space(name).name == name
    with pytest.raises(ElboxError, match="unknown data space 'gray'.*binary, continuous, discrete, real"):
        get_data_space("gray")


@pytest.mark.parametrize("name", ["binary", "continuous", "discrete"])
def test_data_space_rejects_non_uint8(name):
    with pytest.raises(ElboxError, match="uint8"):
        get_data_space(name).train_batch(torch.zeros(2, 1, 28, 28), None)


def levels_batch(levels=(0, 1, 64, 128, 200, 254, 255), n=20000):
    """A batch whose row j holds the value levels[j] n times."""
    return torch.tensor(levels, dtype=torch.uint8).repeat_interleave(n).reshape(len(levels), 1, n, 1)


def test_binary_space():
    space = get_data_space("binary")
    x = levels_batch()
    a, b, c = space.eval_data(x, seed=1), space.eval_data(x, seed=1), space.eval_data(x, seed=2)
    assert a.dtype == torch.float32 and torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    n = x.shape[2]
    for row, k in enumerate(x[:, 0, 0, 0].tolist()):
        p = k / 255
        stderr = math.sqrt(p * (1 - p) / n)
        assert abs(a[row].mean().item() - p) <= 5 * stderr + 1e-7, (k, a[row].mean())  # 5 standard errors
    g = torch.Generator().manual_seed(0)
    t1, t2 = space.train_batch(x, g), space.train_batch(x, g)
    assert not torch.equal(t1, t2)  # fresh randomness each batch
    assert space.log_prob_offset(784) == 0.0


def test_continuous_space():
    space = get_data_space("continuous")
    x = levels_batch(n=2000)
    y = space.eval_data(x, seed=3)
    assert y.dtype == torch.float32 and torch.equal(y, space.eval_data(x, seed=3))
    k = x.float()
    assert bool(((y >= k / 256) & (y < (k + 1) / 256)).all())
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(space.train_batch(x, g), space.train_batch(x, g))
    assert space.log_prob_offset(784) == pytest.approx(-784 * math.log(256))


def test_continuous_top_of_bin_stays_in_bin():
    k = torch.tensor([0.0, 128.0, 255.0])
    u = torch.full_like(k, 1 - 2**-24)  # largest value torch.rand can return
    y = spaces._dequantize(k, u)
    assert bool((y < (k + 1) / 256).all()) and bool((y >= k / 256).all())


def test_discrete_space():
    space = get_data_space("discrete")
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    y = space.train_batch(x, None)
    assert torch.equal(y, x.float() / 255) and torch.equal(space.eval_data(x, seed=9), y)
    assert torch.equal((y * 255).round().to(torch.uint8), x)
    assert y.min() == 0 and y.max() == 1
    assert space.log_prob_offset(784) == 0.0


# ---------------------------------------------------------------------------
# Batching


@pytest.mark.parametrize("shuffle", [False, True])
def test_iterate_batches_covers_each_index_once(shuffle):
    g = torch.Generator().manual_seed(0)
    batches = list(iterate_batches(103, 10, shuffle, g))
    assert [len(b) for b in batches] == [10] * 10 + [3]
    everything = torch.cat(batches)
    assert sorted(everything.tolist()) == list(range(103))
    in_order = everything.tolist() == list(range(103))
    assert in_order != shuffle


def test_iterate_batches_drop_last_and_errors():
    batches = list(iterate_batches(103, 10, True, torch.Generator().manual_seed(1), drop_last=True))
    assert [len(b) for b in batches] == [10] * 10
    assert len(set(torch.cat(batches).tolist())) == 100
    a = torch.cat(list(iterate_batches(50, 7, True, torch.Generator().manual_seed(5))))
    b = torch.cat(list(iterate_batches(50, 7, True, torch.Generator().manual_seed(5))))
    assert torch.equal(a, b)
    with pytest.raises(ElboxError, match="batch size"):
        iterate_batches(10, 0, False, None)
    with pytest.raises(ElboxError, match="empty dataset"):
        iterate_batches(0, 4, False, None)
    with pytest.raises(ElboxError, match="no full batch"):
        iterate_batches(3, 4, False, None, drop_last=True)

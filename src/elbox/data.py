"""Datasets, splits, data spaces and batching.

Datasets: "fashion-mnist" and "mnist" (28x28 grayscale, 10 classes, IDX files), "cifar-10"
(32x32 RGB, 10 classes, the binary version's .bin batch files; the Python version is never read,
so nothing is ever unpickled), plus "synthetic", a small deterministic dataset for tests and smoke runs.

Splits: "validation" is always the last 5000 images of the official training set.
                fashion-mnist, mnist             cifar-10
  "train"       first 55000 of the training set  first 45000 of the training set
  "validation"  last 5000 of the training set    last 5000 of the training set
  "train-full"  all 60000                        all 50000 (data_batch_1..5 in order)
  "test"        the official 10000 test images   the official 10000 (test_batch)
For "synthetic": 1000 train, 200 validation, 200 test ("train-full" = train + validation).

Where the files come from, first match wins (see `find_dataset_dir`):
  1. a directory given by the user (`root`, the CLI's --data-dir)
  2. $ELBOX_DATA/<name>, then $ELBOX_DATA itself
  3. the user cache, $XDG_CACHE_HOME/elbox/<name> (default ~/.cache/elbox/<name>)
  4. system directories, /usr/share/datasets/<name> (Debian package dataset-fashion-mnist)
  5. a download into the user cache, checking the MD5 of each official .gz archive (IDX) or of
     cifar-10-binary.tar.gz, from which only the six .bin batch files are extracted
A directory may hold IDX files gzipped or uncompressed, and the CIFAR-10 .bin files directly or
in cifar-10-batches-bin/ (as the archive extracts). Files read from disk are checked against the
SHA-256 of the decompressed payload where it is known (repackagers re-gzip, so archive MD5s only
apply to downloads) and always checked structurally.

Data spaces turn uint8 images into the float32 values in [0, 1] a model sees:
  "binary"      dynamic binarization, x ~ Bernoulli(k/255)
  "continuous"  uniform dequantization, y = (k + u)/256, u ~ U[0, 1)
  "discrete"    x = k/255, no randomness
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import math
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from elbox.errors import ElboxError

# ---------------------------------------------------------------------------
# IDX files

_IDX_DTYPES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path, kind: str) -> bytes:
    """Whole file contents; `kind` ("IDX file") names the file in error messages."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ElboxError(f"{kind} not found: {path}") from None
    except OSError as e:
        raise ElboxError(f"cannot read {kind} {path}: {e.strerror or e}") from None


def _read_file_bytes(path: Path) -> bytes:
    """Whole IDX file contents, decompressed if gzipped."""
    raw = _read_bytes(path, "IDX file")
    if not raw:
        raise ElboxError(f"IDX file {path} is empty")
    is_gzip = raw[:2] == _GZIP_MAGIC
    if path.name.endswith(".gz") and not is_gzip:
        raise ElboxError(f"IDX file {path} is named .gz but is not a gzip file")
    if not is_gzip:
        return raw
    try:
        data = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise ElboxError(f"IDX file {path} is a corrupt gzip stream ({e or type(e).__name__})") from None
    if not data:
        raise ElboxError(f"IDX file {path} is empty (after decompression)")
    return data


def _parse_idx(data: bytes, path: Path) -> np.ndarray:
    """Parse IDX bytes (header + payload) into a read-only array."""
    if len(data) < 4:
        raise ElboxError(f"IDX file {path} is truncated: {len(data)} bytes, too short for a header")
    if data[:2] != b"\x00\x00":
        raise ElboxError(f"IDX file {path} has a bad magic number {data[:4].hex()} (expected 0000 then type and ndim)")
    code, ndim = data[2], data[3]
    if code != 0x08:
        kind = _IDX_DTYPES.get(code, "unknown")
        raise ElboxError(f"IDX file {path} has unsupported dtype code 0x{code:02x} ({kind}); only 0x08 (uint8) is supported")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ElboxError(f"IDX file {path} is truncated: header needs {header_len} bytes for {ndim} dims, file has {len(data)}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(dims)
    found = len(data) - header_len
    if found < expected:
        raise ElboxError(f"IDX file {path} is truncated: dims {dims} need {expected} data bytes, found {found}")
    if found > expected:
        raise ElboxError(f"IDX file {path} has {found - expected} trailing bytes after the data for dims {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a uint8 IDX file (plain or gzipped) into a read-only numpy array."""
    path = Path(path)
    return _parse_idx(_read_file_bytes(path), path)


# ---------------------------------------------------------------------------
# CIFAR-10 binary batch files

CIFAR_CLASSES = 10


def _parse_cifar_batch(data: bytes, path: Path, image_shape: tuple[int, ...], expected_records: int) -> np.ndarray:
    """Check a CIFAR binary batch; return its records as a read-only uint8 array [N, 1 + C*H*W].

    Each record is one label byte (0-9) and then the image channel by channel (for CIFAR-10:
    1024 red, 1024 green, 1024 blue bytes), each channel a row-major 32x32 plane.
    """
    record = 1 + math.prod(image_shape)
    if not data:
        raise ElboxError(f"CIFAR batch file {path} is empty")
    if len(data) % record:
        raise ElboxError(
            f"CIFAR batch file {path} is truncated or corrupt: {len(data)} bytes is not a whole number of "
            f"{record}-byte records (1 label byte + {record - 1} pixel bytes)"
        )
    n = len(data) // record
    if n != expected_records:
        raise ElboxError(f"CIFAR batch file {path} holds {n} records, expected {expected_records}")
    records = np.frombuffer(data, dtype=np.uint8).reshape(n, record)
    bad = np.flatnonzero(records[:, 0] >= CIFAR_CLASSES)
    if bad.size:
        i = int(bad[0])
        raise ElboxError(
            f"CIFAR batch file {path} is corrupt: record {i} has label byte {records[i, 0]}, "
            f"expected 0-{CIFAR_CLASSES - 1}"
        )
    return records


# ---------------------------------------------------------------------------
# Dataset specs

# Role -> official file name. A directory may hold each one gzipped or uncompressed.
IDX_FILES = {
    "train-images": "train-images-idx3-ubyte.gz",
    "train-labels": "train-labels-idx1-ubyte.gz",
    "test-images": "t10k-images-idx3-ubyte.gz",
    "test-labels": "t10k-labels-idx1-ubyte.gz",
}

# Role -> batch file; the roles of a part ("train-", "test-") are read in this order.
CIFAR10_FILES = {
    **{f"train-{i}": f"data_batch_{i}.bin" for i in range(1, 6)},
    "test-1": "test_batch.bin",
}

IDX = "idx"
CIFAR_BINARY = "cifar-binary"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset's files come from and what they must look like."""

    name: str
    mirrors: tuple[str, ...]  # base URLs, tried in order
    archive_md5: dict[str, str]  # downloaded file name (each IDX .gz, or `archive`) -> MD5
    payload_sha256: dict[str, str]  # file name -> SHA-256 of the (decompressed) file; {} if unknown
    debian_package: str | None = None
    format: str = IDX  # IDX or CIFAR_BINARY
    files: dict[str, str] = dataclasses.field(default_factory=lambda: dict(IDX_FILES))  # role -> file
    archive: str | None = None  # one tar.gz holding all the files, downloaded instead of each file
    archive_dir: str | None = None  # the folder inside `archive` holding the files
    train_size: int = 60000  # CIFAR: each "train-" batch file holds an equal share (test_size likewise)
    validation_size: int = 5000  # taken from the end of the official training set
    test_size: int = 10000
    image_shape: tuple[int, int, int] = (1, 28, 28)  # channels, height, width


DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        archive_md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        # Computed with `zcat FILE | sha256sum` on the Debian dataset-fashion-mnist files.
        payload_sha256={
            "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        debian_package="dataset-fashion-mnist",
    ),
    "mnist": DatasetSpec(
        name="mnist",
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        archive_md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        payload_sha256={},  # unknown: validated structurally only
    ),
    "cifar-10": DatasetSpec(
        name="cifar-10",
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        # The "binary version" MD5 listed on https://www.cs.toronto.edu/~kriz/cifar.html
        archive_md5={"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"},
        payload_sha256={},  # unknown: validated structurally only
        format=CIFAR_BINARY,
        files=dict(CIFAR10_FILES),
        archive="cifar-10-binary.tar.gz",
        archive_dir="cifar-10-batches-bin",
        train_size=50000,
        image_shape=(3, 32, 32),
    ),
}

SYNTHETIC = "synthetic"
SPLITS = ("train", "validation", "train-full", "test")
SYNTHETIC_SIZES = {"train": 1000, "validation": 200, "test": 200}
SYNTHETIC_SEED = 20240601

# System-wide dataset directories (Debian installs to /usr/share/datasets/<name>).
SYSTEM_DATA_DIRS: list[Path] = [Path("/usr/share/datasets")]
DOWNLOAD_TIMEOUT_S = 60

# A URL opener: url -> binary file-like object usable as a context manager.
Opener = Callable[[str], object]


def dataset_names() -> list[str]:
    return [*DATASETS, SYNTHETIC]


def get_dataset_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ElboxError(f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}") from None


def _part_files(spec: DatasetSpec, part: str) -> list[str]:
    """The files of one part ("train" or "test"): those whose role starts with "<part>-"."""
    return [f for role, f in spec.files.items() if role.startswith(f"{part}-")]


def _part_size(spec: DatasetSpec, part: str) -> int:
    return spec.train_size if part == "train" else spec.test_size


# ---------------------------------------------------------------------------
# Finding and downloading files


def user_cache_dir(name: str) -> Path:
    """$XDG_CACHE_HOME/elbox/<name>, default ~/.cache/elbox/<name>."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "elbox" / name


def _locate(directory: Path, file_name: str) -> Path | None:
    """The file as `name.gz` or uncompressed `name`, whichever exists."""
    for candidate in (file_name, file_name.removesuffix(".gz")):
        if (directory / candidate).is_file():
            return directory / candidate
    return None


def _missing_files(directory: Path, spec: DatasetSpec) -> list[str]:
    return [f for f in spec.files.values() if _locate(directory, f) is None]


def _layouts(directory: Path, spec: DatasetSpec) -> list[Path]:
    """Where the files may sit under a directory: in it, or in the archive's folder inside it."""
    return [directory, directory / spec.archive_dir] if spec.archive_dir else [directory]


def _holding_dir(directory: Path, spec: DatasetSpec) -> Path | None:
    """The first of `_layouts(directory)` that holds all of the dataset's files, if any."""
    for candidate in _layouts(directory, spec):
        if not _missing_files(candidate, spec):
            return candidate
    return None


def _layout_hint(spec: DatasetSpec) -> str:
    """How a directory may hold the files, for error messages."""
    if spec.format == IDX:
        return "gzipped or not"
    return f"directly or in {spec.archive_dir}/" if spec.archive_dir else "uncompressed"


def _candidate_dirs(name: str) -> list[Path]:
    """Search locations 2-4 (env var, user cache, system dirs), in order."""
    dirs = []
    env = os.environ.get("ELBOX_DATA")
    if env:
        dirs += [Path(env) / name, Path(env)]
    dirs.append(user_cache_dir(name))
    dirs += [Path(d) / name for d in SYSTEM_DATA_DIRS]
    return dirs


class _DownloadFailed(ElboxError):
    """No mirror could be reached (as opposed to a checksum mismatch)."""


def _default_opener(url: str):
    return urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S)


def _md5_download(url: str, dest: Path, expected_md5: str, opener: Opener) -> None:
    """Fetch url into a temp file next to dest, verify its MD5, then move it into place."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        md5 = hashlib.md5()
        with os.fdopen(fd, "wb") as out, opener(url) as response:
            while chunk := response.read(1 << 20):
                md5.update(chunk)
                out.write(chunk)
        if md5.hexdigest() != expected_md5:
            raise ElboxError(
                f"download {url} has the wrong checksum: MD5 {md5.hexdigest()}, expected {expected_md5}; file discarded"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _fetch(spec: DatasetSpec, file_name: str, dest: Path, mirrors: Sequence[str], opener: Opener) -> None:
    """Download file_name from the first mirror that serves it into dest, checking its MD5.

    Unreachable mirrors are skipped; a checksum mismatch raises at once.
    """
    errors = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + file_name
        print(f"elbox: downloading {url}", file=sys.stderr)
        try:
            _md5_download(url, dest, spec.archive_md5[file_name], opener)
            return
        except (OSError, http.client.HTTPException, ValueError) as e:
            errors.append(f"{url}: {e}")
    raise _DownloadFailed(f"could not download {file_name} for dataset {spec.name!r}: " + "; ".join(errors))


def _extract_members(archive: Path, members: dict[str, str], out_dir: Path) -> None:
    """Extract the named members of a tar.gz (member name -> output file name) into out_dir.

    Nothing else in the archive is extracted, and output paths come from `members`, never from
    the archive, so absolute paths, '..' and links in it cannot write anywhere else; a wanted
    member that is not a regular file is an error. The files are written to a staging folder
    beside out_dir and moved into place only once all of them were read.
    """
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{archive.name}.", suffix=".extract"))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:  # one pass over the compressed stream
                target = members.get(member.name)
                if target is None:
                    continue
                if not member.isfile():
                    raise ElboxError(f"archive {archive}: member {member.name} is not a regular file; refusing it")
                with tar.extractfile(member) as src, open(staging / target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        missing = [name for name, target in members.items() if not (staging / target).is_file()]
        if missing:
            raise ElboxError(f"archive {archive} is missing {', '.join(missing)}")
        out_dir.mkdir(exist_ok=True)
        for target in members.values():
            os.replace(staging / target, out_dir / target)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ElboxError(f"archive {archive} is a corrupt gzip/tar archive ({e or type(e).__name__})") from None
    except OSError as e:
        raise ElboxError(f"cannot extract {archive} into {out_dir}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _download_archive(spec: DatasetSpec, dest: Path, mirrors: Sequence[str], opener: Opener) -> Path:
    """Download spec.archive into dest, extract the dataset's files, delete the archive."""
    archive = dest / spec.archive
    _fetch(spec, spec.archive, archive, mirrors, opener)
    if spec.archive_dir:
        out_dir, members = dest / spec.archive_dir, {f"{spec.archive_dir}/{f}": f for f in spec.files.values()}
    else:
        out_dir, members = dest, {f: f for f in spec.files.values()}
    try:
        _extract_members(archive, members, out_dir)
    finally:
        archive.unlink(missing_ok=True)
    return out_dir


def download_dataset(
    name: str,
    dest_dir: str | os.PathLike | None = None,
    *,
    mirrors: Sequence[str] | None = None,
    opener: Opener | None = None,
) -> Path:
    """Download a dataset into dest_dir (default: the user cache), checking MD5s.

    Returns the directory holding the files. IDX datasets fetch each .gz file, keeping files
    already in dest_dir; datasets with an `archive` fetch it, extract only their files (into
    dest_dir/<archive_dir>) and delete it. Each download tries the mirrors in turn; a checksum
    mismatch raises at once. `mirrors` and `opener` are injectable for tests.
    """
    spec = get_dataset_spec(name)
    dest = Path(dest_dir) if dest_dir is not None else user_cache_dir(name)
    mirrors = tuple(mirrors) if mirrors is not None else spec.mirrors
    opener = opener or _default_opener
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _DownloadFailed(f"cannot create download directory {dest}: {e.strerror or e}") from None
    if spec.archive is not None:
        return _holding_dir(dest, spec) or _download_archive(spec, dest, mirrors, opener)
    for file_name in spec.files.values():
        if _locate(dest, file_name) is None:
            _fetch(spec, file_name, dest / file_name, mirrors, opener)
    return dest


def _not_found_message(spec: DatasetSpec, looked_in: list[Path], reason: str) -> str:
    ways = [
        "pass a directory holding the files: --data-dir DIR, or set ELBOX_DATA=DIR "
        f"(files: {', '.join(spec.files.values())}; {_layout_hint(spec)})"
    ]
    if spec.debian_package:
        ways.append(f"install the Debian package: apt-get install {spec.debian_package}")
    sources = [m + spec.archive for m in spec.mirrors] if spec.archive else spec.mirrors
    ways.append(
        f"allow the download from {' or '.join(sources)} (saved to {user_cache_dir(spec.name)}); it failed: {reason}"
    )
    lines = [f"dataset {spec.name!r} not found. Get it one of these ways:"]
    lines += [f"  {i}. {w}" for i, w in enumerate(ways, 1)]
    lines.append("Looked in: " + ", ".join(str(d) for d in looked_in))
    return "\n".join(lines)


def _check_user_dir(root: Path, spec: DatasetSpec) -> Path:
    """The directory under a user-given root that holds the dataset's files, else a clear error."""
    found = _holding_dir(root, spec)
    if found is not None:
        return found
    # Report what is missing from the layout the user most likely meant.
    meant = next((d for d in reversed(_layouts(root, spec)) if d.is_dir()), root)
    raise ElboxError(
        f"data directory {root} does not hold dataset {spec.name!r}: missing {', '.join(_missing_files(meant, spec))} "
        f"in {meant} ({_layout_hint(spec)})"
    )


def find_dataset_dir(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    download: bool = True,
    mirrors: Sequence[str] | None = None,
    opener: Opener | None = None,
) -> Path:
    """The directory holding a dataset's files (search order in the module docstring)."""
    spec = get_dataset_spec(name)
    if root is not None:
        return _check_user_dir(Path(root), spec)
    looked_in = _candidate_dirs(name)
    for directory in looked_in:
        found = _holding_dir(directory, spec)
        if found is not None:
            return found
    if not download:
        raise ElboxError(_not_found_message(spec, looked_in, "downloads disabled"))
    try:
        return download_dataset(name, mirrors=mirrors, opener=opener)
    except _DownloadFailed as e:
        raise ElboxError(_not_found_message(spec, looked_in, str(e))) from None


# ---------------------------------------------------------------------------
# Loading splits

# (resolved directory, dataset, part) -> (images [N, C, H, W], labels [N]), both uint8 and
# read-only, so that train and validation share one read.
_PART_CACHE: dict[tuple[Path, str, str], tuple[np.ndarray, np.ndarray]] = {}
_SYNTHETIC_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def clear_cache() -> None:
    _PART_CACHE.clear()
    _SYNTHETIC_CACHE.clear()


def _verify_payload(path: Path, data: bytes, spec: DatasetSpec, file_name: str) -> None:
    """Check a file's (decompressed) contents against the spec's SHA-256, where one is known."""
    expected = spec.payload_sha256.get(file_name)
    if expected is None:
        return
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ElboxError(
            f"{path} has the wrong checksum for dataset {spec.name!r}: "
            f"SHA-256 of the payload is {actual}, expected {expected}"
        )


def _dataset_file(directory: Path, file_name: str, spec: DatasetSpec) -> Path:
    path = _locate(directory, file_name)
    if path is None:
        raise ElboxError(f"dataset {spec.name!r}: {file_name} not found in {directory}")
    return path


def _read_idx_part(spec: DatasetSpec, directory: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 1, H, W] and labels [N] from a part's two IDX files."""
    arrays = []
    for kind in ("images", "labels"):
        file_name = spec.files[f"{part}-{kind}"]
        path = _dataset_file(directory, file_name, spec)
        data = _read_file_bytes(path)
        _verify_payload(path, data, spec, file_name)
        arrays.append(_parse_idx(data, path))
    images, labels = arrays
    if images.ndim != 3:
        raise ElboxError(
            f"dataset {spec.name!r} {part} images in {directory} have shape {images.shape}, expected (N, H, W)"
        )
    return images.reshape(len(images), 1, *images.shape[1:]), labels


def _read_cifar_part(spec: DatasetSpec, directory: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, C, H, W] and labels [N] from a part's batch files, concatenated in order."""
    files = _part_files(spec, part)
    per_file = _part_size(spec, part) // len(files)
    batches = []
    for file_name in files:
        path = _dataset_file(directory, file_name, spec)
        data = _read_bytes(path, "CIFAR batch file")
        _verify_payload(path, data, spec, file_name)
        batches.append(_parse_cifar_batch(data, path, spec.image_shape, per_file))
    records = np.concatenate(batches) if len(batches) > 1 else batches[0]
    records.flags.writeable = False
    # Views: the label column, and the pixel bytes split into channel planes.
    return records[:, 1:].reshape(len(records), *spec.image_shape), records[:, 0]


_PART_READERS = {IDX: _read_idx_part, CIFAR_BINARY: _read_cifar_part}


def _check_structure(images: np.ndarray, labels: np.ndarray, spec: DatasetSpec, part: str, where: Path) -> None:
    what = f"dataset {spec.name!r} {part} files in {where}"
    if images.shape[1:] != spec.image_shape:
        expected = ", ".join(map(str, spec.image_shape))
        raise ElboxError(f"{what}: images have shape {images.shape}, expected (N, {expected})")
    if labels.ndim != 1:
        raise ElboxError(f"{what}: labels have shape {labels.shape}, expected (N,)")
    if len(images) != len(labels):
        raise ElboxError(f"{what}: {len(images)} images but {len(labels)} labels")
    if len(images) != _part_size(spec, part):
        raise ElboxError(f"{what}: {len(images)} examples, expected {_part_size(spec, part)}")


def _load_part(spec: DatasetSpec, directory: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Read (once), checksum-verify and check one part ("train" or "test") of a dataset."""
    key = (directory.resolve(), spec.name, part)
    if key not in _PART_CACHE:
        images, labels = _PART_READERS[spec.format](spec, directory, part)
        _check_structure(images, labels, spec, part, directory)
        _PART_CACHE[key] = images, labels
    return _PART_CACHE[key]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ElboxError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def load_split(name: str, split: str, root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 [N, C, H, W] (contiguous, a fresh copy) and labels as int64 [N].

    C, H, W = 1, 28, 28 for the IDX datasets and "synthetic", 3, 32, 32 for "cifar-10".
    """
    _check_split(split)
    if name == SYNTHETIC:
        return _synthetic_split(split)
    spec = get_dataset_spec(name)
    directory = find_dataset_dir(name, root)
    part = "test" if split == "test" else "train"
    images, labels = _load_part(spec, directory, part)
    first_validation = spec.train_size - spec.validation_size
    rows = {
        "train": slice(0, first_validation),
        "validation": slice(first_validation, spec.train_size),
    }.get(split, slice(None))
    x = torch.from_numpy(images[rows].copy(order="C"))  # CIFAR images are strided views
    y = torch.from_numpy(labels[rows].astype(np.int64))
    return x, y


def _synthetic_data() -> tuple[torch.Tensor, torch.Tensor]:
    """10 classes: 5 Gaussian blobs at different places, 5 stripe orientations, plus noise."""
    g = torch.Generator().manual_seed(SYNTHETIC_SEED)
    n = sum(SYNTHETIC_SIZES.values())
    coords = (torch.arange(28, dtype=torch.float32) + 0.5) / 28
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    templates = []
    for cy, cx in [(0.3, 0.3), (0.3, 0.7), (0.7, 0.3), (0.7, 0.7), (0.5, 0.5)]:
        templates.append(torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 0.12**2)))
    for c in range(5):
        theta = math.pi * c / 5
        templates.append(0.5 + 0.5 * torch.cos(2 * math.pi * 3 * (xx * math.cos(theta) + yy * math.sin(theta))))
    templates = torch.stack(templates)  # [10, 28, 28]
    labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    scale = 0.6 + 0.4 * torch.rand(n, 1, 1, generator=g)
    noise = 0.1 * torch.randn(n, 28, 28, generator=g)
    x = (templates[labels] * scale + noise).clamp(0, 1)
    images = (x * 255).round().to(torch.uint8).unsqueeze(1).contiguous()
    return images, labels.to(torch.int64)


def _synthetic_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if "all" not in _SYNTHETIC_CACHE:
        _SYNTHETIC_CACHE["all"] = _synthetic_data()
    images, labels = _SYNTHETIC_CACHE["all"]
    n_train, n_val = SYNTHETIC_SIZES["train"], SYNTHETIC_SIZES["validation"]
    rows = {
        "train": slice(0, n_train),
        "validation": slice(n_train, n_train + n_val),
        "train-full": slice(0, n_train + n_val),
        "test": slice(n_train + n_val, None),
    }[split]
    return images[rows].clone(), labels[rows].clone()


# ---------------------------------------------------------------------------
# Data spaces


class DataSpace:
    """How uint8 images [B, C, H, W] become the float32 values in [0, 1] a model sees."""

    name: str = ""

    def train_batch(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Transform a training batch; random spaces draw fresh randomness each call."""
        return self._transform(self._check(x), generator)

    def eval_data(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Transform evaluation data deterministically: same seed -> identical tensor."""
        x = self._check(x)
        generator = torch.Generator(device=x.device).manual_seed(seed)
        return self._transform(x, generator)

    def log_prob_offset(self, num_dims: int) -> float:
        """Nats to add to a model's log-density to get a log-probability of the 8-bit data."""
        return 0.0

    def _transform(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise ElboxError(f"data space {self.name!r} expects a uint8 tensor of 8-bit images, got {got}")
        return x


DATA_SPACES: dict[str, type[DataSpace]] = {}


def _register(cls: type[DataSpace]) -> type[DataSpace]:
    DATA_SPACES[cls.name] = cls
    return cls


@_register
class BinarySpace(DataSpace):
    """Dynamic binarization: x ~ Bernoulli(k/255), a fresh draw per training batch."""

    name = "binary"

    def _transform(self, x, generator):
        # u uniform on {0..254}: P(u < k) = k/255 exactly, and integer draws are twice as fast as bernoulli()
        u = torch.randint(0, 255, x.shape, generator=generator, device=x.device, dtype=torch.uint8)
        return (u < x).float()


def _dequantize(k: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(k + u)/256, kept strictly below (k + 1)/256 despite float32 rounding of k + u."""
    v = torch.minimum(k + u, torch.nextafter(k + 1, k))
    return v / 256  # exact: division by a power of two


@_register
class ContinuousSpace(DataSpace):
    """Uniform dequantization: y = (k + u)/256 with u ~ U[0, 1)."""

    name = "continuous"

    def _transform(self, x, generator):
        u = torch.rand(x.shape, generator=generator, device=x.device)
        return _dequantize(x.float(), u)

    def log_prob_offset(self, num_dims: int) -> float:
        # Each bin has width 1/256: log P(k) = log E_u p(y) - D ln 256 >= E_u log p(y) - D ln 256 (Jensen).
        return -num_dims * math.log(256)


@_register
class DiscreteSpace(DataSpace):
    """8-bit data as is: x = k/255, no randomness."""

    name = "discrete"

    def _transform(self, x, generator):
        return x.float() / 255


def get_data_space(name: str) -> DataSpace:
    try:
        return DATA_SPACES[name]()
    except KeyError:
        raise ElboxError(f"unknown data space {name!r}; valid data spaces: {', '.join(DATA_SPACES)}") from None


# ---------------------------------------------------------------------------
# Batching


def iterate_batches(
    n: int,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Index tensors covering range(n) in batches; gather with x[idx].

    Arguments are checked at call time, not at the first next().
    """
    if batch_size <= 0:
        raise ElboxError(f"batch size must be positive, got {batch_size}")
    if n <= 0:
        raise ElboxError(f"empty dataset: cannot make batches from {n} examples")
    if drop_last and n < batch_size:
        raise ElboxError(f"no full batch: {n} examples is fewer than batch size {batch_size} with drop_last")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    end = n - n % batch_size if drop_last else n
    return (order[i : i + batch_size] for i in range(0, end, batch_size))

"""Datasets: what they are, where their files come from, downloads with checksums.

Datasets: "fashion-mnist" and "mnist" (28x28 grayscale, 10 classes, IDX files), "cifar-10"
(32x32 RGB, 10 classes, the binary version's .bin batch files; the Python version is never read,
so nothing is ever unpickled), plus "synthetic", a small deterministic dataset for tests and smoke runs
(generated here, no files).

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
apply to downloads) and always checked structurally (see elbox.data.splits and elbox.data.formats).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import logging
import math
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from elbox.core.errors import ElboxError

LOG = logging.getLogger(__name__)  # shown by elbox.core.log's handler

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
        LOG.info(f"downloading {url}")
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
# The synthetic dataset


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

"""Splits: loading a dataset's train, validation and test images as uint8 tensors (`load_split`).

Splits: "validation" is always the last 5000 images of the official training set.
                fashion-mnist, mnist             cifar-10
  "train"       first 55000 of the training set  first 45000 of the training set
  "validation"  last 5000 of the training set    last 5000 of the training set
  "train-full"  all 60000                        all 50000 (data_batch_1..5 in order)
  "test"        the official 10000 test images   the official 10000 (test_batch)
For "synthetic": 1000 train, 200 validation, 200 test ("train-full" = train + validation).

Each part of a dataset (the official training or test set) is read once per directory, checked against
the payload SHA-256 where the spec knows one and structurally, and kept read-only in memory
(`clear_cache` forgets it); `load_split` returns fresh copies.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from elbox.core.errors import ElboxError
from elbox.data import dataset_files  # readers looked up at call time, so a patch of the module sees every read
from elbox.data.sources import (
    CIFAR_BINARY,
    IDX,
    SYNTHETIC,
    SYNTHETIC_SIZES,
    DatasetSpec,
    _locate,
    _part_files,
    _part_size,
    _synthetic_data,
    find_dataset_dir,
    get_dataset_spec,
)

SPLITS = ("train", "validation", "train-full", "test")

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
        data = dataset_files.read_file_bytes(path)
        _verify_payload(path, data, spec, file_name)
        arrays.append(dataset_files.parse_idx(data, path))
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
        data = dataset_files.read_bytes(path, "CIFAR batch file")
        _verify_payload(path, data, spec, file_name)
        batches.append(dataset_files.parse_cifar_batch(data, path, spec.image_shape, per_file))
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


def load_split(
    name: str, split: str, root: str | os.PathLike | None = None, validation_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 [N, C, H, W] (contiguous, a fresh copy) and labels as int64 [N].

    C, H, W = 1, 28, 28 for the IDX datasets and "synthetic", 3, 32, 32 for "cifar-10". validation_size: how many of
    the official training images, the last ones, form the validation split (default: the dataset's 5000; e.g. 10000
    for the 50,000 / 10,000 split of the VampPrior and Exemplar VAE papers); "train" is the rest.
    """
    _check_split(split)
    if name == SYNTHETIC:
        return _synthetic_split(split)
    spec = get_dataset_spec(name)
    size = spec.validation_size if validation_size is None else validation_size
    if not 0 < size < spec.train_size:
        raise ElboxError(f"validation_size must be between 1 and {spec.train_size - 1} for {name}, got {size}")
    directory = find_dataset_dir(name, root)
    part = "test" if split == "test" else "train"
    images, labels = _load_part(spec, directory, part)
    first_validation = spec.train_size - size
    rows = {
        "train": slice(0, first_validation),
        "validation": slice(first_validation, spec.train_size),
    }.get(split, slice(None))
    x = torch.from_numpy(images[rows].copy(order="C"))  # CIFAR images are strided views
    y = torch.from_numpy(labels[rows].astype(np.int64))
    return x, y


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

"""Data given by a built-in dataset's name or in memory (a tensor, a NumPy array or a torch Dataset of 8-bit
images), as the training and validation images of a run and the "data" record its config.json keeps."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from elbox.data.formats import image_shape, to_8bit_tensor
from elbox.data.sources import dataset_names
from elbox.data.splits import load_split
from elbox.data.user import open_source
from elbox.data.user_tables import Table
from elbox.errors import ElboxError

BUILTIN_VALIDATION = "last 5000 of the official training set"
HELD_OUT_FRACTION = 0.1
Images = Tensor | Dataset


def as_examples(data: Any, what: str) -> Tensor:
    """Examples in memory from a tensor, a NumPy array or a Dataset (of examples, or of (example, label) pairs):
    vectors [N, D] of real numbers as float32; otherwise 8-bit images as uint8 [N, C, H, W] (integers 0..255 or
    floats in [0, 1] on the grid k/255; [N, H, W], [N, C, H, W] or [N, H, W, C])."""
    if isinstance(data, Dataset):
        items = [data[i] for i in range(len(data))]
        items = [item[0] if isinstance(item, (tuple, list)) else item for item in items]
        if not items:
            raise ElboxError(f"{what} is an empty Dataset")
        data = np.stack([item.cpu().numpy() if isinstance(item, Tensor) else np.asarray(item) for item in items])
    if isinstance(data, Tensor):
        data = data.detach().cpu().numpy()
    if not isinstance(data, np.ndarray):
        raise ElboxError(f"{what}: give a built-in dataset name, a path, a tensor, a NumPy array or a torch Dataset, "
                         f"got {type(data).__name__}")
    if data.ndim == 2:
        if data.dtype.kind not in "uif" or data.shape[0] == 0:
            raise ElboxError(f"{what}: vectors must be a non-empty array of real numbers, got {data.dtype} {data.shape}")
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    return to_8bit_tensor(data, image_shape(data.shape, what), what)


def is_builtin(data: Any) -> bool:
    return isinstance(data, str) and data in dataset_names()


def is_path(data: Any) -> bool:
    return isinstance(data, (str, os.PathLike)) and not is_builtin(data)


def held_out(examples: Images, fraction: float, seed: int) -> tuple[Images, Images, int]:
    """(the rest, a random held-out fraction, its size): a seeded permutation; Subsets for a Dataset."""
    n = len(examples)
    if n < 2:
        raise ElboxError(f"the data have {n} example(s); at least 2 are needed to hold some out for validation")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(n - 1, max(1, round(fraction * n)))
    if isinstance(examples, Tensor):
        return examples[order[n_val:]], examples[order[:n_val]], n_val
    return Subset(examples, order[n_val:].tolist()), Subset(examples, order[:n_val].tolist()), n_val


def first(examples: Images, n: int | None) -> Images:
    if not n:
        return examples
    return examples[:n] if isinstance(examples, Tensor) else Subset(examples, range(min(n, len(examples))))


def training_data(data: Any, validation: Any = None, data_dir: str | None = None, limit_train: int | None = None,
                  seed: int = 0, validation_fraction: float = HELD_OUT_FRACTION, image_size: Any = None,
                  columns: list[str] | None = None) -> tuple[Images, Images, dict]:
    """(training data, validation data, the "data" record of config.json). data: a built-in dataset's name (its
    own validation split); a path (a folder of images, an .npy/.npz array, a .csv/.parquet table: read on demand,
    elbox.data.user); or images given in memory. For paths and images in memory, `validation` gives the validation
    data in the same form, else a seeded random `validation_fraction` is held out (recorded)."""
    if is_builtin(data):
        if validation is not None:
            raise ElboxError(f"the built-in dataset {data} has its own validation split; give a validation set only "
                             "with your own data")
        train, _ = load_split(data, "train", data_dir)
        val, _ = load_split(data, "validation", data_dir)
        record = {"name": data, "data_dir": data_dir, "validation": BUILTIN_VALIDATION, "limit_train": limit_train}
        return first(train, limit_train), val, record
    if is_path(data):
        examples = open_source(data, image_size=image_size, columns=columns)
        record = {"path": str(Path(data).resolve()), "kind": examples.kind, "image_size": image_size, "columns": columns}
        if isinstance(examples, Table):  # new tables are read by these names (elbox.data.preprocessing)
            record["column_names"] = list(examples.names)
    else:
        examples = as_examples(data, "data")
        record = {"source": "images given in memory"}
    if validation is None:
        given = None
    elif is_path(validation):
        given = open_source(validation, image_size=image_size, columns=record.get("column_names", columns))
    else:
        given = as_examples(validation, "validation data")
    if given is not None:
        record["validation"] = str(Path(validation).resolve()) if is_path(validation) else "images given in memory"
        val = given
    else:
        examples, val, n_val = held_out(examples, validation_fraction, seed)
        record["validation"] = f"{n_val} examples held out at random (fraction {validation_fraction}, seed {seed})"
        record["validation_fraction"] = validation_fraction
    record["limit_train"] = limit_train
    return first(examples, limit_train), val, record


def run_data(record: dict, seed: int) -> tuple[Images, Images, dict]:
    """A run's training and validation data again, from the "data" record of its config.json (a built-in dataset or
    paths, with the same held-out examples for the same seed)."""
    if "name" in record:
        return training_data(record["name"], None, record.get("data_dir"), record.get("limit_train"), seed)
    if "path" in record:
        validation = None if "validation_fraction" in record else record.get("validation")
        return training_data(record["path"], validation, None, record.get("limit_train"), seed,
                             record.get("validation_fraction", HELD_OUT_FRACTION), record.get("image_size"), record.get("columns"))
    raise ElboxError("this run was trained on data given in memory; give them again (from Python)")

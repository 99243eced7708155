"""Data given by a built-in dataset's name or in memory (a tensor, a NumPy array or a torch Dataset of 8-bit
images), as the training and validation images of a run and the "data" record its config.json keeps."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, Subset

from elbox.core.errors import ElboxError
from elbox.data.formats import image_shape, to_8bit_tensor
from elbox.data.sources import dataset_names
from elbox.data.splits import load_split
from elbox.data.user import open_source
from elbox.data.user_images import item_index, one_line
from elbox.data.user_tables import Table

BUILTIN_VALIDATION = "last 5000 of the official training set"
HELD_OUT_FRACTION = 0.1
Images = Tensor | Dataset


def as_examples(data: Any, what: str) -> Tensor:
    """Examples in memory from a tensor, a NumPy array or a map-style Dataset (of examples, or of (example, label)
    pairs): vectors [N, D] of real numbers as float64 (float32 ones as they are: standardizing them in float64 keeps
    a column's small spread around a large mean, elbox.data.spaces.RealSpace); otherwise 8-bit images as uint8
    [N, C, H, W] (integers 0..255 or floats in [0, 1] on the grid k/255; [N, H, W], [N, C, H, W] or [N, H, W, C]).
    A CPU tensor or a writable C-contiguous array already in that form is used as it is, not copied."""
    if isinstance(data, ExampleRows):
        return data.gathered()
    if isinstance(data, Dataset):
        data = dataset_array(data, what)
    if isinstance(data, Tensor):
        data = tensor_array(data, what)
    if not isinstance(data, np.ndarray):
        raise ElboxError(
            f"{what}: give a built-in dataset name, a path, a tensor, a NumPy array or a torch Dataset, "
            f"got {type(data).__name__}"
        )
    if data.ndim == 2:
        return vector_tensor(data, what)
    return to_8bit_tensor(data, image_shape(data.shape, what), what)


def vector_tensor(data: np.ndarray, what: str) -> Tensor:
    """Vectors [N, D] as a float64 tensor (float32 ones as float32), sharing `data`'s memory where it can."""
    if data.dtype.kind not in "uif" or 0 in data.shape:
        raise ElboxError(f"{what}: vectors must be a non-empty array of real numbers, got {data.dtype} {data.shape}")
    dtype = data.dtype if data.dtype in (np.float32, np.float64) else np.float64
    vectors = np.ascontiguousarray(data, dtype=dtype)  # a copy only where the dtype or the layout differ
    return torch.from_numpy(vectors if vectors.flags.writeable else vectors.copy())


def tensor_array(data: Tensor, what: str) -> np.ndarray:
    """A tensor's values as a NumPy array (sharing a CPU tensor's memory)."""
    if data.is_meta:
        raise ElboxError(
            f"{what} is a tensor on the meta device, of shape {tuple(data.shape)}: it has no values; give "
            "a tensor that holds the data"
        )
    try:
        return data.detach().cpu().numpy()
    except (TypeError, RuntimeError) as e:
        raise ElboxError(
            f"{what}: a tensor of {data.dtype} ({data.layout}) cannot be read as data ({one_line(e)}); "
            "give a dense tensor of integers or floats"
        ) from None


def dataset_array(data: Dataset, what: str) -> np.ndarray:
    """A map-style Dataset's examples (items, or the first element of (example, label) items) stacked into one new
    array; ElboxError for items of differing shapes or dtypes, and for a length (__len__) that is not the Dataset's:
    an IndexError before it, or an item at it."""
    try:
        n = None if isinstance(data, IterableDataset) else len(data)
    except TypeError:  # no __len__
        n = None
    if n is None:
        raise ElboxError(
            f"{what} is a {type(data).__name__} without a length or indexed items; give a map-style "
            "Dataset (__len__ and __getitem__), a tensor or an array"
        )
    if n == 0:
        raise ElboxError(f"{what} is an empty Dataset")
    out = None
    for i in range(n):
        item = dataset_item(data, i, n, what)
        if out is None:
            out = np.empty((n, *item.shape), item.dtype)
        elif item.shape != out.shape[1:] or item.dtype != out.dtype:
            raise ElboxError(
                f"{what}: Dataset item {i} has shape {tuple(item.shape)} and dtype {item.dtype}, item 0 "
                f"{tuple(out.shape[1:])} and {out.dtype}; all examples must have one shape and dtype"
            )
        out[i] = item
    try:
        data[n]
    except Exception:  # any failure at index n is the end the length promised
        return out
    raise ElboxError(
        f"{what}: the Dataset says it has {n} items (__len__), but item {n} exists too; make __len__ count every item"
    )


def dataset_item(data: Dataset, i: int, n: int, what: str) -> np.ndarray:
    """Item i of a Dataset of n items as an array: its example, from a tensor, an array or an (example, label) pair."""
    try:
        item = data[i]
    except IndexError as e:
        raise ElboxError(
            f"{what}: the Dataset says it has {n} items (__len__), but item {i} raised IndexError ({one_line(e)})"
        ) from None
    item = item[0] if isinstance(item, (tuple, list)) else item
    if isinstance(item, Tensor):
        return tensor_array(item, f"{what} (item {i})")
    try:
        array = np.asarray(item)
    except (TypeError, ValueError) as e:
        raise ElboxError(
            f"{what}: Dataset item {i} is a {type(item).__name__}, not an example ({one_line(e)})"
        ) from None
    if array.dtype.kind not in "uifb":
        raise ElboxError(
            f"{what}: Dataset item {i} is a {type(item).__name__} of dtype {array.dtype}; give tensors or "
            "arrays of numbers"
        )
    return array


class ExampleRows(Dataset):
    """The rows `indices` of examples held in memory [N, ...], read by index: a held-out split that copies none of
    the examples. Attributes: examples, indices, shape (one example's)."""

    def __init__(self, examples: Tensor, indices: Tensor):
        self.examples, self.indices = examples, indices
        self.shape = tuple(examples.shape[1:])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Tensor:
        return self.examples[self.indices[item_index(index, len(self))]]

    def __getitems__(self, indices: list[int]) -> list[Tensor]:
        """A batch's items in one gather (DataLoader asks for them so, instead of one __getitem__ each)."""
        return list(self.examples[self.indices[torch.as_tensor(indices, dtype=torch.long)]].unbind(0))

    def gathered(self) -> Tensor:
        """The rows as one new tensor."""
        return self.examples[self.indices]


def is_builtin(data: Any) -> bool:
    return isinstance(data, str) and data in dataset_names()


def is_path(data: Any) -> bool:
    return isinstance(data, (str, os.PathLike)) and not is_builtin(data)


def held_out(examples: Images, fraction: float, seed: int) -> tuple[Images, Images, int]:
    """(the rest, a random held-out fraction, its size): a seeded permutation, as index views (ExampleRows of a
    tensor, Subsets of a Dataset) that copy no examples. Fraction 0 holds none out: (the examples, all of them as
    the validation data, 0)."""
    n = len(examples)
    if fraction == 0:
        return examples, ExampleRows(examples, torch.arange(n)) if isinstance(examples, Tensor) else examples, 0
    if n < 2:
        raise ElboxError(f"the data have {n} example(s); at least 2 are needed to hold some out for validation")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(n - 1, max(1, round(fraction * n)))
    if isinstance(examples, Tensor):
        return ExampleRows(examples, order[n_val:]), ExampleRows(examples, order[:n_val]), n_val
    return Subset(examples, order[n_val:].tolist()), Subset(examples, order[:n_val].tolist()), n_val


def first(examples: Images, n: int | None) -> Images:
    if not n:
        return examples
    if isinstance(examples, Tensor):
        return examples[:n]
    if isinstance(examples, ExampleRows):
        return ExampleRows(examples.examples, examples.indices[:n])
    return Subset(examples, range(min(n, len(examples))))


@runtime_checkable
class ShapedDataset(Protocol):
    """A Dataset that knows the shape of its examples without reading one (elbox's folder, array and table readers)."""

    shape: tuple[int, ...]


def example_shape(examples: Images) -> tuple[int, ...]:
    """The shape of one example of a tensor or a Dataset (its `shape`, else its first item's)."""
    if isinstance(examples, Tensor):
        return tuple(examples.shape[1:])
    if isinstance(examples, ShapedDataset):
        return tuple(examples.shape)
    return tuple(as_examples(Subset(examples, [0]), "data").shape[1:])


def check_same_shape(train: Images, val: Images, data: Any, validation: Any) -> None:
    """ElboxError unless the validation examples have the training examples' shape."""
    train_shape, val_shape = example_shape(train), example_shape(val)
    if train_shape != val_shape:
        names = [f" {x}" if is_path(x) else " (given in memory)" for x in (validation, data)]
        raise ElboxError(
            f"the validation data{names[0]} have examples of shape {val_shape}, the training "
            f"data{names[1]} {train_shape}; give validation data of the training data's shape"
        )


def training_data(
    data: Any,
    validation: Any = None,
    data_dir: str | None = None,
    limit_train: int | None = None,
    seed: int = 0,
    validation_fraction: float = HELD_OUT_FRACTION,
    image_size: Any = None,
    columns: list[str] | None = None,
    validation_size: int | None = None,
) -> tuple[Images, Images, dict]:
    """(training data, validation data, the "data" record of config.json). data: a built-in dataset's name (its
    own validation split); a path (a folder of images, an .npy/.npz array, a .csv/.parquet table: read on demand,
    elbox.data.user); or images given in memory. For paths and images in memory, `validation` gives the validation
    data in the same form (of the same shape: checked here, before any training), else a seeded random
    `validation_fraction` is held out (recorded); fraction 0 holds none out, and the training data serve as the
    validation data (recorded as such)."""
    if is_builtin(data):
        if validation is not None:
            raise ElboxError(
                f"the built-in dataset {data} has its own validation split; give a validation set only "
                "with your own data"
            )
        train, _ = load_split(data, "train", data_dir, validation_size)
        val, _ = load_split(data, "validation", data_dir, validation_size)
        described = BUILTIN_VALIDATION if validation_size is None else BUILTIN_VALIDATION.replace("5000", str(len(val)))
        record = {
            "name": data,
            "data_dir": data_dir,
            "validation": described,
            "limit_train": limit_train,
            **({"validation_size": validation_size} if validation_size is not None else {}),
        }
        return first(train, limit_train), val, record
    if is_path(data):
        examples = open_source(data, image_size=image_size, columns=columns)
        record = {
            "path": str(Path(data).resolve()),
            "kind": examples.kind,
            "image_size": image_size,
            "columns": columns,
        }
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
        check_same_shape(examples, given, data, validation)
        record["validation"] = str(Path(validation).resolve()) if is_path(validation) else "images given in memory"
        val = given
    else:
        examples, val, n_val = held_out(examples, validation_fraction, seed)
        record["validation"] = (
            f"{n_val} examples held out at random (fraction {validation_fraction}, seed {seed})"
            if n_val
            else "none (fraction 0): the training data"
        )
        record["validation_fraction"] = validation_fraction
        val = val if n_val else first(val, limit_train)  # the training data: as many as are trained on
    record["limit_train"] = limit_train
    return first(examples, limit_train), val, record


def run_data(record: dict, seed: int) -> tuple[Images, Images, dict]:
    """A run's training and validation data again, from the "data" record of its config.json (a built-in dataset or
    paths, with the same held-out examples for the same seed)."""
    if "name" in record:
        return training_data(
            record["name"],
            None,
            record.get("data_dir"),
            record.get("limit_train"),
            seed,
            validation_size=record.get("validation_size"),
        )
    if "path" in record:
        validation = None if "validation_fraction" in record else record.get("validation")
        return training_data(
            record["path"],
            validation,
            None,
            record.get("limit_train"),
            seed,
            record.get("validation_fraction", HELD_OUT_FRACTION),
            record.get("image_size"),
            record.get("columns"),
        )
    raise ElboxError("this run was trained on data given in memory; give them again (from Python)")

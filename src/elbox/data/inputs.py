"""Data given by a built-in dataset's name or in memory (a tensor, a NumPy array or a torch Dataset of 8-bit
images), as the training and validation images of a run and the "data" record its config.json keeps."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from elbox.data.formats import to_8bit_tensor
from elbox.data.splits import load_split
from elbox.errors import ElboxError
from elbox.options import short_repr

BUILTIN_VALIDATION = "last 5000 of the official training set"
HELD_OUT_FRACTION = 0.1


def image_shape(shape: tuple[int, ...], what: str) -> tuple[int, int, int]:
    """(C, H, W) of one image in an array of images [N, H, W], [N, C, H, W] or [N, H, W, C] (C = 1 or 3)."""
    if len(shape) == 3:
        return (1, *shape[1:])
    if len(shape) == 4 and shape[1] in (1, 3):
        return tuple(shape[1:])
    if len(shape) == 4 and shape[3] in (1, 3):
        return (shape[3], shape[1], shape[2])
    raise ElboxError(f"{what} has shape {short_repr(tuple(shape))}; give images as [N, H, W], [N, C, H, W] or "
                     "[N, H, W, C] with 1 or 3 channels")


def as_images(data: Any, what: str) -> Tensor:
    """8-bit images uint8 [N, C, H, W] from a tensor, a NumPy array or a Dataset (of images, or of (image, label)
    pairs): integers 0..255 or floats in [0, 1] on the 8-bit grid k/255."""
    if isinstance(data, Dataset):
        items = [data[i] for i in range(len(data))]
        items = [item[0] if isinstance(item, (tuple, list)) else item for item in items]
        if not items:
            raise ElboxError(f"{what} is an empty Dataset")
        data = np.stack([item.cpu().numpy() if isinstance(item, Tensor) else np.asarray(item) for item in items])
    if isinstance(data, Tensor):
        data = data.detach().cpu().numpy()
    if not isinstance(data, np.ndarray):
        raise ElboxError(f"{what}: give a built-in dataset name, a tensor, a NumPy array or a torch Dataset, "
                         f"got {type(data).__name__}")
    return to_8bit_tensor(data, image_shape(data.shape, what), what)


def training_data(data: Any, validation: Any, data_dir: str | None, limit_train: int | None,
                  seed: int) -> tuple[Tensor, Tensor, dict]:
    """(training images, validation images, the "data" record of config.json) for a built-in dataset name, or
    for images given in memory with a validation set given or held out at random (seeded, recorded)."""
    if isinstance(data, str):
        if validation is not None:
            raise ElboxError(f"the built-in dataset {data} has its own validation split; give `validation` only with "
                             "images given in memory")
        train, _ = load_split(data, "train", data_dir)
        val, _ = load_split(data, "validation", data_dir)
        record = {"name": data, "data_dir": data_dir, "validation": BUILTIN_VALIDATION, "limit_train": limit_train}
        return (train[:limit_train] if limit_train else train), val, record
    images = as_images(data, "data")
    if validation is not None:
        val = as_images(validation, "validation data")
        record = {"source": "images given in memory", "validation": "images given in memory"}
    else:
        if images.shape[0] < 2:
            raise ElboxError(f"data has {images.shape[0]} image(s); at least 2 are needed to hold one out for validation")
        order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
        n_val = max(1, round(HELD_OUT_FRACTION * images.shape[0]))
        images, val = images[order[n_val:]], images[order[:n_val]]
        record = {"source": "images given in memory",
                  "validation": f"{n_val} images held out at random (fraction {HELD_OUT_FRACTION}, seed {seed})"}
    if limit_train:
        images = images[:limit_train]
    record["limit_train"] = limit_train
    return images, val, record

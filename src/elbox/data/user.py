"""Users' own data, by path, as a map-style torch Dataset that reads on demand: `open_source`.

  a folder                  ImageFolder (elbox.data.user_images): every image file under it, decoded per item
  FILE.png, .jpg, ...       ImageFolder of that one image (IMAGE_SUFFIXES)
  FILE.npy, FILE.npz        ImageArray for images [N, H, W], [N, C, H, W], [N, H, W, C]; VectorArray for (N, D)
                            (elbox.data.user_arrays), memory-mapped where stored uncompressed
  FILE.csv, .tsv, .parquet  Table (elbox.data.user_tables): numeric columns as vectors, loaded whole

Every dataset has `kind` ("images": items uint8 [C, H, W]; "vectors": items float32 [D]), `shape` (one item's) and
`path`. Bad input (a missing path, an empty folder, an unreadable image, a wrong rank, NaN, ...) is one ElboxError
naming the input and the problem.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from elbox.core.errors import ElboxError
from elbox.core.options import did_you_mean, short_repr
from elbox.data.formats import open_array
from elbox.data.user_arrays import ImageArray, VectorArray
from elbox.data.user_images import ImageFolder, is_image_file, parse_image_size
from elbox.data.user_tables import TABLE_SUFFIXES, Table

ARRAY_SUFFIXES = (".npy", ".npz")


def open_source(
    path: str | os.PathLike,
    image_size: int | tuple[int, int] | None = None,
    columns: list[str] | None = None,
    id_column: str | None = None,
) -> Dataset:
    """The dataset at `path`, its reader picked by what the path is (see the module's docstring).

    `image_size` (an int S for S x S, or (H, W)) resizes and center-crops a folder's images; an array's images
    must already have that size. `columns` picks a table's columns; `id_column` names a table column whose values
    name the rows (it is not modelled).
    """
    path = Path(path)
    if not path.exists():
        from elbox.data.sources import dataset_names

        builtin = did_you_mean(str(path), dataset_names()) if path.parent == Path() else ""
        raise ElboxError(f"data {path} does not exist" + (f"; {builtin}(a built-in dataset)" if builtin else ""))
    name = path.name.lower()
    if id_column is not None and not name.endswith(TABLE_SUFFIXES):
        raise ElboxError(f"data {path} is not a table; an ID column names the rows of a table (.csv, .tsv, .parquet)")
    if path.is_dir() or is_image_file(path):
        _refuse_columns(columns, path, "a folder of images" if path.is_dir() else "an image")
        return ImageFolder(path, image_size)
    if name.endswith(ARRAY_SUFFIXES):
        _refuse_columns(columns, path, "an array")
        array = open_array(path)
        if array.ndim == 2:
            if image_size is not None:
                raise ElboxError(f"data {path} holds vectors (N, D); an image size applies to images only")
            return VectorArray(path, array=array)
        if array.ndim not in (3, 4):
            raise ElboxError(
                f"data {path} has rank {array.ndim}, shape {short_repr(array.shape)}; give vectors "
                "(N, D) or images [N, H, W], [N, C, H, W] or [N, H, W, C]"
            )
        images = ImageArray(path, array=array)
        size = parse_image_size(image_size)
        if size is not None and size != images.shape[1:]:
            raise ElboxError(
                f"data {path} holds images of {images.shape[1]}x{images.shape[2]}, not the image size "
                f"{size[0]}x{size[1]}; only folders of image files are resized: resize the array first"
            )
        return images
    if name.endswith(TABLE_SUFFIXES):
        if image_size is not None:
            raise ElboxError(f"data {path} is a table; an image size applies to images only")
        return Table(path, columns, id_column)
    suffix = "".join(path.suffixes[-2:]) or "(none)"
    raise ElboxError(
        f"data {path}: unsupported file type {suffix}; give a folder of images, an image file "
        "(.png, .jpg, ...), a .npy or .npz array, or a .csv, .tsv or .parquet table"
    )


def _refuse_columns(columns: Any, path: Path, what: str) -> None:
    if columns is not None:
        raise ElboxError(f"data {path} is {what}; columns pick the columns of a table (.csv, .tsv, .parquet)")


def read_images(path: str | Path, image_size: Any = None) -> tuple[np.ndarray, list[str]]:
    """The images in `path` as an array (not yet checked) and a name for each (relative file path or index):
    a .npy/.npz file (memory-mapped where it can be), a folder of images or one image file, read as `ImageFolder`
    reads them (resized and center-cropped to image_size, as a run trained on a folder does)."""
    path = Path(path)
    if path.is_dir() or is_image_file(path):
        folder = ImageFolder(path, image_size)
        return np.stack([folder[i].numpy() for i in range(len(folder))]), list(folder.names)
    if not path.exists():
        raise ElboxError(f"input {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise ElboxError(
            f"input {path}: unsupported file type {suffix or '(none)'}; give a .npy or .npz file, a folder "
            "of images or an image file (.png, .jpg, ...)"
        )
    array = open_array(path)
    return array, [str(i) for i in range(len(array))] if array.ndim > 0 else []

"""Users' .npy / .npz arrays of images or of vectors as torch Datasets that read each item from disk when it is
asked for (through a memory map where the array is stored uncompressed; see elbox.data.formats.open_array).

Opening checks the header (dtype, rank, declared size against the file) and then the values, one chunk at a time so
that memory stays small: NaN, infinite and out-of-range values are refused by their index. uint8 images need no
value pass; other dtypes cost one read of the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from elbox.core.errors import ElboxError
from elbox.core.options import short_repr
from elbox.data.formats import (
    as_uint8,
    check_8bit_values,
    first_true,
    image_shape,
    open_array,
    row_chunks,
)
from elbox.data.user_images import item_index

_FLOAT32_MAX = float(np.finfo(np.float32).max)


class _ArrayDataset(Dataset):
    """An array opened from `path` (memory-mapped where it can be), kept picklable for DataLoader workers: a memory
    map is reopened in the worker, never copied into the pickle."""

    _fd: int | None = None  # the file descriptor a worker reads rows through (read_rows), once opened

    def __init__(self, path: str | os.PathLike, key: str | None, array: np.ndarray | None, what: str):
        self.path, self.key, self._fd = Path(path), key, None
        self.array = open_array(self.path, key) if array is None else array
        self._what = f"{what} {self.path}" + (f" (array {key!r})" if key is not None else "")
        if self.array.dtype.kind not in "uifb":
            raise ElboxError(f"{self._what} has dtype {short_repr(str(self.array.dtype))}; give real numbers")

    def __len__(self) -> int:
        return len(self.array)

    def rows(self, indices: list[int]) -> np.ndarray:
        """The rows at `indices` (negative ones count from the end; IndexError outside), in one read. From a
        memory-mapped file each row is read with pread into a new array: reading through the mapping would leave
        every page it touched resident in this process (an epoch over a 3 GB file: 3 GB of RSS)."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if not isinstance(self.array, np.memmap) or not self.array.flags.c_contiguous:
            return self.array[index]
        n = len(self.array)
        if ((index < -n) | (index >= n)).any():
            raise IndexError(f"row index out of range for {n} rows")
        index = np.where(index < 0, index + n, index)
        out = np.empty((len(index), *self.array.shape[1:]), dtype=self.array.dtype)
        row_bytes = out[0].nbytes if len(out) else 0
        flat = out.reshape(len(index), -1).view(np.uint8)
        if self._fd is None:
            self._fd = os.open(self.array.filename, os.O_RDONLY)
        for j, i in enumerate(index.tolist()):
            if os.preadv(self._fd, [flat[j]], self.array.offset + i * row_bytes) != row_bytes:
                raise ElboxError(f"{self._what}: the file is shorter than its header says (row {i})")
        return out

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"] = None  # each process opens its own
        if isinstance(self.array, np.memmap):
            state["array"] = None
        return state

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.array is None:
            self.array = open_array(self.path, self.key)


class ImageArray(_ArrayDataset):
    """8-bit images from a .npy or .npz file: [N, H, W], [N, C, H, W] or [N, H, W, C] with C = 1 or 3, integers
    0..255 or floats in [0, 1] on the 8-bit grid k/255. Item i is a uint8 tensor [C, H, W].

    In an .npz, `key` names the array (else the only one, or the one named "x" or "images"). `array` is the array
    already opened from `path` (open_source passes it). Attributes: path, array (an np.memmap where the file is
    mapped), shape (C, H, W), kind "images".
    """

    kind = "images"

    def __init__(self, path: str | os.PathLike, key: str | None = None, *, array: np.ndarray | None = None):
        super().__init__(path, key, array, "image array")
        shape = self.array.shape
        if self.array.ndim not in (3, 4):
            hint = " (an (N, D) array is read as vectors)" if self.array.ndim == 2 else ""
            raise ElboxError(
                f"{self._what} has rank {self.array.ndim}, shape {short_repr(shape)}; give images as "
                f"[N, H, W], [N, C, H, W] or [N, H, W, C] with C = 1 or 3{hint}"
            )
        self.shape = image_shape(shape, self._what)
        if shape[0] == 0 or 0 in self.shape:
            raise ElboxError(f"{self._what} is empty: shape {short_repr(shape)}")
        self._channels_last = self.array.ndim == 4 and shape[1:] != self.shape
        check_8bit_values(self.array, self._what)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__([item_index(index, len(self))])[0]  # read as rows are: not through the map

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        """A batch's items in one read (DataLoader asks for them so, instead of one __getitem__ each)."""
        rows = self.rows(indices)
        rows = np.moveaxis(rows, -1, 1) if self._channels_last else rows.reshape(-1, *self.shape)
        return list(torch.from_numpy(as_uint8(rows)).unbind(0))


def check_real_values(array: np.ndarray, what: str, columns: list[str] | None = None) -> None:
    """Finite values that fit float32 in a 2-D array, read chunk by chunk; else ElboxError naming the first bad
    row and column (by name where `columns` are given)."""
    if array.dtype.kind != "f":
        return  # integers and booleans are finite, and fit float32
    for start, chunk in row_chunks(array):
        finite = np.isfinite(chunk)
        for problem, bad in (
            ("a NaN or infinite value", ~finite),
            ("a value too large for float32", finite & (np.abs(chunk) > _FLOAT32_MAX)),
        ):
            if bad.any():
                local, (row, col) = first_true(bad, start)
                name = repr(columns[col]) if columns else str(col)
                raise ElboxError(
                    f"{what} has {problem} ({chunk[local]:.6g}) at row {row}, column {name}; give finite numbers"
                )


class VectorArray(_ArrayDataset):
    """Vectors of real numbers from a .npy or .npz file of shape (N, D): item i is a float64 tensor [D], so that the
    standardization (elbox.data.spaces.RealSpace, in float64) sees the values as stored: cast to float32 first, a
    column whose spread is small next to its magnitude would be quantized (timestamps near 1.7e9 spanning an hour:
    float32's spacing there is 128 s, so some 28 levels).

    NaN, infinite values and values too large for float32 are refused by row and column. In an .npz, `key` names
    the array. Attributes: path, array, shape (D,), names (the column numbers as strings), kind "vectors".
    """

    kind = "vectors"

    def __init__(self, path: str | os.PathLike, key: str | None = None, *, array: np.ndarray | None = None):
        super().__init__(path, key, array, "vector array")
        shape = self.array.shape
        if self.array.ndim != 2:
            hint = (
                " (images are read as images: [N, H, W], [N, C, H, W] or [N, H, W, C])"
                if self.array.ndim in (3, 4)
                else ""
            )
            raise ElboxError(
                f"{self._what} has rank {self.array.ndim}, shape {short_repr(shape)}; give vectors as "
                f"an (N, D) array{hint}"
            )
        if 0 in shape:
            raise ElboxError(f"{self._what} is empty: shape {short_repr(shape)}")
        self.shape = (shape[1],)
        self.names = [str(j) for j in range(shape[1])]
        check_real_values(self.array, self._what)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__([item_index(index, len(self))])[0]  # read as rows are: not through the map

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        """A batch's items in one read (DataLoader asks for them so, instead of one __getitem__ each)."""
        return list(torch.from_numpy(np.array(self.rows(indices), dtype=np.float64)).unbind(0))

"""Reading users' files: .npy/.npz arrays and the images users give to `elbox score` (the built-in datasets' IDX and
CIFAR-10 files: elbox.data.dataset_files).

Users' arrays (`open_array`): .npy files and .npz archives, never unpickled, their headers checked against the
file before anything is allocated, memory-mapped where stored uncompressed. 8-bit values are checked chunk by
chunk (`check_8bit_values`), so that a large memory-mapped array is never read whole.

User input to `elbox score` (elbox.data.user.read_images), all holding 8-bit images:
  FILE.npy              one array
  FILE.npz              one array, or the array named "x" or "images"
  DIRECTORY             every image file under it, as elbox.data.user_images.ImageFolder reads them
  FILE.png, .jpg, ...   one image file, read the same way
Arrays may be integers 0..255, or floats in [0, 1] on the 8-bit grid k/255 (binary {0, 1} arrays included),
shaped [N, C, H, W], [N, H, W] (one channel) or [N, H, W, C] (channels last); `to_8bit_tensor` checks them
against a model's data shape. The images then go through the run's data space (binarized or dequantized with
randomness seeded from each image's own pixels and the given seed, or k/255: elbox.evaluation.inference).
"""

from __future__ import annotations

import math
import os
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from elbox.core.errors import ElboxError
from elbox.core.options import short_repr
from elbox.core.system import allocatable_bytes, format_bytes
from elbox.data.user_images import one_line

# ---------------------------------------------------------------------------
# Users' arrays (.npy, .npz) and images (`elbox score`)

NPZ_KEYS = ("x", "images")
CHUNK_ELEMENTS = 1 << 22  # values checked per step: a memory-mapped array is read once in pieces, never whole
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_NOT_AN_ARRAY = "is corrupt, truncated or not a plain numeric array (pickled objects are never loaded)"
# what numpy's header parser and zipfile raise on broken bytes
_ARRAY_ERRORS = (
    ValueError,
    OSError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    KeyError,
    RuntimeError,
    NotImplementedError,
    struct.error,
    SyntaxError,
    TypeError,
    OverflowError,
    tokenize.TokenError,
)


def open_array(path: str | os.PathLike, key: str | None = None) -> np.ndarray:
    """The array of a .npy file or .npz archive (told apart by their magic bytes, not by name), never unpickled.

    Memory-mapped (an np.memmap, read on demand) from a .npy file or an uncompressed .npz member (np.savez); a
    compressed member (np.savez_compressed) is read whole, after checking that it fits, with the float32 copy the
    data space makes of it, in what this process can allocate (free memory, an address-space limit). The header's
    shape and dtype are checked against the bytes the file holds before anything is mapped or allocated. In an
    .npz, `key` names the array; without it, the only array or the one named "x" or "images"."""
    path = Path(path)
    if not path.is_file():
        raise ElboxError(f"input {path} " + ("is not a file" if path.exists() else "does not exist"))
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_NPY_MAGIC))
            if magic == _NPY_MAGIC:
                f.seek(0)
                shape, fortran, dtype, header = _read_npy_header(f, f"input {path}")
                _check_size(shape, dtype, path.stat().st_size - header, f"input {path}")
                return _map(path, shape, fortran, dtype, header)
        if magic.startswith(_ZIP_MAGIC):
            return _open_npz(path, key)
    except ElboxError:
        raise
    except _ARRAY_ERRORS as e:
        raise ElboxError(f"input {path} {_NOT_AN_ARRAY}: {one_line(e)}") from None
    raise ElboxError(f"input {path} {_NOT_AN_ARRAY}: it is neither a .npy file nor a .npz archive")


def _read_npy_header(f, what: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, Fortran order, dtype, header length in bytes) of the .npy stream `f`, read from its start."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ElboxError(f"{what} is a .npy file of version {version}; versions 1.0 and 2.0 are read")
    if dtype.hasobject:
        raise ElboxError(
            f"{what} holds pickled Python objects (dtype {short_repr(str(dtype))}); pickled objects are never loaded"
        )
    if any(d < 0 for d in shape):
        raise ElboxError(f"{what} {_NOT_AN_ARRAY}: negative dimension in shape {short_repr(shape)}")
    return tuple(shape), bool(fortran), dtype, f.tell()


def _check_size(shape: tuple[int, ...], dtype: np.dtype, available: int, what: str) -> None:
    need = math.prod(shape) * dtype.itemsize
    if need > available:
        raise ElboxError(
            f"{what} is truncated: its header declares shape {short_repr(shape)} of {dtype} "
            f"({format_bytes(need)}) but the file holds {format_bytes(max(available, 0))} of data"
        )


def _refuse_extra(extra: int, shape: tuple[int, ...], what: str) -> None:
    if extra > 0:
        raise ElboxError(
            f"{what} holds more bytes than its header's shape {short_repr(shape)} declares; refused as "
            "corrupt or a decompression bomb"
        )


def _map(path: Path, shape: tuple[int, ...], fortran: bool, dtype: np.dtype, offset: int) -> np.ndarray:
    if math.prod(shape) == 0:
        return np.empty(shape, dtype)  # an empty file part cannot be mapped
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=offset)


def _open_npz(path: Path, key: str | None) -> np.ndarray:
    with zipfile.ZipFile(path) as archive:
        names = [n.removesuffix(".npy") for n in archive.namelist() if n.endswith(".npy")]
        info = archive.getinfo(_pick_npz_array(names, key, path) + ".npy")
        what = f"input {path} (array {info.filename.removesuffix('.npy')!r})"
        if info.flag_bits & 1:
            raise ElboxError(f"{what} is encrypted")
        with archive.open(info) as f:
            shape, fortran, dtype, header = _read_npy_header(f, what)
        _check_size(shape, dtype, info.file_size - header, what)
        _refuse_extra(info.file_size - header - math.prod(shape) * dtype.itemsize, shape, what)
        if info.compress_type == zipfile.ZIP_STORED:  # the member's bytes lie as they are in the file: map them
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)  # the member's local header: name and extra field lengths at bytes 26-29
            if len(local) < 30 or local[:4] != _ZIP_MAGIC:
                raise ElboxError(f"{what} {_NOT_AN_ARRAY}: bad local zip header")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            return _map(path, shape, fortran, dtype, info.header_offset + 30 + name_len + extra_len + header)
        _check_room(shape, dtype, what)
        with archive.open(info) as f:
            try:
                array = np.lib.format.read_array(f, allow_pickle=False)  # reads only the bytes the shape declares
            except MemoryError:
                raise ElboxError(
                    f"{what} is compressed and its {format_bytes(math.prod(shape) * dtype.itemsize)} "
                    f"do not fit in memory; {_STORE_UNCOMPRESSED}"
                ) from None
            _refuse_extra(len(f.read(1)), shape, what)  # one byte more means it expands beyond: stop there
            return array


_STORE_UNCOMPRESSED = "store it uncompressed (np.save, np.savez) to read it on demand"
FLOAT32_BYTES = 4  # each value's float32 copy, which the model's data space makes of the array read whole


def _check_room(shape: tuple[int, ...], dtype: np.dtype, what: str) -> None:
    """ElboxError unless a compressed member read whole fits in what this process can allocate: its decompressed
    bytes and the float32 copy that the data space makes of them later (4 bytes a value)."""
    count = math.prod(shape)
    stored, floats = count * dtype.itemsize, count * FLOAT32_BYTES
    room, limit = allocatable_bytes()
    if stored + floats > room:
        raise ElboxError(
            f"{what} is compressed and would take {format_bytes(stored + floats)} in memory "
            f"({format_bytes(stored)} decompressed, {format_bytes(floats)} as float32), more than the "
            f"{format_bytes(room)} of {limit}; {_STORE_UNCOMPRESSED}"
        )


def _pick_npz_array(names: list[str], key: str | None, path: Path) -> str:
    if key is not None:
        if key not in names:
            raise ElboxError(f"input {path} has no array named {short_repr(key)}; it holds {short_repr(names)}")
        return key
    if len(names) == 1:
        return names[0]
    for name in NPZ_KEYS:
        if name in names:
            return name
    if not names:
        raise ElboxError(f"input {path} holds no arrays")
    raise ElboxError(
        f"input {path} holds arrays {short_repr(names)}; pick one by key, or name the images (or "
        f"vectors) {' or '.join(repr(k) for k in NPZ_KEYS)}, or store one array"
    )


def row_chunks(array: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) in pieces of about CHUNK_ELEMENTS values, each read into memory."""
    step = max(1, CHUNK_ELEMENTS // max(1, math.prod(array.shape[1:])))
    for start in range(0, len(array), step):
        yield start, np.asarray(array[start : start + step])


def first_true(mask: np.ndarray, start: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(index in the chunk, index in the whole array) of the first True of a chunk's mask, in C order."""
    local = tuple(int(i) for i in np.unravel_index(int(mask.argmax()), mask.shape))
    return local, (start + local[0], *local[1:])


def _refuse_first(mask: np.ndarray, chunk: np.ndarray, start: int, what: str, problem: str) -> None:
    if mask.any():
        local, index = first_true(mask, start)
        raise ElboxError(f"{what} has the value {chunk[local]:.6g} at index {index}{problem}")


def check_8bit_values(array: np.ndarray, what: str) -> None:
    """Integers 0..255, or floats in [0, 1] on the 8-bit grid k/255; else ElboxError naming the first bad index.
    uint8 and bool arrays pass unread; others are read once, chunk by chunk."""
    if array.dtype.kind == "b" or array.dtype == np.uint8:
        return
    for start, chunk in row_chunks(array):
        if array.dtype.kind == "f":
            _refuse_first(~np.isfinite(chunk), chunk, start, what, "; give finite values (NaN or infinite found)")
            _refuse_first((chunk < 0) | (chunk > 1), chunk, start, what, "; floats must lie in [0, 1] (k/255)")
            scaled = chunk.astype(np.float64) * 255
            _refuse_first(
                np.abs(scaled - np.round(scaled)) > 1e-3,
                chunk,
                start,
                what,
                ", off the 8-bit grid k/255 of 8-bit images (round them to it: (x * 255).round() / 255)",
            )
        else:
            _refuse_first((chunk < 0) | (chunk > 255), chunk, start, what, "; 8-bit images need integers 0..255")


def as_uint8(array: np.ndarray) -> np.ndarray:
    """Checked 8-bit values (see check_8bit_values) as a new C-contiguous uint8 array: floats k/255 become k, and
    booleans, like floats 0 and 1, become 0 and 255."""
    if array.dtype.kind in "fb":
        return np.rint(array.astype(np.float64) * 255).astype(np.uint8, order="C")
    return array.astype(np.uint8, order="C")


def _uint8_shared(array: np.ndarray) -> np.ndarray:
    """`array` itself where it is already uint8, C-contiguous and writable (no copy of a large array given in
    memory), else as_uint8's new array (a read-only memory map included)."""
    if array.dtype == np.uint8 and array.flags.c_contiguous and array.flags.writeable:
        return array
    return as_uint8(array)


def image_shape(shape: tuple[int, ...], what: str) -> tuple[int, int, int]:
    """(C, H, W) of one image in an array of images [N, H, W], [N, C, H, W] or [N, H, W, C] (C = 1 or 3)."""
    if len(shape) == 3:
        return (1, *shape[1:])
    if len(shape) == 4 and shape[1] in (1, 3):
        return tuple(shape[1:])
    if len(shape) == 4 and shape[3] in (1, 3):
        return (shape[3], shape[1], shape[2])
    raise ElboxError(
        f"{what} has shape {short_repr(tuple(shape))}; give images as [N, H, W], [N, C, H, W] or "
        "[N, H, W, C] with 1 or 3 channels"
    )


def _layouts(c: int, h: int, w: int) -> dict[tuple[int, ...], str]:
    """One image's accepted array shapes for a model of images (c, h, w): shape -> layout ("chw", "hwc", "hw")."""
    shapes = {(c, h, w): "chw", (h, w, c): "hwc"}
    shapes.update({(1, h, w): "chw", (h, w, 1): "hwc", (h, w): "hw"} if c in (1, 3) else {})
    shapes.update({(3, h, w): "chw", (h, w, 3): "hwc"} if c == 1 else {})
    return shapes


def to_8bit_tensor(array: np.ndarray, data_shape: tuple[int, ...], what: str) -> torch.Tensor:
    """Check an array of images against the model's data shape and the 8-bit range; return uint8 [N, *data_shape].

    Images may be [N, C, H, W], [N, H, W, C] or (one channel) [N, H, W]; one image alone may drop the N. Grayscale
    images given to a 3-channel model are repeated over the channels (the same picture). RGB images given to a
    1-channel model are taken when their three channels are equal (grayscale stored as RGB) and refused otherwise:
    converting colors would score another image than the one given. uint8 images [N, C, H, W] or [N, H, W] already
    in the model's channels share the array's memory (if it is writable), not copied."""
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "uifb":
        kind = array.dtype if isinstance(array, (np.ndarray, torch.Tensor)) else type(array)
        raise ElboxError(f"{what} has dtype {kind}; give integers 0..255 or floats in [0, 1]")
    c, h, w = data_shape
    layouts = _layouts(c, h, w)
    if tuple(array.shape) in ((c, h, w), (h, w, c)) or (array.ndim == 2 and tuple(array.shape) in layouts):
        array = array[None]  # one image
    if array.ndim == 0 or array.shape[0] == 0:
        raise ElboxError(f"{what} is empty: no images to score")
    shape = tuple(array.shape[1:])
    if shape not in layouts:
        raise ElboxError(
            f"{what} has images of shape {short_repr(shape)}; the model takes {(c, h, w)}"
            + (f" or {(h, w)}" if c == 1 else f" or channels last {(h, w, c)}")
        )
    check_8bit_values(array, what)  # before the layout changes, so that the index named is the array's own
    array = {"hw": lambda a: a[:, None], "hwc": lambda a: np.moveaxis(a, -1, 1), "chw": lambda a: a}[layouts[shape]](
        array
    )
    images = torch.from_numpy(_uint8_shared(array))
    if images.shape[1] == 3 and c == 1:
        unequal = (images[:, 1:] != images[:, :1]).flatten(1).any(1)
        if unequal.any():
            raise ElboxError(
                f"{what} has RGB images (image {int(unequal.nonzero()[0])}: shape {short_repr(shape)}); "
                f"the model takes grayscale images {(c, h, w)}: convert them first (e.g. Pillow's "
                "Image.convert('L'))"
            )
        images = images[:, :1].contiguous()
    return images.expand(-1, c, -1, -1).contiguous() if images.shape[1] != c else images

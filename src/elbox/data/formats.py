"""Reading file formats: IDX files, CIFAR-10 binary batches, and the images users give to `elbox score`.

IDX files (fashion-mnist, mnist): uint8 arrays, plain or gzipped (recognized by the gzip magic bytes;
a file named .gz must be gzipped), checked structurally: header, dtype, dims against the payload size.

CIFAR-10 binary batches (the binary version's .bin files; the Python version is never read, so nothing
is ever unpickled): fixed-size records of one label byte and the image's pixel bytes, checked for whole
records, the expected record count and labels 0-9.

User input (`read_images`), all holding 8-bit images:
  FILE.npy              one array, loaded without pickle
  FILE.npz              one array, or the array named "x" or "images"; loaded without pickle
  DIRECTORY             every *.png in it (sorted by name), grayscale or RGB
Arrays may be integers 0..255, or floats in [0, 1] on the 8-bit grid k/255 (binary {0, 1} arrays included),
shaped [N, C, H, W], [N, H, W] (one channel) or [N, H, W, C] (channels last); `to_8bit_tensor` checks them
against a model's data shape. The images then go through the run's data space exactly as test images do
(binarized or dequantized with the given seed, or k/255).
"""

from __future__ import annotations

import gzip
import io
import math
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

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
# User input: .npy, .npz, a folder of PNGs

NPZ_KEYS = ("x", "images")


def read_images(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """The images in `path` as an array (not yet checked) and a name for each (file name or index)."""
    path = Path(path)
    if path.is_dir():
        return _read_png_folder(path)
    if not path.is_file():
        raise ElboxError(f"input {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise ElboxError(f"input {path}: unsupported file type {suffix or '(none)'}; give a .npy or .npz file or a folder of PNG images")
    try:
        loaded = np.load(path, allow_pickle=False)  # numpy picks .npy or .npz by the file's magic bytes, not its name
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                array = _pick_npz_array(loaded, path)
        else:
            array = loaded
    except ElboxError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError, RuntimeError) as e:
        raise ElboxError(f"input {path} is corrupt, truncated or not a plain numeric array "
                         f"(pickled objects are never loaded): {e}") from None
    return array, [str(i) for i in range(len(array))] if array.ndim > 0 else []


def _pick_npz_array(archive, path: Path) -> np.ndarray:
    names = list(archive.files)
    if len(names) == 1:
        return archive[names[0]]
    for key in NPZ_KEYS:
        if key in names:
            return archive[key]
    raise ElboxError(f"input {path} holds arrays {names}; name the images {' or '.join(repr(k) for k in NPZ_KEYS)}, or store one array")


def _read_png_folder(path: Path) -> tuple[np.ndarray, list[str]]:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        raise ElboxError(f"input folder {path} has no .png files")
    images = []
    for file in files:
        try:
            with Image.open(io.BytesIO(file.read_bytes())) as image:
                if image.mode not in ("L", "RGB", "1", "P", "RGBA", "LA"):
                    raise ElboxError(f"image {file} has mode {image.mode}; give 8-bit grayscale or RGB PNGs")
                channels = "L" if image.mode in ("L", "1", "LA") else "RGB"
                array = np.asarray(image.convert(channels))
        except ElboxError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
            raise ElboxError(f"image {file} is not a readable PNG: {e}") from None
        if images and array.shape != images[0].shape:
            raise ElboxError(f"image {file} has shape {array.shape}, but {files[0].name} has {images[0].shape}; all must match")
        images.append(array)
    return np.stack(images), [f.name for f in files]


def to_8bit_tensor(array: np.ndarray, data_shape: tuple[int, ...], what: str) -> torch.Tensor:
    """Check an array of images against the model's data shape and the 8-bit range; return uint8 [N, *data_shape]."""
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "uifb":
        kind = getattr(array, "dtype", type(array))
        raise ElboxError(f"{what} has dtype {kind}; give integers 0..255 or floats in [0, 1]")
    if array.ndim == 0 or array.shape[0] == 0:
        raise ElboxError(f"{what} is empty: no images to score")
    c, h, w = data_shape
    shape = array.shape[1:]
    if shape == (c, h, w):
        pass
    elif c == 1 and shape == (h, w):
        array = array[:, None]
    elif shape == (h, w, c):
        array = np.moveaxis(array, -1, 1)
    else:
        raise ElboxError(f"{what} has images of shape {shape}; the model takes {(c, h, w)}"
                         + (f" or {(h, w)}" if c == 1 else f" or channels last {(h, w, c)}"))
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ElboxError(f"{what} contains NaN or infinite values")
        if array.min() < 0 or array.max() > 1:
            raise ElboxError(f"{what} has float values in [{array.min():.4g}, {array.max():.4g}]; floats must lie in [0, 1] (k/255)")
        scaled = array.astype(np.float64) * 255
        if np.abs(scaled - np.round(scaled)).max() > 1e-3:
            raise ElboxError(f"{what} has float values off the 8-bit grid k/255; the model scores 8-bit images")
        array = np.round(scaled)
    elif array.min() < 0 or array.max() > 255:
        raise ElboxError(f"{what} has integer values in [{array.min()}, {array.max()}]; 8-bit images need 0..255")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8))

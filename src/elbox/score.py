"""Scoring new data: read images from a user's file, check them, and estimate log p(x) per image.

Accepted inputs (`read_images`), all holding 8-bit images:
  FILE.npy              one array, loaded without pickle
  FILE.npz              one array, or the array named "x" or "images"; loaded without pickle
  DIRECTORY             every *.png in it (sorted by name), grayscale or RGB
Arrays may be integers 0..255, or floats in [0, 1] on the 8-bit grid k/255 (binary {0, 1} arrays included),
shaped [N, C, H, W], [N, H, W] (one channel) or [N, H, W, C] (channels last). The images then go through the
run's data space exactly as test images do (binarized or dequantized with the given seed, or k/255).

The estimate per image is the tightest one the model has: the exact log p(x), else IWAE-K, else the ELBO.
"""

from __future__ import annotations

import csv
import io
import math
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from elbox.atomic import atomic_write_bytes
from elbox.errors import ElboxError

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


def write_scores_csv(path: str | Path, names: list[str], log_likelihood: torch.Tensor, num_dims: int, estimate: str) -> None:
    """One row per image: name, log-likelihood estimate (nats), bits/dim, the estimate used. Atomic write."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["index", "name", "log_likelihood_nats", "bits_per_dim", "estimate"])
    bits = num_dims * math.log(2)
    for i, (name, value) in enumerate(zip(names, log_likelihood.tolist())):
        writer.writerow([i, name, f"{value:.6f}", f"{-value / bits:.6f}", estimate])
    atomic_write_bytes(path, buffer.getvalue().encode())

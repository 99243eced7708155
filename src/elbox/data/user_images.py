"""A folder of users' image files as a torch Dataset that decodes each image only when it is asked for.

Decoding is Pillow's (the PyPI builds of torchvision for torch 2.13.0 are CUDA builds that do not load beside the
CPU build of torch, so torchvision.io is not used). Opening a folder lists its files and reads each one's header
(size and pixel mode, about 0.1 ms a file), so that mixed sizes, 16-bit pixels and unreadable files are refused
before training starts; pixels are decoded in __getitem__, so memory does not grow with the folder.
"""

from __future__ import annotations

import operator
import os
import stat
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from elbox.core.errors import ElboxError
from elbox.core.options import short_repr

# file suffix -> the format's name in messages; the formats Pillow decodes without extra programs
IMAGE_SUFFIXES = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".jpe": "JPEG",
    ".jfif": "JPEG",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".webp": "WebP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".pbm": "PNM",
    ".pgm": "PNM",
    ".ppm": "PNM",
    ".pnm": "PNM",
}
_GRAY_MODES = {"1", "L", "LA"}  # alpha is dropped
_COLOR_MODES = {"RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}
_PALETTE_MODES = {"P", "PA"}  # grayscale when every palette entry is gray, else RGB


def cut(text: str, limit: int = 100) -> str:
    """`text` on one line, cut to `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(error: BaseException, limit: int = 100) -> str:
    """An exception's text as one short line, for the end of an ElboxError message."""
    text = error.strerror if isinstance(error, OSError) and error.strerror else error
    return cut(str(text), limit) or type(error).__name__


def item_index(index: Any, length: int) -> int:
    """A dataset index as a non-negative int (negative ones count from the end); IndexError outside."""
    i = operator.index(index)
    if not -length <= i < length:
        raise IndexError(f"index {i} is out of range for a dataset of {length} items")
    return i % length


def parse_image_size(image_size: Any) -> tuple[int, int] | None:
    """None, an int S (meaning S x S) or (height, width), as (height, width)."""
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)
    ):
        raise ElboxError(f"image size must be a positive whole number or (height, width), got {short_repr(image_size)}")
    return (size[0], size[1])


def find_images(root: Path) -> list[str]:
    """Paths relative to `root` (POSIX style, sorted) of every image file under it; hidden files and folders
    (names starting with a dot) are left out."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(folder).relative_to(root)
        found += [
            (rel / f).as_posix()
            for f in files
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES
        ]
    return sorted(found)


def printable_name(name: str) -> str:
    """A file name as text that any UTF-8 file can hold: os.fsdecode writes bytes that are not UTF-8 as lone
    surrogates, which no encoder takes; here they become \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def is_image_file(path: Path) -> bool:
    """True for an existing file (not a folder) whose suffix names an image format (IMAGE_SUFFIXES)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and path.exists() and not path.is_dir()


def _unreadable(file: Path, error: BaseException) -> ElboxError:
    kind = IMAGE_SUFFIXES.get(file.suffix.lower(), "image")
    return ElboxError(f"image {file} is not a readable {kind}: {one_line(error)}")


def _channels(image: Image.Image, file: Path) -> int:
    """1 or 3: the channels this opened (not yet decoded) image gives; ElboxError for 16-bit and other modes."""
    mode = image.mode
    if mode.startswith("I") or mode == "F" or any(";16" in str(tile[-1]) for tile in image.tile):
        raise ElboxError(f"image {file} has 16-bit or wider pixels (mode {mode}); give 8-bit images")
    if mode in _GRAY_MODES:
        return 1
    if mode in _COLOR_MODES:
        return 3
    if mode in _PALETTE_MODES:
        palette = image.getpalette() or []
        return 1 if palette[0::3] == palette[1::3] == palette[2::3] else 3
    raise ElboxError(f"image {file} has the pixel mode {mode}; give 8-bit grayscale or RGB images")


def open_image(file: Path) -> Image.Image:
    """Image.open on a regular file, refusing an image with more pixels than Pillow's decompression-bomb limit
    (PIL.Image.MAX_IMAGE_PIXELS) from its header, before any pixel is decoded. A FIFO or a device would block or
    never end: refused."""
    info = os.stat(file)  # follows links: a link loop raises OSError
    if not stat.S_ISREG(info.st_mode):
        raise ElboxError(f"image {file} is not a regular file")
    if info.st_size == 0:
        raise ElboxError(f"image {file} is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow warns from 1x the limit, fails at 2x
        try:
            return Image.open(file)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            size = str(e).split(",")[0]  # "Image size (N pixels) exceeds limit of M pixels"
            raise ElboxError(
                f"image {file} is too large to decode safely: {cut(size, 90)} (PIL.Image.MAX_IMAGE_PIXELS)"
            ) from None


def _probe(file: Path) -> tuple[tuple[int, int], int]:
    """((height, width), channels) from the file's header; the pixels are not decoded."""
    try:
        with open_image(file) as image:
            return (image.height, image.width), _channels(image, file)
    except ElboxError:
        raise
    except Exception as e:  # Pillow's decoders raise many kinds of errors on broken bytes
        raise _unreadable(file, e) from None


class ImageFolder(Dataset):
    """Every image file under `path` (searched recursively, sorted by relative path; see IMAGE_SUFFIXES), or the
    one image file `path` is, decoded on demand: item i is a uint8 tensor [C, H, W].

    C is 3 if any image is in color (grayscale images are then repeated over the three channels), else 1. Alpha
    channels are dropped, palette images become grayscale when their palette is gray and RGB otherwise, and 16-bit
    images are refused. Animated images give their first frame. Without `image_size` all images must be the same
    size; with it (an int S for S x S, or (H, W)) each image is resized (bilinear, antialiased) so that it covers
    H x W and then center-cropped to it.

    C = 3 when only some images are in color is warned about (a UserWarning naming how many and the first), since
    it makes the model an RGB one. Attributes: path, names (the relative paths, in item order, as printable text:
    bytes of a file name that are not UTF-8 written as \\xNN), shape (C, H, W), kind "images".
    """

    kind = "images"

    def __init__(self, path: str | os.PathLike, image_size: int | tuple[int, int] | None = None):
        self.path = Path(path)
        self.image_size = parse_image_size(image_size)
        if is_image_file(self.path):  # one image: a folder of one
            self._root, self._files = self.path.parent, [self.path.name]
        elif not self.path.is_dir():
            raise ElboxError(
                f"image folder {self.path} " + ("is not a folder" if self.path.exists() else "does not exist")
            )
        else:
            self._root, self._files = self.path, find_images(self.path)
        if not self._files:
            others = ", ".join(sorted({s for s in IMAGE_SUFFIXES if s != ".png"}))
            raise ElboxError(f"input folder {self.path} has no image files (no .png files, nor {others})")
        self.names = [printable_name(name) for name in self._files]
        colors, first = [], None
        for name in self._files:
            size, c = _probe(self._root / name)
            if c == 3:
                colors.append(name)
            if first is None:
                first = (name, size)
            elif self.image_size is None and size != first[1]:
                raise ElboxError(
                    f"images in {self.path} differ in size: {printable_name(first[0])} is "
                    f"{first[1][0]}x{first[1][1]} but {printable_name(name)} is {size[0]}x{size[1]} "
                    "(height x width); all must match, or give an "
                    "image size to resize and crop them"
                )
        if 0 < len(colors) < len(self._files):
            warnings.warn(
                f"{len(colors)} of the {len(self._files)} images in {self.path} are in color (the first: "
                f"{self._root / printable_name(colors[0])}): all are read with 3 channels (RGB), the "
                "grayscale ones repeated over them",
                UserWarning,
                stacklevel=2,
            )
        self.shape = (3 if colors else 1, *(self.image_size or first[1]))

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> torch.Tensor:
        file = self._root / self._files[item_index(index, len(self))]
        c, h, w = self.shape
        try:
            with open_image(file) as image:
                if _channels(image, file) > c:
                    raise ElboxError(f"image {file} is in color now but was grayscale when {self.path} was opened")
                resize = self.image_size is not None and image.size != (w, h)
                if resize:
                    image.draft(None, (w, h))  # JPEG: decode at a reduced scale that still covers w x h
                if image.mode in _PALETTE_MODES:
                    image = image.convert("RGBA")  # palette transparency is applied by Pillow, then dropped
                image = image.convert("L" if c == 1 else "RGB")
                if resize:
                    image = ImageOps.fit(image, (w, h), Image.Resampling.BILINEAR)
                array = np.asarray(image)
        except ElboxError:
            raise
        except Exception as e:  # Pillow's decoders raise many kinds of errors on broken bytes
            raise _unreadable(file, e) from None
        if array.shape[:2] != (h, w):
            raise ElboxError(
                f"image {file} is {array.shape[0]}x{array.shape[1]} now, but the images in {self.path} "
                f"were {h}x{w} when it was opened"
            )
        return torch.from_numpy(array.reshape(h, w, c).transpose(2, 0, 1).copy())  # a writable [C, H, W] copy

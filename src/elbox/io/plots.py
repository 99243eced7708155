"""Images: grids of samples and reconstructions (rows optionally labelled, e.g. "input" / "reconstruction")."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from elbox.core.errors import ElboxError
from elbox.io.atomic import PNG_SOFTWARE, atomic_write_bytes


def image_grid(
    images: torch.Tensor, nrow: int | None = None, padding: int = 2, scale: int = 2, row_labels: Sequence[str] = ()
) -> Image.Image:
    """Tile images [N, C, H, W] with values in [0, 1] (C = 1 or 3) into one PIL image, nrow images per row. row_labels:
    text written left of the rows, taken in turn (("input", "reconstruction") labels alternating rows)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ElboxError(f"image grid needs [N, 1 or 3, H, W] images, got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = torch.ones(c, ncol * (h + padding) + padding, nrow * (w + padding) + padding)
    for i, img in enumerate(images.detach().float().cpu().clamp(0, 1)):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = img
    array = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(array.squeeze(-1) if c == 1 else array, mode="L" if c == 1 else "RGB")
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST) if scale > 1 else picture
    return label_rows(picture, row_labels, ncol) if row_labels else picture


def label_rows(picture: Image.Image, labels: Sequence[str], rows: int) -> Image.Image:
    """The picture with a white margin on its left holding a label for each of its `rows` rows (labels in turn)."""
    font = ImageFont.load_default(size=14)
    margin = 8 + max(round(ImageDraw.Draw(picture).textlength(label, font=font)) for label in labels)
    labelled = Image.new(picture.mode, (picture.width + margin, picture.height), "white")
    labelled.paste(picture, (margin, 0))
    draw = ImageDraw.Draw(labelled)
    for row in range(rows):
        draw.text(
            (margin - 4, (row + 0.5) * picture.height / rows),
            labels[row % len(labels)],
            fill="black",
            font=font,
            anchor="rm",
        )
    return labelled


def save_image_grid(
    images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 2, row_labels: Sequence[str] = ()
) -> Path:
    """Write an image grid as PNG, atomically."""
    path = Path(path)
    atomic_write_bytes(path, grid_png(images, nrow=nrow, scale=scale, row_labels=row_labels))
    return path


def grid_png(images: torch.Tensor, nrow: int | None = None, scale: int = 2, row_labels: Sequence[str] = ()) -> bytes:
    """An image grid as PNG bytes, tagged "Software: elbox" (elbox's own file: it may replace it, elbox.io.atomic)."""
    buffer = io.BytesIO()
    info = PngInfo()
    info.add_text("Software", PNG_SOFTWARE)
    image_grid(images, nrow=nrow, scale=scale, row_labels=row_labels).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


__all__ = ["grid_png", "image_grid", "label_rows", "save_image_grid"]

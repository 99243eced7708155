"""Images: grids of samples and reconstructions."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from PIL import Image

from elbox.atomic import atomic_write_bytes
from elbox.errors import ElboxError


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, scale: int = 2) -> Image.Image:
    """Tile images [N, C, H, W] with values in [0, 1] (C = 1 or 3) into one PIL image."""
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
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST) if scale > 1 else picture


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 2) -> Path:
    """Write an image grid as PNG, atomically."""
    path = Path(path)
    buffer = io.BytesIO()
    image_grid(images, nrow=nrow, scale=scale).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path


__all__ = ["image_grid", "save_image_grid"]

"""Images on disk: [-1, 1] floats to uint8, grids, PNG and .npz files (written atomically, by
process 0 only, so several hosts never clobber one file)."""

from __future__ import annotations

import math

import jax
import numpy as np
from PIL import Image

from ldm_jax.storage import files


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] float images -> uint8 [0, 255]."""
    images = np.asarray(images, dtype=np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images_uint8: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tiles [N, H, W, C] uint8 images into one [rows*(H+pad)+pad, ..., C] image."""
    images_uint8 = np.asarray(images_uint8)
    if images_uint8.ndim != 4:
        raise ValueError(f"make_grid expects [N, H, W, C] images, got shape {images_uint8.shape}.")
    n, h, w, c = images_uint8.shape
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h,
             pad + col * (w + pad): pad + col * (w + pad) + w] = images_uint8[i]
    return grid


def save_png(image_uint8: np.ndarray, path: str, upscale: int = 1) -> None:
    """Writes an HWC uint8 image as PNG (atomically, nearest-neighbour upscaled for small images)."""
    if jax.process_index() != 0:
        return
    img = Image.fromarray(image_uint8.squeeze(-1) if image_uint8.shape[-1] == 1 else image_uint8)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    with files.atomic_write(path, "wb") as f:
        img.save(f, format="PNG")

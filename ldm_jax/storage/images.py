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


class ImageInputError(ValueError):
    """An --input / --mask file that cannot be read as the images it should hold."""


def read_image_inputs(path: str, *, key: str, flag: str, gray: bool = False) -> np.ndarray:
    """uint8 [N, H, W, 3] (or [N, H, W] with gray=True) from a PNG/JPEG file, a folder of them
    (sorted by name) or an .npz holding `key`. Images of a folder must share one size."""
    import os
    from ldm_jax import UserError

    class _Error(UserError, ImageInputError):
        pass

    if not os.path.exists(path):
        raise _Error(f"{flag}={path}: no such file or folder.")
    if path.endswith(".npz"):
        with np.load(path) as data:
            if key not in data:
                raise _Error(f"{flag}={path}: the .npz has no {key!r} array (it has "
                             f"{sorted(data.files)}).")
            arr = np.asarray(data[key])
        if arr.dtype != np.uint8:
            raise _Error(f"{flag}={path}: {key!r} must be uint8, got {arr.dtype}.")
        if gray and arr.ndim == 4:
            arr = arr[..., 0]
        want = 3 if gray else 4
        if arr.ndim != want or (not gray and arr.shape[-1] != 3):
            raise _Error(f"{flag}={path}: {key!r} must be uint8 "
                         f"{'[N, H, W]' if gray else '[N, H, W, 3]'}, got shape {arr.shape}.")
        return arr
    names = [path]
    if os.path.isdir(path):
        names = sorted(os.path.join(path, n) for n in os.listdir(path)
                       if n.lower().endswith((".png", ".jpg", ".jpeg")))
        if not names:
            raise _Error(f"{flag}={path}: the folder holds no .png/.jpg images.")
    out = []
    for name in names:
        try:
            with Image.open(name) as img:
                img = img.convert("L") if gray else img.convert("RGB")
                out.append(np.asarray(img, np.uint8))
        except OSError as e:
            raise _Error(f"{flag}={name}: not a readable image ({e}).") from None
        if out[-1].shape != out[0].shape:
            raise _Error(f"{flag}={name}: {out[-1].shape[1]}x{out[-1].shape[0]} pixels, but "
                         f"{names[0]} is {out[0].shape[1]}x{out[0].shape[0]}; give images of "
                         f"one size.")
    return np.stack(out)

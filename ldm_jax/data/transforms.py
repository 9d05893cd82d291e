"""Pure numpy / PIL image preprocessing for the input pipeline.

No TensorFlow and no JAX here: these functions run inside grain worker threads on host CPU.
All randomness comes from a `numpy.random.Generator` passed in by the caller, so the pipeline
can make it a function of (seed, global example position).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image


# PIL modes of 16-bit greyscale (PNG, PPM...). Pillow opens 16-bit RGB(A) PNGs as 8-bit
# 'RGB'/'RGBA' itself (keeping each channel's high byte), so those need nothing here.
_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def scale_16bit_to_uint8(values) -> np.ndarray:
    """Integer values in 0..65535 -> uint8 as round(value / 257): 65535 -> 255, 32768 -> 128.

    PIL's own convert('L' / 'RGB') clips instead (every value above 255 turns white), which
    would make a 16-bit photo a white sheet.
    """
    v = np.asarray(values).astype(np.uint32)
    # (v + 128) // 257 == round(v / 257) for integers; no ties occur (257 is odd).
    return ((v + 128) // 257).astype(np.uint8)


def _range_to_uint8(values: np.ndarray) -> np.ndarray:
    """Linearly maps [min, max] of the array to 0..255 (a constant image becomes 0)."""
    v = values.astype(np.float64)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return np.zeros(v.shape, np.uint8)
    return np.round((v - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def pil_to_uint8(im: Image.Image) -> np.ndarray:
    """A decoded PIL image -> numpy uint8: (H, W) for greyscale, (H, W, 3) otherwise.

    - 'L' and 'RGB' are taken as they are; greyscale stays 2-D (`to_rgb_uint8` replicates it
      after resizing, a third of the work).
    - 16-bit greyscale ('I;16*') is scaled by 1/257 (`scale_16bit_to_uint8`), not clipped.
    - 32-bit 'I' holds 16-bit data in practice (older Pillow opens 16-bit PNGs so): scaled
      like 16-bit when its values lie in 0..65535, else its actual [min, max] is stretched to
      0..255 (there is no standard white level above 16 bits). 'F' is treated the same way.
    - '1' (bilevel) becomes 'L'; palette with transparency goes through RGBA (PIL warns and
      may drop the transparency mask otherwise), then RGB; every other mode (RGBA, LA, CMYK,
      YCbCr, P, ...) is converted to RGB by PIL, which knows its semantics. Alpha is dropped.
    """
    mode = im.mode
    if mode in ("L", "RGB"):
        return np.asarray(im, dtype=np.uint8)
    if mode in _16BIT_MODES:
        return scale_16bit_to_uint8(np.asarray(im))
    if mode in ("I", "F"):
        values = np.asarray(im)
        if values.size and (values.min() < 0 or values.max() > 65535):
            return _range_to_uint8(values)
        return scale_16bit_to_uint8(np.round(values))
    if mode == "1":
        return np.asarray(im.convert("L"), dtype=np.uint8)
    if mode in ("P", "PA") and (mode == "PA" or "transparency" in im.info):
        im = im.convert("RGBA")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def to_rgb_uint8(image, key: str = "image") -> np.ndarray:
    """Validates an image array and returns it as (H, W, 3) uint8.

    Greyscale (H, W) or (H, W, 1) is replicated to 3 channels and (H, W, 4) RGBA drops its
    alpha channel; anything else (other ranks, 2 or 5+ channels, non-uint8 dtypes) raises a
    ValueError naming the feature key and the expected shape, because silently reinterpreting
    such arrays would train on garbage.

    Args:
      image: array-like image.
      key: name of the feature the image came from (for the error message).
    """
    image = np.asarray(image)
    expected = "(H, W, 3) uint8 (or greyscale (H, W) / (H, W, 1), or RGBA (H, W, 4))"
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"Feature {key!r} (data.image_key) has shape {image.shape}; expected {expected}. "
            "Check data.image_key points at an image feature, or convert the data."
        )
    if image.dtype != np.uint8:
        raise ValueError(
            f"Feature {key!r} (data.image_key) has dtype {image.dtype}; expected {expected}."
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"Feature {key!r} (data.image_key) is an empty image: {image.shape}.")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[-1] == 4:
        image = image[:, :, :3]
    return image


def resize_short_side(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes (H, W, 3) uint8 so its short side is `size`, keeping the aspect ratio.

    Uses PIL bicubic, which is antialiased when downsampling (the filter support scales with
    the reduction factor), so large photos do not alias. No-op if the short side already is
    `size`.
    """
    h, w = image.shape[:2]
    if min(h, w) == size:
        return image
    scale = size / min(h, w)
    # max(size, ...) guards against rounding the long side below the crop size.
    if h <= w:
        new_h, new_w = size, max(size, int(round(w * scale)))
    else:
        new_h, new_w = max(size, int(round(h * scale))), size
    pil = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(pil.resize((new_w, new_h), Image.BICUBIC), dtype=np.uint8)


def crop(image: np.ndarray, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Crops a `size` x `size` window: uniformly random if `rng` is given, else centered."""
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(f"Cannot crop {size}x{size} from an image of shape {image.shape}.")
    if rng is None:
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top = int(rng.integers(0, h - size + 1))
        left = int(rng.integers(0, w - size + 1))
    return image[top : top + size, left : left + size]


def maybe_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flips left-right with probability 1/2."""
    if rng.random() < 0.5:
        return image[:, ::-1]
    return image


def uint8_to_float(image: np.ndarray) -> np.ndarray:
    """Scales uint8 0..255 to float32 in [-1, 1]."""
    return image.astype(np.float32) * np.float32(1.0 / 127.5) - np.float32(1.0)


def images_to_uint8(images) -> np.ndarray:
    """Inverse of `uint8_to_float`: float in [-1, 1] (numpy or jax array) -> uint8 0..255.

    Values outside [-1, 1] (e.g. model samples) are clipped.
    """
    x = np.asarray(images, dtype=np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where the output square of `preprocess_image` lies in the image it came from: the
    image resized to (resized_h, resized_w), then the window [top, top+size) x
    [left, left+size), then mirrored left-right if `flipped`. Boxes follow the pixels with
    `transform_boxes`."""

    resized_h: int
    resized_w: int
    top: int
    left: int
    size: int
    flipped: bool = False


def transform_boxes(boxes, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Normalised xyxy boxes of the source image -> the same boxes in the output square.

    Boxes are clipped to the crop window; boxes with nothing left inside it (zero width or
    height after clipping) are dropped.

    Returns:
      (boxes float32 [M, 4] normalised xyxy in the output, keep bool [N]: which input boxes
      survive, to select their labels).
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    g = geometry
    x = (boxes[:, [0, 2]] * g.resized_w - g.left) / g.size
    y = (boxes[:, [1, 3]] * g.resized_h - g.top) / g.size
    x, y = np.clip(x, 0.0, 1.0), np.clip(y, 0.0, 1.0)
    if g.flipped:
        x = 1.0 - x[:, ::-1]
    out = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out[keep].astype(np.float32), keep


def flip_boxes(boxes) -> np.ndarray:
    """Normalised xyxy boxes [N, 4] of an image -> the boxes of its left-right mirror."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return np.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], axis=1)


def preprocess_image_with_geometry(
    image,
    image_size: int,
    *,
    rng: np.random.Generator | None = None,
    random_crop: bool = False,
    random_flip: bool = False,
    key: str = "image",
) -> tuple[np.ndarray, Geometry]:
    """`preprocess_image`, also returning the `Geometry` of the output (for boxes).

    Draws from `rng` exactly as `preprocess_image` does (crop offsets, then the flip), so
    asking for the geometry never changes the augmentation.
    """
    if (random_crop or random_flip) and rng is None:
        raise ValueError("random_crop / random_flip need an rng.")
    image = to_rgb_uint8(image, key)
    image = resize_short_side(image, image_size)
    h, w = image.shape[:2]
    if h < image_size or w < image_size:
        raise ValueError(f"Cannot crop {image_size}x{image_size} from an image of shape "
                         f"{image.shape}.")
    if random_crop:
        top = int(rng.integers(0, h - image_size + 1))
        left = int(rng.integers(0, w - image_size + 1))
    else:
        top, left = (h - image_size) // 2, (w - image_size) // 2
    image = image[top : top + image_size, left : left + image_size]
    flipped = bool(random_flip and rng.random() < 0.5)  # as maybe_flip draws it
    if flipped:
        image = image[:, ::-1]
    return uint8_to_float(image), Geometry(h, w, top, left, image_size, flipped)


def preprocess_image(
    image,
    image_size: int,
    *,
    rng: np.random.Generator | None = None,
    random_crop: bool = False,
    random_flip: bool = False,
    key: str = "image",
) -> np.ndarray:
    """Full image preprocessing: validate -> resize short side -> crop -> flip -> [-1, 1].

    Args:
      image: array-like (H, W[, C]) uint8 image.
      image_size: output height = width.
      rng: source of randomness; required if `random_crop` or `random_flip`.
      random_crop: random crop (train) instead of center crop (eval).
      random_flip: random horizontal flip.
      key: feature name, for error messages.

    Returns:
      float32 array (image_size, image_size, 3) in [-1, 1].
    """
    return preprocess_image_with_geometry(
        image, image_size, rng=rng, random_crop=random_crop, random_flip=random_flip,
        key=key)[0]

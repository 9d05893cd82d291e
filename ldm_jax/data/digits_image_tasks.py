"""The embedded digits for image-conditioned LDMs: super-resolution and semantic synthesis.

Two sources derived from `ldm_digits` (`ldm_jax.data.digits`: sklearn's 8x8 digits at 32x32
RGB; no network, no TensorFlow; `data.source` names in brackets). They read the same images,
splits (train 1498, test 299, and the same holdout behaviour), `label` and `id` (the sklearn
index) through `sources.digits_source`, and add one canonical image field
(`ldm_jax.data.conditioning_fields`) computed on read: a cheap, deterministic function of the
example, so there is no TFDS builder of their own to prepare.

* ['digits_sr'] `low_res` uint8 [8, 8, 3]: the digit's native 8x8 image, grey 0..16 scaled to
  0..255 exactly as `digits.digit_to_rgb32` scales it before its bilinear resize, so that
  PIL-bilinear-upsampling `low_res` to 32 px gives the 32 px image exactly (super-resolution
  x4 with `conditioning.degradation='given'`).
* ['digits_semantic'] `segmentation` uint8 [32, 32]: 0 = background, 1 + digit = the digit's
  foreground, the pixels of the 32 px grey image brighter than FOREGROUND_THRESHOLD (0.3)
  times that image's maximum (all background for an all-black image). 11 classes, named
  SEGMENTATION_CLASS_NAMES ('background', '0', ..., '9') in the source's `num_classes` /
  `class_names` under 'segmentation', which precompute_latents records in the latents
  metadata.

Inpainting needs no data set of its own: plain 'digits' with `latents.keep_images`.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from ldm_jax.data import digits
from ldm_jax.data.conditioning_fields import (LOW_RES, SEGMENTATION, CanonicalFieldsSource,
                                              FieldSpec)
from ldm_jax.data.sources import HoldoutPolicy, digits_source

SR_SOURCE = "digits_sr"
SEMANTIC_SOURCE = "digits_semantic"
LOW_RES_SIZE = 8  # sklearn's native digits: 32 px / 4
# Foreground: grey > FOREGROUND_THRESHOLD * the image's maximum grey value.
FOREGROUND_THRESHOLD = 0.3
SEGMENTATION_CLASS_NAMES = ("background",) + tuple(str(d) for d in range(digits.NUM_CLASSES))
NUM_SEGMENTATION_CLASSES = len(SEGMENTATION_CLASS_NAMES)  # 11

# The canonical field each source carries, under its own (already canonical) name.
SR_FIELDS = FieldSpec(low_res_key=LOW_RES)
SEMANTIC_FIELDS = FieldSpec(segmentation_key=SEGMENTATION)

_SKLEARN_IMAGES = None
_SKLEARN_LOCK = threading.Lock()


def _sklearn_images() -> np.ndarray:
    """sklearn's 1797 digits, float [N, 8, 8] values 0..16 (loaded once per process)."""
    global _SKLEARN_IMAGES  # pylint: disable=global-statement
    with _SKLEARN_LOCK:
        if _SKLEARN_IMAGES is None:
            from sklearn.datasets import load_digits

            _SKLEARN_IMAGES = np.asarray(load_digits().images, np.float64)
    return _SKLEARN_IMAGES


def digit_to_low_res(digit: np.ndarray) -> np.ndarray:
    """One sklearn 8x8 digit (values 0..16) -> uint8 [8, 8, 3], scaled to 0..255 exactly as
    `digits.digit_to_rgb32` scales it before resizing."""
    grey = np.clip(np.round(np.asarray(digit, np.float64) * (255.0 / 16.0)), 0, 255)
    return np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2)


def low_res_of(sklearn_index: int) -> np.ndarray:
    """The `low_res` field of the digit with sklearn index `sklearn_index` (its `id`)."""
    return digit_to_low_res(_sklearn_images()[int(sklearn_index)])


def segmentation_of(image: np.ndarray, label: int) -> np.ndarray:
    """The `segmentation` field of a 32 px digit image ([H, W] or [H, W, 3] uint8) of class
    `label`: uint8 [H, W], 1 + label where grey > FOREGROUND_THRESHOLD * max grey, else 0."""
    image = np.asarray(image)
    grey = image[..., 0] if image.ndim == 3 else image
    label = int(label)
    if not 0 <= label < digits.NUM_CLASSES:
        raise ValueError(f"label must be in 0..{digits.NUM_CLASSES - 1}, got {label}.")
    peak = int(grey.max()) if grey.size else 0
    foreground = grey.astype(np.float64) > FOREGROUND_THRESHOLD * peak if peak else \
        np.zeros(grey.shape, bool)
    return np.where(foreground, np.uint8(1 + label), np.uint8(0)).astype(np.uint8)


def _add_low_res(example: dict) -> dict:
    example[LOW_RES] = low_res_of(int(example["id"]))
    return example


def _add_segmentation(example: dict) -> dict:
    example[SEGMENTATION] = segmentation_of(example["image"], int(example["label"]))
    return example


class DerivedDigitsSource:
    """A digits source whose examples also hold a field computed by `add(example)` (a
    module-level function, so the source pickles). Has the wrapped source's `split`,
    `holdout`, `features`, `num_classes` and `class_names` (plus `extra_classes`)."""

    def __init__(self, source, add, extra_classes: dict[str, tuple[str, ...]] | None = None):
        self._source, self._add = source, add
        self.split = getattr(source, "split", None)
        self.holdout = getattr(source, "holdout", None)
        self.features = getattr(source, "features", None)
        self.num_classes = dict(getattr(source, "num_classes", {}) or {})
        self.class_names = dict(getattr(source, "class_names", {}) or {})
        for key, names in (extra_classes or {}).items():
            self.num_classes[key] = len(names)
            self.class_names[key] = list(names)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return self._add(dict(self._source[index]))

    def __repr__(self) -> str:
        return f"DerivedDigitsSource({self._source!r}, {self._add.__name__})"


def _source(add, fields_default: FieldSpec, split, data_dir, holdout, fields, extra_classes=None):
    source = DerivedDigitsSource(digits_source(split, data_dir, holdout=holdout), add,
                                 extra_classes)
    return CanonicalFieldsSource(source, (fields or FieldSpec()).filled(fields_default))


def sr_source(split: str, data_dir: str | os.PathLike | None = None, *,
              holdout: HoldoutPolicy | None = None, fields: FieldSpec | None = None):
    """The 'digits_sr' split: the `digits` split ({'image' 32x32, 'label', 'id'}) with
    'low_res' uint8 [8, 8, 3] (the native digit; see the module doc). `fields` (from the
    config) may name other fields; its empty entries default to SR_FIELDS."""
    return _source(_add_low_res, SR_FIELDS, split, data_dir, holdout, fields)


def semantic_source(split: str, data_dir: str | os.PathLike | None = None, *,
                    holdout: HoldoutPolicy | None = None, fields: FieldSpec | None = None):
    """The 'digits_semantic' split: the `digits` split with 'segmentation' uint8 [32, 32]
    (0 background, 1 + digit foreground; see the module doc); `num_classes` and
    `class_names` describe 'segmentation' (11 classes)."""
    return _source(_add_segmentation, SEMANTIC_FIELDS, split, data_dir, holdout, fields,
                   {SEGMENTATION: SEGMENTATION_CLASS_NAMES})


__all__ = [
    "DerivedDigitsSource", "FOREGROUND_THRESHOLD", "LOW_RES_SIZE", "NUM_SEGMENTATION_CLASSES",
    "SEGMENTATION_CLASS_NAMES", "SEMANTIC_FIELDS", "SEMANTIC_SOURCE", "SR_FIELDS", "SR_SOURCE",
    "digit_to_low_res", "low_res_of", "segmentation_of", "semantic_source", "sr_source",
]

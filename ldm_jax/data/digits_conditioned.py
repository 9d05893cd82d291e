"""The embedded digits with captions and with layouts: text- and layout-to-image on a CPU.

Two TFDS builders in the style of `ldm_jax.data.digits` (sklearn's 8x8 digits; no network, no
TensorFlow; array_record, prepared once into the data dir; `data.source` names in brackets):

* `ldm_digits_captions` ['digits_captions']: the 32x32 RGB digits and splits of `ldm_digits`
  (train 1498, test 299) with `label`, `id` and `caption`: 3 distinct captions per image drawn
  (seeded by the image's sklearn index) from `TRAIN_PHRASINGS`, e.g. "a handwritten seven",
  "the digit 7". Test captions come from the same phrasings; `HELDOUT_PHRASINGS` are never in
  the data, for evaluation prompts (`captions_for`).
* `ldm_digits_layout` ['digits_layout']: 64x64 RGB canvases (black, like the digits) holding 2
  or 3 digits, each 8x8 digit scaled (bilinear, as `digits.digit_to_rgb32`) into its own
  box of side MIN_SIDE..MAX_SIDE px (square-ish), boxes apart by at least MARGIN px (IoU 0).
  Fields: `boxes` float32 [N, 4] normalised xyxy, `box_labels` int64 [N] (the digits), `id`;
  no `label`. Train canvases (NUM_TRAIN_CANVASES) use digits of the digits train split, test
  canvases (NUM_TEST_CANVASES) those of the test split. Canvas i of a split is a function of
  (LAYOUT_SEED, split, i) only. Use `data.image_size=64`.

`captions_source` / `layout_source` read them with the canonical fields of
`ldm_jax.data.conditioning_fields` ('caption' as list[str]; 'boxes', 'box_labels').
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ldm_jax.data import digits
from ldm_jax.data.conditioning_fields import CanonicalFieldsSource, FieldSpec
from ldm_jax.data.sources import (CachedSource, HoldoutPolicy, MissingDataError,
                                  tfds_source)

CAPTIONS_NAME = "ldm_digits_captions"
LAYOUT_NAME = "ldm_digits_layout"

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Caption templates: {word} = 'seven', {n} = '7'.
TRAIN_PHRASINGS = (
    "a handwritten {word}",
    "the digit {n}",
    "number {word}",
    "a picture of a {n}",
    "an image of the number {word}",
    "{word}",
    "digit {word}",
    "a {word} written by hand",
)
# Never in the data: prompts for checking that the text encoder generalises.
HELDOUT_PHRASINGS = (
    "a drawing of the digit {word}",
    "handwritten {n}",
    "the number {word}, handwritten",
)
CAPTIONS_PER_IMAGE = 3
CAPTION_SEED = 20240611

LAYOUT_SIZE = 64
NUM_TRAIN_CANVASES = 3000
NUM_TEST_CANVASES = 500
OBJECTS_PER_CANVAS = (2, 3)
MIN_SIDE, MAX_SIDE = 20, 30  # box sides in pixels
MAX_ASPECT_DELTA = 3  # |height - width| <= this many pixels: square-ish boxes
MARGIN = 2  # empty pixels at least between two boxes
LAYOUT_SEED = 20240612

# The canonical fields each data set carries, under its own (already canonical) names.
CAPTIONS_FIELDS = FieldSpec(caption_keys=("caption",))
LAYOUT_FIELDS = FieldSpec(boxes_key="boxes", box_labels_key="box_labels", box_format="xyxy")


# ------------------------------------------------------------------------------ captions


def captions_for(digit: int, templates=TRAIN_PHRASINGS) -> list[str]:
    """Every caption of `digit` (0..9) under `templates` (e.g. HELDOUT_PHRASINGS)."""
    digit = int(digit)
    if not 0 <= digit <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}.")
    return [t.format(word=DIGIT_WORDS[digit], n=digit) for t in templates]


def draw_captions(sklearn_index: int, digit: int) -> list[str]:
    """The CAPTIONS_PER_IMAGE distinct train captions of one image (seeded by its index)."""
    rng = np.random.default_rng((CAPTION_SEED, int(sklearn_index)))
    picks = rng.choice(len(TRAIN_PHRASINGS), CAPTIONS_PER_IMAGE, replace=False)
    options = captions_for(digit, TRAIN_PHRASINGS)
    return [options[int(i)] for i in picks]


class _EmbeddedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared by the two builders: no download, metadata built in code."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # As in digits.LdmDigits: TFDS's default needs importlib_resources, which it lacks.
        return epath.Path(__file__)


class LdmDigitsCaptions(_EmbeddedBuilder):
    """sklearn digits, 32x32 RGB, with 3 captions each (registered as `ldm_digits_captions`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: ldm_digits with 3 templated captions each."}

    def _info(self) -> tfds.core.DatasetInfo:
        size = digits.IMAGE_SIZE
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "The ldm_digits images (sklearn 8x8 digits at 32x32 RGB) with three captions "
                "each, drawn from templated phrasings ('a handwritten seven', 'the digit 7')."),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                "label": tfds.features.ClassLabel(num_classes=digits.NUM_CLASSES),
                "id": np.int64,
                "caption": tfds.features.Sequence(tfds.features.Text(),
                                                  length=CAPTIONS_PER_IMAGE),
            }),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {"train": self._generate_examples(test=False),
                "test": self._generate_examples(test=True)}

    def _generate_examples(self, test: bool):
        for i, image, label in _digits_split(test):
            yield i, {"image": digits._png_bytes(digits.digit_to_rgb32(image)),  # pylint: disable=protected-access
                      "label": int(label), "id": i, "caption": draw_captions(i, int(label))}


# ------------------------------------------------------------------------------- layouts


def _digits_split(test: bool):
    """(sklearn index, 8x8 image, label) of the ldm_digits train or test split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    for i, (image, label) in enumerate(zip(data.images, data.target)):
        if (i % digits.TEST_EVERY == digits.TEST_EVERY - 1) == test:
            yield i, image, label


def digit_to_grey(digit: np.ndarray, height: int, width: int) -> np.ndarray:
    """One sklearn 8x8 digit (values 0..16) as uint8 (height, width), bilinear like
    `digits.digit_to_rgb32`."""
    from PIL import Image

    grey = np.clip(np.round(np.asarray(digit, np.float64) * (255.0 / 16.0)), 0, 255)
    im = Image.fromarray(grey.astype(np.uint8), mode="L")
    return np.asarray(im.resize((int(width), int(height)), Image.BILINEAR), dtype=np.uint8)


def _apart(a, b) -> bool:
    """Whether pixel boxes (x0, y0, x1, y1), x1/y1 exclusive, are MARGIN or more apart."""
    return (a[2] + MARGIN <= b[0] or b[2] + MARGIN <= a[0] or
            a[3] + MARGIN <= b[1] or b[3] + MARGIN <= a[1])


def place_boxes(rng: np.random.Generator, count: int) -> list[tuple[int, int, int, int]]:
    """`count` pixel boxes (x0, y0, x1, y1) in the canvas, MARGIN apart (rejection sampling;
    starts over when a box does not fit, which the sizes make rare)."""
    for _ in range(1000):
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(50 * count):
            w = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
            h = int(np.clip(w + rng.integers(-MAX_ASPECT_DELTA, MAX_ASPECT_DELTA + 1),
                            MIN_SIDE, MAX_SIDE))
            x0 = int(rng.integers(0, LAYOUT_SIZE - w + 1))
            y0 = int(rng.integers(0, LAYOUT_SIZE - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            if all(_apart(box, other) for other in boxes):
                boxes.append(box)
                if len(boxes) == count:
                    return boxes
    raise RuntimeError(f"could not place {count} boxes")  # not reached with these sizes


def make_canvas(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray):
    """One layout canvas from a pool of 8x8 digits.

    Returns:
      (uint8 [LAYOUT_SIZE, LAYOUT_SIZE, 3] image, float32 [N, 4] normalised xyxy boxes,
      int64 [N] digit labels).
    """
    count = int(rng.choice(OBJECTS_PER_CANVAS))
    pixel_boxes = place_boxes(rng, count)
    picks = rng.integers(0, len(images), size=count)
    grey = np.zeros((LAYOUT_SIZE, LAYOUT_SIZE), np.uint8)
    for (x0, y0, x1, y1), k in zip(pixel_boxes, picks):
        grey[y0:y1, x0:x1] = digit_to_grey(images[k], y1 - y0, x1 - x0)
    boxes = np.asarray(pixel_boxes, np.float32) / np.float32(LAYOUT_SIZE)
    return (np.repeat(grey[:, :, None], 3, axis=2), boxes,
            np.asarray(labels[picks], np.int64))


def canvas(split: str, index: int, pool=None):
    """Canvas `index` of `split` ('train' | 'test') as the builder writes it:
    (image, boxes, box_labels). `pool` = (8x8 images, labels) of the split's digits."""
    test = {"train": False, "test": True}[split]
    if pool is None:
        pool = _pool(test)
    rng = np.random.default_rng((LAYOUT_SEED, int(test), int(index)))
    return make_canvas(rng, *pool)


def _pool(test: bool):
    rows = list(_digits_split(test))
    return (np.stack([image for _, image, _ in rows]),
            np.asarray([label for _, _, label in rows], np.int64))


class LdmDigitsLayout(_EmbeddedBuilder):
    """64x64 canvases of 2-3 digits in boxes (registered as `ldm_digits_layout`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: 2-3 sklearn digits per 64x64 canvas."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "64x64 RGB canvases with 2 or 3 sklearn digits each, every digit scaled "
                f"(bilinear) into its own box of {MIN_SIDE}..{MAX_SIDE} px, boxes at least "
                f"{MARGIN} px apart. boxes: normalised x0,y0,x1,y1; box_labels: the digits."),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(LAYOUT_SIZE, LAYOUT_SIZE, 3),
                                             encoding_format="png"),
                "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
                "box_labels": tfds.features.Tensor(shape=(None,), dtype=np.int64),
                "id": np.int64,
            }),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples("train", NUM_TRAIN_CANVASES),
                "test": self._generate_examples("test", NUM_TEST_CANVASES)}

    def _generate_examples(self, split: str, count: int):
        pool = _pool(split == "test")
        for i in range(count):
            image, boxes, labels = canvas(split, i, pool)
            yield i, {"image": digits._png_bytes(image), "boxes": boxes,  # pylint: disable=protected-access
                      "box_labels": labels, "id": i}


# ------------------------------------------------------------------------------- sources


def _source(builder_cls, fields_default: FieldSpec, split, data_dir, holdout, fields,
            box_classes: bool):
    if data_dir is not None and not os.path.isdir(os.path.expanduser(os.fspath(data_dir))):
        raise MissingDataError(
            f"data.data_dir={os.fspath(data_dir)!r} does not exist. Create it, or set "
            f"data.data_dir=None to build the {builder_cls.name} data set under <cwd>/data/tfds.")
    data_dir = digits.ensure_prepared(builder_cls, data_dir)
    source = CachedSource(tfds_source(builder_cls.name, split, data_dir, holdout=holdout))
    source = CanonicalFieldsSource(source, (fields or FieldSpec()).filled(fields_default))
    if box_classes:
        source.num_classes["box_labels"] = digits.NUM_CLASSES
        source.class_names["box_labels"] = [str(d) for d in range(digits.NUM_CLASSES)]
    return source


def captions_source(split: str, data_dir: str | os.PathLike | None = None, *,
                    holdout: HoldoutPolicy | None = None, fields: FieldSpec | None = None):
    """The `ldm_digits_captions` split (built on first use under `data_dir`, None =
    <cwd>/data/tfds): {'image', 'label', 'id', 'caption': list of 3 str}. `fields` (from the
    config) may name other caption fields; its empty entries default to CAPTIONS_FIELDS."""
    return _source(LdmDigitsCaptions, CAPTIONS_FIELDS, split, data_dir, holdout, fields, False)


def layout_source(split: str, data_dir: str | os.PathLike | None = None, *,
                  holdout: HoldoutPolicy | None = None, fields: FieldSpec | None = None):
    """The `ldm_digits_layout` split (built on first use under `data_dir`): {'image' 64x64,
    'boxes' float32 [N, 4] xyxy, 'box_labels' int64 [N], 'id'}; `num_classes` and
    `class_names` describe 'box_labels' (the ten digits)."""
    return _source(LdmDigitsLayout, LAYOUT_FIELDS, split, data_dir, holdout, fields, True)


__all__ = [
    "CAPTIONS_NAME", "CAPTIONS_PER_IMAGE", "DIGIT_WORDS", "HELDOUT_PHRASINGS", "LAYOUT_NAME",
    "LAYOUT_SIZE", "LdmDigitsCaptions", "LdmDigitsLayout", "MARGIN", "MAX_SIDE", "MIN_SIDE",
    "NUM_TEST_CANVASES", "NUM_TRAIN_CANVASES", "TRAIN_PHRASINGS", "canvas", "captions_for",
    "captions_source", "draw_captions", "layout_source", "make_canvas", "place_boxes",
]

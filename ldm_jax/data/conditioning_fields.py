"""Canonical conditioning fields: captions, object layouts and image conditions, whatever the
source calls them.

Every image source can carry, besides its image and class label, the fields text, layout and
image conditioning read, under fixed names and types:

  'caption':      str, or list[str] when an image has several captions ('' = no caption);
  'boxes':        float32 [N, 4], normalised xyxy (x0, y0, x1, y1 in [0, 1]), N may be 0;
  'box_labels':   int64 [N], the class of each box;
  'segmentation': [H, W] class ids, the size of the image: uint8 when every id is <= 255
                  (always for a uint8 source), else int32 (semantic synthesis);
  'low_res':      uint8 [h, w, 3], a given low-resolution version of the image, h/H = w/W
                  (super-resolution with degradation 'given').

Which source field holds them is configured per data set (`data.caption_key`,
`data.boxes_key`, `data.box_labels_key`, `data.box_format`, `data.segmentation_key`,
`data.low_res_key`; see `FieldSpec`); nested TFDS features are paths with '/'
('captions/text', 'objects/bbox'). `CanonicalFieldsSource` wraps a source and adds the
canonical fields to each example; `ldm_jax.data.registry.make_source` applies it. From there
on, the pipeline (`condition_fields`, the `condition_fn` hook), precompute_latents (the
latents features of the same names) and the digits data sets of
`ldm_jax.data.digits_conditioned` / `ldm_jax.data.digits_image_tasks` use only the canonical
names.

Image fields follow the image's geometry (`transform_image_fields`): when the image is
resized (short side to data.image_size), cropped and flipped, the label map gets the same
crop and flip after a NEAREST resize to the resized image, and the low-resolution image the
same crop in its own frame (the window scaled by h/H, w/W) and a bicubic resize to
image_size * h/H pixels, which must be a whole number (else a DataConfigError: the two cannot
stay consistent).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ldm_jax.data import transforms
from ldm_jax.data.sources import DataConfigError

CAPTION = "caption"
BOXES = "boxes"
BOX_LABELS = "box_labels"
SEGMENTATION = "segmentation"
LOW_RES = "low_res"
CANONICAL_KEYS = (CAPTION, BOXES, BOX_LABELS, SEGMENTATION, LOW_RES)
# The canonical fields that are images: they follow the image's crop, resize and flip.
IMAGE_FIELDS = (SEGMENTATION, LOW_RES)
# Latents only (latents.keep_images): the center-cropped image that was encoded, uint8
# [H, W, 3], stored by precompute_latents beside its latent.
IMAGE = "image"
# Latents only (conditioning.precompute_context): a frozen text encoder's output for each of
# the example's captions, float32 [k, L, width], stored by precompute_latents.
CONTEXT = "context"
# 'xyxy': x0, y0, x1, y1; 'yxyx': ymin, xmin, ymax, xmax (TFDS BBoxFeature). Both normalised.
BOX_FORMATS = ("xyxy", "yxyx")

# condition_fn(fields, rng, train) -> {name: fixed-shape array} (see `merge_condition`).
ConditionFn = Callable[[dict, "np.random.Generator | None", bool], dict]


# ---------------------------------------------------------------------------- the config


def _keys(value, field: str) -> tuple[str, ...]:
    """'a' / 'a,b' / ['a', 'b'] / '' -> tuple of source field paths."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        parts = value.split(",")
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise DataConfigError(f"data.{field}={value!r} must be a string (a source field, "
                              "nested paths with '/', several comma separated) or ''.")
    keys = tuple(str(p).strip().strip("/") for p in parts)
    if not all(keys):
        raise DataConfigError(f"data.{field}={value!r} has an empty field name.")
    return keys


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """Where a source keeps its captions and layouts (empty = it has none).

    caption_keys: source fields holding captions; several fields are joined into one list.
    boxes_key / box_labels_key: source fields of the boxes [N, 4] and their classes [N].
    box_format: 'xyxy' or 'yxyx' (TFDS BBoxFeature), both normalised to [0, 1].
    segmentation_key: source field of a label map [H, W] (or [H, W, 1]) of class ids.
    low_res_key: source field of a low-resolution image [h, w, 3] (or greyscale) uint8.
    """

    caption_keys: tuple[str, ...] = ()
    boxes_key: str = ""
    box_labels_key: str = ""
    box_format: str = "xyxy"
    segmentation_key: str = ""
    low_res_key: str = ""

    def __post_init__(self):
        if self.box_format not in BOX_FORMATS:
            raise DataConfigError(
                f"data.box_format={self.box_format!r} must be one of {list(BOX_FORMATS)}: "
                "'xyxy' = x0,y0,x1,y1, 'yxyx' = ymin,xmin,ymax,xmax (TFDS BBoxFeature), "
                "both normalised to [0, 1].")
        if self.box_labels_key and not self.boxes_key:
            raise DataConfigError(
                f"data.box_labels_key={self.box_labels_key!r} is set but data.boxes_key is "
                "empty; set data.boxes_key to the field of the boxes (e.g. 'objects/bbox').")

    @classmethod
    def from_config(cls, data_cfg) -> FieldSpec:
        """The spec of a `data` config: caption_key, boxes_key, box_labels_key, box_format,
        segmentation_key, low_res_key.

        The one place these fields are read with a fallback: a `data` group built by hand
        rather than by `defaults.data_config` (older tests and tools) may lack them, and
        lacking them means what their defaults mean, no conditioning fields.
        """
        def field(name, default=""):
            return data_cfg.get(name, default) if hasattr(data_cfg, "get") else getattr(
                data_cfg, name, default)

        single = {}
        for name in ("boxes_key", "box_labels_key", "segmentation_key", "low_res_key"):
            keys = _keys(field(name), name)
            if len(keys) > 1:
                raise DataConfigError(f"data.{name}={field(name)!r} names several fields; it "
                                      "names one field (nested with '/'), or '' for none.")
            single[name] = "".join(keys)
        return cls(_keys(field("caption_key"), "caption_key"), single["boxes_key"],
                   single["box_labels_key"], str(field("box_format") or "xyxy"),
                   single["segmentation_key"], single["low_res_key"])

    @property
    def active(self) -> bool:
        return bool(self.caption_keys or self.boxes_key or self.segmentation_key or
                    self.low_res_key)

    def filled(self, defaults: FieldSpec) -> FieldSpec:
        """This spec with its empty entries taken from `defaults` (a data set's own names)."""
        own_boxes = bool(self.boxes_key)
        return FieldSpec(
            self.caption_keys or defaults.caption_keys,
            self.boxes_key if own_boxes else defaults.boxes_key,
            self.box_labels_key if own_boxes else defaults.box_labels_key,
            self.box_format if own_boxes else defaults.box_format,
            self.segmentation_key or defaults.segmentation_key,
            self.low_res_key or defaults.low_res_key)


# ------------------------------------------------------------------------ field conversion


def field_paths(example: Mapping, prefix: str = "") -> list[str]:
    """Every field of a (nested) example as a '/' path, for error messages."""
    paths = []
    for key, value in example.items():
        if isinstance(value, Mapping):
            paths.extend(field_paths(value, f"{prefix}{key}/"))
        else:
            paths.append(f"{prefix}{key}")
    return sorted(paths)


def get_field(example: Mapping, path: str, config_field: str) -> Any:
    """example['a']['b'] for path 'a/b'; a DataConfigError naming `data.<config_field>` and
    the available fields when it is missing."""
    value: Any = example
    for part in path.split("/"):
        if not isinstance(value, Mapping) or part not in value:
            raise DataConfigError(
                f"data.{config_field}={path!r} is not a field of this data set (fields: "
                f"{field_paths(example)}); set it to one of them (nested with '/'), or '' "
                "for none.")
        value = value[part]
    return value


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def normalize_caption(value) -> str | list[str]:
    """A caption value as sources store it (str, bytes, numpy bytes/object arrays, lists)
    -> stripped str when there is one caption ('' when none), list[str] when several."""
    if isinstance(value, np.ndarray):
        value = value.item() if value.ndim == 0 else value.reshape(-1).tolist()
    if isinstance(value, (list, tuple)):
        texts = [t for t in (_text(v).strip() for v in value) if t]
        if len(texts) != 1:
            return texts if texts else ""
        return texts[0]
    return _text(value).strip()


def caption_list(caption) -> list[str]:
    """A canonical caption as a list (one entry per caption; [] for none)."""
    caption = normalize_caption(caption)
    if isinstance(caption, list):
        return caption
    return [caption] if caption else []


def boxes_to_xyxy(boxes, box_format: str = "xyxy") -> np.ndarray:
    """Boxes [N, 4] in `box_format` ('xyxy' | 'yxyx') -> float32 [N, 4] xyxy."""
    if box_format not in BOX_FORMATS:
        raise DataConfigError(f"data.box_format={box_format!r} must be one of "
                              f"{list(BOX_FORMATS)}.")
    arr = np.asarray(boxes, np.float32)
    if arr.size == 0:
        return np.zeros((0, 4), np.float32)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise DataConfigError(f"data.boxes_key: boxes must have shape [N, 4], got {arr.shape}.")
    if box_format == "yxyx":
        arr = arr[:, [1, 0, 3, 2]]
    return np.ascontiguousarray(arr, np.float32)


def segmentation_map(value, key: str = "segmentation_key") -> np.ndarray:
    """A label map as sources store it ([H, W] or [H, W, 1], any integer or bool dtype) ->
    [H, W] class ids: uint8 when the source's dtype is uint8 / bool or every id is <= 255,
    else int32. Negative ids, floats and other shapes are a DataConfigError naming
    `data.<key>`."""
    arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.dtype.kind not in "biu" or arr.size == 0:
        raise DataConfigError(
            f"data.{key}: a label map must be [H, W] (or [H, W, 1]) integer class ids, got "
            f"dtype {arr.dtype} shape {arr.shape}; point data.{key} at the label map field.")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "b":
        return arr.astype(np.uint8)
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high > np.iinfo(np.int32).max:
        raise DataConfigError(
            f"data.{key}: label map class ids must be in 0..{np.iinfo(np.int32).max}, got "
            f"{low}..{high}.")
    return arr.astype(np.uint8 if high <= 255 else np.int32)


def low_res_image(value, key: str = "low_res_key") -> np.ndarray:
    """A low-resolution image as sources store it -> uint8 [h, w, 3] (greyscale replicated,
    alpha dropped); other shapes and dtypes are a DataConfigError naming `data.<key>`."""
    arr = np.asarray(value)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if (arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or arr.dtype != np.uint8
            or arr.size == 0):
        raise DataConfigError(
            f"data.{key}: a low-resolution image must be uint8 [h, w, 3] (or greyscale [h, w], "
            f"RGBA [h, w, 4]), got dtype {arr.dtype} shape {arr.shape}; point data.{key} at "
            "the low-resolution image field.")
    if arr.shape[-1] == 1:
        return np.repeat(arr, 3, axis=2)
    return arr[:, :, :3]


def canonical_fields(example: Mapping, spec: FieldSpec) -> dict[str, Any]:
    """The canonical fields of one raw example under `spec` (only those it configures)."""
    out: dict[str, Any] = {}
    if spec.caption_keys:
        captions: list[str] = []
        for key in spec.caption_keys:
            captions.extend(caption_list(get_field(example, key, "caption_key")))
        out[CAPTION] = normalize_caption(captions)
    if spec.boxes_key:
        boxes = boxes_to_xyxy(get_field(example, spec.boxes_key, "boxes_key"), spec.box_format)
        out[BOXES] = boxes
        if spec.box_labels_key:
            labels = np.asarray(get_field(example, spec.box_labels_key, "box_labels_key"))
            labels = labels.reshape(-1)
            if labels.shape[0] != boxes.shape[0] or (
                    labels.size and not np.issubdtype(labels.dtype, np.integer)):
                raise DataConfigError(
                    f"data.box_labels_key={spec.box_labels_key!r} must hold one integer class "
                    f"per box: got dtype {labels.dtype} shape {labels.shape} for "
                    f"{boxes.shape[0]} boxes (data.boxes_key={spec.boxes_key!r}).")
            out[BOX_LABELS] = labels.astype(np.int64)
    if spec.segmentation_key:
        out[SEGMENTATION] = segmentation_map(
            get_field(example, spec.segmentation_key, "segmentation_key"))
    if spec.low_res_key:
        out[LOW_RES] = low_res_image(get_field(example, spec.low_res_key, "low_res_key"))
    return out


# --------------------------------------------------------------------- image field geometry


def center_geometry(height: int, width: int, image_size: int) -> transforms.Geometry:
    """The `transforms.Geometry` of the pipeline's eval preprocessing of a height x width
    image (short side resized to image_size, center crop, no flip), without its pixels.

    Mirrors `transforms.resize_short_side` and `transforms.preprocess_image_with_geometry`
    (a test checks they agree), so precompute_latents can move image fields into the frame
    of the encoded image without preprocessing the image twice.
    """
    h, w, size = int(height), int(width), int(image_size)
    if min(h, w) != size:
        scale = size / min(h, w)
        if h <= w:
            h, w = size, max(size, int(round(w * scale)))
        else:
            h, w = max(size, int(round(h * scale))), size
    return transforms.Geometry(h, w, (h - size) // 2, (w - size) // 2, size)


def _crop_and_flip(array: np.ndarray, geometry: transforms.Geometry) -> np.ndarray:
    g = geometry
    array = array[g.top:g.top + g.size, g.left:g.left + g.size]
    if g.flipped:
        array = array[:, ::-1]
    return np.ascontiguousarray(array)


def transform_segmentation(seg: np.ndarray, geometry: transforms.Geometry,
                           image_hw: Sequence[int]) -> np.ndarray:
    """A label map of an image_hw image -> the label map of the output square of `geometry`:
    NEAREST resize to the resized image (no new class ids), then the same crop and flip."""
    from PIL import Image

    seg = segmentation_map(seg)
    height, width = int(image_hw[0]), int(image_hw[1])
    if seg.shape != (height, width):
        raise DataConfigError(
            f"data.segmentation_key: the label map is {seg.shape[1]}x{seg.shape[0]} (WxH) but "
            f"its image is {width}x{height}; a label map must have its image's size.")
    g = geometry
    if (g.resized_h, g.resized_w) != seg.shape:
        # uint8 -> PIL 'L', int32 -> 'I': NEAREST keeps the ids of either.
        seg = np.asarray(Image.fromarray(seg).resize((g.resized_w, g.resized_h), Image.NEAREST),
                         seg.dtype)
    return _crop_and_flip(seg, g)


def low_res_output_size(low_hw: Sequence[int], image_hw: Sequence[int], image_size: int) -> int:
    """The side of the output low-resolution square: image_size * h/H (= image_size * w/W);
    a DataConfigError when it is not a whole number or the two ratios differ (the
    low-resolution image could not stay aligned with the image's crop)."""
    h, w = int(low_hw[0]), int(low_hw[1])
    height, width = int(image_hw[0]), int(image_hw[1])
    sides = (image_size * h / height, image_size * w / width)
    side = int(round(sides[0]))
    factor = height // h if h and height % h == 0 and width == w * (height // h) else 0
    hint = (f"set data.image_size to a multiple of {factor}" if factor else
            "resize the low-resolution images to a whole fraction of their images' size")
    if any(abs(s - side) > 1e-6 for s in sides) or side < 1:
        raise DataConfigError(
            f"data.low_res_key: the low-resolution image is {w}x{h} (WxH) and its image "
            f"{width}x{height}, so at data.image_size={image_size} it would be "
            f"{sides[1]:g}x{sides[0]:g} px; the two stay aligned only when data.image_size * "
            f"h/H and data.image_size * w/W are the same whole number: {hint}.")
    return side


def transform_low_res(low: np.ndarray, geometry: transforms.Geometry,
                      image_hw: Sequence[int]) -> np.ndarray:
    """A low-resolution image of an image_hw image -> the low-resolution image of the output
    square of `geometry`: the crop window in its own frame (scaled by h/H, w/W; sub-pixel
    windows are resampled, not rounded), bicubic-resized to `low_res_output_size`, then
    flipped with the image."""
    from PIL import Image

    low = low_res_image(low)
    g = geometry
    side = low_res_output_size(low.shape[:2], image_hw, g.size)
    h, w = low.shape[:2]
    box = (g.left * w / g.resized_w, g.top * h / g.resized_h,
           (g.left + g.size) * w / g.resized_w, (g.top + g.size) * h / g.resized_h)
    whole = [int(round(b)) for b in box]
    if all(abs(b - r) < 1e-6 for b, r in zip(box, whole)) and \
            whole[2] - whole[0] == side and whole[3] - whole[1] == side:
        out = low[whole[1]:whole[3], whole[0]:whole[2]]  # same size: the pixels as they are
    else:
        out = np.asarray(Image.fromarray(np.ascontiguousarray(low)).resize(
            (side, side), Image.BICUBIC, box=box), np.uint8)
    if g.flipped:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def transform_image_fields(fields: Mapping, geometry: transforms.Geometry,
                           image_hw: Sequence[int]) -> dict[str, Any]:
    """`fields` with its image fields ('segmentation', 'low_res') moved into the output square
    of `geometry` (the image was image_hw before the pipeline's resize, crop and flip), as
    `transforms.transform_boxes` moves boxes; other fields are returned as they are."""
    out = dict(fields)
    if SEGMENTATION in out:
        out[SEGMENTATION] = transform_segmentation(out[SEGMENTATION], geometry, image_hw)
    if LOW_RES in out:
        out[LOW_RES] = transform_low_res(out[LOW_RES], geometry, image_hw)
    return out


def flip_image_fields(fields: Mapping) -> dict[str, Any]:
    """`fields` of a left-right mirrored example: 'image', 'segmentation' and 'low_res'
    mirrored (boxes are `transforms.flip_boxes`'s business)."""
    out = dict(fields)
    for key in (IMAGE,) + IMAGE_FIELDS:
        if key in out:
            out[key] = np.ascontiguousarray(np.asarray(out[key])[:, ::-1])
    return out


def _nested_feature(features, path: str):
    """The TFDS feature at a '/' path (through Sequence features), or None."""
    feature = features
    for part in path.split("/"):
        while hasattr(feature, "feature") and not hasattr(feature, "keys"):
            feature = feature.feature  # tfds Sequence(...) of a dict or a leaf
        try:
            feature = feature[part]
        except (KeyError, TypeError, IndexError):
            return None
    while hasattr(feature, "feature") and not hasattr(feature, "keys"):
        feature = feature.feature
    return feature


class CanonicalFieldsSource:
    """A source whose examples also hold the canonical fields of `spec` (see the module doc).

    Has the `split`, `num_classes`, `class_names`, `holdout` and `features` of the wrapped
    source (other attributes are forwarded to it); when the box labels or the label map are
    a TFDS ClassLabel (e.g. COCO's 'objects/label'), its class count and names are added
    under 'box_labels' / 'segmentation'. Thread-safe and picklable when the wrapped source is.
    """

    def __init__(self, source, spec: FieldSpec):
        self._source = source
        self.spec = spec
        self.split = getattr(source, "split", None)
        self.holdout = getattr(source, "holdout", None)
        self.features = getattr(source, "features", None)
        # The canonical fields every example of this source has (precompute gives them
        # their fixed latents features).
        single = ((BOXES, spec.boxes_key), (BOX_LABELS, spec.box_labels_key),
                  (SEGMENTATION, spec.segmentation_key), (LOW_RES, spec.low_res_key))
        self.canonical_keys = tuple(
            k for k, on in ((CAPTION, spec.caption_keys),) + single if on)
        # Top-level source fields the canonical ones are read from (not carried twice).
        paths = spec.caption_keys + tuple(path for _, path in single if path)
        self.consumed_keys = tuple(sorted({p.split("/")[0] for p in paths} -
                                          set(self.canonical_keys)))
        self.num_classes = dict(getattr(source, "num_classes", {}) or {})
        self.class_names = dict(getattr(source, "class_names", {}) or {})
        for key, path in ((BOX_LABELS, spec.box_labels_key),
                          (SEGMENTATION, spec.segmentation_key)):
            label = _nested_feature(self.features, path) if path and \
                self.features is not None else None
            if label is not None and hasattr(label, "num_classes") and hasattr(label, "names"):
                self.num_classes[key] = int(label.num_classes)
                self.class_names[key] = [str(n) for n in label.names]

    def __getattr__(self, name: str):
        # Everything else (a folder's relpaths, unreadable counts...) is the wrapped source's.
        # Dunder and private names are not forwarded, so pickling and copying stay plain.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._source, name)

    def _convert(self, example: dict) -> dict:
        example = dict(example)
        example.update(canonical_fields(example, self.spec))
        return example

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return self._convert(self._source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        getitems = getattr(self._source, "__getitems__", None)
        examples = getitems(indices) if getitems else [self._source[i] for i in indices]
        return [self._convert(e) for e in examples]

    def __repr__(self) -> str:
        return f"CanonicalFieldsSource({self._source!r}, {self.spec})"


# ------------------------------------------------------------------------ the condition hook


def condition_fields(example: Mapping, label_key: str | None = None, *,
                     with_image: bool = False) -> dict[str, Any]:
    """What a `condition_fn` receives: the canonical fields present in `example`, as
    caption str | list[str], boxes float32 [N, 4], box_labels int64 [N], segmentation
    [H, W] uint8 | int32, low_res uint8 [h, w, 3], a precomputed context float32
    [k, L, width], 'label' (the int class id of `label_key`) when there is one, and with
    `with_image` the stored 'image' uint8 [H, W, 3] (latents of latents.keep_images: in a raw
    source example 'image' is the undecoded source image, not a condition).

    The image fields are in the frame of `example`: a latents record's are already those of
    the encoded image; for a raw source example the caller moves them with the image
    (`transform_image_fields`)."""
    fields: dict[str, Any] = {}
    if CAPTION in example:
        fields[CAPTION] = normalize_caption(example[CAPTION])
    if CONTEXT in example:
        fields[CONTEXT] = np.asarray(example[CONTEXT], np.float32)
    if BOXES in example:
        fields[BOXES] = boxes_to_xyxy(example[BOXES])
        if BOX_LABELS in example:
            fields[BOX_LABELS] = np.asarray(example[BOX_LABELS], np.int64).reshape(-1)
    if SEGMENTATION in example:
        fields[SEGMENTATION] = np.asarray(example[SEGMENTATION])
    if LOW_RES in example:
        fields[LOW_RES] = np.asarray(example[LOW_RES], np.uint8)
    if with_image and IMAGE in example:
        fields[IMAGE] = np.asarray(example[IMAGE], np.uint8)
    if label_key and label_key in example and np.ndim(example[label_key]) == 0:
        fields["label"] = int(np.asarray(example[label_key]))
    return fields


def merge_condition(out: dict, produced: Mapping, reserved: Sequence[str] = ()) -> dict:
    """Adds a condition_fn's outputs to an example dict: numeric numpy arrays only (they are
    stacked into batches and become device arrays) under names not already taken."""
    if not isinstance(produced, Mapping):
        raise TypeError(f"condition_fn must return a dict of numpy arrays, got "
                        f"{type(produced).__name__}.")
    for key, value in produced.items():
        if key in out or key in reserved:
            raise ValueError(f"condition_fn output {key!r} clashes with a batch key "
                             f"({sorted(set(out) | set(reserved))}); rename it.")
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"condition_fn output {key!r} has dtype {arr.dtype}; batches hold "
                            "numbers only (tokenize text into integer ids).")
        out[key] = arr
    return out


__all__ = [
    "BOXES",
    "BOX_FORMATS",
    "BOX_LABELS",
    "CANONICAL_KEYS",
    "CAPTION",
    "CONTEXT",
    "CanonicalFieldsSource",
    "ConditionFn",
    "FieldSpec",
    "IMAGE",
    "IMAGE_FIELDS",
    "LOW_RES",
    "SEGMENTATION",
    "boxes_to_xyxy",
    "canonical_fields",
    "caption_list",
    "center_geometry",
    "condition_fields",
    "field_paths",
    "flip_image_fields",
    "get_field",
    "low_res_image",
    "low_res_output_size",
    "merge_condition",
    "normalize_caption",
    "segmentation_map",
    "transform_image_fields",
    "transform_low_res",
    "transform_segmentation",
]

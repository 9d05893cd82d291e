"""Canonical conditioning fields: captions and object layouts, whatever the source calls them.

Every image source can carry, besides its image and class label, the fields text and layout
conditioning read, under fixed names and types:

  'caption':    str, or list[str] when an image has several captions ('' = no caption);
  'boxes':      float32 [N, 4], normalised xyxy (x0, y0, x1, y1 in [0, 1]), N may be 0;
  'box_labels': int64 [N], the class of each box.

Which source field holds them is configured per data set (`data.caption_key`,
`data.boxes_key`, `data.box_labels_key`, `data.box_format`; see `FieldSpec`); nested TFDS
features are paths with '/' ('captions/text', 'objects/bbox'). `CanonicalFieldsSource` wraps a
source and adds the canonical fields to each example; `ldm_jax.data.registry.make_source`
applies it. From there on, the pipeline (`condition_fields`, the `condition_fn` hook),
precompute_latents (the `caption` / `boxes` / `box_labels` latents features) and the digits
data sets of `ldm_jax.data.digits_conditioned` use only the canonical names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ldm_jax.data.sources import DataConfigError

CAPTION = "caption"
BOXES = "boxes"
BOX_LABELS = "box_labels"
CANONICAL_KEYS = (CAPTION, BOXES, BOX_LABELS)
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
    """

    caption_keys: tuple[str, ...] = ()
    boxes_key: str = ""
    box_labels_key: str = ""
    box_format: str = "xyxy"

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
        """The spec of a `data` config: caption_key, boxes_key, box_labels_key, box_format.

        The one place these fields are read with a fallback: a `data` group built by hand
        rather than by `defaults.data_config` (older tests and tools) may lack them, and
        lacking them means what their defaults mean, no conditioning fields.
        """
        def field(name, default=""):
            return data_cfg.get(name, default) if hasattr(data_cfg, "get") else getattr(
                data_cfg, name, default)

        boxes = _keys(field("boxes_key"), "boxes_key")
        labels = _keys(field("box_labels_key"), "box_labels_key")
        if len(boxes) > 1 or len(labels) > 1:
            raise DataConfigError("data.boxes_key and data.box_labels_key name one field each.")
        return cls(_keys(field("caption_key"), "caption_key"), "".join(boxes),
                   "".join(labels), str(field("box_format") or "xyxy"))

    @property
    def active(self) -> bool:
        return bool(self.caption_keys or self.boxes_key)

    def filled(self, defaults: FieldSpec) -> FieldSpec:
        """This spec with its empty entries taken from `defaults` (a data set's own names)."""
        own_boxes = bool(self.boxes_key)
        return FieldSpec(
            self.caption_keys or defaults.caption_keys,
            self.boxes_key if own_boxes else defaults.boxes_key,
            self.box_labels_key if own_boxes else defaults.box_labels_key,
            self.box_format if own_boxes else defaults.box_format)


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
    source (other attributes are forwarded to it); when the box labels are a TFDS ClassLabel (e.g. COCO's 'objects/label'), its
    class count and names are added under 'box_labels'. Thread-safe and picklable when the
    wrapped source is.
    """

    def __init__(self, source, spec: FieldSpec):
        self._source = source
        self.spec = spec
        self.split = getattr(source, "split", None)
        self.holdout = getattr(source, "holdout", None)
        self.features = getattr(source, "features", None)
        # The canonical fields every example of this source has (precompute gives them
        # their fixed latents features).
        self.canonical_keys = tuple(
            k for k, on in ((CAPTION, spec.caption_keys), (BOXES, spec.boxes_key),
                            (BOX_LABELS, spec.box_labels_key)) if on)
        # Top-level source fields the canonical ones are read from (not carried twice).
        paths = spec.caption_keys + tuple(k for k in (spec.boxes_key, spec.box_labels_key) if k)
        self.consumed_keys = tuple(sorted({p.split("/")[0] for p in paths} -
                                          set(self.canonical_keys)))
        self.num_classes = dict(getattr(source, "num_classes", {}) or {})
        self.class_names = dict(getattr(source, "class_names", {}) or {})
        if spec.box_labels_key and self.features is not None:
            label = _nested_feature(self.features, spec.box_labels_key)
            if label is not None and hasattr(label, "num_classes") and hasattr(label, "names"):
                self.num_classes[BOX_LABELS] = int(label.num_classes)
                self.class_names[BOX_LABELS] = [str(n) for n in label.names]

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


def condition_fields(example: Mapping, label_key: str | None = None) -> dict[str, Any]:
    """What a `condition_fn` receives: the canonical fields present in `example`, as
    caption str | list[str], boxes float32 [N, 4], box_labels int64 [N], a precomputed
    context float32 [k, L, width], and 'label' (the int class id of `label_key`) when there
    is one."""
    fields: dict[str, Any] = {}
    if CAPTION in example:
        fields[CAPTION] = normalize_caption(example[CAPTION])
    if CONTEXT in example:
        fields[CONTEXT] = np.asarray(example[CONTEXT], np.float32)
    if BOXES in example:
        fields[BOXES] = boxes_to_xyxy(example[BOXES])
        if BOX_LABELS in example:
            fields[BOX_LABELS] = np.asarray(example[BOX_LABELS], np.int64).reshape(-1)
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
    "boxes_to_xyxy",
    "canonical_fields",
    "caption_list",
    "condition_fields",
    "field_paths",
    "get_field",
    "merge_condition",
    "normalize_caption",
]

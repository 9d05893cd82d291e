"""Object layouts (boxes + class labels) as token sequences, as the paper's layout-to-image
models feed them to their transformer tau_theta.

The coordinate tokenizer of taming-transformers' layout conditioning (used by LDM's
layout2img): a layout of N objects becomes

  [BOS] (class, top-left corner, bottom-right corner) x N [EOS] [PAD] ... [PAD]

padded to `max_length`. A corner (x, y) in [0, 1] is quantised on a G x G grid (G = `grid`):
cell id round(y * (G - 1)) * G + round(x * (G - 1)). Ids: PAD = 0, BOS = 1, EOS = 2, class c
is 3 + c, corner cell k is 3 + num_classes + k, so vocab_size = 3 + num_classes + G * G. The
empty layout ([BOS][EOS][PAD]...) is the null condition of classifier-free guidance.

Boxes are normalised xyxy (x0, y0, x1, y1), as the data pipeline delivers them
(`ldm_jax.data.conditioning_fields`). `parse_layout` reads the command-line form
"7:0.1,0.1,0.45,0.45;3:0.55,0.5,0.95,0.95".
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from ldm_jax import UserError

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
NUM_SPECIAL = 3
TOKENS_PER_OBJECT = 3
LAYOUT_SYNTAX = "CLASS:x0,y0,x1,y1;CLASS:x0,y0,x1,y1 (coordinates in [0, 1], CLASS an id or name)"


class LayoutError(UserError, ValueError):
    """A layout (boxes, classes, or its text form) is invalid; the message names the object
    and the value at fault."""


class LayoutTruncationWarning(UserWarning):
    """A layout had more objects than fit in max_length tokens; the last ones were dropped."""


def _check_layout(labels, boxes, num_classes: int | None, where: str = "layout"):
    """(labels int64 [N], boxes float64 [N, 4]) validated, or LayoutError."""
    boxes = np.asarray(boxes, np.float64)
    labels = np.asarray(labels)
    if boxes.size == 0 and labels.size == 0:
        return np.zeros((0,), np.int64), np.zeros((0, 4), np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise LayoutError(f"{where}: boxes must have shape [N, 4] (x0, y0, x1, y1), got "
                          f"{boxes.shape}.")
    labels = labels.reshape(-1)
    if labels.shape[0] != boxes.shape[0]:
        raise LayoutError(f"{where}: {labels.shape[0]} labels for {boxes.shape[0]} boxes; "
                          "give one class per box.")
    if not (np.issubdtype(labels.dtype, np.integer) or np.all(np.mod(labels, 1) == 0)):
        raise LayoutError(f"{where}: class ids must be integers, got {labels.tolist()}.")
    labels = labels.astype(np.int64)
    for i, (label, box) in enumerate(zip(labels, boxes)):
        if label < 0 or (num_classes is not None and label >= num_classes):
            span = f"[0, {num_classes})" if num_classes is not None else "the ids >= 0"
            raise LayoutError(f"{where}, object {i}: class id {int(label)} is outside {span}.")
        bad = [v for v in box if not 0.0 <= v <= 1.0]  # NaN fails too
        if bad:
            raise LayoutError(f"{where}, object {i}: box coordinate {bad[0]} is outside [0, 1] "
                              f"(box {box.tolist()}; coordinates are fractions of the image).")
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            raise LayoutError(f"{where}, object {i}: box {box.tolist()} needs x1 > x0 and "
                              "y1 > y0 (x0, y0 = top-left corner, x1, y1 = bottom-right).")
    return labels, boxes


class LayoutTokenizer:
    """Layouts -> int32 token ids [B, max_length] (see the module doc for the format).

    Args:
      num_classes: number of object classes (ids 0..num_classes-1).
      grid: G, the corner quantisation grid (G x G cells).
      max_length: tokens per layout, BOS and EOS included; (max_length - 2) // 3 objects fit.
    """

    def __init__(self, num_classes: int, grid: int = 32, max_length: int = 77):
        if int(num_classes) < 1:
            raise LayoutError(f"num_classes={num_classes}: a layout tokenizer needs at least "
                              "one object class.")
        if int(grid) < 2:
            raise LayoutError(f"grid={grid}: the corner grid needs at least 2 x 2 cells.")
        if int(max_length) < 2:
            raise LayoutError(f"max_length={max_length}: needs room for [BOS] and [EOS].")
        self.num_classes = int(num_classes)
        self.grid = int(grid)
        self.max_length = int(max_length)
        self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID
        self.class_offset = NUM_SPECIAL
        self.coord_offset = NUM_SPECIAL + self.num_classes
        self.vocab_size = self.coord_offset + self.grid * self.grid
        self.max_objects = (self.max_length - 2) // TOKENS_PER_OBJECT

    # -------------------------------------------------------------------------- encoding

    def _corner(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        g = self.grid - 1
        return (self.coord_offset + np.round(y * g).astype(np.int64) * self.grid
                + np.round(x * g).astype(np.int64))

    def __call__(self, layouts: Sequence) -> np.ndarray:
        """int32 [len(layouts), max_length]; each layout is (labels [N] int, boxes [N, 4]
        normalised xyxy). Layouts with more than `max_objects` objects keep the first ones
        (one LayoutTruncationWarning per call says how many were cut).

        Raises:
          LayoutError: a coordinate outside [0, 1], x1 <= x0 or y1 <= y0, a class id outside
            [0, num_classes), or mismatched shapes (naming the layout and object index).
        """
        if (len(layouts) == 2 and isinstance(layouts[1], np.ndarray)
                and layouts[1].ndim == 2 and layouts[1].shape[1] == 4):
            raise LayoutError("the layout tokenizer takes a list of layouts (labels, boxes), got "
                              "a single layout; wrap it in a list.")
        out = np.full((len(layouts), self.max_length), self.pad_id, np.int32)
        truncated = 0
        for row, layout in enumerate(layouts):
            try:
                labels, boxes = layout
            except (TypeError, ValueError):
                raise LayoutError(f"layout {row}: expected a pair (labels [N], boxes [N, 4]), "
                                  f"got {type(layout).__name__}.") from None
            labels, boxes = _check_layout(labels, boxes, self.num_classes, f"layout {row}")
            if len(labels) > self.max_objects:
                truncated += 1
                labels, boxes = labels[:self.max_objects], boxes[:self.max_objects]
            tokens = np.empty((len(labels), TOKENS_PER_OBJECT), np.int64)
            tokens[:, 0] = self.class_offset + labels
            tokens[:, 1] = self._corner(boxes[:, 0], boxes[:, 1])
            tokens[:, 2] = self._corner(boxes[:, 2], boxes[:, 3])
            seq = np.concatenate([[self.bos_id], tokens.reshape(-1), [self.eos_id]])
            out[row, :len(seq)] = seq
        if truncated:
            warnings.warn(f"{truncated} of {len(layouts)} layouts had more than "
                          f"{self.max_objects} objects (max_length={self.max_length} tokens); "
                          "their last objects were dropped.", LayoutTruncationWarning,
                          stacklevel=2)
        return out

    def null(self) -> np.ndarray:
        """int32 [max_length]: the tokens of the empty layout (the unconditional input)."""
        return self([(np.zeros((0,), np.int64), np.zeros((0, 4), np.float32))])[0]

    # -------------------------------------------------------------------------- decoding

    def decode(self, tokens) -> tuple[np.ndarray, np.ndarray]:
        """The layout of one token row [L]: (labels int64 [N], boxes float32 [N, 4] xyxy),
        exact up to the grid quantisation (|error| <= 0.5 / (grid - 1)).

        Raises:
          LayoutError: the row is not a layout token sequence (no BOS, a token out of place).
        """
        ids = [int(t) for t in np.asarray(tokens).reshape(-1)]
        if not ids or ids[0] != self.bos_id:
            raise LayoutError("layout tokens must start with [BOS] (id 1).")
        body = ids[1:]
        end = body.index(self.eos_id) if self.eos_id in body else len(body)
        body = [t for t in body[:end] if t != self.pad_id]
        if len(body) % TOKENS_PER_OBJECT:
            raise LayoutError(f"layout tokens hold {len(body)} object tokens, not a multiple "
                              f"of {TOKENS_PER_OBJECT} (class, corner, corner).")
        labels, boxes = [], []
        g = self.grid - 1
        for i in range(0, len(body), TOKENS_PER_OBJECT):
            cls, first, second = body[i:i + TOKENS_PER_OBJECT]
            if not self.class_offset <= cls < self.coord_offset:
                raise LayoutError(f"object {i // 3}: token {cls} is not a class token.")
            corners = []
            for t in (first, second):
                if not self.coord_offset <= t < self.vocab_size:
                    raise LayoutError(f"object {i // 3}: token {t} is not a corner token.")
                y, x = divmod(t - self.coord_offset, self.grid)
                corners += [x / g, y / g]
            labels.append(cls - self.class_offset)
            boxes.append(corners)
        return (np.asarray(labels, np.int64),
                np.asarray(boxes, np.float32).reshape(-1, 4))

    def identity(self) -> dict:
        """What a run records so a checkpoint is never paired with other token ids."""
        return {"kind": "layout", "format": "class,top_left,bottom_right",
                "num_classes": self.num_classes, "grid": self.grid,
                "max_length": self.max_length, "vocab_size": self.vocab_size,
                "pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id}

    def __repr__(self) -> str:
        return (f"LayoutTokenizer(num_classes={self.num_classes}, grid={self.grid}, "
                f"max_length={self.max_length})")


def parse_layout(text: str, class_names: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
    """The command-line form of a layout -> (labels int64 [N], boxes float32 [N, 4]).

    "7:0.1,0.1,0.45,0.45;3:0.55,0.5,0.95,0.95": objects separated by ';', each a class (an id,
    or one of `class_names`, exact or case-insensitive) then ':' and x0,y0,x1,y1 in [0, 1].
    Empty text is the empty layout. Class ids are checked against len(class_names) when
    names are given.

    Raises:
      LayoutError: malformed text, an unknown class name, or an invalid box (naming the
        object and the value).
    """
    names = [str(n) for n in class_names]
    lower = {n.lower(): i for i, n in reversed(list(enumerate(names)))}
    labels, boxes = [], []
    items = [item.strip() for item in str(text or "").split(";")]
    items = [item for item in items if item]
    for i, item in enumerate(items):
        cls, sep, coords = item.partition(":")
        cls = cls.strip()
        if not sep or not cls:
            raise LayoutError(f"layout object {i} {item!r}: expected {LAYOUT_SYNTAX}.")
        if cls in names:
            label = names.index(cls)
        elif cls.lower() in lower:
            label = lower[cls.lower()]
        else:
            try:
                label = int(cls)
            except ValueError:
                known = f"; known classes: {names}" if names else ""
                raise LayoutError(f"layout object {i}: unknown class {cls!r} (give a class id "
                                  f"or name{known}).") from None
        parts = [p.strip() for p in coords.split(",")]
        try:
            box = [float(p) for p in parts]
        except ValueError:
            box = []
        if len(box) != 4:
            raise LayoutError(f"layout object {i} {item!r}: the box must be four numbers "
                              f"x0,y0,x1,y1, got {coords.strip()!r}; expected {LAYOUT_SYNTAX}.")
        labels.append(label)
        boxes.append(box)
    labels_arr = np.asarray(labels, np.int64)
    boxes_arr = np.asarray(boxes, np.float64).reshape(-1, 4)
    _check_layout(labels_arr, boxes_arr, len(names) if names else None, "layout")
    return labels_arr, boxes_arr.astype(np.float32)


__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "LayoutError", "LayoutTokenizer",
           "LayoutTruncationWarning", "parse_layout"]

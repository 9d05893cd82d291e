"""Reading a source for `ldm_jax.data.precompute`: one shard's records as host-local
batches of center-cropped images plus the fields each latent record keeps (captions, boxes,
label maps and low-resolution images moved into the encoded image's frame)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from ldm_jax.data import conditioning_fields, pipeline, transforms
from ldm_jax.data.latents_writer import PrecomputeError


def reader_cfg(source_data) -> ml_collections.ConfigDict:
    """source_data as a `data` config for the pipeline: eval-style reads, no label check
    (labels travel with the other conditioning fields)."""
    cfg = copy.deepcopy(source_data)
    cfg.random_crop = False
    cfg.random_flip = False
    cfg.label_key = None
    return cfg


class RangeSource:
    """Records [start, stop) of a source, re-indexed from 0 (one shard's worth)."""

    def __init__(self, source, start: int, stop: int):
        self._source, self._start, self._len = source, start, stop - start

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict:
        return self._source[self._start + int(i)]


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """What a record stores besides its latent and kept fields: the encoded image
    (keep_images) and the dtype of the label map feature (uint8 or int32)."""

    keep_images: bool = False
    segmentation_dtype: Any = np.uint8


class ShardExampleFn:
    """(index in shard, raw example) -> {'image', 'index' (in split), 'extras' (kept fields)}.

    Canonical conditioning fields (`canonical`: the source's `canonical_keys`) are stored in
    their fixed types, with boxes, label maps and low-resolution images moved into the frame
    of the encoded, center-cropped image; with `options.keep_images` the extras also hold that
    image as 'image' uint8 [H, W, 3].
    """

    def __init__(self, data_cfg, keep: Sequence[str], offset: int,
                 canonical: Sequence[str] = (), options: ImageOptions = ImageOptions()):
        self._image_fn = pipeline._ExampleFn(data_cfg, train=False)  # pylint: disable=protected-access
        self._image_key, self._size = data_cfg.image_key, int(data_cfg.image_size)
        self._keep, self._offset = tuple(keep), offset
        canonical = tuple(k for k in canonical if k in self._keep)
        # Image fields are moved here, from the raw example: the image pipeline never sees
        # them, so they are transformed exactly once.
        self._image_fields = tuple(k for k in canonical
                                   if k in conditioning_fields.IMAGE_FIELDS)
        self._canonical = tuple(k for k in canonical if k not in self._image_fields)
        self._options = options

    def __call__(self, indexed):
        index, example = indexed
        raw = {k: example[k] for k in self._image_fields if k in example}
        if raw:
            example = {k: v for k, v in example.items() if k not in raw}
        out, fields = self._image_fn.example_and_fields((index, example),
                                                        with_fields=bool(self._canonical))
        # 0-d arrays -> python scalars / bytes: what TFDS's ClassLabel and Text encoders take.
        extras = {k: example[k].item() if np.ndim(example[k]) == 0 and
                  isinstance(example[k], np.ndarray) else example[k]
                  for k in self._keep if k not in self._image_fields}
        extras.update(self._moved_image_fields(raw, example, index))
        if self._options.keep_images:
            # The encoded pixels themselves: uint8 -> [-1, 1] -> uint8 is exact.
            extras[conditioning_fields.IMAGE] = transforms.images_to_uint8(out["image"])
        for key in self._canonical:
            value = fields.get(key)
            if key == conditioning_fields.CAPTION:
                value = conditioning_fields.caption_list(value if value is not None else "")
            elif value is None:  # box labels without boxes: empty like the boxes
                value = np.zeros((0, 4) if key == conditioning_fields.BOXES else (0,),
                                 np.float32 if key == conditioning_fields.BOXES else np.int64)
            extras[key] = value
        return {"image": out["image"], "index": index + self._offset, "extras": extras}

    def _moved_image_fields(self, raw: dict, example: dict, index: int) -> dict:
        """The label map / low-resolution image of a raw example in the encoded frame (the
        eval preprocessing's center crop, `conditioning_fields.center_geometry`)."""
        if not raw:
            return {}
        height, width = np.shape(example[self._image_key])[:2]
        geometry = conditioning_fields.center_geometry(height, width, self._size)
        moved = conditioning_fields.transform_image_fields(raw, geometry, (height, width))
        seg = moved.get(conditioning_fields.SEGMENTATION)
        if seg is not None:
            dtype = np.dtype(self._options.segmentation_dtype)
            if seg.size and int(seg.max()) > np.iinfo(dtype).max:
                raise PrecomputeError(
                    f"example {index + self._offset}'s label map has class id {int(seg.max())}, "
                    f"but the first example fixed the stored segmentation dtype to {dtype}; "
                    "give the source's label maps one integer type (int32 for ids above 255).")
            moved[conditioning_fields.SEGMENTATION] = seg.astype(dtype)
        return moved


def shard_batches(source, data_cfg, keep, start: int, stop: int, local_batch: int,
                   num_batches: int, image_shape,
                   image_options: ImageOptions = ImageOptions()):
    """Host-local batches of one shard: {'image', 'index', 'mask', 'extras' (list)}.

    Reuses the image pipeline's eval preprocessing (center crop, no flip) and its threaded
    reads; batches are assembled here because conditioning fields (captions, variable-length
    boxes) cannot be stacked by grain. Padded with zero images (mask False) to `num_batches`
    so every host runs the same number of encode steps in a round.
    """
    import grain

    examples = iter(())
    if stop > start:
        ds = grain.MapDataset.source(RangeSource(source, start, stop)).map_with_index(
            lambda i, x: (i, x)).map(ShardExampleFn(
                data_cfg, keep, start, getattr(source, "canonical_keys", ()), image_options))
        threads = int(data_cfg.num_threads)
        options = grain.ReadOptions(num_threads=threads if threads > 1 else 0,
                                    prefetch_buffer_size=max(int(data_cfg.prefetch), 1)
                                    if threads > 1 else 0)
        examples = iter(ds.to_iter_dataset(options))
    for _ in range(num_batches):
        rows = [e for _, e in zip(range(local_batch), examples)]
        n = len(rows)
        images = np.zeros((local_batch,) + tuple(image_shape), np.float32)
        index = np.zeros((local_batch,), np.int32)
        for j, row in enumerate(rows):
            images[j], index[j] = row["image"], row["index"]
        yield {"image": images, "index": index, "mask": np.arange(local_batch) < n,
               "extras": [row["extras"] for row in rows]}


class Subset:
    """The records `indices` of a source (the scale_by_std sample)."""

    def __init__(self, source, indices: np.ndarray):
        self._source, self._indices = source, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> dict:
        return self._source[int(self._indices[int(i)])]

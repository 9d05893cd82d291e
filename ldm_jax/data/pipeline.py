"""Deterministic, resumable, multi-host image input pipeline (grain, no TensorFlow).

Train stream. Conceptually there is ONE global stream of examples: the source is shuffled
with a per-epoch reshuffle and repeated forever (`grain.MapDataset.shuffle(...).repeat(None)`)
and each position `g` of that stream is augmented with an RNG that depends only on
(seed, g). The global batch at step `s` is positions [s*B, (s+1)*B), and host `p` of `P`
reads the p-th contiguous slice of it, positions s*B + p*b + [0, b) with b = B // P. Because
everything is random access by position:

* the batches are a pure function of (seed, step), so resuming at `start_step=k` gives
  exactly the batches an uninterrupted run gives from step k (no iterator state to save
  beyond the step number), and
* the union over hosts of the host-local batches is the same global batch whatever the
  number of hosts, pixels included.

Each host only reads (and decodes) its own b examples per step. Batches are prefetched by a
pool of threads (`grain.ReadOptions`); threads rather than processes because decoding is in
PIL / array_record, which release the GIL, and processes would need absl flags parsed.

Eval stream. One pass over the eval split, no shuffle, center crop, no flip, padded with
copies of example 0 to a whole number of global batches; `mask` is False on padding, so every
example is counted exactly once across hosts.

Batch dicts (host-local, b = global_batch_size // process_count):
  'image': float32 [b, H, W, 3] in [-1, 1]
  'label': int32 [b]            (only if data.label_key is set)
  'index': int32 [b]            (record index in the split; -1 on eval padding)
  'mask':  bool [b]             (eval only; False marks padding)

Config fields read (`data` ConfigDict): source, name, data_dir, folder, image_size,
train_split, eval_split, image_key, label_key, random_crop, random_flip, num_threads, prefetch;
and, by the sources (`registry.make_source`), caption_key, boxes_key, box_labels_key,
box_format.

Latents (`data.source='latents'`, records precomputed by `python -m
ldm_jax.precompute_latents` in `data.latents_dir`): the same streams, shuffling, host slicing
and resume guarantees, with no image preprocessing; batches hold
  'moments': float32 [b, h, w, 2C] (KL first stage) or 'latent': float32 [b, h, w, C] (VQ)
  'label': int32 [b]            (only if data.label_key is set AND the latents carry it)
  'index', 'mask'               (as above)
image_size and random_crop are ignored; random_flip (train only) flips latents left-right.

Conditioning (text, layouts, images). Both iterators take an optional
`condition_fn(fields, rng, train) -> {name: np.ndarray}`. `fields` holds the canonical
conditioning fields of the example (`ldm_jax.data.conditioning_fields`): 'caption' (str, or
list[str] for several captions), 'boxes' (float32 [N, 4] normalised xyxy, already following
the crop and flip of the image or latent), 'box_labels' (int64 [N]), 'segmentation' and
'low_res' (following the image likewise), 'label' (int), each only when present, and 'image'
(uint8 [H, W, 3]: the preprocessed image; for latents the stored one, when kept). `rng` is the example's augmentation generator (a function of (seed,
position), after the crop/flip draws; None on the eval stream), so a resumed run sees the same
choices. Its arrays (fixed shapes, e.g. token ids [L]) are added to the example and batched.
Without a condition_fn, captions and boxes are not put in batches (they do not stack).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from ldm_jax.data import conditioning_fields
from ldm_jax.data import latents as latents_lib
from ldm_jax.data import registry, transforms
from ldm_jax.data.sources import DataConfigError


# ----------------------------------------------------------------------------------- helpers


def _resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # Imported lazily: the pipeline itself never needs JAX.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"Bad process_index={process_index} / process_count={process_count}.")
    return int(process_index), int(process_count)


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise DataConfigError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count} (each host gets global_batch_size // process_count "
            "examples); change the batch size or the number of hosts."
        )
    return global_batch_size // process_count


def _derive_seeds(seed: int) -> tuple[int, int]:
    """Independent 32-bit seeds for the shuffle and the augmentation from one user seed.

    grain's shuffle uses (seed + epoch) per epoch, so feeding the same raw seed to both
    would correlate them; a SeedSequence decorrelates them.
    """
    shuffle_seed, aug_seed = np.random.SeedSequence(int(seed)).generate_state(2)
    return int(shuffle_seed), int(aug_seed)


class _AttachIndex:
    """(index, example) -> (record index, example).

    Under shuffle/repeat, grain hands the source level `epoch * len + record`, hence the mod.
    """

    def __init__(self, num_records: int):
        self.num_records = num_records

    def __call__(self, index: int, example: dict) -> tuple[int, dict]:
        return index % self.num_records, example


class _ExampleFn:
    """Raw source example -> {'image', 'label'?, 'index', condition_fn outputs...}; a class so
    it pickles cleanly."""

    def __init__(self, data_cfg, *, train: bool,
                 condition_fn: conditioning_fields.ConditionFn | None = None):
        self.image_key = data_cfg.image_key
        self.label_key = data_cfg.label_key
        self.image_size = int(data_cfg.image_size)
        self.random_crop = bool(data_cfg.random_crop) and train
        self.random_flip = bool(data_cfg.random_flip) and train
        self.train = train
        self.condition_fn = condition_fn

    def __call__(self, indexed: tuple[int, dict], rng: np.random.Generator | None = None):
        out, fields = self.example_and_fields(indexed, rng,
                                              with_fields=self.condition_fn is not None)
        if self.condition_fn is not None:
            conditioning_fields.merge_condition(out, self.condition_fn(fields, rng, self.train),
                                                reserved=("mask",))
        return out

    def example_and_fields(self, indexed: tuple[int, dict],
                           rng: np.random.Generator | None = None, *, with_fields: bool = True):
        """(example dict, canonical conditioning fields) of a raw example; the fields' boxes
        are moved into the output image's frame (crop, flip)."""
        index, example = indexed
        if self.image_key not in example:
            raise DataConfigError(
                f"data.image_key={self.image_key!r} is not a feature of this data set "
                f"(features: {sorted(example)}); set data.image_key to the image feature."
            )
        image, geometry = transforms.preprocess_image_with_geometry(
            example[self.image_key],
            self.image_size,
            rng=rng,
            random_crop=self.random_crop,
            random_flip=self.random_flip,
            key=self.image_key,
        )
        out = {"image": image, "index": np.int32(index)}
        # Labels only where the data has them: an unlabelled source (a folder without class
        # sub-folders, a TFDS set without this feature) trains unconditional models as is; a
        # task that needs labels checks for them when it starts (conditioning.kind='class').
        if self.label_key and self.label_key in example:
            label = np.asarray(example[self.label_key])
            if label.ndim != 0 or not np.issubdtype(label.dtype, np.integer):
                raise DataConfigError(
                    f"data.label_key={self.label_key!r} must be an integer class id, got "
                    f"dtype {label.dtype} shape {label.shape}."
                )
            out["label"] = label.astype(np.int32)
        fields = {}
        if with_fields:
            fields = conditioning_fields.condition_fields(example, self.label_key)
            if conditioning_fields.BOXES in fields:
                boxes, keep = transforms.transform_boxes(fields[conditioning_fields.BOXES],
                                                         geometry)
                fields[conditioning_fields.BOXES] = boxes
                if conditioning_fields.BOX_LABELS in fields:
                    fields[conditioning_fields.BOX_LABELS] = \
                        fields[conditioning_fields.BOX_LABELS][keep]
            # Label maps and low-resolution images follow the image's resize, crop and flip.
            fields = conditioning_fields.transform_image_fields(
                fields, geometry, np.shape(example[self.image_key])[:2])
            fields[conditioning_fields.IMAGE] = transforms.images_to_uint8(image)
        return out, fields


class _HostSlice(grain.MapDataset):
    """Host-local view of a global stream: local element k -> global position
    (k // b) * B + p * b + k % b, i.e. this host's contiguous slice of every global batch.

    With `num_valid` (eval), positions >= num_valid are padding: they repeat position 0 and
    carry mask=False / index=-1.
    """

    def __init__(self, parent: grain.MapDataset, *, global_batch: int, local_batch: int,
                 process_index: int, num_batches: int | None = None,
                 num_valid: int | None = None):
        super().__init__(parent)
        self._B, self._b, self._p = global_batch, local_batch, process_index
        self._num_valid = num_valid
        if num_batches is None:
            num_batches = len(parent) // global_batch
        self._length = num_batches * local_batch

    def _position(self, k: int) -> int:
        step, j = divmod(k, self._b)
        return step * self._B + self._p * self._b + j

    def __len__(self) -> int:
        return self._length

    def _finish(self, element: dict, position: int) -> dict:
        if self._num_valid is None:
            return element
        valid = position < self._num_valid
        element = dict(element, mask=np.bool_(valid))
        if not valid:
            element["index"] = np.int32(-1)
        return element

    def _parent_index(self, position: int) -> int:
        if self._num_valid is not None and position >= self._num_valid:
            return 0
        return position

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.slice(k)
        position = self._position(k)
        return self._finish(self._parent[self._parent_index(position)], position)

    def _getitems(self, ks: Sequence[int]):
        positions = [self._position(k) for k in ks]
        # Forwarded as one call so that, with grain's batch pushdown, a batch becomes one
        # batched source read.
        elements = self._parent._getitems([self._parent_index(g) for g in positions])  # pylint: disable=protected-access
        return [self._finish(e, g) for e, g in zip(elements, positions)]

    def __str__(self) -> str:
        return f"_HostSlice(B={self._B}, b={self._b}, p={self._p})"


class BatchIterator:
    """Iterator over host-local batch dicts with a `step` counter.

    `step` (also `get_state()['step']`) is the step of the NEXT batch; save it in checkpoints
    and pass it back as `start_step` to resume exactly.
    """

    def __init__(self, batches: grain.MapDataset, *, start_step: int, num_threads: int,
                 prefetch: int, num_batches: int | None = None):
        # num_threads 0/1 means synchronous reads (no background thread).
        threads = int(num_threads) if num_threads and num_threads > 1 else 0
        buffer = max(int(prefetch), 1) if threads else 0
        read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)
        self._iter = iter(batches.to_iter_dataset(read_options))
        self._step = int(start_step)
        self.num_batches = num_batches

    @property
    def step(self) -> int:
        return self._step

    def get_state(self) -> dict[str, int]:
        """{'step': next step}; resume with `make_train_iterator(..., start_step=step)`."""
        return {"step": self._step}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iter)
        self._step += 1
        return batch

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("The train iterator is infinite.")
        return self.num_batches

    def close(self) -> None:
        """Stops prefetch threads."""
        close = getattr(self._iter, "close", None)
        if close is not None:
            close()


def _is_latents(data_cfg) -> bool:
    return data_cfg.source in ("latents", "synthetic_latents")


def _make_example_fn(data_cfg, *, train: bool, condition_fn=None):
    """The per-example transform for the configured source (images, or precomputed latents)."""
    if _is_latents(data_cfg):
        return latents_lib.LatentExampleFn(data_cfg, train=train, condition_fn=condition_fn)
    return _ExampleFn(data_cfg, train=train, condition_fn=condition_fn)


def _check_image_size(data_cfg) -> None:
    if _is_latents(data_cfg):
        return  # latents are used as stored; there is no image to resize.
    size = data_cfg.image_size
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise DataConfigError(f"data.image_size must be a positive int, got {size!r}.")


def _validate_first(source, fn, what: str) -> None:
    """Runs the example fn on record 0 in the calling thread, so config errors (wrong key,
    bad image rank) surface at construction with a clean traceback, not in a worker."""
    if len(source) == 0:
        raise DataConfigError(f"The {what} split is empty.")
    fn((0, source[0]), np.random.default_rng(0))


def _open(data_cfg, *, train: bool, global_batch_size: int, process_index, process_count, source,
          condition_fn=None):
    """Shared set-up of both iterators: host slice size, source of the split, example fn
    (checked on record 0). Returns (process_index, process_count, local_batch, source, fn)."""
    process_index, process_count = _resolve_processes(process_index, process_count)
    local_batch = _local_batch_size(global_batch_size, process_count)
    _check_image_size(data_cfg)
    split = data_cfg.train_split if train else data_cfg.eval_split
    if not split:
        field = "data.train_split" if train else "data.eval_split"
        raise DataConfigError(f"{field} is empty; name the split to read (e.g. 'train', 'test').")
    if source is None:
        source = registry.make_source(data_cfg, split)
    fn = _make_example_fn(data_cfg, train=train, condition_fn=condition_fn)
    _validate_first(source, fn, "train" if train else "eval")
    return process_index, process_count, local_batch, source, fn


# ------------------------------------------------------------------------------- public API


def make_train_iterator(
    data_cfg,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    source=None,
    condition_fn: conditioning_fields.ConditionFn | None = None,
) -> BatchIterator:
    """Infinite iterator over host-local training batches.

    The global batch at step s is a fixed function of (seed, s): global positions
    [s*B, (s+1)*B) of a per-epoch-reshuffled infinite stream, augmented (random crop/flip)
    with an RNG keyed by (seed, position). Host p gets the p-th contiguous slice of size
    b = B // process_count. Resuming with start_step=k yields exactly the batches an
    uninterrupted iterator yields from step k.

    Args:
      data_cfg: the `data` config (see module docstring).
      global_batch_size: B, summed over all hosts.
      seed: data seed (shuffle and augmentation).
      start_step: first step to produce (the saved `iterator.step` when resuming).
      process_index, process_count: this host and the host count; default to
        jax.process_index() / jax.process_count().
      source: optional pre-built random-access source overriding `data.source`.
      condition_fn: optional (fields, rng, train=True) -> {name: array} adding conditioning
        inputs (e.g. token ids) to each example (see the module docstring).

    Returns:
      BatchIterator yielding {'image': f32 [b,H,W,3], 'label': i32 [b] (if data.label_key),
      'index': i32 [b], condition_fn outputs [b, ...]}; `.step` / `.get_state()` give the
      next step.

    Raises:
      ValueError: B not divisible by the process count, bad config (DataConfigError).
    """
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    process_index, process_count, local_batch, source, fn = _open(
        data_cfg, train=True, global_batch_size=global_batch_size, process_index=process_index,
        process_count=process_count, source=source, condition_fn=condition_fn)

    shuffle_seed, aug_seed = _derive_seeds(seed)
    ds = grain.MapDataset.source(source).map_with_index(_AttachIndex(len(source)))
    # shuffle().repeat(None) reshuffles every epoch (epoch e uses shuffle_seed + e) and stays
    # random access, so position g of the infinite stream is computable directly.
    ds = ds.shuffle(seed=shuffle_seed).repeat(None)
    # grain's random_map keys the per-element RNG by (aug_seed, index) where index is the
    # position in THIS dataset, i.e. the global stream position: augmentation is independent
    # of host count, threads and resumption.
    ds = ds.random_map(fn, seed=aug_seed)
    ds = _HostSlice(ds, global_batch=global_batch_size, local_batch=local_batch,
                    process_index=process_index)
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds[start_step:]  # random access by batch index: resuming costs nothing
    return BatchIterator(
        ds,
        start_step=start_step,
        num_threads=data_cfg.num_threads,
        prefetch=data_cfg.prefetch,
    )


def make_eval_iterator(
    data_cfg,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_examples: int | None = None,
    source=None,
    condition_fn: conditioning_fields.ConditionFn | None = None,
) -> BatchIterator:
    """One deterministic pass over the eval split, as host-local batches with a `mask`.

    No shuffle, center crop, no flip. The first `num_examples` (default: all) records are
    laid out as global positions 0..N-1, padded (with copies of record 0, mask=False,
    index=-1) up to ceil(N / B) * B, and host p gets the p-th contiguous slice of each global
    batch, so every example appears exactly once with mask=True across all hosts.

    Args:
      data_cfg: the `data` config.
      global_batch_size: B, summed over all hosts.
      process_index, process_count: default to jax.process_index() / jax.process_count().
      num_examples: evaluate only the first N records of the split.
      source: optional pre-built random-access source overriding `data.source`.
      condition_fn: as for `make_train_iterator`, called with rng=None and train=False.

    Returns:
      BatchIterator (len() = number of batches) yielding {'image', 'label'?, 'index', 'mask',
      condition_fn outputs}.
    """
    process_index, process_count, local_batch, source, fn = _open(
        data_cfg, train=False, global_batch_size=global_batch_size, process_index=process_index,
        process_count=process_count, source=source, condition_fn=condition_fn)
    n = len(source) if num_examples is None else min(int(num_examples), len(source))
    if n < 1:
        raise DataConfigError(f"eval_num_examples={num_examples} leaves nothing to evaluate; "
                              f"set it to at least 1.")
    num_batches = math.ceil(n / global_batch_size)

    ds = grain.MapDataset.source(source).map_with_index(_AttachIndex(len(source))).map(fn)
    ds = _HostSlice(ds, global_batch=global_batch_size, local_batch=local_batch,
                    process_index=process_index, num_batches=num_batches, num_valid=n)
    ds = ds.batch(local_batch, drop_remainder=True)
    return BatchIterator(
        ds,
        start_step=0,
        num_threads=data_cfg.num_threads,
        prefetch=data_cfg.prefetch,
        num_batches=num_batches,
    )


def dataset_info(data_cfg) -> dict[str, Any]:
    """Sizes and shapes of the configured data set.

    Returns:
      {'num_train_examples': int, 'num_eval_examples': int (0 if no data.eval_split),
       'image_shape': (H, W, 3) after preprocessing, 'num_classes': int or None}.
      For data.source='latents' also 'latent_key' ('moments' | 'latent'), 'latent_shape'
      [h, w, C] and 'latents_metadata' (the precompute's metadata); 'image_shape' is then
      the decoded image shape (h*f, w*f, 3).
    """
    if _is_latents(data_cfg):
        return _latents_dataset_info(data_cfg)
    _check_image_size(data_cfg)
    train = registry.make_source(data_cfg, data_cfg.train_split)
    eval_split = data_cfg.eval_split
    num_eval = len(registry.make_source(data_cfg, eval_split)) if eval_split else 0
    label_key = data_cfg.label_key
    num_classes = getattr(train, "num_classes", {}).get(label_key) if label_key else None
    size = int(data_cfg.image_size)
    return {
        "num_train_examples": len(train),
        "num_eval_examples": num_eval,
        "image_shape": (size, size, 3),
        "num_classes": num_classes,
    }


def _latents_dataset_info(data_cfg) -> dict[str, Any]:
    train = registry.make_source(data_cfg, data_cfg.train_split)
    eval_split = data_cfg.eval_split
    num_eval = len(registry.make_source(data_cfg, eval_split)) if eval_split else 0
    meta = train.metadata
    label_key = data_cfg.label_key
    h, w, _ = meta["latent_shape"]
    return {
        "num_train_examples": len(train),
        "num_eval_examples": num_eval,
        "image_shape": (h * meta["f"], w * meta["f"], 3),
        "num_classes": train.num_classes.get(label_key) if label_key else None,
        "latent_key": meta["latent_key"],
        "latent_shape": tuple(meta["latent_shape"]),
        "latents_metadata": meta,
    }


__all__ = [
    "BatchIterator",
    "DataConfigError",
    "dataset_info",
    "make_eval_iterator",
    "make_train_iterator",
]

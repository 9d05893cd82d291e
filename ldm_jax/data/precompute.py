"""Encoding an image data set with a frozen first stage into a TFDS latents data set (the
library half of `python -m ldm_jax.precompute_latents`).

Reads the stage-2 config's `source_data` group (the images: same fields as `data`) and
`latents` group (scale_factor, scale_num_examples, seed). By default it writes the splits stage
2 reads, `data.train_split` and `data.eval_split`, encoded from `source_data.train_split` and
`source_data.eval_split` (a source with one split gets a deterministic held-out slice, recorded
in the metadata: data.holdout_percent). Every example of each split is
center-cropped (no flip), encoded once with `FirstStage.encode_moments` under jit (batch split
over the mesh, parameters replicated) and written UNSCALED as array_record shards of a TFDS data
set that reads with no TensorFlow; the layout and metadata are described in
`ldm_jax.data.latents`.

Reading a shard's records is `ldm_jax.data.precompute_reading`; the precompute itself has
three steps, one function each: `_plan` (first stage, splits, shard layout, features),
`_scale_factor` (fixed, or scale_by_std over the train split) and `_metadata`. With
`conditioning.precompute_context` each record also gets the frozen text encoder's context of
its captions (`_add_context`, on the host's first device), and the metadata its identity.
With `latents.keep_images` (`latents.resolve_keep_images`: None = True for conditioning.kind
'concat' or 'hybrid') each record also stores the center-cropped image it encodes, `image`
uint8 [H, W, 3]; a source's label maps and low-resolution images (`segmentation`,
`low_res`) are always stored, moved into the frame of the encoded image
(`conditioning_fields.transform_image_fields`).

Resume: a split is cut into shards of `examples_per_shard` consecutive examples. A shard is
written to progress/tmp/, renamed into place when complete, then recorded by a
progress/<shard>.done.json marker; rerunning the same command skips recorded shards, so a
crash loses at most the shards in flight and the result is byte-identical to an uninterrupted
run. progress/run.json fingerprints the first stage, the source, the context encoder and
keep_images; an OUT_DIR written with different ones is refused. `ldm_latents.json` is written last
(atomically): without it the data set is incomplete.

Multi-host (started like training, see docs/multihost.md; OUT_DIR and the source images on a
file system every host sees): unfinished shards are
dealt round-robin to the processes; in each round every host encodes its own shard (the global
batch is the hosts' local batches side by side) and writes only it; process 0 writes the
metadata after a barrier.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from ldm_jax.config import loading as config_lib
from ldm_jax.data import conditioning_fields
from ldm_jax.data import latents as latents_lib
from ldm_jax.data import latents_writer, pipeline, registry
from ldm_jax.data.latents_writer import PrecomputeError
from ldm_jax.data import precompute_reading as reading
from ldm_jax.data.precompute_reading import ImageOptions
from ldm_jax.parallel import sharding
from ldm_jax.storage import files

DEFAULT_EXAMPLES_PER_SHARD = 1024  # ~100 MB of KL-f4 moments at 256 px: TFDS's shard size.
# Fields of source_data that decide the content of the latents (checked on resume); the rest
# (data_dir, threads, augmentation flags that the eval path ignores) may change between runs.
_SOURCE_IDENTITY_FIELDS = ("source", "name", "folder", "image_size", "image_key")
# Also identity, but only when set (run.json files written before they existed lack them).
_CONDITIONING_IDENTITY_FIELDS = ("caption_key", "boxes_key", "box_labels_key", "box_format",
                                 "segmentation_key", "low_res_key")


# --------------------------------------------------------------------------------- encoding


def make_encode_fn(first_stage, mesh, seed: int):
    """Jitted (params, images, index) -> (stored latents, per-example z stats [B, 2]).

    Stored latents: KL moments [B,h,w,2C] / VQ pre-quantisation latents [B,h,w,C]. z is what
    scale_by_std measures: for KL a posterior sample mean + exp(logvar/2) * eps (as LDM's
    get_first_stage_encoding) with eps keyed by the example's split index, so the sample does
    not depend on batching or hosts; for VQ the latent itself. Stats are the per-example mean
    and centred sum of squares, merged in float64 on the host (Chan et al.).
    """
    base_key = jax.random.key(seed)

    def encode(params, images, index):
        stored = first_stage.encode_moments(params, images).astype(jnp.float32)
        if first_stage.kind == "kl":
            mean, logvar = jnp.split(stored, 2, axis=-1)
            eps = jax.vmap(lambda i: jax.random.normal(
                jax.random.fold_in(base_key, i), mean.shape[1:], jnp.float32))(index)
            z = mean + jnp.exp(0.5 * logvar) * eps
        else:
            z = stored
        flat = z.reshape(z.shape[0], -1)
        mu = jnp.mean(flat, axis=1)
        m2 = jnp.sum(jnp.square(flat - mu[:, None]), axis=1)
        return stored, jnp.stack([mu, m2], axis=1)

    batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    return jax.jit(encode, in_shardings=(replicated, batch, batch), out_shardings=(batch, batch))


def _merge_stats(stats: np.ndarray, per_example: int) -> tuple[int, float, float]:
    """Chan's parallel merge of per-example (mean, M2) rows -> (count, mean, M2), float64."""
    stats = np.asarray(stats, np.float64)
    n = per_example * len(stats)
    mean = float(np.mean(stats[:, 0]))
    m2 = float(np.sum(stats[:, 1]) + per_example * np.sum(np.square(stats[:, 0] - mean)))
    return n, mean, m2


def scale_by_std(encode, params, mesh, source, data_cfg, *, num_examples: int, seed: int,
                 global_batch: int, per_example: int) -> tuple[float, int]:
    """1 / std(z) over a seeded random sample of `num_examples` records of `source`.

    std is the unbiased (ddof=1) standard deviation over all elements, as torch's
    `z.flatten().std()` in LDM. Returns (scale, number of examples used).
    """
    n = min(int(num_examples), len(source))
    if n < 1:
        raise PrecomputeError(f"latents.scale_num_examples={num_examples}: need at least 1.")
    indices = np.sort(np.random.default_rng(seed).choice(len(source), n, replace=False))
    iterator = pipeline.make_eval_iterator(data_cfg, global_batch_size=global_batch,
                                           source=reading.Subset(source, indices))
    rows = []
    for local in iterator:
        position = np.where(local["mask"], local["index"], 0)
        split_index = indices[position].astype(np.int32)  # the RNG key: index in the split
        batch = sharding.global_batch({"image": local["image"], "index": split_index,
                                       "mask": local["mask"]}, mesh)
        _, stats = encode(params, batch["image"], batch["index"])
        stats, mask = sharding.to_host((stats, batch["mask"]))
        rows.append(np.asarray(stats)[np.asarray(mask)])
    count, _, m2 = _merge_stats(np.concatenate(rows), per_example)
    return 1.0 / math.sqrt(m2 / (count - 1)), n


# ------------------------------------------------------------------------------ the precompute


def _check_config(config, first_stage) -> None:
    for group in ("source_data", "latents"):
        if group not in config:
            raise PrecomputeError(
                f"config has no `{group}` group; precompute_latents needs a stage-2 (diffusion) "
                "config with source_data (the images) and latents (scale_factor, "
                "scale_num_examples, seed).")
    f = first_stage.downsampling_factor
    size = config.source_data.image_size
    if not isinstance(size, (int, np.integer)) or size < 1 or size % f:
        raise PrecomputeError(
            f"config.source_data.image_size={size!r} must be a positive multiple of the first "
            f"stage's downsampling factor f={f} (so the latent grid is whole); e.g. "
            f"--config.source_data.image_size={max(f, (int(size or 0) // f) * f)}.")


def _split_plan(config, requested: Sequence[str]) -> dict[str, str]:
    """{latents split name: source split} to write. Default: the splits stage 2 reads
    (data.train_split, data.eval_split) from source_data's train and eval splits."""
    src = config.source_data
    if requested:
        plan = {name: name for name in requested}
    else:
        plan = {}
        pairs = [(src.train_split, src.train_split)]
        if "data" in config and config.data.source == "latents":
            pairs = [(config.data.train_split, src.train_split),
                     (config.data.eval_split, src.eval_split)]
        elif src.eval_split:
            pairs.append((src.eval_split, src.eval_split))
        for target, source_split in pairs:
            if target and source_split:
                plan.setdefault(sources_split_name(target), source_split)
    for name in plan:
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise PrecomputeError(
                f"split {name!r} is not a plain split name: precompute whole splits (e.g. "
                "--splits=train) and slice when reading (data.train_split='train[:95%]').")
    return plan


def sources_split_name(spec: str) -> str:
    """The base split of a split spec ('train[:90%]' -> 'train')."""
    return str(spec).split("[")[0].split("+")[0].strip()


def _fingerprint(first_stage, src, counts, examples_per_shard, features,
                 context_encoder=None, keep_images: bool = False) -> dict:
    # The context encoder and keep_images only when set: run.json files written before they
    # existed lack them (and kept no images).
    context = {"context_encoder": context_encoder} if context_encoder else {}
    images = {"keep_images": True} if keep_images else {}
    return files.to_json_compatible({
        **context,
        **images,
        "schema_version": latents_lib.SCHEMA_VERSION,
        "kind": first_stage.kind,
        "model_config_hash": first_stage.identity["model_config_hash"],
        "params_hash": first_stage.identity["params_hash"],
        "source_data": dict({k: src[k] for k in _SOURCE_IDENTITY_FIELDS},
                            **{k: src[k] for k in _CONDITIONING_IDENTITY_FIELDS
                               if k in src and src[k] and
                               (k != "box_format" or src.boxes_key)}),
        "splits": counts,
        "examples_per_shard": int(examples_per_shard),
        "features": {k: repr(v) for k, v in features.items()},
    })


@dataclasses.dataclass
class _Plan:
    """Everything decided before the first example is encoded."""

    first_stage: Any
    src: Any  # config.source_data
    lat: Any  # config.latents
    mesh: Any
    global_batch: int
    examples_per_shard: int
    split_sources: dict  # latents split -> image source
    split_from: dict  # latents split -> source split
    layout: dict  # latents split -> [examples per shard]
    features: Any
    kept: list
    skipped: list
    out_root: str
    data_dir: str
    latent_shape: list
    stored_shape: list
    context: Any = None  # the TextCondition whose context is stored (precompute_context)
    images: ImageOptions = ImageOptions()  # keep_images, the label map dtype

    @property
    def counts(self) -> dict:
        return {s: len(ds) for s, ds in self.split_sources.items()}


def _plan(config, first_stage_dir, output_dir, *, splits, batch_size, examples_per_shard) -> _Plan:
    from ldm_jax.storage.first_stage import load_first_stage

    first_stage = load_first_stage(first_stage_dir)
    _check_config(config, first_stage)
    src, eps = config.source_data, int(examples_per_shard)
    if eps < 1:
        raise PrecomputeError(f"--examples_per_shard={examples_per_shard} must be >= 1.")
    split_from = _split_plan(config, list(splits or ()))
    mesh = sharding.make_mesh(config.mesh)
    global_batch = int(batch_size or config.batch_size)
    sharding.check_batch_divides(global_batch, mesh, "batch_size")
    kind, f, c = first_stage.kind, first_stage.downsampling_factor, first_stage.latent_channels
    size = int(src.image_size)
    latent_shape = [size // f, size // f, c]
    split_sources = {name: registry.make_source(src, from_split)
                     for name, from_split in split_from.items()}
    if any(len(ds) == 0 for ds in split_sources.values()):
        raise PrecomputeError(f"a split of config.source_data is empty: "
                              f"{ {s: len(ds) for s, ds in split_sources.items()} }.")
    first_source = next(iter(split_sources.values()))
    stored_shape = latent_shape[:2] + [2 * c if kind == "kl" else c]
    context = _context_condition(config, getattr(first_source, "canonical_keys", ()))
    extra = {} if context is None else {conditioning_fields.CONTEXT: latents_lib.context_feature(
        context.tokenizer.max_length, context.context_dim)}
    images, image_features = _image_features(first_source, src,
                                              latents_lib.resolve_keep_images(config))
    extra.update(image_features)
    features, kept, skipped = latents_lib.make_features(
        first_source, first_source[0], image_key=src.image_key, kind=kind,
        stored_shape=stored_shape, extra=extra)
    out_root = os.path.abspath(os.path.expanduser(output_dir))
    return _Plan(first_stage=first_stage, src=src, lat=config.latents, mesh=mesh,
                 global_batch=global_batch, examples_per_shard=eps, split_sources=split_sources,
                 split_from=split_from,
                 layout={s: [min(eps, len(ds) - i) for i in range(0, len(ds), eps)]
                         for s, ds in split_sources.items()},
                 features=features, kept=kept, skipped=skipped, out_root=out_root,
                 data_dir=latents_lib.tfds_dir(out_root), latent_shape=latent_shape,
                 stored_shape=stored_shape, context=context, images=images)


def _image_features(source, src, keep_images: bool) -> tuple[ImageOptions, dict]:
    """(options, fixed latents features) of the stored image (keep_images) and of the
    source's image fields ('segmentation', 'low_res'), their shapes and the label map's
    dtype taken from the first example in the encoded frame (`src`: config.source_data)."""
    size = int(src.image_size)
    features = {conditioning_fields.IMAGE: latents_lib.image_feature(size)} if keep_images else {}
    canonical = getattr(source, "canonical_keys", ())
    keys = [k for k in conditioning_fields.IMAGE_FIELDS if k in canonical]
    if not keys:
        return ImageOptions(keep_images), features
    first = source[0]
    image_key = src.image_key
    if image_key not in first:
        raise latents_lib.DataConfigError(
            f"data.image_key={image_key!r} is not a feature of this data set (features: "
            f"{sorted(first)}); set source_data.image_key to the image feature.")
    height, width = np.shape(first[image_key])[:2]
    moved = conditioning_fields.transform_image_fields(
        {k: first[k] for k in keys}, conditioning_fields.center_geometry(height, width, size),
        (height, width))
    dtype = np.dtype(np.uint8)
    seg = moved.get(conditioning_fields.SEGMENTATION)
    if seg is not None:
        classes = int(getattr(source, "num_classes", {}).get(conditioning_fields.SEGMENTATION, 0))
        dtype = np.dtype(np.int32 if seg.dtype == np.int32 or classes > 256 else np.uint8)
    for key, value in moved.items():
        features[key] = latents_lib.canonical_feature(
            key, value.shape, dtype if key == conditioning_fields.SEGMENTATION else None)
    return ImageOptions(keep_images, dtype), features


def _context_condition(config, canonical_keys):
    """The config's TextCondition when it asks for a precomputed context (else None)."""
    from ldm_jax.conditioning.encoders import TextCondition, make_condition
    if "conditioning" not in config or not TextCondition.wants_precomputed_context(
            config.conditioning):
        return None
    if conditioning_fields.CAPTION not in canonical_keys:
        raise PrecomputeError(
            "config.conditioning.precompute_context=True needs captions: set "
            "source_data.caption_key to the caption feature (an image folder: <image>.txt "
            "files), or set conditioning.precompute_context=False.")
    return make_condition(config)


def _add_context(condition, records: list[dict]) -> None:
    """records[i]['context'] = float32 [k_i, L, width]: each of its k_i captions encoded by the
    frozen text encoder (all captions of the shard in one batched, jitted pass)."""
    captions = [list(r[conditioning_fields.CAPTION]) for r in records]
    context = condition.encode_texts([c for cs in captions for c in cs])
    start = 0
    for record, cs in zip(records, captions):
        record[conditioning_fields.CONTEXT] = context[start:start + len(cs)]
        start += len(cs)


def _scale_factor(plan: _Plan, encode, params, reader_cfg) -> tuple[float, dict]:
    """(scale factor, how it was chosen): config.latents.scale_factor when positive, else
    scale_by_std over the train split (the first one written)."""
    lat = plan.lat
    if float(lat.scale_factor) > 0:
        return float(lat.scale_factor), {"method": "fixed"}
    train_split = next(iter(plan.split_sources))
    scale, used = scale_by_std(
        encode, params, plan.mesh, plan.split_sources[train_split], reader_cfg,
        num_examples=int(lat.scale_num_examples), seed=int(lat.seed),
        global_batch=plan.global_batch, per_example=int(np.prod(plan.latent_shape)))
    print(f"scale_by_std over {used} {train_split!r} examples: scale_factor {scale:.6g}",
          flush=True)
    return scale, {"method": "scale_by_std", "num_examples": used, "split": train_split,
                   "seed": int(lat.seed), "ddof": 1}


def _labels_of(plan: _Plan) -> tuple[dict, dict]:
    """({label key: class count}, {label key: class names}) of the carried label fields."""
    source = next(iter(plan.split_sources.values()))
    counts = {k: int(v) for k, v in getattr(source, "num_classes", {}).items() if k in plan.kept}
    names = {k: list(v) for k, v in getattr(source, "class_names", {}).items() if k in plan.kept}
    return counts, names


def _metadata(plan: _Plan, scale: float, scale_source: dict, latents_config: dict) -> dict:
    kind, fs = plan.first_stage.kind, plan.first_stage
    num_classes, class_names = _labels_of(plan)
    return files.to_json_compatible({
        "schema_version": latents_lib.SCHEMA_VERSION,
        "kind": kind,
        "latent_key": latents_lib.LATENT_KEYS[kind],
        "first_stage": dict(fs.identity, model_config=config_lib.to_json_dict(fs.config.model)),
        "f": fs.downsampling_factor,
        "latent_shape": plan.latent_shape,
        "stored_shape": plan.stored_shape,
        "scale_factor": scale,
        "scale_factor_source": scale_source,
        "latents_config": latents_config,
        "num_examples": plan.counts,
        "num_shards": {s: len(lengths) for s, lengths in plan.layout.items()},
        "examples_per_shard": plan.examples_per_shard,
        "source_data": config_lib.to_json_dict(plan.src),
        # Which source images each split holds (a held-out slice of a one-split source says so).
        "splits": {s: {"from_split": plan.split_from[s],
                       "holdout": getattr(ds, "holdout", None)}
                   for s, ds in plan.split_sources.items()},
        "features": {k: repr(v) for k, v in plan.features.items()},
        "conditioning_keys": plan.kept,
        "skipped_keys": plan.skipped,
        "keep_images": plan.images.keep_images,
        "num_classes": num_classes,
        "class_names": class_names,
        "dataset_name": latents_lib.DATASET_NAME,
        "tfds_version": latents_lib.TFDS_VERSION,
        **({"context_encoder": plan.context.context_identity()}
           if plan.context is not None else {}),
    })


def _encode_shards(pending, *, split_sources, layout, eps, reader_cfg, kept, encode, params, mesh,
                   global_batch, image_shape, latent_key, write, on_shard_written,
                   image_options: ImageOptions = ImageOptions()) -> None:
    """Encodes the pending (split, shard) pairs, dealt round-robin to the processes.

    In each round process p encodes pending[round * P + p]; all processes run the same number
    of encode steps (the longest shard of the round; hosts with a shorter or no shard feed
    masked padding), because every step is one program over the global mesh.
    """
    pc, pi = jax.process_count(), jax.process_index()
    local_batch = global_batch // pc
    batch_spec = P(sharding.BATCH_AXES)
    for r in range(0, len(pending), pc):
        round_shards = pending[r:r + pc]
        steps = max(math.ceil(layout[s][i] / local_batch) for s, i in round_shards)
        mine = round_shards[pi] if pi < len(round_shards) else None
        split, shard = mine if mine is not None else (next(iter(split_sources)), -1)
        start = shard * eps if mine is not None else 0
        stop = start + layout[split][shard] if mine is not None else 0
        t0, records, inflight = time.perf_counter(), [], None

        def collect(done):
            local, out = done
            stored = np.asarray(multihost_utils.global_array_to_host_local_array(
                out, mesh, batch_spec))
            for j in np.flatnonzero(local["mask"]):
                record = dict(local["extras"][j])
                record.update({latent_key: stored[j], "index": int(local["index"][j])})
                records.append(record)

        for local in reading.shard_batches(split_sources[split], reader_cfg, kept, start,
                                           stop, local_batch, steps, image_shape,
                                           image_options):
            batch = sharding.global_batch({"image": local["image"], "index": local["index"]}, mesh)
            out, _ = encode(params, batch["image"], batch["index"])
            # Dispatch is asynchronous: the next batch is read while this one encodes.
            if inflight is not None:
                collect(inflight)  # pylint: disable=cell-var-from-loop
            inflight = (local, out)
        collect(inflight)
        if mine is not None:
            name = write(split, shard, records)
            print(f"  {name}: {len(records)} examples in {time.perf_counter() - t0:.1f}s",
                  flush=True)
            if on_shard_written is not None:
                on_shard_written(split, shard)


def _encode_pending(plan: _Plan, on_shard_written):
    """Encodes and writes every shard not recorded as done; returns (encode fn, replicated
    first-stage params, reader config) for the scale factor."""
    out_root, data_dir, layout, lat = plan.out_root, plan.data_dir, plan.layout, plan.lat
    params = jax.device_put(plan.first_stage.params, sharding.replicated(plan.mesh))
    encode = make_encode_fn(plan.first_stage, plan.mesh, int(lat.seed))
    pending = [(s, i) for s, lengths in layout.items() for i, n in enumerate(lengths)
               if not latents_writer.shard_done(out_root, data_dir,
                                                latents_lib.shard_name(s, i, len(lengths)), n)]
    # Every host must read the progress markers before any host writes new ones.
    latents_writer.barrier("progress_read")
    total = sum(len(lengths) for lengths in layout.values())
    print(f"Precomputing {plan.first_stage.kind.upper()} latents {plan.stored_shape} of splits "
          f"{plan.counts} (from source splits {plan.split_from}) into {data_dir}: "
          f"{total - len(pending)} of {total} shards already done; batch {plan.global_batch} on "
          f"mesh {dict(plan.mesh.shape)}, {jax.process_count()} process(es).", flush=True)
    serialize = latents_lib.example_serializer(plan.features)

    def write(split, shard, records):
        name = latents_lib.shard_name(split, shard, len(layout[split]))
        if plan.context is not None:
            _add_context(plan.context, records)
        latents_writer.write_shard(out_root, data_dir, name, serialize, records)
        return name

    reader_cfg = reading.reader_cfg(plan.src)
    size = int(plan.src.image_size)
    _encode_shards(pending, split_sources=plan.split_sources, layout=layout,
                   eps=plan.examples_per_shard, reader_cfg=reader_cfg, kept=plan.kept,
                   encode=encode, params=params, mesh=plan.mesh, global_batch=plan.global_batch,
                   image_shape=(size, size, 3),
                   latent_key=latents_lib.LATENT_KEYS[plan.first_stage.kind], write=write,
                   on_shard_written=on_shard_written, image_options=plan.images)
    latents_writer.barrier("shards_done")
    return encode, params, reader_cfg


def precompute(config, first_stage_dir: str, output_dir: str, *,
               splits: Sequence[str] | None = None, batch_size: int | None = None,
               examples_per_shard: int = DEFAULT_EXAMPLES_PER_SHARD,
               on_shard_written: Callable[[str, int], None] | None = None) -> dict:
    """Encodes `config.source_data` with the first stage in `first_stage_dir` into `output_dir`.

    Resumes a previous run into the same `output_dir` (finished shards are kept); returns the
    existing metadata at once if that run already finished with the same settings.

    Args:
      config: stage-2 config with `source_data`, `latents`, `batch_size`, `mesh` (and `data`,
        whose train/eval split names the written splits get).
      first_stage_dir: the autoencoder's run directory (`load_first_stage`).
      output_dir: OUT_DIR (layout in `ldm_jax.data.latents_writer`).
      splits: source split names to encode under their own names; default: the splits stage 2
        reads (see `_split_plan`).
      batch_size: global encode batch; default config.batch_size. Keep it fixed across a
        resume for byte-identical results (numerics may differ across batch sizes).
      examples_per_shard: consecutive examples per shard (the unit of resume); a multiple of
        the per-host batch wastes no encode work on padding.
      on_shard_written: called as f(split, shard_index) after each shard this process finishes.

    Returns:
      The metadata dict written to `ldm_latents.json` (see `ldm_jax.data.latents`).

    Raises:
      PrecomputeError: bad config, or output_dir holds latents of another first stage/config.
      FirstStageError, DataConfigError, MeshError: the first stage, the source data or the
        mesh/batch cannot be used.
    """
    plan = _plan(config, first_stage_dir, output_dir, splits=splits, batch_size=batch_size,
                 examples_per_shard=examples_per_shard)
    out_root, data_dir, layout = plan.out_root, plan.data_dir, plan.layout
    latents_writer.claim_output(out_root, data_dir, _fingerprint(
        plan.first_stage, plan.src, plan.counts, plan.examples_per_shard, plan.features,
        plan.context.context_identity() if plan.context is not None else None,
        plan.images.keep_images))
    lat = plan.lat
    latents_config = files.to_json_compatible({
        "scale_factor": float(lat.scale_factor), "scale_num_examples": int(lat.scale_num_examples),
        "seed": int(lat.seed)})
    if os.path.isfile(os.path.join(data_dir, latents_lib.METADATA_FILE)):
        existing = latents_lib.read_latents_metadata(out_root)
        if existing["latents_config"] == latents_config:
            print(f"Latents in {out_root} are complete; nothing to do.", flush=True)
            return existing

    encode, params, reader_cfg = _encode_pending(plan, on_shard_written)

    scale, scale_source = _scale_factor(plan, encode, params, reader_cfg)
    metadata = _metadata(plan, scale, scale_source, latents_config)
    if plan.skipped:
        print(f"Not carried (not a simple type, or a reserved name): {plan.skipped}", flush=True)
    if jax.process_index() == 0:
        latents_writer.finish(out_root, data_dir, plan.features, layout, metadata)
        print(f"Wrote {os.path.join(data_dir, latents_lib.METADATA_FILE)}.", flush=True)
    latents_writer.barrier("finished")
    return metadata

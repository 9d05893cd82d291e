"""Command line: encode an image data set with a frozen first stage into a TFDS latents data set.

  python -m ldm_jax.precompute_latents --config=configs/X.py[:variant] --first_stage=RUN_DIR \\
      --output=OUT_DIR [--config.key=value ...] [--splits=train,test] [--batch_size=N] \\
      [--examples_per_shard=N] [multi-host flags: docs/multihost.md]

Reads the stage-2 config's `source_data` group (the images: same fields as `data`) and
`latents` group (scale_factor, scale_num_examples, seed). Every example of each split is
center-cropped (no flip), encoded once with `FirstStage.encode_moments` under jit (batch split
over the mesh, parameters replicated) and written UNSCALED as array_record shards of a TFDS data
set that reads with no TensorFlow; the layout and metadata are described in
`ldm_jax.data.latents`.

Resume: a split is cut into shards of `examples_per_shard` consecutive examples. A shard is
written to progress/tmp/, renamed into place when complete, then recorded by a
progress/<shard>.done.json marker; rerunning the same command skips recorded shards, so a
crash loses at most the shards in flight and the result is byte-identical to an uninterrupted
run. progress/run.json fingerprints the first stage and the source; an OUT_DIR written with a
different one is refused. `ldm_latents.json` is written last (atomically): without it the
data set is incomplete.

Multi-host (started like training, see docs/multihost.md; OUT_DIR and the source images on a
file system every host sees): unfinished shards are
dealt round-robin to the processes; in each round every host encodes its own shard (the global
batch is the hosts' local batches side by side) and writes only it; process 0 writes the
metadata after a barrier.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from ldm_jax import cli, config_lib, distributed, sharding
from ldm_jax.data import latents as latents_lib
from ldm_jax.data import pipeline, sources

DEFAULT_EXAMPLES_PER_SHARD = 1024  # ~100 MB of KL-f4 moments at 256 px: TFDS's shard size.
# Fields of source_data that decide the content of the latents (checked on resume); the rest
# (data_dir, threads, augmentation flags that the eval path ignores) may change between runs.
_SOURCE_IDENTITY_FIELDS = ("source", "name", "folder", "image_size", "image_key")


class PrecomputeError(ValueError):
    """A precompute cannot run or resume as asked; the message says why and what to do."""


# ---------------------------------------------------------------------------------- helpers


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
    os.replace(tmp, path)  # readers see the old file or the whole new one, never a part.


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (tuple, np.ndarray)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _canonical(obj: Any) -> Any:
    """JSON round trip: tuples become lists, so fingerprints compare equal after reloading."""
    return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


def _barrier(name: str) -> None:
    # A coordination-service barrier, not a device collective: hosts may arrive minutes apart
    # (one scans the source or compiles longer), which a first gloo collective does not allow.
    distributed.barrier(f"precompute_latents:{name}")


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _reader_cfg(source_data) -> ml_collections.ConfigDict:
    """source_data as a `data` config for the pipeline: eval-style reads, no label check
    (labels travel with the other conditioning fields)."""
    cfg = ml_collections.ConfigDict(source_data.to_dict())
    cfg.random_crop = False
    cfg.random_flip = False
    cfg.label_key = None
    return cfg


# ---------------------------------------------------------------------------------- reading


class _RangeSource:
    """Records [start, stop) of a source, re-indexed from 0 (one shard's worth)."""

    def __init__(self, source, start: int, stop: int):
        self._source, self._start, self._len = source, start, stop - start

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict:
        return self._source[self._start + int(i)]


class _ShardExampleFn:
    """(index in shard, raw example) -> {'image', 'index' (in split), 'extras' (kept fields)}."""

    def __init__(self, data_cfg, keep: Sequence[str], offset: int):
        self._image_fn = pipeline._ExampleFn(data_cfg, train=False)  # pylint: disable=protected-access
        self._keep, self._offset = tuple(keep), offset

    def __call__(self, indexed):
        index, example = indexed
        out = self._image_fn((index, example))
        # 0-d arrays -> python scalars / bytes: what TFDS's ClassLabel and Text encoders take.
        extras = {k: example[k].item() if np.ndim(example[k]) == 0 and
                  isinstance(example[k], np.ndarray) else example[k] for k in self._keep}
        return {"image": out["image"], "index": index + self._offset, "extras": extras}


def _shard_batches(source, data_cfg, keep, start: int, stop: int, local_batch: int,
                   num_batches: int, image_shape):
    """Host-local batches of one shard: {'image', 'index', 'mask', 'extras' (list)}.

    Reuses the image pipeline's eval preprocessing (center crop, no flip) and its threaded
    reads; batches are assembled here because conditioning fields (captions, variable-length
    boxes) cannot be stacked by grain. Padded with zero images (mask False) to `num_batches`
    so every host runs the same number of encode steps in a round.
    """
    import grain

    examples = iter(())
    if stop > start:
        ds = grain.MapDataset.source(_RangeSource(source, start, stop)).map_with_index(
            lambda i, x: (i, x)).map(_ShardExampleFn(data_cfg, keep, start))
        threads = int(data_cfg.get("num_threads", 0) or 0)
        options = grain.ReadOptions(num_threads=threads if threads > 1 else 0,
                                    prefetch_buffer_size=max(int(data_cfg.get("prefetch", 2) or 2), 1)
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


class _Subset:
    """The records `indices` of a source (the scale_by_std sample)."""

    def __init__(self, source, indices: np.ndarray):
        self._source, self._indices = source, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> dict:
        return self._source[int(self._indices[int(i)])]


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
                                           source=_Subset(source, indices))
    rows = []
    for local in iterator:
        position = np.where(local["mask"], local["index"], 0)
        split_index = indices[position].astype(np.int32)  # the RNG key: index in the split
        batch = sharding.global_batch({"image": local["image"], "index": split_index,
                                       "mask": local["mask"]}, mesh)
        _, stats = encode(params, batch["image"], batch["index"])
        stats = multihost_utils.process_allgather(stats, tiled=True)
        mask = multihost_utils.process_allgather(batch["mask"], tiled=True)
        rows.append(np.asarray(stats)[np.asarray(mask)])
    count, _, m2 = _merge_stats(np.concatenate(rows), per_example)
    return 1.0 / math.sqrt(m2 / (count - 1)), n


# ------------------------------------------------------------------------------ the precompute


def _check_config(config, first_stage) -> tuple[Any, Any]:
    for group in ("source_data", "latents"):
        if group not in config:
            raise PrecomputeError(
                f"config has no `{group}` group; precompute_latents needs a stage-2 (diffusion) "
                "config with source_data (the images) and latents (scale_factor, "
                "scale_num_examples, seed).")
    src, lat = config.source_data, config.latents
    f = first_stage.downsampling_factor
    size = src.get("image_size", None)
    if not isinstance(size, (int, np.integer)) or size < 1 or size % f:
        raise PrecomputeError(
            f"config.source_data.image_size={size!r} must be a positive multiple of the first "
            f"stage's downsampling factor f={f} (so the latent grid is whole); e.g. "
            f"--config.source_data.image_size={max(f, (int(size or 0) // f) * f)}.")
    return src, lat


def _split_names(config_splits, src) -> list[str]:
    names = config_splits or [s for s in (src.get("train_split"), src.get("eval_split")) if s]
    names = list(dict.fromkeys(names))  # dedupe, keep order (eval_split may equal train_split)
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise PrecomputeError(
                f"split {name!r} is not a plain split name: precompute whole splits (e.g. "
                "--splits=train) and slice when reading (data.train_split='train[:95%]').")
    return names


def _fingerprint(first_stage, src, counts, examples_per_shard, features) -> dict:
    return _canonical({
        "schema_version": latents_lib.SCHEMA_VERSION,
        "kind": first_stage.kind,
        "model_config_hash": first_stage.identity["model_config_hash"],
        "params_hash": first_stage.identity["params_hash"],
        "source_data": {k: src.get(k, None) for k in _SOURCE_IDENTITY_FIELDS},
        "splits": counts,
        "examples_per_shard": int(examples_per_shard),
        "features": {k: repr(v) for k, v in features.items()},
    })


def _check_or_claim(out_root: str, data_dir: str, fingerprint: dict) -> None:
    """Refuses an OUT_DIR written for another first stage/config; records ours otherwise."""
    progress = os.path.join(out_root, latents_lib.PROGRESS_DIR)
    run_file = os.path.join(progress, "run.json")
    if os.path.isfile(run_file):
        with open(run_file) as f:
            existing = json.load(f)
        diffs = sorted(k for k in set(existing) | set(fingerprint)
                       if existing.get(k) != fingerprint.get(k))
        if diffs:
            details = "; ".join(f"{k}: existing {json.dumps(existing.get(k))[:200]}, now "
                                f"{json.dumps(fingerprint.get(k))[:200]}" for k in diffs)
            raise PrecomputeError(
                f"--output={out_root} holds latents from a different first stage or config "
                f"({details}). Refusing to mix them: use a new --output directory, or delete "
                f"{out_root} to start over.")
    elif os.path.isdir(data_dir) and os.listdir(data_dir):
        raise PrecomputeError(
            f"--output={out_root}: {data_dir} has files but no {run_file}, so their origin is "
            "unknown. Refusing to mix them: use a new --output directory, or delete it.")
    _barrier("checked")
    if jax.process_index() == 0:
        os.makedirs(os.path.join(progress, "tmp"), exist_ok=True)
        os.makedirs(data_dir, exist_ok=True)
        for name in os.listdir(os.path.join(progress, "tmp")):  # leftovers of a crash
            os.remove(os.path.join(progress, "tmp", name))
        if not os.path.isfile(run_file):
            _write_json_atomic(run_file, fingerprint)
    _barrier("claimed")


def _is_done(out_root: str, data_dir: str, name: str, num_examples: int) -> bool:
    marker = os.path.join(out_root, latents_lib.PROGRESS_DIR, name + ".done.json")
    path = os.path.join(data_dir, name)
    if not (os.path.isfile(marker) and os.path.isfile(path)):
        return False  # a shard renamed but not yet recorded is simply redone.
    with open(marker) as f:
        done = json.load(f)
    return done["num_examples"] == num_examples and done["num_bytes"] == os.path.getsize(path)


def _write_shard(out_root: str, data_dir: str, name: str, serialize, records: list[dict]) -> None:
    """tmp file -> rename into the data set -> done marker (in that order, for resume)."""
    from tensorflow_datasets.core import file_adapters

    tmp = os.path.join(out_root, latents_lib.PROGRESS_DIR, "tmp",
                       f"{name}.p{jax.process_index()}")
    file_adapters.ArrayRecordFileAdapter.write_examples(
        tmp, ((None, serialize(r)) for r in records))
    final = os.path.join(data_dir, name)
    os.replace(tmp, final)
    _write_json_atomic(os.path.join(out_root, latents_lib.PROGRESS_DIR, name + ".done.json"), {
        "num_examples": len(records), "num_bytes": os.path.getsize(final),
        "sha256": _file_sha256(final), "first_index": int(records[0]["index"])})


def _finish(out_root, data_dir, features, layout, metadata) -> None:
    """Process 0: TFDS metadata, a TF-free read check, then ldm_latents.json (last)."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import naming

    infos = []
    for split, lengths in layout.items():
        names = [latents_lib.shard_name(split, i, len(lengths)) for i in range(len(lengths))]
        missing = [s for s, k in zip(names, lengths) if not _is_done(out_root, data_dir, s, k)]
        if missing:
            raise PrecomputeError(f"shards not finished: {missing[:5]}; rerun to resume.")
        template = naming.ShardedFileTemplate(
            data_dir=data_dir, template=naming.DEFAULT_FILENAME_TEMPLATE,
            dataset_name=latents_lib.DATASET_NAME, split=split, filetype_suffix="array_record")
        infos.append(tfds.core.SplitInfo(
            name=split, shard_lengths=list(lengths), filename_template=template,
            num_bytes=sum(os.path.getsize(os.path.join(data_dir, s)) for s in names)))
    fs, src = metadata["first_stage"], metadata["source_data"]
    # check_data=False: TFDS's own check reads through tf.data (TensorFlow); ours below does not.
    tfds.folder_dataset.write_metadata(
        data_dir=data_dir, features=features, split_infos=infos, check_data=False,
        description=(f"{metadata['kind'].upper()} first-stage latents ({metadata['latent_key']}, "
                     f"unscaled; scale_factor {metadata['scale_factor']:.6g}) of "
                     f"{src.get('name') or src.get('folder') or src.get('source')} by "
                     f"{fs['workdir']} step {fs['step']}; see {latents_lib.METADATA_FILE}."))
    builder = tfds.builder_from_directory(data_dir)
    for split, lengths in layout.items():
        ds, n = builder.as_data_source(split=split), sum(lengths)
        if len(ds) != n or int(ds[n - 1]["index"]) != n - 1:
            raise PrecomputeError(f"read-back check of split {split!r} in {data_dir} failed.")
    _write_json_atomic(os.path.join(data_dir, latents_lib.METADATA_FILE), metadata)


def _encode_shards(pending, *, split_sources, layout, eps, reader_cfg, kept, encode, params, mesh,
                   global_batch, image_shape, latent_key, write, on_shard_written) -> None:
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

        for local in _shard_batches(split_sources[split], reader_cfg, kept, start, stop,
                                    local_batch, steps, image_shape):
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


def precompute(config, first_stage_dir: str, output_dir: str, *,
               splits: Sequence[str] | None = None, batch_size: int | None = None,
               examples_per_shard: int = DEFAULT_EXAMPLES_PER_SHARD,
               on_shard_written: Callable[[str, int], None] | None = None) -> dict:
    """Encodes `config.source_data` with the first stage in `first_stage_dir` into `output_dir`.

    Resumes a previous run into the same `output_dir` (finished shards are kept); returns the
    existing metadata at once if that run already finished with the same settings.

    Args:
      config: stage-2 config with `source_data`, `latents`, `batch_size`, `mesh`.
      first_stage_dir: the autoencoder's run directory (`load_first_stage`).
      output_dir: OUT_DIR (layout in `ldm_jax.data.latents`).
      splits: source split names to encode; default source_data.train_split and eval_split.
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
    from ldm_jax.first_stage import load_first_stage

    first_stage = load_first_stage(first_stage_dir)
    src, lat = _check_config(config, first_stage)
    eps = int(examples_per_shard)
    if eps < 1:
        raise PrecomputeError(f"--examples_per_shard={examples_per_shard} must be >= 1.")
    split_names = _split_names(list(splits or ()), src)
    mesh = sharding.make_mesh(config.get("mesh", None) or {"data": -1, "fsdp": 1})
    global_batch = int(batch_size or config.batch_size)
    sharding.check_batch_divides(global_batch, mesh, "batch_size")
    kind, f, c = first_stage.kind, first_stage.downsampling_factor, first_stage.latent_channels
    size = int(src.image_size)
    latent_shape = [size // f, size // f, c]
    stored_shape = latent_shape[:2] + [2 * c if kind == "kl" else c]

    split_sources = {s: sources.make_source(src, s) for s in split_names}
    first_source = split_sources[split_names[0]]
    if any(len(ds) == 0 for ds in split_sources.values()):
        raise PrecomputeError(f"a split of config.source_data is empty: "
                              f"{ {s: len(ds) for s, ds in split_sources.items()} }.")
    features, kept, skipped = latents_lib.make_features(
        first_source, first_source[0], image_key=src.get("image_key", "image") or "image",
        kind=kind, stored_shape=stored_shape)
    layout = {s: [min(eps, len(ds) - i) for i in range(0, len(ds), eps)]
              for s, ds in split_sources.items()}
    counts = {s: len(ds) for s, ds in split_sources.items()}

    out_root = os.path.abspath(os.path.expanduser(output_dir))
    data_dir = latents_lib.tfds_dir(out_root)
    _check_or_claim(out_root, data_dir, _fingerprint(first_stage, src, counts, eps, features))
    latents_config = _canonical({"scale_factor": float(lat.scale_factor),
                                 "scale_num_examples": int(lat.scale_num_examples),
                                 "seed": int(lat.seed)})
    if os.path.isfile(os.path.join(data_dir, latents_lib.METADATA_FILE)):
        existing = latents_lib.read_latents_metadata(out_root)
        if existing.get("latents_config") == latents_config:
            print(f"Latents in {out_root} are complete; nothing to do.", flush=True)
            return existing

    params = jax.device_put(first_stage.params, sharding.replicated(mesh))
    encode = make_encode_fn(first_stage, mesh, int(lat.seed))
    pending = [(s, i) for s, lengths in layout.items() for i, n in enumerate(lengths)
               if not _is_done(out_root, data_dir, latents_lib.shard_name(s, i, len(lengths)), n)]
    # Every host must read the progress markers before any host writes new ones.
    _barrier("progress_read")
    total = sum(len(lengths) for lengths in layout.values())
    print(f"Precomputing {kind.upper()} latents {stored_shape} of splits {counts} into "
          f"{data_dir}: {total - len(pending)} of {total} shards already done; batch "
          f"{global_batch} on mesh {dict(mesh.shape)}, {jax.process_count()} process(es).",
          flush=True)
    serialize = latents_lib.example_serializer(features)

    def write(split, shard, records):
        name = latents_lib.shard_name(split, shard, len(layout[split]))
        _write_shard(out_root, data_dir, name, serialize, records)
        return name

    reader_cfg = _reader_cfg(src)
    _encode_shards(pending, split_sources=split_sources, layout=layout, eps=eps,
                   reader_cfg=reader_cfg, kept=kept, encode=encode, params=params, mesh=mesh,
                   global_batch=global_batch, image_shape=(size, size, 3),
                   latent_key=latents_lib.LATENT_KEYS[kind], write=write,
                   on_shard_written=on_shard_written)
    _barrier("shards_done")

    if float(lat.scale_factor) > 0:
        scale, scale_source = float(lat.scale_factor), {"method": "fixed"}
    else:
        train_split = src.get("train_split", None) or "train"
        train = split_sources.get(train_split) or sources.make_source(src, train_split)
        scale, used = scale_by_std(
            encode, params, mesh, train, reader_cfg, num_examples=int(lat.scale_num_examples),
            seed=int(lat.seed), global_batch=global_batch, per_example=int(np.prod(latent_shape)))
        scale_source = {"method": "scale_by_std", "num_examples": used, "split": train_split,
                        "seed": int(lat.seed), "ddof": 1}
        print(f"scale_by_std over {used} {train_split!r} examples: scale_factor {scale:.6g}",
              flush=True)

    metadata = _canonical({
        "schema_version": latents_lib.SCHEMA_VERSION,
        "kind": kind,
        "latent_key": latents_lib.LATENT_KEYS[kind],
        "first_stage": dict(first_stage.identity,
                            model_config=config_lib.to_json_dict(first_stage.config.model)),
        "f": f,
        "latent_shape": latent_shape,
        "stored_shape": stored_shape,
        "scale_factor": scale,
        "scale_factor_source": scale_source,
        "latents_config": latents_config,
        "num_examples": counts,
        "num_shards": {s: len(lengths) for s, lengths in layout.items()},
        "examples_per_shard": eps,
        "source_data": config_lib.to_json_dict(src),
        "features": {k: repr(v) for k, v in features.items()},
        "conditioning_keys": kept,
        "skipped_keys": skipped,
        "dataset_name": latents_lib.DATASET_NAME,
        "tfds_version": latents_lib.TFDS_VERSION,
    })
    if skipped:
        print(f"Not carried (not a simple type, or a reserved name): {skipped}", flush=True)
    if jax.process_index() == 0:
        _finish(out_root, data_dir, features, layout, metadata)
        print(f"Wrote {os.path.join(data_dir, latents_lib.METADATA_FILE)}.", flush=True)
    _barrier("finished")
    return metadata


# -------------------------------------------------------------------------------------- CLI


def parse_args(argv):
    """Splits `--config.x=y` overrides from the regular flags; unknown flags are an error."""
    overrides, rest = config_lib.split_config_args(argv)
    parser = argparse.ArgumentParser(prog="python -m ldm_jax.precompute_latents",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="stage-2 config with source_data and latents groups")
    parser.add_argument("--first_stage", required=True, help="the autoencoder's run directory")
    parser.add_argument("--output", required=True, help="OUT_DIR for the latents data set")
    parser.add_argument("--splits", default="",
                        help="comma separated source splits (default: train and eval split)")
    parser.add_argument("--batch_size", type=int, default=0,
                        help="global encode batch (default: config.batch_size)")
    parser.add_argument("--examples_per_shard", type=int, default=DEFAULT_EXAMPLES_PER_SHARD)
    cli.add_distributed_flags(parser)
    return parser.parse_args(rest), overrides


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)

    def command():
        config = cli.load_config(args.config, overrides)
        cli.initialize_distributed(args)
        splits = [s.strip() for s in args.splits.split(",") if s.strip()]
        precompute(config, args.first_stage, args.output, splits=splits or None,
                   batch_size=args.batch_size or None, examples_per_shard=args.examples_per_shard)

    return cli.run_reporting_user_errors(command)


if __name__ == "__main__":
    sys.exit(main())

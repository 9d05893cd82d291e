"""Writing a latents data set: the output directory's claim, resumable shards, the metadata.

Layout of OUT_DIR (see ldm_jax/data/latents.py for the records): `1.0.0/` is the TFDS data set
(array_record shards, dataset_info.json, ldm_latents.json written last), `progress/` holds
`run.json` (the fingerprint of the first stage and source this directory belongs to),
`<shard>.done.json` markers and `tmp/` (shards being written). A shard is written to tmp/,
renamed into place, then recorded by its marker, so a crash loses at most the shards in flight
and a rerun redoes exactly those.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax

from ldm_jax import UserError
from ldm_jax.data import latents as latents_lib
from ldm_jax.parallel import distributed
from ldm_jax.storage import files


class PrecomputeError(UserError, ValueError):
    """A precompute cannot run or resume as asked; the message says why and what to do."""


def barrier(name: str) -> None:
    # A coordination-service barrier, not a device collective: hosts may arrive minutes apart
    # (one scans the source or compiles longer), which a first gloo collective does not allow.
    distributed.barrier(f"precompute_latents:{name}")


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def claim_output(out_root: str, data_dir: str, fingerprint: dict) -> None:
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
    barrier("checked")
    if jax.process_index() == 0:
        os.makedirs(os.path.join(progress, "tmp"), exist_ok=True)
        os.makedirs(data_dir, exist_ok=True)
        for name in os.listdir(os.path.join(progress, "tmp")):  # leftovers of a crash
            os.remove(os.path.join(progress, "tmp", name))
        if not os.path.isfile(run_file):
            files.write_json(run_file, fingerprint)
    barrier("claimed")


def shard_done(out_root: str, data_dir: str, name: str, num_examples: int) -> bool:
    marker = os.path.join(out_root, latents_lib.PROGRESS_DIR, name + ".done.json")
    path = os.path.join(data_dir, name)
    if not (os.path.isfile(marker) and os.path.isfile(path)):
        return False  # a shard renamed but not yet recorded is simply redone.
    with open(marker) as f:
        done = json.load(f)
    return done["num_examples"] == num_examples and done["num_bytes"] == os.path.getsize(path)


def write_shard(out_root: str, data_dir: str, name: str, serialize, records: list[dict]) -> None:
    """tmp file -> rename into the data set -> done marker (in that order, for resume)."""
    from tensorflow_datasets.core import file_adapters

    tmp = os.path.join(out_root, latents_lib.PROGRESS_DIR, "tmp",
                       f"{name}.p{jax.process_index()}")
    file_adapters.ArrayRecordFileAdapter.write_examples(
        tmp, ((None, serialize(r)) for r in records))
    final = os.path.join(data_dir, name)
    os.replace(tmp, final)
    files.write_json(os.path.join(out_root, latents_lib.PROGRESS_DIR, name + ".done.json"), {
        "num_examples": len(records), "num_bytes": os.path.getsize(final),
        "sha256": _file_sha256(final), "first_index": int(records[0]["index"])})


def finish(out_root, data_dir, features, layout, metadata) -> None:
    """Process 0: TFDS metadata, a TF-free read check, then ldm_latents.json (last)."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import naming

    infos = []
    for split, lengths in layout.items():
        names = [latents_lib.shard_name(split, i, len(lengths)) for i in range(len(lengths))]
        missing = [s for s, k in zip(names, lengths) if not shard_done(out_root, data_dir, s, k)]
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
                     f"{src['name'] or src['folder'] or src['source']} by "
                     f"{fs['workdir']} step {fs['step']}; see {latents_lib.METADATA_FILE}."))
    builder = tfds.builder_from_directory(data_dir)
    for split, lengths in layout.items():
        ds, n = builder.as_data_source(split=split), sum(lengths)
        if len(ds) != n or int(ds[n - 1]["index"]) != n - 1:
            raise PrecomputeError(f"read-back check of split {split!r} in {data_dir} failed.")
    files.write_json(os.path.join(data_dir, latents_lib.METADATA_FILE), metadata)

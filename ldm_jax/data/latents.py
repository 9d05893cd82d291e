"""Precomputed first-stage latents: reading them, and the data set's format (shared with the
writer, `python -m ldm_jax.precompute_latents`).

Layout of a latents directory `OUT_DIR` (the `--output` of precompute_latents):

  OUT_DIR/1.0.0/                         the TFDS data set (read with no TensorFlow via
                                         `tfds.builder_from_directory(...).as_data_source()`)
    ldm_latents-<split>.array_record-<i>-of-<n>   one shard per `examples_per_shard` examples
    dataset_info.json, features.json     TFDS metadata
    ldm_latents.json                     OUR metadata, written last: its presence means the
                                         precompute finished (see METADATA_FILE below)
  OUT_DIR/progress/                      resume state (run.json fingerprint, one
                                         <shard>.done.json per finished shard, tmp/)

Each record holds `moments` float32 [h, w, 2C] (KL: posterior mean and log-variance
concatenated) or `latent` float32 [h, w, C] (VQ: pre-quantisation latent), `index` int64 (the
position in the source split; records are stored in source order, so it equals the record
number) and the source's simple conditioning fields under their source names (`label`, `id`,
text, numeric arrays); with `conditioning.precompute_context`, `context` float32 [k, L, width]
(the frozen text encoder's output for each of the k captions). The canonical conditioning fields of a source configured with
`data.caption_key` / `data.boxes_key` / `data.segmentation_key` / `data.low_res_key`
(`ldm_jax.data.conditioning_fields`) have fixed types: `caption` a Sequence of Text (1..k
captions; [] for none), `boxes` float32 [N, 4] normalised xyxy in the frame of the ENCODED
(center-cropped) image, N varying, `box_labels` int64 [N], `segmentation` [H, W] class ids
(uint8, or int32 when the data has ids above 255) and `low_res` uint8 [h, w, 3]
(h = H * the data's low-res ratio), both in the frame of the encoded image too. With
`latents.keep_images` (`resolve_keep_images`: None = True for conditioning.kind 'concat' or
'hybrid') each record also holds `image` uint8 [H, W, 3]: exactly the center-cropped image
that was encoded (image-conditioned tasks degrade or mask it on the fly).
Latents are stored UNSCALED; stage 2 multiplies by `metadata['scale_factor']`.

`ldm_latents.json` (schema_version 1) holds: kind ('kl'|'vq'), latent_key, first_stage (the
identity from `first_stage.load_first_stage` plus its model_config), f, latent_shape [h, w, C],
stored_shape, scale_factor with scale_factor_source ({'method': 'scale_by_std', 'num_examples',
'split', 'seed', 'ddof'} or {'method': 'fixed'}), num_examples and num_shards per split,
examples_per_shard, source_data (the config group), features ({key: feature repr}),
conditioning_keys, skipped_keys, num_classes / class_names (per carried label field, e.g.
'label', 'box_labels', 'segmentation'), keep_images (whether records hold `image`; absent in
metadata written before it existed = False), latents_config (the `latents` group the run used),
dataset_name / tfds_version, and context_encoder (`TextCondition.context_identity()`: the
text encoder, its weights' sha256, width, max_length, tokenizer) when the context is stored.
scale_by_std is 1 / std(z) (unbiased, over all elements, float64
accumulation) over a seeded random sample (numpy default_rng(seed), without replacement) of
`num_examples` train records, z being a posterior sample mean + exp(logvar / 2) * eps with
eps = jax.random.normal(fold_in(key(seed), index)) for KL, the stored latent for VQ.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ldm_jax import UserError
from ldm_jax.data import conditioning_fields
from ldm_jax.data import sources as sources_lib
from ldm_jax.data import transforms

SCHEMA_VERSION = 1
DATASET_NAME = "ldm_latents"
TFDS_VERSION = "1.0.0"
METADATA_FILE = "ldm_latents.json"
PROGRESS_DIR = "progress"
LATENT_KEYS = {"kl": "moments", "vq": "latent"}
# Names the latents set defines itself; source fields with these names are not carried.
RESERVED_KEYS = ("index", "moments", "latent", conditioning_fields.CONTEXT)
# conditioning.kind values whose conditions are images: latents.keep_images defaults to True.
IMAGE_CONDITION_KINDS = ("concat", "hybrid")

DataConfigError = sources_lib.DataConfigError

_RUN_HINT = ("run python -m ldm_jax.precompute_latents --config=CONFIG.py --first_stage=RUN_DIR "
             "--output={dir} first")


class LatentsNotReadyError(DataConfigError):
    """No precomputed latents at the given path, or the precompute has not finished."""


class FirstStageMismatchError(UserError, ValueError):
    """The latents were encoded by a different first stage than the one given."""


def tfds_dir(latents_dir: str | os.PathLike) -> str:
    """The TFDS version directory inside `latents_dir` (`OUT_DIR/1.0.0`).

    Accepts either OUT_DIR or the version directory itself.
    """
    root = os.path.abspath(os.path.expanduser(os.fspath(latents_dir)))
    if os.path.basename(root) == TFDS_VERSION and not os.path.isdir(
            os.path.join(root, TFDS_VERSION)):
        return root
    return os.path.join(root, TFDS_VERSION)


def _output_root(latents_dir: str | os.PathLike) -> str:
    return os.path.dirname(tfds_dir(latents_dir))


def read_latents_metadata(latents_dir: str | os.PathLike | None) -> dict[str, Any]:
    """Reads `ldm_latents.json` of a finished precompute.

    Args:
      latents_dir: the precompute's --output directory (or its `1.0.0` sub-directory).

    Returns:
      The metadata dict (see the module docstring).

    Raises:
      LatentsNotReadyError: nothing precomputed there ("run ... first"), or the precompute did
        not finish (no metadata file: "rerun it to resume"), or an unknown schema version.
    """
    if not latents_dir:
        raise LatentsNotReadyError(
            "data.latents_dir is not set; set it to the --output directory of "
            "python -m ldm_jax.precompute_latents.")
    data_dir = tfds_dir(latents_dir)
    path = os.path.join(data_dir, METADATA_FILE)
    if not os.path.isfile(path):
        started = os.path.isdir(data_dir) or os.path.isdir(
            os.path.join(_output_root(latents_dir), PROGRESS_DIR))
        if started:
            raise LatentsNotReadyError(
                f"Latents in {os.fspath(latents_dir)!r} are incomplete (no {METADATA_FILE}): the "
                "precompute did not finish; rerun it (the same python -m "
                "ldm_jax.precompute_latents command) to resume.")
        raise LatentsNotReadyError(
            f"No precomputed latents in {os.fspath(latents_dir)!r} (data.latents_dir): "
            + _RUN_HINT.format(dir=os.fspath(latents_dir)) + ".")
    with open(path) as f:
        metadata = json.load(f)
    version = metadata.get("schema_version")
    if version != SCHEMA_VERSION:
        raise LatentsNotReadyError(
            f"{path} has schema_version={version!r}, this code reads {SCHEMA_VERSION}; "
            "recompute the latents with this version of ldm_jax.")
    return metadata


def check_first_stage_matches(metadata: dict, first_stage_identity: dict) -> None:
    """Raises FirstStageMismatchError unless the latents come from this first stage.

    Compares the model config hash and the parameter hash (not the run directory or step: a
    copied run, or the same weights at another path, is the same first stage).

    Args:
      metadata: from `read_latents_metadata`.
      first_stage_identity: `FirstStage.identity` of the autoencoder stage 2 decodes with.
    """
    stored = metadata.get("first_stage", {})
    diffs = [key for key in ("model_config_hash", "params_hash")
             if stored.get(key) != first_stage_identity.get(key)]
    if diffs:
        what = ", ".join(f"{k} {stored.get(k)!r} vs {first_stage_identity.get(k)!r}" for k in diffs)
        raise FirstStageMismatchError(
            f"The latents were encoded by a different first stage than the one given ({what}; "
            f"latents from {stored.get('workdir')!r} step {stored.get('step')}, given "
            f"{first_stage_identity.get('workdir')!r} step {first_stage_identity.get('step')}). "
            "Decoding them with another autoencoder gives garbage: point stage 2 at the first "
            "stage the latents came from, or recompute the latents with python -m "
            "ldm_jax.precompute_latents --first_stage=<the new run>.")


class ContextEncoderMismatchError(UserError, ValueError):
    """The latents' precomputed context is not the configured text encoder's (or is absent)."""


def _flat(identity: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in identity.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_context_encoder_matches(metadata: dict, identity: dict, latents_dir) -> None:
    """Raises ContextEncoderMismatchError unless the latents hold a context precomputed by the
    encoder of `identity` (`TextCondition.context_identity()`); the message names each field
    that differs (weights, tokenizer, max_length...) with both values."""
    fix = ("precompute the latents again with this encoder (python -m ldm_jax.precompute_latents "
           "with conditioning.precompute_context=True), or set "
           "conditioning.precompute_context=False")
    stored = metadata.get("context_encoder")
    if not stored:
        raise ContextEncoderMismatchError(
            f"conditioning.precompute_context=True but the latents in data.latents_dir="
            f"{os.fspath(latents_dir)!r} hold no precomputed context: {fix}.")
    ours, theirs = _flat(identity), _flat(stored)
    diffs = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if diffs:
        what = "; ".join(f"{k}: latents {theirs.get(k)!r}, config {ours.get(k)!r}" for k in diffs)
        raise ContextEncoderMismatchError(
            f"The context in data.latents_dir={os.fspath(latents_dir)!r} was precomputed by "
            f"another text encoder than config.conditioning's ({what}): {fix}.")


def resolve_keep_images(config) -> bool:
    """Whether precompute_latents stores each example's encoded image (`image`): the
    config's `latents.keep_images`, where None (or absent) means True exactly when
    `conditioning.kind` is 'concat' or 'hybrid' (image-conditioned tasks need it)."""
    latents_cfg = config.get("latents") if hasattr(config, "get") else None
    value = latents_cfg.get("keep_images") if latents_cfg is not None and hasattr(
        latents_cfg, "get") else None
    if value is None:
        conditioning = config.get("conditioning") if hasattr(config, "get") else None
        kind = conditioning.get("kind", "none") if conditioning is not None else "none"
        return kind in IMAGE_CONDITION_KINDS
    if not isinstance(value, (bool, np.bool_)):
        raise DataConfigError(f"latents.keep_images={value!r} must be True, False or None "
                              "(None: True for conditioning.kind 'concat' or 'hybrid').")
    return bool(value)


class LatentsSource(sources_lib.TfdsSource):
    """A `TfdsSource` over a latents split that also carries the precompute `metadata`."""

    def __init__(self, data_source, *, metadata: dict, **kwargs):
        super().__init__(data_source, **kwargs)
        self.metadata = metadata

    def __repr__(self) -> str:
        return f"LatentsSource({self.name!r}, split={self.split!r}, len={len(self)})"


def latents_source(latents_dir: str | os.PathLike | None, split: str) -> LatentsSource:
    """Random-access source over one split of precomputed latents (dicts of numpy arrays).

    Args:
      latents_dir: the precompute's --output directory.
      split: a split name the precompute wrote, or a TFDS split spec over it ('train[:90%]').

    Raises:
      LatentsNotReadyError: see `read_latents_metadata`.
      DataConfigError: unknown split.
    """
    import tensorflow_datasets as tfds

    metadata = read_latents_metadata(latents_dir)
    available = sorted(metadata["num_examples"])
    unknown = [s for s in sources_lib._split_names(split) if s not in available]  # pylint: disable=protected-access
    if unknown:
        raise DataConfigError(
            f"Unknown split {split!r} (data.train_split / data.eval_split) for the latents in "
            f"data.latents_dir={os.fspath(latents_dir)!r}; precomputed splits: {available} "
            "(precompute others with --splits).")
    builder = tfds.builder_from_directory(tfds_dir(latents_dir))
    return LatentsSource(
        builder.as_data_source(split=split), metadata=metadata, name=os.fspath(latents_dir),
        split=split, num_classes=sources_lib._class_counts(builder),  # pylint: disable=protected-access
        class_names=sources_lib._class_names(builder))  # pylint: disable=protected-access


class LatentExampleFn:
    """Latent record -> {'moments' | 'latent': float32, 'label'?: int32, 'index': int32,
    condition_fn outputs...}.

    The pipeline's counterpart of its image `_ExampleFn` for `data.source='latents'`: no image
    preprocessing. With `data.random_flip` (train only) the latent is flipped left-right with
    probability 1/2: for a convolutional encoder the latent of a flipped image is close to
    the flipped latent, but not equal, so this is off unless a config asks for it. Boxes,
    the stored image, label map and low-resolution image handed to `condition_fn` are
    flipped with the latent.

    condition_fn: optional `(fields, rng, train) -> {name: np.ndarray}` (see
    `ldm_jax.data.pipeline`); `fields` holds the record's canonical conditioning fields
    (`conditioning_fields.condition_fields`: caption str | list[str], boxes, box_labels,
    segmentation, low_res, label) and, for latents.keep_images, 'image' uint8 [H, W, 3], all
    as numpy arrays. Without it, these stay out of the batch.
    """

    def __init__(self, data_cfg, *, train: bool, condition_fn=None):
        self.label_key = data_cfg.label_key
        self.random_flip = bool(data_cfg.random_flip) and train
        self.train = train
        self.condition_fn = condition_fn

    def __call__(self, indexed: tuple[int, dict], rng: np.random.Generator | None = None):
        index, example = indexed
        key = next((k for k in LATENT_KEYS.values() if k in example), None)
        if key is None:
            raise DataConfigError(
                f"data.source='latents': the records have no 'moments' or 'latent' feature "
                f"(features: {sorted(example)}); is data.latents_dir a precompute_latents "
                "output?")
        latent = np.asarray(example[key], np.float32)
        flipped = False
        if self.random_flip:
            if rng is None:
                raise ValueError("random_flip needs an rng.")
            flipped = bool(rng.random() < 0.5)  # the draw of transforms.maybe_flip
            if flipped:
                latent = np.ascontiguousarray(latent[:, ::-1])
        out = {key: latent, "index": np.int32(index)}
        # Label only where the data set has it: latents of unlabelled data (a folder) under a
        # config whose label_key defaults to 'label' just carry no label.
        if self.label_key and self.label_key in example:
            label = np.asarray(example[self.label_key])
            if label.ndim != 0 or not np.issubdtype(label.dtype, np.integer):
                raise DataConfigError(
                    f"data.label_key={self.label_key!r} must be an integer class id, got "
                    f"dtype {label.dtype} shape {label.shape}.")
            out["label"] = label.astype(np.int32)
        if self.condition_fn is not None:
            fields = conditioning_fields.condition_fields(example, self.label_key,
                                                          with_image=True)
            if flipped:
                fields = conditioning_fields.flip_image_fields(fields)
                if conditioning_fields.BOXES in fields:
                    fields[conditioning_fields.BOXES] = transforms.flip_boxes(
                        fields[conditioning_fields.BOXES])
            conditioning_fields.merge_condition(
                out, self.condition_fn(fields, rng, self.train), reserved=("mask",))
        return out


# ------------------------------------------------------------------------ the data set's schema


def shard_name(split: str, shard: int, num_shards: int) -> str:
    """TFDS's file name for one shard: ldm_latents-<split>.array_record-00003-of-00012."""
    return f"{DATASET_NAME}-{split}.array_record-{shard:05d}-of-{num_shards:05d}"


def _feature_for(feature, value, class_names=None) -> Any:
    """The latents-set feature for one source field, or None to skip it.

    Uses the source's TFDS feature where known (exact shapes, class names); otherwise infers
    from the first example: the leading dimension of an array may vary per example (a
    variable number of boxes), the others are fixed to the first example's.
    """
    import tensorflow_datasets as tfds

    if class_names:  # integer ids with names (an image folder's class sub-folders)
        return tfds.features.ClassLabel(names=list(class_names))
    if feature is not None:
        if isinstance(feature, (tfds.features.Image, tfds.features.Video)):
            return None
        if isinstance(feature, tfds.features.ClassLabel):
            return tfds.features.ClassLabel(names=feature.names)
        if isinstance(feature, tfds.features.Text):
            return tfds.features.Text()
        info = feature.get_tensor_info()
        if not isinstance(info, tfds.features.TensorInfo):
            return None  # nested dicts (e.g. COCO 'objects'): not a simple type.
        shape, dtype = tuple(info.shape), np.dtype(info.np_dtype)
    else:
        arr = np.asarray(value)
        if arr.dtype.kind == "u" and arr.dtype.itemsize == 1 and arr.ndim >= 2:
            return None  # another image (mask, depth map...): not conditioning we carry.
        # Only the leading dimension is left open: TFDS decodes arrays with several unknown
        # dimensions wrongly when they hold fewer elements than dimensions (e.g. no boxes).
        dtype, shape = arr.dtype, (None,) + arr.shape[1:] if arr.ndim else ()
    if dtype.kind in "SUO":
        return tfds.features.Text() if shape == () else None
    if dtype.kind not in "biuf":
        return None
    # TFDS's plain encoding allows one unknown dimension; bytes encoding allows any number.
    encoding = "bytes" if sum(d is None for d in shape) > 1 else "none"
    return tfds.features.Tensor(shape=shape, dtype=dtype, encoding=encoding)


def canonical_feature(key: str, shape: Sequence[int] | None = None, dtype=None):
    """The latents-set feature of a canonical conditioning field (conditioning_fields).

    The image fields ('segmentation', 'low_res') take the fixed `shape` (and, for
    'segmentation', `dtype`: uint8 or int32) of the encoded frame; without them their
    height and width are left open.
    """
    import tensorflow_datasets as tfds

    if key == conditioning_fields.CAPTION:
        return tfds.features.Sequence(tfds.features.Text())
    if key == conditioning_fields.BOXES:
        return tfds.features.Tensor(shape=(None, 4), dtype=np.float32)
    if key == conditioning_fields.BOX_LABELS:
        return tfds.features.Tensor(shape=(None,), dtype=np.int64)
    if key == conditioning_fields.SEGMENTATION:
        dtype = np.dtype(np.uint8 if dtype is None else dtype)  # (a dtype's bool is False)
        if dtype not in (np.dtype(np.uint8), np.dtype(np.int32)):
            raise ValueError(f"segmentation is stored as uint8 or int32, not {dtype}.")
        return tfds.features.Tensor(shape=tuple(shape or (None, None)), dtype=dtype,
                                    encoding="bytes")
    if key == conditioning_fields.LOW_RES:
        return tfds.features.Tensor(shape=tuple(shape or (None, None, 3)), dtype=np.uint8,
                                    encoding="bytes")
    raise KeyError(key)


def image_feature(image_size: int):
    """The latents-set feature of the stored encoded image (latents.keep_images)."""
    import tensorflow_datasets as tfds

    size = int(image_size)
    return tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8, encoding="bytes")


def context_feature(max_length: int, width: int):
    """The latents-set feature of a precomputed context: float32 [k captions, L, width]."""
    import tensorflow_datasets as tfds

    return tfds.features.Tensor(shape=(None, int(max_length), int(width)), dtype=np.float32,
                                encoding="bytes")


def make_features(source, first_example: dict, *, image_key: str, kind: str,
                  stored_shape: Sequence[int], extra: dict | None = None):
    """The latents set's tfds FeaturesDict for a source, and which source fields it carries.

    Args:
      source: the image source (its `features`, when TFDS-backed, give exact field types).
      first_example: a raw example of it (types of fields the source does not describe).
      image_key: the image field (never carried).
      kind: 'kl' | 'vq' (names the latent feature, LATENT_KEYS).
      stored_shape: [h, w, 2C] for KL moments, [h, w, C] for VQ latents.
      extra: features the precompute adds itself ({'context': context_feature(...)},
        {'image': image_feature(...)}) or fixes from the encoded frame (the image fields
        'segmentation' / 'low_res': `canonical_feature(key, shape, dtype)`).

    Returns:
      (features, conditioning_keys, skipped_keys): fields that are not simple types (nested
      dicts, other images) or clash with our names (RESERVED_KEYS, `extra`) are skipped. The
      canonical fields the source produces (its `canonical_keys`, see
      `conditioning_fields.CanonicalFieldsSource`) get their fixed types (`extra`'s, else
      `canonical_feature`).
    """
    import tensorflow_datasets as tfds

    source_features = getattr(source, "features", None)
    # Raw-bytes encoding: ~100x faster to serialize than TFDS's default float list (4 ms per
    # 64x64x6 latent, hours over ImageNet) and exact all the same.
    spec = {LATENT_KEYS[kind]: tfds.features.Tensor(shape=tuple(stored_shape), dtype=np.float32,
                                                    encoding="bytes"),
            "index": tfds.features.Scalar(dtype=np.int64)}
    kept, skipped = [], []
    extra = dict(extra or {})
    canonical = set(getattr(source, "canonical_keys", ()))
    consumed = set(getattr(source, "consumed_keys", ()))
    for key in sorted(first_example):
        if key == image_key:
            continue
        if key in consumed:  # read into a canonical field (caption, boxes): not kept twice
            skipped.append(key)
            continue
        if key in canonical:
            spec[key] = extra[key] if key in extra else canonical_feature(key)
            kept.append(key)
            continue
        known = source_features[key] if source_features is not None and \
            key in source_features else None
        names = getattr(source, "class_names", {}).get(key)
        reserved = key in RESERVED_KEYS or key in extra
        out = None if reserved else _feature_for(known, first_example[key], names)
        if out is None:
            skipped.append(key)
        else:
            spec[key] = out
            kept.append(key)
    spec.update(extra)
    return tfds.features.FeaturesDict(spec), kept, skipped


def example_serializer(features) -> Callable[[dict], bytes]:
    """record dict -> tf.Example bytes, as TFDS writes them but with the feature map in key order.

    `features.serialize_example` writes the map in an order that depends on the process's
    string hash seed, so a resumed run (a new process) or another host would write different
    bytes for the same example; deterministic protobuf serialisation sorts the keys.
    """
    from tensorflow_datasets.core import example_serializer as tfds_serializer

    serializer = tfds_serializer.ExampleSerializer(features.get_serialized_info())

    def serialize(record: dict) -> bytes:
        proto = serializer.get_tf_example(features.encode_example(record))
        return proto.SerializeToString(deterministic=True)

    return serialize


__all__ = [
    "ContextEncoderMismatchError",
    "FirstStageMismatchError",
    "IMAGE_CONDITION_KINDS",
    "LatentExampleFn",
    "LatentsNotReadyError",
    "LatentsSource",
    "canonical_feature",
    "check_context_encoder_matches",
    "check_first_stage_matches",
    "context_feature",
    "example_serializer",
    "image_feature",
    "latents_source",
    "make_features",
    "read_latents_metadata",
    "resolve_keep_images",
    "shard_name",
    "tfds_dir",
]

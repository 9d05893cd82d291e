"""Random-access image sources: TFDS (array_record) data sets and the embedded digits.

Image folders live in `ldm_jax.data.folder`, precomputed latents in `ldm_jax.data.latents`;
`ldm_jax.data.registry.make_source` picks one from a `data` config. This module imports none
of them (they import it), so there is no import cycle.

A source is any object with `__len__` and `__getitem__(i) -> dict of numpy arrays` (grain's
`RandomAccessDataSource` protocol); sources here may also implement `__getitems__` for
batched reads. Every image source carries:
  num_classes: {feature key: number of classes};
  class_names: {feature key: [name of class 0, name of class 1, ...]};
  holdout: None, or a JSON-able dict saying the split is (or excludes) a held-out slice of
    another split (see `HoldoutPolicy`), for the caller to record in its metadata.
TFDS-backed sources also expose `features` (the TFDS FeaturesDict, or None where unknown).

TensorFlow is optional: TFDS data prepared as `array_record` is read through
`builder.as_data_source()` with no TF at all. Only `tfrecord`-format data sets need TF (read
once through tf.data and kept in memory as encoded bytes).

Config mistakes raise `DataConfigError` (a ValueError) whose message names the `data.*`
field at fault and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ldm_jax import UserError

# Percent of a one-split source held out as the eval split unless `data.holdout_percent`
# says otherwise (the value of the config default).
DEFAULT_HOLDOUT_PERCENT = 5


class DataConfigError(UserError, ValueError):
    """A data config problem; the message names the `data.*` field and the fix."""


class MissingDataError(DataConfigError, FileNotFoundError):
    """A configured data directory or folder does not exist."""


class DataNotPreparedError(DataConfigError):
    """The TFDS data set has not been prepared (downloaded/built) in the data dir."""


@dataclasses.dataclass(frozen=True)
class HoldoutPolicy:
    """Where the eval split comes from when a source has only the train split.

    When `eval_split` is not a split of the source but `train_split` is, the eval split is a
    deterministic `percent`% slice of the train split, and reading `train_split` then leaves
    that slice out, so one config's train and eval never overlap (CelebA-HQ in TFDS and most
    photo folders have a single split). Inactive (no slicing: a missing split is an error)
    when `eval_split` is empty or equals `train_split`, or `percent` is 0.
    """

    train_split: str = "train"
    eval_split: str | None = "test"
    percent: int = DEFAULT_HOLDOUT_PERCENT

    @classmethod
    def from_config(cls, data_cfg) -> HoldoutPolicy:
        """The policy of a `data` config: train_split, eval_split, holdout_percent."""
        percent = data_cfg.holdout_percent
        if isinstance(percent, bool) or not isinstance(percent, (int, np.integer)) or not (
                0 <= percent <= 99):
            raise DataConfigError(
                f"data.holdout_percent={percent!r} must be an int in 0..99: the percent of the "
                "train split held out as data.eval_split when the data has no such split "
                "(0 turns holding out off)."
            )
        return cls(str(data_cfg.train_split or ""), data_cfg.eval_split or None, int(percent))

    @property
    def active(self) -> bool:
        return bool(self.eval_split) and self.eval_split != self.train_split and self.percent > 0

    def describe(self, role: str, method: str, **extra) -> dict[str, Any]:
        """The JSON-able `holdout` record of a source; role 'eval' is the held-out slice,
        'train' the train split without it."""
        return {"from_split": self.train_split, "eval_split": self.eval_split, "role": role,
                "method": method, "percent": self.percent, **extra}


def _to_numpy(value: Any) -> Any:
    """Recursively converts example values (python scalars, bytes, arrays) to numpy."""
    if isinstance(value, Mapping):
        return {k: _to_numpy(v) for k, v in value.items()}
    return np.asarray(value)


def _split_names(split: str) -> list[str]:
    """Base split names of a TFDS split spec, e.g. 'train[:90%]+test' -> ['train', 'test']."""
    return [part.split("[")[0].strip() for part in str(split).split("+")]


# --------------------------------------------------------------------------------------- TFDS


class TfdsSource:
    """Wraps a TFDS `ArrayRecordDataSource` so examples come back as dicts of numpy arrays."""

    def __init__(self, data_source, *, name: str, split: str, num_classes: dict[str, int],
                 class_names: dict[str, list[str]] | None = None,
                 holdout: dict[str, Any] | None = None):
        self._ds = data_source
        self.name = name
        self.split = split
        self.num_classes = num_classes
        self.class_names = class_names or {}
        self.holdout = holdout

    @property
    def features(self):
        """The data set's TFDS FeaturesDict (None if the data source does not say)."""
        return getattr(getattr(self._ds, "dataset_info", None), "features", None)

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _to_numpy(self._ds[int(index)])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        # One batched array_record read is cheaper than len(indices) single reads.
        return [_to_numpy(x) for x in self._ds.__getitems__([int(i) for i in indices])]

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, len={len(self)})"


class EncodedRecordsSource:
    """In-memory examples whose image features are still encoded bytes (decoded on access).

    Used for tfrecord-format TFDS data: tf.data cannot do random access, so the records are
    read once; keeping images encoded keeps memory near the on-disk size.
    """

    def __init__(self, records: list[dict], image_keys: Sequence[str], *, name: str,
                 split: str, num_classes: dict[str, int],
                 class_names: dict[str, list[str]] | None = None,
                 holdout: dict[str, Any] | None = None):
        self._records = records
        self._image_keys = tuple(image_keys)
        self.name = name
        self.split = split
        self.num_classes = num_classes
        self.class_names = class_names or {}
        self.holdout = holdout
        self.features = None  # set by _load_tfrecord

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        example = dict(self._records[int(index)])
        for key in self._image_keys:
            with Image.open(io.BytesIO(example[key])) as im:
                example[key] = np.asarray(im)
        return _to_numpy(example)


class CachedSource:
    """Keeps decoded examples of a small source in memory after their first read.

    Worth it only when the decoded data set fits comfortably in RAM (the digits set is
    ~5 MB): decoding a tiny PNG through TFDS costs ~100 us, several times the preprocessing.
    """

    def __init__(self, source):
        self._source = source
        self._cache: dict[int, dict] = {}
        self.split = getattr(source, "split", None)
        self.num_classes = getattr(source, "num_classes", {})
        self.class_names = getattr(source, "class_names", {})
        self.holdout = getattr(source, "holdout", None)
        self.features = getattr(source, "features", None)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        example = self._cache.get(index)
        if example is None:
            # Racing threads may both decode the same record; the result is identical and
            # dict assignment is atomic, so no lock is needed.
            example = self._source[index]
            self._cache[index] = example
        # Shallow copy: consumers may add/replace keys, never mutate the cached arrays.
        return dict(example)

    def __repr__(self) -> str:
        return f"CachedSource({self._source!r})"


def _class_labels(builder) -> dict[str, Any]:
    import tensorflow_datasets as tfds

    return {key: feature for key, feature in builder.info.features.items()
            if isinstance(feature, tfds.features.ClassLabel)}


def _class_counts(builder) -> dict[str, int]:
    return {key: int(f.num_classes) for key, f in _class_labels(builder).items()}


def _class_names(builder) -> dict[str, list[str]]:
    # ClassLabel(num_classes=K) without names reports '0'..'K-1', still useful as labels.
    return {key: [str(n) for n in f.names] for key, f in _class_labels(builder).items()}


def _prepare_hint(builder, name: str, data_dir: str) -> str:
    cmd = f"tfds build {name} --data_dir={data_dir} --file_format=array_record"
    hint = f"Prepare it with:\n  {cmd}"
    if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        hint = (
            f"{name!r} needs a manual download: put the files in a folder MANUAL_DIR, then run\n"
            f"  {cmd} --manual_dir=MANUAL_DIR\n"
            "(building from raw files may need TensorFlow: `pip install -r requirements-tf.txt`)."
            f"\nManual download instructions from TFDS:\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )
    return hint


def _load_tfrecord(builder, name: str, split: str, num_classes: dict[str, int],
                   class_names: dict[str, list[str]] | None = None,
                   holdout: dict[str, Any] | None = None):
    """Reads a tfrecord-format split through tf.data into an `EncodedRecordsSource`."""
    try:
        import tensorflow  # noqa: F401  (only probing availability)
    except ImportError:
        raise DataConfigError(
            f"TFDS data set {name!r} in {builder.data_dir} is stored as tfrecord, which needs "
            "TensorFlow to read, and TensorFlow is not installed. Either install it "
            "(`pip install -r requirements-tf.txt`), or re-prepare the data set as array_record "
            f"(`tfds build {name} --data_dir=... --file_format=array_record`, or convert it in "
            f"place: `tfds convert_format --dataset_version_dir={builder.data_dir} "
            "--out_file_format=array_record`)."
        ) from None
    import tensorflow_datasets as tfds

    image_keys = [
        k for k, f in builder.info.features.items() if isinstance(f, tfds.features.Image)
    ]
    decoders = {k: tfds.decode.SkipDecoding() for k in image_keys}
    ds = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
    records = list(tfds.as_numpy(ds))
    source = EncodedRecordsSource(records, image_keys, name=name, split=split,
                                  num_classes=num_classes, class_names=class_names,
                                  holdout=holdout)
    source.features = builder.info.features
    return source


def _resolve_tfds_split(split: str, available: list[str], policy: HoldoutPolicy | None,
                        name: str) -> tuple[str, dict[str, Any] | None]:
    """(TFDS split spec to read, holdout record) for `split`, slicing a held-out eval split
    off the train split when the data set has no eval split (see `HoldoutPolicy`)."""
    def exists(spec):
        return bool(spec) and all(s in available for s in _split_names(spec))

    # Only a plain split name can be sliced: TFDS slices do not compose ('train[:50%][95%:]').
    can_hold_out = (policy is not None and policy.active and not exists(policy.eval_split)
                    and policy.train_split in available)
    if can_hold_out and split == policy.eval_split:
        spec = f"{policy.train_split}[{100 - policy.percent}%:]"
        return spec, policy.describe("eval", "tfds_slice", spec=spec)
    if can_hold_out and split == policy.train_split:
        spec = f"{policy.train_split}[:{100 - policy.percent}%]"
        return spec, policy.describe("train", "tfds_slice", spec=spec)
    if exists(split):
        return split, None
    hint = ""
    if policy is not None and split == policy.eval_split and policy.active:
        hint = (f" data.eval_split can only be held out of data.train_split="
                f"{policy.train_split!r} when that is one of the available splits; set "
                "data.eval_split to an available split or a slice such as 'train[95%:]'.")
    raise DataConfigError(
        f"Unknown split {split!r} for TFDS data set {name!r} (data.train_split / "
        f"data.eval_split). Available splits: {available}.{hint}"
    )


def tfds_source(name: str, split: str, data_dir: str | os.PathLike | None = None, *,
                holdout: HoldoutPolicy | None = None):
    """Random-access source over a prepared TFDS data set split.

    Args:
      name: TFDS name, optionally with config/version, e.g. 'celeb_a_hq/256'.
      split: TFDS split spec, e.g. 'train', 'test', 'train[:95%]'.
      data_dir: TFDS data dir; None means TFDS's default (`~/tensorflow_datasets`, or
        $TFDS_DATA_DIR).
      holdout: if given and the data set lacks `holdout.eval_split`, that split is read as
        `train[95%:]` and `holdout.train_split` as `train[:95%]` (for percent 5); None reads
        `split` as given.

    Returns:
      A source with `__len__`, `__getitem__` (dict of numpy arrays), `num_classes`,
      `class_names`, `holdout` and `features`.

    Raises:
      MissingDataError: `data_dir` does not exist.
      DataNotPreparedError: the data set is not prepared in `data_dir` (says how to prepare).
      DataConfigError: unknown name / split, or tfrecord data without TensorFlow.
    """
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import constants

    if not name:
        raise DataConfigError("data.name is empty; set it to a TFDS name, e.g. 'celeb_a_hq/256'.")
    if data_dir is None:
        data_dir = constants.get_default_data_dir()
    else:
        data_dir = os.path.expanduser(os.fspath(data_dir))
        if not os.path.isdir(data_dir):
            raise MissingDataError(
                f"data.data_dir={data_dir!r} does not exist. Point data.data_dir at the TFDS "
                f"data dir holding {name!r}, or prepare it there with "
                f"`tfds build {name} --data_dir={data_dir} --file_format=array_record`."
            )
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        # The TFDS error lists every registered data set; ours stays readable.
        raise DataConfigError(
            f"data.name={name!r} is neither a registered TFDS data set nor prepared under "
            f"data.data_dir={data_dir!r}. Check the spelling (e.g. 'celeb_a_hq/256') and "
            "data.data_dir."
        ) from None
    if not builder.is_prepared():
        raise DataNotPreparedError(
            f"TFDS data set {name!r} (data.name) is not prepared in data.data_dir="
            f"{data_dir!r}. {_prepare_hint(builder, name, data_dir)}"
        )
    spec, held = _resolve_tfds_split(split, sorted(builder.info.splits.keys()), holdout, name)
    num_classes, class_names = _class_counts(builder), _class_names(builder)
    formats = {f.value for f in builder.info.available_file_formats()}
    if formats & {"array_record", "parquet"}:
        ds = builder.as_data_source(split=spec)
        return TfdsSource(ds, name=name, split=split, num_classes=num_classes,
                          class_names=class_names, holdout=held)
    source = _load_tfrecord(builder, name, spec, num_classes, class_names, held)
    source.split = split  # the config's name; the slice read is in `holdout['spec']`
    return source


def digits_source(split: str, data_dir: str | os.PathLike | None = None, *,
                  holdout: HoldoutPolicy | None = None):
    """The embedded `ldm_digits` data set (built on first use under `data_dir`).

    Args:
      split: 'train' or 'test' (or any TFDS split spec over those).
      data_dir: where the builder is written; None means `<cwd>/data/tfds`.
      holdout: as for `tfds_source` (digits has both splits, so it only matters for an
        eval split name other than 'test').
    """
    from ldm_jax.data import digits

    if data_dir is not None and not os.path.isdir(os.path.expanduser(os.fspath(data_dir))):
        # An explicit data_dir that does not exist is almost always a typo; only the default
        # location is created on demand.
        raise MissingDataError(
            f"data.data_dir={os.fspath(data_dir)!r} does not exist. Create it, or set "
            "data.data_dir=None to build the digits data set under <cwd>/data/tfds."
        )
    data_dir = digits.ensure_digits_prepared(data_dir)
    return CachedSource(tfds_source(digits.NAME, split, data_dir, holdout=holdout))

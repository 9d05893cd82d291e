"""Random-access image sources: TFDS (array_record) data sets, image folders, embedded digits
(and precomputed latents, `ldm_jax.data.latents`).

A source is any object with `__len__` and `__getitem__(i) -> dict of numpy arrays` (grain's
`RandomAccessDataSource` protocol); sources here may also implement `__getitems__` for
batched reads and carry `num_classes` ({feature key: number of classes}); TFDS-backed sources
also expose `features` (the TFDS FeaturesDict, or None where unknown).

TensorFlow is optional: TFDS data prepared as `array_record` is read through
`builder.as_data_source()` with no TF at all. Only `tfrecord`-format data sets need TF (read
once through tf.data and kept in memory as encoded bytes).

Config mistakes raise `DataConfigError` (a ValueError) whose message names the `data.*`
field at fault and says how to fix it.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SOURCES = ("digits", "tfds", "folder", "latents", "synthetic_latents")
# Fraction (in percent) of a split-less image folder that goes to the `test` split.
FOLDER_TEST_PERCENT = 5


class DataConfigError(ValueError):
    """A data config problem; the message names the `data.*` field and the fix."""


class MissingDataError(DataConfigError, FileNotFoundError):
    """A configured data directory or folder does not exist."""


class DataNotPreparedError(DataConfigError):
    """The TFDS data set has not been prepared (downloaded/built) in the data dir."""


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

    def __init__(self, data_source, *, name: str, split: str, num_classes: dict[str, int]):
        self._ds = data_source
        self.name = name
        self.split = split
        self.num_classes = num_classes

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
                 split: str, num_classes: dict[str, int]):
        self._records = records
        self._image_keys = tuple(image_keys)
        self.name = name
        self.split = split
        self.num_classes = num_classes
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
        self.num_classes = getattr(source, "num_classes", {})
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


def _class_counts(builder) -> dict[str, int]:
    import tensorflow_datasets as tfds

    counts = {}
    for key, feature in builder.info.features.items():
        if isinstance(feature, tfds.features.ClassLabel):
            counts[key] = int(feature.num_classes)
    return counts


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


def _load_tfrecord(builder, name: str, split: str, num_classes: dict[str, int]):
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
    source = EncodedRecordsSource(
        records, image_keys, name=name, split=split, num_classes=num_classes
    )
    source.features = builder.info.features
    return source


def tfds_source(name: str, split: str, data_dir: str | os.PathLike | None = None):
    """Random-access source over a prepared TFDS data set split.

    Args:
      name: TFDS name, optionally with config/version, e.g. 'celeb_a_hq/256'.
      split: TFDS split spec, e.g. 'train', 'test', 'train[:95%]'.
      data_dir: TFDS data dir; None means TFDS's default (`~/tensorflow_datasets`, or
        $TFDS_DATA_DIR).

    Returns:
      A source with `__len__`, `__getitem__` (dict of numpy arrays) and `num_classes`.

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
    available = sorted(builder.info.splits.keys())
    unknown = [s for s in _split_names(split) if s not in available]
    if unknown:
        raise DataConfigError(
            f"Unknown split {split!r} for TFDS data set {name!r} (data.train_split / "
            f"data.eval_split). Available splits: {available}."
        )
    num_classes = _class_counts(builder)
    formats = {f.value for f in builder.info.available_file_formats()}
    if formats & {"array_record", "parquet"}:
        ds = builder.as_data_source(split=split)
        return TfdsSource(ds, name=name, split=split, num_classes=num_classes)
    return _load_tfrecord(builder, name, split, num_classes)


def digits_source(split: str, data_dir: str | os.PathLike | None = None):
    """The embedded `ldm_digits` data set (built on first use under `data_dir`).

    Args:
      split: 'train' or 'test' (or any TFDS split spec over those).
      data_dir: where the builder is written; None means `<cwd>/data/tfds`.
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
    return CachedSource(tfds_source(digits.NAME, split, data_dir))


# ------------------------------------------------------------------------------------ Folder


def list_images(root: str | os.PathLike) -> list[str]:
    """Image files under `root` (recursive, sorted, paths relative to `root`)."""
    root = os.fspath(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for fname in filenames:
            if fname.lower().endswith(IMAGE_EXTENSIONS) and not fname.startswith("."):
                found.append(os.path.relpath(os.path.join(dirpath, fname), root))
    # Sorting by POSIX relative path makes the order (and thus the seeded shuffle) the same on
    # every host and OS, whatever order the file system lists entries in.
    return sorted(found, key=lambda p: p.replace(os.sep, "/"))


def _in_test_split(relpath: str) -> bool:
    # Hash of the relative path, not the file index: adding images does not move old ones
    # between splits, and the split is the same on every host.
    digest = hashlib.md5(relpath.replace(os.sep, "/").encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % 100 < FOLDER_TEST_PERCENT


class FolderSource:
    """Images from a folder; `__getitem__` returns `{image_key: (H, W, 3) or (H, W) uint8}`."""

    def __init__(self, root: str, relpaths: list[str], *, split: str, image_key: str = "image"):
        self.root = root
        self.relpaths = relpaths
        self.split = split
        self.image_key = image_key
        self.num_classes: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        from PIL import Image, ImageOps

        path = os.path.join(self.root, self.relpaths[int(index)])
        try:
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)  # phone photos store rotation in EXIF
                # Greyscale stays 2-D (the transforms replicate it); palette, RGBA, CMYK... are
                # converted to RGB here because PIL knows their semantics.
                if im.mode not in ("RGB", "L"):
                    im = im.convert("RGB")
                image = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError) as e:
            raise ValueError(f"Cannot read image {path!r} (data.folder): {e}") from e
        return {self.image_key: image}

    def __repr__(self) -> str:
        return f"FolderSource({self.root!r}, split={self.split!r}, len={len(self)})"


def folder_source(folder: str | os.PathLike | None, split: str, image_key: str = "image"):
    """Random-access source over an image folder (png/jpg/jpeg/webp/bmp, recursive).

    If `folder` has a `train/` or `test/` sub-folder, each sub-folder is a split (images at
    the top level are ignored). Otherwise the split is a deterministic hash of each file's
    relative path: ~95% 'train', ~5% 'test'.

    Raises:
      MissingDataError: the folder does not exist.
      DataConfigError: unknown split, or no images in the split.
    """
    if not folder:
        raise DataConfigError("data.folder is not set; set it to a folder of images.")
    root = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    if not os.path.isdir(root):
        raise MissingDataError(
            f"data.folder={os.fspath(folder)!r} does not exist (or is not a directory); "
            "set data.folder to a folder of png/jpg/jpeg/webp/bmp images."
        )
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if "train" in subdirs or "test" in subdirs:
        if split not in subdirs:
            raise DataConfigError(
                f"Unknown split {split!r} (data.train_split / data.eval_split) for "
                f"data.folder={root!r}: available splits (sub-folders) are {subdirs}."
            )
        split_root = os.path.join(root, split)
        relpaths = [os.path.join(split, p) for p in list_images(split_root)]
        where = f"sub-folder {split_root!r}"
    else:
        if split not in ("train", "test"):
            raise DataConfigError(
                f"Unknown split {split!r} (data.train_split / data.eval_split) for "
                f"data.folder={root!r}: it has no split sub-folders, so the available splits "
                f"are ['train', 'test'] (a {100 - FOLDER_TEST_PERCENT}/{FOLDER_TEST_PERCENT} "
                "hash split). Add train/ and test/ sub-folders for other splits."
            )
        all_paths = list_images(root)
        if not all_paths:
            raise DataConfigError(
                f"data.folder={root!r} contains no images ({', '.join(IMAGE_EXTENSIONS)})."
            )
        want_test = split == "test"
        relpaths = [p for p in all_paths if _in_test_split(p) == want_test]
        where = f"the hash-based {split!r} split of {len(all_paths)} images in {root!r}"
    if not relpaths:
        raise DataConfigError(
            f"No images ({', '.join(IMAGE_EXTENSIONS)}) in {where} (data.folder). Add images, "
            "or use train/ and test/ sub-folders to choose the split explicitly."
        )
    return FolderSource(root, relpaths, split=split, image_key=image_key)


# ------------------------------------------------------------------------------------ Config


def make_source(data_cfg, split: str):
    """Builds the source for `split` from a `data` config (see `ldm_jax.data.pipeline`).

    Dispatches on `data.source`: 'digits' | 'tfds' | 'folder' | 'latents' (precomputed
    first-stage latents in `data.latents_dir`, see `ldm_jax.data.latents`).
    """
    kind = data_cfg.get("source", None)
    data_dir = data_cfg.get("data_dir", None)
    if kind == "digits":
        return digits_source(split, data_dir)
    if kind == "tfds":
        return tfds_source(data_cfg.get("name", None), split, data_dir)
    if kind == "folder":
        return folder_source(
            data_cfg.get("folder", None), split, data_cfg.get("image_key", "image") or "image"
        )
    if kind == "synthetic_latents":
        from ldm_jax.data.synthetic import SyntheticLatentsSource
        # Held-out split: other noise on the same class patterns.
        return SyntheticLatentsSource(data_cfg.get("latent_shape"), data_cfg.get("num_classes", 0),
                                      noise_seed=0 if split == data_cfg.get("train_split", "train") else 1)
    if kind == "latents":
        from ldm_jax.data import latents  # imported here: latents imports this module.

        return latents.latents_source(data_cfg.get("latents_dir", None), split)
    raise DataConfigError(f"Unknown data.source={kind!r}; expected one of {list(SOURCES)}.")

"""The embedded `ldm_digits` data set: sklearn's 8x8 handwritten digits as a TFDS builder.

The 1797 digits ship inside scikit-learn (`sklearn.datasets.load_digits`), so the data set
builds with no network access and no TensorFlow. It is the smoke-test / CI data set of the
stack: small enough to prepare in about a second, large enough to train a toy LDM on.

Each 8x8 image (values 0..16) is rescaled to uint8 0..255, resized to 32x32 with PIL bilinear
and replicated to 3 equal RGB channels. Every 6th sample (index % 6 == 5) goes to `test`
(299 examples), the rest to `train` (1498 examples).

The data is written as `array_record` so it can be read with random access through
`builder.as_data_source()` (what `ldm_jax.data.sources` uses).
"""

from __future__ import annotations

import contextlib
import io
import os
import threading

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NAME = "ldm_digits"
IMAGE_SIZE = 32
NUM_CLASSES = 10
# Every TEST_EVERY-th sample (by sklearn order) goes to the test split.
TEST_EVERY = 6

_PREPARED: set[tuple[str, str]] = set()  # (data set name, data dir)
_PREPARE_LOCK = threading.Lock()


def default_digits_data_dir() -> str:
    """Where the digits builder is written when `data.data_dir` is None: `<cwd>/data/tfds`."""
    return os.path.join(os.getcwd(), "data", "tfds")


def digit_to_rgb32(digit: np.ndarray) -> np.ndarray:
    """Converts one sklearn 8x8 digit (float values 0..16) to a (32, 32, 3) uint8 image."""
    from PIL import Image

    grey = np.clip(np.round(np.asarray(digit, np.float64) * (255.0 / 16.0)), 0, 255)
    grey = grey.astype(np.uint8)
    big = Image.fromarray(grey, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    big = np.asarray(big, dtype=np.uint8)
    return np.repeat(big[:, :, None], 3, axis=2)


def _png_bytes(image: np.ndarray) -> bytes:
    """PNG-encodes with PIL.

    TFDS encodes numpy images with `tf.image.encode_png`, which would make TensorFlow a hard
    dependency; handing it already-encoded PNG bytes keeps the build TF-free.
    """
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class LdmDigits(tfds.core.GeneratorBasedBuilder):
    """sklearn digits, 32x32 RGB, as a TFDS data set (registered as `ldm_digits`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: sklearn digits at 32x32 RGB."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's default derives this via `importlib_resources`, which it imports lazily but
        # does not depend on (ModuleNotFoundError in download_and_prepare); the file path is
        # all it is used for (looking up a checksums.tsv next to the builder).
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo is built directly: `dataset_info_from_configs` would look for metadata
        # files (README, CITATIONS.bib) in a per-data-set package folder we do not have.
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "scikit-learn's 8x8 handwritten digits (UCI ML hand-written digits), rescaled "
                "to 0..255, resized to 32x32 (bilinear) and replicated to RGB."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"
                    ),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    "id": np.int64,
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data ships with scikit-learn.
        return {
            "train": self._generate_examples(test=False),
            "test": self._generate_examples(test=True),
        }

    def _generate_examples(self, test: bool):
        from sklearn.datasets import load_digits

        digits = load_digits()
        for i, (digit, label) in enumerate(zip(digits.images, digits.target)):
            if (i % TEST_EVERY == TEST_EVERY - 1) != test:
                continue
            yield i, {
                "image": _png_bytes(digit_to_rgb32(digit)),
                "label": int(label),
                "id": i,
            }


def ensure_digits_prepared(data_dir: str | os.PathLike | None = None) -> str:
    """Builds the `ldm_digits` data set under `data_dir` unless it is already there.

    Safe to call repeatedly (and from several threads): an already-prepared data set is only
    checked, not rebuilt. Needs neither network access nor TensorFlow.

    Args:
      data_dir: TFDS data dir; None means `<cwd>/data/tfds`. Created if missing.

    Returns:
      The data dir (as a string) the data set lives in.
    """
    return ensure_prepared(LdmDigits, data_dir)


def ensure_prepared(builder_cls, data_dir: str | os.PathLike | None = None) -> str:
    """Builds the embedded TFDS data set of `builder_cls` (a builder needing no download, like
    `LdmDigits`) as array_record under `data_dir` unless it is already there; thread- and
    process-safe. None means `<cwd>/data/tfds`. Returns the data dir."""
    data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir or default_digits_data_dir())))
    name = builder_cls.name
    with _PREPARE_LOCK:
        if (name, data_dir) in _PREPARED:
            return data_dir
        os.makedirs(data_dir, exist_ok=True)
        with _file_lock(os.path.join(data_dir, f".{name}.lock")):
            builder = builder_cls(data_dir=data_dir, file_format="array_record")
            if not builder.is_prepared():
                print(f"Building the embedded data set {name} in {data_dir} (once).", flush=True)
                tfds.disable_progress_bar()  # per-record bars drown the training log.
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(try_download_gcs=False)
                )
        _PREPARED.add((name, data_dir))
    return data_dir


@contextlib.contextmanager
def _file_lock(path: str):
    """Inter-process lock, so concurrent first runs (parallel test sessions, several
    processes on one machine) do not race to build the same directory."""
    try:
        import fcntl
    except ImportError:  # Not on POSIX: fall back to TFDS's own atomic rename.
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

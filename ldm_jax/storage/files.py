"""Writing files so that a reader (or a resumed run) never sees half of one.

Every file ldm_jax writes that another process or a later run reads (configs, metadata, reports,
caches, images) goes through `atomic_write`: the bytes go to a unique temporary name in the same
directory, which is renamed over the target only once complete (a rename within one file system
is atomic), and is removed if writing fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import IO, Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """`with atomic_write(path) as f: ...` writes `path` all at once or not at all.

    `mode` is 'w' (text) or 'wb' (binary). Parent directories are created. Pass the file
    object, not the name, to writers that append suffixes (np.savez adds '.npz' to names).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}.")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, (tuple, np.ndarray)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_json_compatible(obj: Any) -> Any:
    """A JSON round trip (tuples -> lists, numpy scalars -> numbers), so values compare equal
    to what a reader of the written file gets back."""
    return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes `obj` as indented, key-sorted JSON, atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def write_npz(path: str | os.PathLike, **arrays) -> None:
    """np.savez to `path` (exactly that name), atomically."""
    with atomic_write(path, "wb") as f:  # a file object: np.savez would append '.npz'
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})

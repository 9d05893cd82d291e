"""Image folders as random-access sources, labelled the way torchvision's ImageFolder does.

Images are files ending in `IMAGE_EXTENSIONS` (any case), found recursively; hidden files and
folders (names starting with '.', e.g. .ipynb_checkpoints) are skipped, and so are label maps
(names ending in `SEGMENTATION_SUFFIX`, '.seg.png': side files, see below).

Splits. A folder with a top-level sub-folder named like `data.train_split` or
`data.eval_split` has split sub-folders: each sub-folder is a split (images at the top are
ignored). Otherwise the folder is one pool, split by a hash of each file's relative path.
The held-out split follows `sources.HoldoutPolicy` (`data.holdout_percent`):
  DIR/<train>/ and DIR/<eval>/    read as they are;
  DIR/<train>/ only               <eval> is the hash-selected `percent`% of DIR/<train>/ and
                                  <train> the rest;
  DIR/ (no split sub-folders)     the same hash split of the whole folder.
Hashing the path (not the file's index) keeps the split the same on every host and keeps old
files in their split when images are added.

Classes. A split root (DIR/<split>/, or DIR/ without split sub-folders) is labelled when it
holds no image files directly and its images sit in immediate sub-folders: each such
sub-folder is a class (images nested deeper belong to it). The classes are the sorted union
of the class folder names over the split roots, so train and eval share one mapping even when
a class has no eval images; labels are 0..K-1 in that order. Folders holding no image at all
are not classes. An unlabelled folder (images at the top of the split root) emits no label.

Captions. With `captions=True` (any `data.caption_key`), each image's caption is read from
a side file `<image stem>.txt` beside it (UTF-8, stripped; several non-empty lines are several
captions) into the example's 'caption' field: a str, a list of str, or '' for an image without
a side file (trained like a dropped condition). A split with no side file at all is an error.

Label maps. With `segmentation=True` (any `data.segmentation_key`), each image's label map is
read from `<image stem>.seg.png` beside it (a single-channel PNG of class ids: mode L or P
(the palette indices), 16-bit greyscale for more than 256 classes) into the example's
'segmentation' field, uint8 [H, W] (int32 for 16-bit maps). Every image needs one, of its
size: a missing map is an error when the source is made, a map of another size or kind when
it is read (both name the file).

Unreadable files (truncated, corrupt, not really images) are skipped: see `FolderSource`.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from typing import Any

import numpy as np

from ldm_jax.data import transforms
from ldm_jax.data.sources import DataConfigError, HoldoutPolicy, MissingDataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSION = ".txt"
CAPTION_KEY = "caption"
SEGMENTATION_SUFFIX = ".seg.png"
SEGMENTATION_KEY = "segmentation"
# PIL modes a label map may have: 8-bit ids (P: the palette indices), 16/32-bit ids.
_LABEL_MAP_MODES = ("L", "P", "1", "I", "I;16", "I;16B", "I;16L", "I;16N")
# How many unreadable paths an error message lists.
_MAX_EXAMPLES = 5


class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded and another image was read in its place."""


def _is_image(name: str) -> bool:
    lower = name.lower()
    return (lower.endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
            and not lower.endswith(SEGMENTATION_SUFFIX))


def _walk(root: str):
    # Hidden folders are tool debris (.ipynb_checkpoints, .thumbnails), not data or classes.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield dirpath, filenames


def list_images(root: str | os.PathLike) -> list[str]:
    """Image files under `root` (recursive, sorted, paths relative to `root`)."""
    root = os.fspath(root)
    found = [os.path.relpath(os.path.join(dirpath, f), root)
             for dirpath, filenames in _walk(root) for f in filenames if _is_image(f)]
    # Sorting by POSIX relative path makes the order (and thus the seeded shuffle) the same on
    # every host and OS, whatever order the file system lists entries in.
    return sorted(found, key=lambda p: p.replace(os.sep, "/"))


def _has_image(root: str) -> bool:
    return any(any(_is_image(f) for f in filenames) for _, filenames in _walk(root))


def caption_path(image_path: str) -> str:
    """The caption side file of an image: the same path with '.txt' for its extension."""
    return os.path.splitext(image_path)[0] + CAPTION_EXTENSION


def read_caption(image_path: str) -> str | list[str]:
    """The caption(s) of an image from its side file: '' when there is none, the stripped
    text for one non-empty line, a list of the stripped non-empty lines for several."""
    path = caption_path(image_path)
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: drop a BOM (Windows editors)
            text = f.read()
    except FileNotFoundError:
        return ""
    except UnicodeDecodeError as e:
        raise DataConfigError(
            f"Caption file {path!r} is not UTF-8 text ({e}); re-save it as UTF-8 "
            "(data.caption_key reads <image stem>.txt beside each image).") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if len(lines) == 1 else lines if lines else ""


def segmentation_path(image_path: str) -> str:
    """The label map side file of an image: its path with '.seg.png' for its extension."""
    return os.path.splitext(image_path)[0] + SEGMENTATION_SUFFIX


def read_segmentation(image_path: str, image_hw: tuple[int, int]) -> np.ndarray:
    """The label map of an image (of height x width `image_hw`) from its side file: uint8
    [H, W] class ids (int32 for 16/32-bit maps). A missing file, a map with colour channels
    or of another size than its image is a DataConfigError naming the file."""
    from PIL import Image

    path = segmentation_path(image_path)
    fix = ("data.segmentation_key reads <image stem>.seg.png beside each image: a "
           "single-channel PNG of class ids, the size of its image")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            values = np.asarray(im)
    except FileNotFoundError:
        raise DataConfigError(f"Label map {path!r} of image {image_path!r} is missing ({fix}), "
                              "or set data.segmentation_key=''.") from None
    except Exception as e:  # pylint: disable=broad-except
        raise DataConfigError(f"Label map {path!r} is unreadable ({type(e).__name__}: {e}); "
                              f"re-export it ({fix}).") from None
    if mode not in _LABEL_MAP_MODES:
        raise DataConfigError(f"Label map {path!r} has PIL mode {mode!r}, not a single channel "
                              f"of class ids ({fix}).")
    height, width = int(image_hw[0]), int(image_hw[1])
    if values.shape != (height, width):
        raise DataConfigError(
            f"Label map {path!r} is {values.shape[1]}x{values.shape[0]} (WxH) but its image "
            f"{image_path!r} is {width}x{height}; {fix}.")
    if values.dtype in (np.uint8, np.bool_):  # '1' (bilevel) gives bool: ids 0 and 1
        return values.astype(np.uint8)
    values = values.astype(np.int64)
    if values.size and values.min() < 0:
        raise DataConfigError(f"Label map {path!r} has negative class ids ({fix}).")
    return values.astype(np.int32)


def _missing_segmentations(root: str, relpaths: list[str]) -> list[str]:
    """The label map side files (relative paths) of `relpaths` that do not exist: one
    directory listing per folder, not a stat per image."""
    listings: dict[str, set[str]] = {}
    missing = []
    for relpath in relpaths:
        folder = os.path.dirname(relpath)
        if folder not in listings:
            listings[folder] = set(os.listdir(os.path.join(root, folder)))
        side = segmentation_path(relpath)
        if os.path.basename(side) not in listings[folder]:
            missing.append(side)
    return missing


def in_holdout(relpath: str, percent: int) -> bool:
    """Whether `relpath` (relative to its split root) falls in the held-out `percent`%."""
    digest = hashlib.md5(relpath.replace(os.sep, "/").encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % 100 < percent


def _class_folders(split_root: str) -> list[str] | None:
    """Class folder names of a split root (its sub-folders holding images; [] when it holds
    no image at all), or None when it holds images directly (unlabelled)."""
    with os.scandir(split_root) as it:
        entries = list(it)
    if any(e.is_file() and _is_image(e.name) for e in entries):
        return None
    return sorted(e.name for e in entries
                  if e.is_dir() and not e.name.startswith(".") and _has_image(e.path))


def _resolve_split(root: str, split: str, policy: HoldoutPolicy):
    """Where `split` lives: (base sub-folder, '' for the folder itself; hash part 'train' /
    'eval', or None for all of base; the split roots sharing one class mapping)."""
    subdirs = sorted(e.name for e in os.scandir(root)
                     if e.is_dir() and not e.name.startswith("."))
    split_dirs = [d for d in (policy.train_split, policy.eval_split) if d and d in subdirs]
    if split_dirs:
        hold = (policy.active and policy.train_split in subdirs
                and policy.eval_split not in subdirs)
        if split in subdirs:
            base, part = split, ("train" if hold and split == policy.train_split else None)
        elif hold and split == policy.eval_split:
            base, part = policy.train_split, "eval"
        else:
            held = (f", and {policy.eval_split!r} held out of {policy.train_split!r} "
                    "(data.holdout_percent)" if hold else "")
            raise DataConfigError(
                f"Unknown split {split!r} (data.train_split / data.eval_split) for "
                f"data.folder={root!r}: available splits (sub-folders) are {subdirs}{held}."
            )
        return base, part, sorted(set(split_dirs) | {base})
    if policy.active and split in (policy.train_split, policy.eval_split):
        return "", ("train" if split == policy.train_split else "eval"), [""]
    if split == policy.train_split:  # no distinct eval split: the whole folder is train
        return "", None, [""]
    names = [n for n in (policy.train_split, policy.eval_split if policy.active else None) if n]
    raise DataConfigError(
        f"Unknown split {split!r} (data.train_split / data.eval_split) for data.folder={root!r}: "
        f"it has no split sub-folders, so the available splits are {names} (a "
        f"{100 - policy.percent}/{policy.percent} hash split of its images, "
        "data.holdout_percent). Add sub-folders named like the splits to choose them yourself."
    )


def _class_mapping(root: str, label_roots: list[str], base: str) -> list[str] | None:
    """Sorted class names shared by the split roots, or None for an unlabelled folder."""
    per_root = {r: _class_folders(os.path.join(root, r)) for r in label_roots}
    labelled = [r for r, c in per_root.items() if c]
    flat = [r for r, c in per_root.items() if c is None]
    if labelled and flat:
        # Guessing here would give train and eval different label sets.
        raise DataConfigError(
            f"data.folder={root!r}: split folder(s) {labelled} hold class sub-folders but "
            f"{flat} hold images directly, which then have no class. Put those images in "
            "class sub-folders too, or set data.label_key=None to train unconditionally."
        )
    if not per_root[base]:
        return None
    return sorted(set().union(*(per_root[r] for r in labelled)))


class FolderSource:
    """Images of one split of a folder: `{image_key: uint8 array, label_key: int64}`.

    Images come back as (H, W, 3), or (H, W) for greyscale (the transforms replicate it); see
    `transforms.pil_to_uint8` for 16-bit, palette, CMYK and alpha images. The label is present
    only for labelled folders with a `label_key`; 'caption' with `captions`, 'segmentation'
    (`read_segmentation`) with `segmentation`.

    An unreadable or truncated file is skipped: the next index whose file reads (wrapping
    around) is returned in its place, so reads stay deterministic; an
    `UnreadableImageWarning` names the file once, and `unreadable` / `num_skipped` count them.
    When the distinct unreadable files of the split exceed `max_unreadable_fraction` of its
    files, reads raise a DataConfigError naming `data.max_unreadable_fraction`. So
    floor(fraction * files) are tolerated: with the default 0.01 a split of fewer than 100
    files tolerates none (a bad file in a small folder is worth fixing, not skipping), a split
    of 1000 files ten. The limit is checked as skips happen, so a bad file may surface late in
    an epoch. Counts are per process (a pickled copy starts from its parent's counts).

    Thread-safe (grain reads with threads) and picklable (grain worker processes).
    """

    def __init__(self, root: str, relpaths: list[str], *, split: str, image_key: str = "image",
                 label_key: str | None = None, labels: list[int] | None = None,
                 class_names: list[str] | None = None, holdout: dict[str, Any] | None = None,
                 max_unreadable_fraction: float = 0.01, captions: bool = False,
                 segmentation: bool = False):
        self.root = root
        self.captions = bool(captions)
        self.segmentation = bool(segmentation)
        self.relpaths = relpaths
        self.split = split
        self.image_key = image_key
        self.holdout = holdout
        self.max_unreadable_fraction = float(max_unreadable_fraction)
        labelled = bool(label_key) and labels is not None
        self.label_key = label_key if labelled else None
        self._labels = np.asarray(labels, np.int64) if labelled else None
        names = list(class_names or ())
        self.num_classes: dict[str, int] = {label_key: len(names)} if labelled else {}
        self.class_names: dict[str, list[str]] = {label_key: names} if labelled else {}
        self._lock = threading.Lock()
        self._bad: dict[int, str] = {}  # index -> why it could not be read
        self._num_skipped = 0

    # ------------------------------------------------------------------- unreadable files

    @property
    def unreadable(self) -> dict[str, str]:
        """{relative path: error} of the files found unreadable so far (in this process)."""
        with self._lock:
            return {self.relpaths[i]: why for i, why in sorted(self._bad.items())}

    @property
    def num_skipped(self) -> int:
        """How many reads were served by another image because their file was unreadable."""
        return self._num_skipped

    def _allowed(self) -> float:
        return self.max_unreadable_fraction * len(self.relpaths)

    def _check_limit(self) -> None:
        # Called with the lock held. The epsilon keeps 0.29 * 100 from admitting only 28.
        if len(self._bad) > self._allowed() + 1e-9:
            examples = "; ".join(f"{self.relpaths[i]} ({why})"
                                 for i, why in sorted(self._bad.items())[:_MAX_EXAMPLES])
            raise DataConfigError(
                f"{len(self._bad)} of {len(self.relpaths)} image files of split {self.split!r} in "
                f"data.folder={self.root!r} are unreadable (truncated or corrupt), more than "
                f"data.max_unreadable_fraction={self.max_unreadable_fraction} allows; e.g. "
                f"{examples}. Remove or re-export those files, or raise "
                "data.max_unreadable_fraction to skip them."
            )

    def _mark_bad(self, index: int, error: BaseException) -> None:
        why = f"{type(error).__name__}: {error}"
        with self._lock:
            new = index not in self._bad
            self._bad[index] = why
            if new:
                warnings.warn(
                    f"Skipping unreadable image {os.path.join(self.root, self.relpaths[index])!r}"
                    f" ({why}); another image of split {self.split!r} is read in its place "
                    f"(data.max_unreadable_fraction={self.max_unreadable_fraction}).",
                    UnreadableImageWarning, stacklevel=3)
            self._check_limit()

    # ------------------------------------------------------------------------------ reads

    def _decode(self, index: int) -> np.ndarray:
        from PIL import Image, ImageOps

        path = os.path.join(self.root, self.relpaths[index])
        with Image.open(path) as im:
            # load() decodes now, so truncation raises here (PIL's LOAD_TRUNCATED_IMAGES,
            # which would pad with grey, is left off) instead of slipping through lazily.
            im.load()
            try:
                ImageOps.exif_transpose(im, in_place=True)  # phones store rotation in EXIF
            except Exception as e:  # pylint: disable=broad-except
                # Broken EXIF metadata does not make the pixels unusable.
                warnings.warn(f"Ignoring unreadable EXIF orientation of {path!r}: {e}",
                              UnreadableImageWarning, stacklevel=3)
            return transforms.pil_to_uint8(im)

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        n = len(self.relpaths)
        index = int(index)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        for step in range(n):
            j = (index + step) % n
            if j in self._bad:
                with self._lock:
                    self._check_limit()
                continue
            try:
                image = self._decode(j)
            except MemoryError:
                raise
            except Exception as e:  # pylint: disable=broad-except
                # PIL reports bad files as OSError, SyntaxError, ValueError, struct.error,
                # EOFError, DecompressionBombError...: any failure here is the file's.
                self._mark_bad(j, e)
                continue
            if step:
                with self._lock:
                    self._num_skipped += 1
            example = {self.image_key: image}
            if self._labels is not None:
                example[self.label_key] = self._labels[j]
            if self.captions:
                example[CAPTION_KEY] = read_caption(os.path.join(self.root, self.relpaths[j]))
            if self.segmentation:  # outside the try: a bad map is an error, not a skip
                example[SEGMENTATION_KEY] = read_segmentation(
                    os.path.join(self.root, self.relpaths[j]), image.shape[:2])
            return example
        raise DataConfigError(  # only reachable with data.max_unreadable_fraction >= 1
            f"No image of split {self.split!r} in data.folder={self.root!r} is readable; "
            f"e.g. {list(self.unreadable.items())[:_MAX_EXAMPLES]}."
        )

    # ---------------------------------------------------------------------------- pickling

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]  # locks do not pickle; each copy gets its own
        state["_bad"] = dict(self._bad)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FolderSource({self.root!r}, split={self.split!r}, len={len(self)})"


def folder_source(folder: str | os.PathLike | None, split: str, image_key: str = "image", *,
                  label_key: str | None = "label", holdout: HoldoutPolicy = HoldoutPolicy(),
                  max_unreadable_fraction: float = 0.01, captions: bool = False,
                  segmentation: bool = False) -> FolderSource:
    """Random-access source over one split of an image folder (see the module doc).

    Args:
      folder: the folder (`data.folder`).
      split: the split to read; a sub-folder name, or `holdout.train_split` /
        `holdout.eval_split`.
      image_key: feature key of the image (`data.image_key`).
      label_key: feature key of the class id for labelled folders (`data.label_key`); None or
        '' emits no label.
      holdout: split names and held-out percent (`HoldoutPolicy.from_config`); the default is
        'train' / 'test' with 5% held out.
      max_unreadable_fraction: see `FolderSource`.
      captions: read each image's caption(s) from `<image stem>.txt` into 'caption' (set when
        `data.caption_key` is).
      segmentation: read each image's label map from `<image stem>.seg.png` into
        'segmentation' (set when `data.segmentation_key` is).

    Raises:
      MissingDataError: the folder does not exist.
      DataConfigError: unknown split, no images in the split, class folders in one split
        root but not another, a bad `max_unreadable_fraction`, or `captions` with no
        caption side file in the split, or `segmentation` with an image without its label map.
    """
    if not folder:
        raise DataConfigError("data.folder is not set; set it to a folder of images.")
    if isinstance(max_unreadable_fraction, bool) or not isinstance(
            max_unreadable_fraction, (int, float)) or not 0 <= max_unreadable_fraction <= 1:
        raise DataConfigError(
            f"data.max_unreadable_fraction={max_unreadable_fraction!r} must be a number in "
            "[0, 1]: the fraction of a split's image files that may be unreadable (skipped)."
        )
    root = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    if not os.path.isdir(root):
        raise MissingDataError(
            f"data.folder={os.fspath(folder)!r} does not exist (or is not a directory); "
            f"set data.folder to a folder of {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images."
        )
    base, part, label_roots = _resolve_split(root, split, holdout)
    split_root = os.path.join(root, base)
    paths = list_images(split_root)
    if not paths and not base:
        raise DataConfigError(
            f"data.folder={root!r} contains no images ({', '.join(IMAGE_EXTENSIONS)})."
        )
    if part is not None:
        paths = [p for p in paths if in_holdout(p, holdout.percent) == (part == "eval")]
    if not paths:
        where = f"sub-folder {split_root!r}" if base else f"folder {root!r}"
        if part is not None:
            where = (f"the {'held-out' if part == 'eval' else 'training'} "
                     f"{holdout.percent if part == 'eval' else 100 - holdout.percent}% of the "
                     f"{where} (data.holdout_percent)")
        raise DataConfigError(
            f"No images ({', '.join(IMAGE_EXTENSIONS)}) in {where} for split {split!r} "
            "(data.folder). Add images, change data.holdout_percent, or use sub-folders named "
            "like data.train_split and data.eval_split to choose the split explicitly."
        )
    classes = _class_mapping(root, label_roots, base) if label_key else None
    labels = None
    if classes is not None:
        index = {name: i for i, name in enumerate(classes)}
        labels = [index[p.split(os.sep, 1)[0]] for p in paths]
    held = None
    if part is not None:
        held = holdout.describe(part, "path_hash", folder=base or ".")
    relpaths = [os.path.join(base, p) if base else p for p in paths]
    if captions and not any(os.path.isfile(caption_path(os.path.join(root, p)))
                            for p in relpaths):
        example = caption_path(relpaths[0])
        raise DataConfigError(
            f"data.caption_key is set but no image of split {split!r} in data.folder={root!r} "
            f"has a caption file: put each image's caption in a UTF-8 text file beside it "
            f"named like the image with {CAPTION_EXTENSION} (e.g. {example!r}; one caption a "
            "line), or set data.caption_key='' to train without captions.")
    if segmentation:
        missing = _missing_segmentations(root, relpaths)
        if missing:
            raise DataConfigError(
                f"data.segmentation_key is set but {len(missing)} of {len(relpaths)} images of "
                f"split {split!r} in data.folder={root!r} have no label map, e.g. "
                f"{missing[0]!r}: put each image's label map beside it as <image "
                f"stem>{SEGMENTATION_SUFFIX} (a single-channel PNG of class ids, the image's "
                "size), or set data.segmentation_key='' to read none.")
    return FolderSource(
        root, relpaths, split=split,
        image_key=image_key, label_key=label_key, labels=labels, class_names=classes,
        holdout=held, max_unreadable_fraction=max_unreadable_fraction, captions=captions,
        segmentation=segmentation)

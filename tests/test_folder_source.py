"""Image folders (ldm_jax.data.folder): class labels, held-out splits, real-photo decoding,
unreadable files; and the source registry (ldm_jax.data.registry)."""

import ast
import concurrent.futures
import io
import json
import os
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from ldm_jax.config import defaults
from ldm_jax.data import folder as folder_lib
from ldm_jax.data import pipeline, registry, sources, transforms
from ldm_jax.data.folder import UnreadableImageWarning
from ldm_jax.data.sources import DataConfigError


# Every image of a split-less folder is 'train' (nothing held out).
WHOLE = sources.HoldoutPolicy("train", None)


def data_cfg(folder, **overrides):
    cfg = defaults.data_config(source="folder", folder=str(folder), image_size=16, num_threads=0)
    cfg.update(overrides)
    return cfg


def write(path, array=None, *, seed=0, size=(12, 10), mode=None, **save_kw):
    """Writes a small image (random RGB unless `array` is given); returns the array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if array is None:
        array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path, **save_kw)
    return array


def all_examples(source):
    return [source[i] for i in range(len(source))]


def class_of(relpath, depth):
    return relpath.split(os.sep)[depth]


# ------------------------------------------------------------------------------- labels


def test_labels_from_split_class_folders(tmp_path):
    # 'ant' has no test images; 'dog' has a nested folder (still class 'dog').
    names = ["train/dog/d0.png", "train/dog/deep/d1.png", "train/cat/c0.jpg", "train/cat/c1.png",
             "train/ant/a0.png", "test/dog/d2.png", "test/cat/c2.png"]
    for i, name in enumerate(names):
        write(tmp_path / name, seed=i)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    write(tmp_path / "train" / ".ipynb_checkpoints" / "x.png")  # hidden: no class, no image
    (tmp_path / "train" / "empty").mkdir()  # no images: no class
    cfg = data_cfg(tmp_path)
    train, test = registry.make_source(cfg, "train"), registry.make_source(cfg, "test")
    assert (len(train), len(test)) == (5, 2)
    classes = ["ant", "cat", "dog"]
    for source in (train, test):
        assert source.num_classes == {"label": 3} and source.class_names == {"label": classes}
        assert source.holdout is None
        for relpath, ex in zip(source.relpaths, all_examples(source)):
            assert ex["label"] == classes.index(class_of(relpath, 1)), relpath
            assert ex["label"].dtype == np.int64 and ex["image"].shape == (10, 12, 3)
    # Another label key; none at all.
    other = registry.make_source(data_cfg(tmp_path, label_key="y"), "test")
    assert set(other[0]) == {"image", "y"} and other.class_names == {"y": classes}
    for key in (None, ""):
        bare = registry.make_source(data_cfg(tmp_path, label_key=key), "train")
        assert set(bare[0]) == {"image"} and bare.num_classes == {} and bare.class_names == {}
    # Labels reach the batches.
    batch = next(pipeline.make_eval_iterator(cfg, global_batch_size=2, process_index=0,
                                             process_count=1, source=test))
    assert batch["label"].tolist() == [1, 2]  # test/cat/c2.png, test/dog/d2.png


def test_labels_from_class_folders_with_hash_split(tmp_path):
    classes = ["airplane", "bird", "car"]
    for c in classes:
        for i in range(30):
            write(tmp_path / c / f"{i:02d}.png", seed=i)
    cfg = data_cfg(tmp_path)
    train, test = registry.make_source(cfg, "train"), registry.make_source(cfg, "test")
    assert len(train) + len(test) == 90 and len(test) >= 1
    assert not set(train.relpaths) & set(test.relpaths)
    assert registry.make_source(cfg, "test").relpaths == test.relpaths  # deterministic
    assert train.holdout == {"from_split": "train", "eval_split": "test", "role": "train",
                             "method": "path_hash", "percent": 5, "folder": "."}
    assert test.holdout == dict(train.holdout, role="eval")
    for source in (train, test):
        assert source.class_names == {"label": classes}
        labels = [int(ex["label"]) for ex in all_examples(source)]
        assert labels == [classes.index(class_of(p, 0)) for p in source.relpaths]


def test_unlabelled_folder_emits_no_label(tmp_path):
    write(tmp_path / "top.png")
    for i in range(40):
        write(tmp_path / f"sub{i % 2}" / f"{i}.png", seed=i)
    source = registry.make_source(data_cfg(tmp_path), "train")  # label_key='label'
    assert source.num_classes == {} and source.class_names == {}
    assert all(set(ex) == {"image"} for ex in all_examples(source))


def test_mixed_labelled_and_flat_split_folders_is_an_error(tmp_path):
    write(tmp_path / "train" / "cat" / "a.png")
    write(tmp_path / "test" / "b.png")
    with pytest.raises(DataConfigError, match=r"data\.label_key=None"):
        registry.make_source(data_cfg(tmp_path), "train")
    assert len(registry.make_source(data_cfg(tmp_path, label_key=None), "train")) == 1


# ------------------------------------------------------------------------------- splits


def test_train_folder_only_holds_out_eval(tmp_path):
    for i in range(80):
        write(tmp_path / "train" / f"{i:02d}.png", seed=i)
    cfg = data_cfg(tmp_path, label_key=None)
    train, test = registry.make_source(cfg, "train"), registry.make_source(cfg, "test")
    assert len(test) >= 1 and len(train) + len(test) == 80
    info = pipeline.dataset_info(cfg)
    assert (info["num_train_examples"], info["num_eval_examples"]) == (len(train), len(test))
    assert not set(train.relpaths) & set(test.relpaths)
    assert all(p.startswith("train" + os.sep) for p in train.relpaths + test.relpaths)
    assert test.holdout == {"from_split": "train", "eval_split": "test", "role": "eval",
                            "method": "path_hash", "percent": 5, "folder": "train"}
    assert json.loads(json.dumps(test.holdout)) == test.holdout
    # The same slice as the hash split of the train folder read on its own.
    alone = registry.make_source(data_cfg(tmp_path / "train", label_key=None), "test")
    assert [os.path.join("train", p) for p in alone.relpaths] == test.relpaths
    # Other split names and percent.
    cfg = data_cfg(tmp_path, label_key=None, eval_split="validation", holdout_percent=30)
    held = registry.make_source(cfg, "validation")
    assert 12 <= len(held) <= 40 and set(test.relpaths) <= set(held.relpaths)
    assert len(registry.make_source(cfg, "train")) == 80 - len(held)
    with pytest.raises(DataConfigError, match=r"\['train'\], and 'validation' held out"):
        registry.make_source(cfg, "test")
    # Nothing held out: eval_split unset or equal to train_split, or holdout_percent=0.
    for over in (dict(eval_split=None), dict(eval_split="train"), dict(holdout_percent=0)):
        source = registry.make_source(data_cfg(tmp_path, label_key=None, **over), "train")
        assert len(source) == 80 and source.holdout is None


def test_custom_split_folder_names(tmp_path):
    write(tmp_path / "training" / "x" / "a.png")
    write(tmp_path / "training" / "y" / "b.png")
    write(tmp_path / "val" / "y" / "c.png")
    cfg = data_cfg(tmp_path, train_split="training", eval_split="val")
    val = registry.make_source(cfg, "val")
    assert val.relpaths == [os.path.join("val", "y", "c.png")] and int(val[0]["label"]) == 1
    assert val.class_names == {"label": ["x", "y"]}
    with pytest.raises(DataConfigError, match="no split sub-folders, so the available splits "
                                              r"are \['train', 'test'\]"):
        folder_lib.folder_source(tmp_path / "training" / "x", "val")


# ------------------------------------------------------------------------------- decoding


def png_16bit(array):
    """PNG bytes with 16 bits per channel (PIL cannot write 16-bit RGB itself)."""
    h, w = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    raw = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2, 4: 6}[channels], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def test_16bit_images_are_scaled_not_clipped(tmp_path):
    grey = np.array([[0, 257, 32768, 65535], [128, 129, 1000, 65407]], np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")  # PIL mode 'I;16'
    (tmp_path / "rgb16.png").write_bytes(png_16bit(np.stack([grey, grey[::-1], grey], -1)))
    source = folder_lib.folder_source(tmp_path, "train", holdout=WHOLE)
    images = dict(zip(source.relpaths, (ex["image"] for ex in all_examples(source))))
    expected = np.round(grey / 257).astype(np.uint8)
    assert expected.tolist() == [[0, 1, 128, 255], [0, 1, 4, 255]]
    np.testing.assert_array_equal(images["grey16.png"], expected)  # 2-D, scaled
    rgb = images["rgb16.png"]  # Pillow keeps the high byte: within 1 of round(v / 257)
    assert rgb.shape == (2, 4, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1
    assert rgb[0, 3, 0] == 255 and rgb[0, 2, 0] == 128
    # 32-bit 'I': 16-bit data is scaled the same way; a larger range is stretched.
    as_i = Image.fromarray(grey.astype(np.int32), mode="I")
    np.testing.assert_array_equal(transforms.pil_to_uint8(as_i), expected)
    wide = Image.fromarray(np.array([[0, 100_000, 200_000]], np.int32), mode="I")
    assert transforms.pil_to_uint8(wide).tolist() == [[0, 128, 255]]
    for mode, dtype in (("I;16B", ">u2"), ("I;16L", "<u2")):
        im = Image.frombytes(mode, (4, 2), grey.astype(dtype).tobytes())
        np.testing.assert_array_equal(transforms.pil_to_uint8(im), expected)


def test_modes_and_sizes(tmp_path):
    rgb = np.zeros((6, 9, 3), np.uint8)
    rgb[:, :, 0], rgb[:, :, 2] = 200, 50
    write(tmp_path / "rgb.png", rgb)
    write(tmp_path / "grey.png", np.full((7, 5), 77, np.uint8), mode="L")
    rgba = np.dstack([rgb, np.full((6, 9), 10, np.uint8)])
    write(tmp_path / "rgba.png", rgba, mode="RGBA")
    write(tmp_path / "la.png", np.dstack([np.full((4, 4), 90, np.uint8)] * 2), mode="LA")
    Image.fromarray(rgb).quantize(4).save(tmp_path / "palette.png")
    pal_t = Image.fromarray(rgb).quantize(4)
    pal_t.info["transparency"] = 0
    pal_t.save(tmp_path / "palette_t.png", transparency=0)
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    Image.new("1", (5, 3), 1).save(tmp_path / "bilevel.bmp")
    write(tmp_path / "big.webp", size=(300, 40), lossless=True)
    source = folder_lib.folder_source(tmp_path, "train", holdout=WHOLE)
    images = dict(zip(source.relpaths, (ex["image"] for ex in all_examples(source))))
    assert len(images) == 9 and all(im.dtype == np.uint8 for im in images.values())
    np.testing.assert_array_equal(images["rgb.png"], rgb)
    np.testing.assert_array_equal(images["grey.png"], np.full((7, 5), 77))  # stays 2-D
    np.testing.assert_array_equal(images["rgba.png"], rgb)  # alpha dropped
    np.testing.assert_array_equal(images["la.png"], np.full((4, 4, 3), 90))
    np.testing.assert_array_equal(images["palette.png"], rgb)
    np.testing.assert_array_equal(images["palette_t.png"], rgb)
    assert np.abs(images["cmyk.jpg"].astype(int) - [255, 0, 0]).max() <= 3  # red
    np.testing.assert_array_equal(images["bilevel.bmp"], np.full((3, 5), 255))
    assert images["big.webp"].shape == (40, 300, 3)
    for im in images.values():  # every one preprocesses to the model's input
        assert transforms.preprocess_image(im, 16).shape == (16, 16, 3)


# ----------------------------------------------------------------------------- unreadable


def make_folder_with_bad_files(root, n_good=18):
    for i in range(n_good):
        write(root / f"img{i:02d}.png", seed=i)
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 9, np.uint8)).save(buf, format="JPEG")
    (root / "img05a_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(
        buf, format="PNG")
    (root / "img10a_truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "img99_garbage.png").write_bytes(b"this is not a png")  # last index: wraps


def test_unreadable_files_are_skipped_with_a_warning(tmp_path):
    make_folder_with_bad_files(tmp_path)
    source = folder_lib.folder_source(tmp_path, "train", label_key=None, holdout=WHOLE,
                                      max_unreadable_fraction=0.15)  # 3 of 21 allowed
    bad_trunc = source.relpaths.index("img05a_truncated.jpg")
    bad_garbage = source.relpaths.index("img99_garbage.png")
    assert bad_garbage == len(source) - 1
    with pytest.warns(UnreadableImageWarning, match="img05a_truncated.jpg.*OSError"):
        ex = source[bad_trunc]
    np.testing.assert_array_equal(ex["image"], source[bad_trunc + 1]["image"])  # next index
    with pytest.warns(UnreadableImageWarning, match="img99_garbage.png"):
        ex = source[bad_garbage]
    np.testing.assert_array_equal(ex["image"], source[0]["image"])  # wrapped around
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bad files are skipped without a new warning
        np.testing.assert_array_equal(source[bad_trunc]["image"], source[bad_trunc + 1]["image"])
    bad_png = source.relpaths.index("img10a_truncated.png")
    with pytest.warns(UnreadableImageWarning, match="img10a_truncated.png.*truncated"):
        np.testing.assert_array_equal(source[bad_png]["image"], source[bad_png + 1]["image"])
    assert source.num_skipped == 4
    assert sorted(source.unreadable) == ["img05a_truncated.jpg", "img10a_truncated.png",
                                         "img99_garbage.png"]
    assert "truncated" in source.unreadable["img05a_truncated.jpg"].lower()
    # Picklable (grain worker processes); the copy keeps what is known.
    copy = pickle.loads(pickle.dumps(source))
    assert sorted(copy.unreadable) == sorted(source.unreadable)
    np.testing.assert_array_equal(copy[3]["image"], source[3]["image"])


def test_threaded_reads_skip_consistently(tmp_path):
    make_folder_with_bad_files(tmp_path)
    kw = dict(label_key=None, holdout=WHOLE,
              max_unreadable_fraction=0.15)
    serial = folder_lib.folder_source(tmp_path, "train", **kw)
    threaded = folder_lib.folder_source(tmp_path, "train", **kw)
    indices = list(range(len(serial))) * 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        expected = [serial[i]["image"] for i in indices]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda i: threaded[i]["image"], indices))
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)
    assert threaded.unreadable.keys() == serial.unreadable.keys()
    assert threaded.num_skipped == serial.num_skipped == 12
    # Through the pipeline with reader threads.
    cfg = data_cfg(tmp_path, label_key=None, eval_split=None, max_unreadable_fraction=0.15,
                   num_threads=4)
    with pytest.warns(UnreadableImageWarning):
        it = pipeline.make_train_iterator(cfg, global_batch_size=21, seed=0, process_index=0,
                                          process_count=1)
        batch = next(it)
    assert batch["image"].shape == (21, 16, 16, 3)
    it.close()


def test_too_many_unreadable_files_raise(tmp_path):
    make_folder_with_bad_files(tmp_path)
    cfg = data_cfg(tmp_path, label_key=None, eval_split=None)  # default 0.01 of 21: none
    source = registry.make_source(cfg, "train")
    assert source.max_unreadable_fraction == 0.01
    with pytest.warns(UnreadableImageWarning):
        with pytest.raises(DataConfigError, match=r"1 of 21 image files .*data\."
                                                  r"max_unreadable_fraction=0\.01.*img05a"):
            source[source.relpaths.index("img05a_truncated.jpg")]
    # 0.05 of 21 allows one; the second distinct file raises, naming both.
    cfg.max_unreadable_fraction = 0.05
    source = registry.make_source(cfg, "train")
    with pytest.warns(UnreadableImageWarning):
        source[source.relpaths.index("img05a_truncated.jpg")]
        with pytest.raises(DataConfigError, match="2 of 21.*img05a_truncated.*img99_garbage"):
            source[len(source) - 1]
    for bad in (-0.1, 1.5, None):
        cfg.max_unreadable_fraction = bad
        with pytest.raises(DataConfigError, match="data.max_unreadable_fraction"):
            registry.make_source(cfg, "train")


def test_only_unreadable_files(tmp_path):
    (tmp_path / "a.png").write_bytes(b"nope")
    source = folder_lib.folder_source(tmp_path, "train", holdout=WHOLE,
                                      max_unreadable_fraction=1.0)
    with pytest.warns(UnreadableImageWarning), pytest.raises(DataConfigError, match="readable"):
        source[0]


# ------------------------------------------------------------------------------- registry


def test_registry():
    assert list(registry.SOURCES) == ["digits", "tfds", "folder", "latents", "synthetic_latents", "digits_captions", "digits_layout", "digits_sr", "digits_semantic"]
    with pytest.raises(DataConfigError, match=r"data.source='nope'.*'digits', 'tfds', 'folder'"):
        registry.make_source(defaults.data_config(source="nope"), "train")
    cfg = defaults.data_config(source="synthetic_latents")
    cfg.latent_shape, cfg.num_classes = (4, 4, 3), 2
    train, test = registry.make_source(cfg, "train"), registry.make_source(cfg, "test")
    assert train[1]["latent"].shape == (4, 4, 3) and int(train[1]["label"]) == 1
    assert not np.array_equal(train[0]["latent"], test[0]["latent"])
    # sources.py imports none of the modules that import it (no import cycle).
    tree = ast.parse(open(sources.__file__).read())
    imported = {getattr(node, "module", None) for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for a in node.names}
    names = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             for a in node.names}
    assert not {"ldm_jax.data.latents", "ldm_jax.data.synthetic", "ldm_jax.data.registry",
                "ldm_jax.data.folder"} & imported
    assert not {"latents", "synthetic", "registry", "folder"} & names
    assert not hasattr(sources, "make_source")

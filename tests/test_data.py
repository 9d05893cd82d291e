"""Tests for the TF-free input pipeline (ldm_jax.data)."""

import json
import os
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
from PIL import Image

from ldm_jax.data import digits, pipeline, registry, sources, transforms
from ldm_jax.data import folder as folder_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """The digits data set, built once per test session."""
    return digits.ensure_digits_prepared(str(tmp_path_factory.mktemp("tfds")))


def make_cfg(**overrides):
    cfg = dict(
        source="digits", name=None, data_dir=None, folder=None, image_size=32,
        train_split="train", eval_split="test", image_key="image", label_key="label",
        random_crop=True, random_flip=True, num_threads=0, prefetch=2, holdout_percent=5,
        max_unreadable_fraction=0.01,
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


class ListSource:
    """Minimal random-access source for feeding hand-made examples."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


# ----------------------------------------------------------------------------------- digits


def test_digits_builds_and_reads_without_tensorflow(tmp_path):
    # A fresh interpreter in which tensorflow looks uninstalled even if it is: every import
    # finder is wrapped so that it does not see `tensorflow` (find_spec -> None, as for a
    # missing package; TFDS/etils probe with find_spec, so raising would not do).
    script = textwrap.dedent(f"""
        import importlib.abc, sys

        class HideTF(importlib.abc.MetaPathFinder):
            def __init__(self, finders):
                self.finders = finders

            def find_spec(self, name, path, target=None):
                if name == "tensorflow" or name.startswith("tensorflow."):
                    return None
                for finder in self.finders:
                    spec = finder.find_spec(name, path, target)
                    if spec is not None:
                        return spec
                return None

        sys.meta_path[:] = [HideTF(list(sys.meta_path))]
        from ldm_jax.data import digits, sources
        d = digits.ensure_digits_prepared({str(tmp_path)!r})
        src = sources.tfds_source("ldm_digits", "test", d)
        ex = src[0]
        assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype.name == "uint8", ex
        assert len(src) == 299, len(src)
        assert "tensorflow" not in sys.modules
        print("OK")
    """)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout
    assert os.path.isdir(tmp_path / "ldm_digits" / "1.0.0")


def test_digits_content_and_splits(digits_dir):
    from sklearn.datasets import load_digits

    assert digits.ensure_digits_prepared(digits_dir) == digits_dir  # idempotent
    train = sources.digits_source("train", digits_dir)
    test = sources.digits_source("test", digits_dir)
    assert (len(train), len(test)) == (1498, 299)
    assert train.num_classes == {"label": 10}
    train_ids = {int(train[i]["id"]) for i in range(len(train))}
    test_ids = {int(test[i]["id"]) for i in range(len(test))}
    assert not train_ids & test_ids
    assert train_ids | test_ids == set(range(1797))
    assert all(i % 6 == 5 for i in test_ids)
    raw = load_digits()
    for i in (0, 7, 100):
        ex = test[i]
        assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
        # PNG storage is lossless: pixels equal the documented conversion exactly.
        np.testing.assert_array_equal(ex["image"], digits.digit_to_rgb32(raw.images[ex["id"]]))
        assert int(ex["label"]) == raw.target[ex["id"]]


def _ids(source):
    return [int(source[i]["id"]) for i in range(len(source))]


def test_digits_holdout_slice(digits_dir):
    # ldm_digits has no 'validation' split: with eval_split='validation' it is the last 5% of
    # 'train' (a TFDS slice), and 'train' leaves that slice out.
    cfg = make_cfg(data_dir=digits_dir, eval_split="validation")
    train = registry.make_source(cfg, "train")
    held = registry.make_source(cfg, "validation")
    assert len(train) + len(held) == 1498 and 70 <= len(held) <= 80
    train_ids, held_ids = _ids(train), _ids(held)
    assert train_ids + held_ids == _ids(sources.digits_source("train", digits_dir))
    assert held_ids == _ids(registry.make_source(cfg, "validation"))  # deterministic
    assert held.holdout == {"from_split": "train", "eval_split": "validation", "role": "eval",
                            "method": "tfds_slice", "percent": 5, "spec": "train[95%:]"}
    assert train.holdout == dict(held.holdout, role="train", spec="train[:95%]")
    assert json.loads(json.dumps(held.holdout)) == held.holdout
    assert held.split == "validation" and held.num_classes == {"label": 10}
    assert held.class_names == {"label": [str(i) for i in range(10)]}
    # Both splits exist: read as they are, nothing held out.
    plain = registry.make_source(make_cfg(data_dir=digits_dir), "train")
    assert len(plain) == 1498 and plain.holdout is None
    assert registry.make_source(make_cfg(data_dir=digits_dir), "test").holdout is None
    # Another percent; 0 turns holding out off.
    cfg10 = make_cfg(data_dir=digits_dir, eval_split="validation", holdout_percent=10)
    assert 145 <= len(registry.make_source(cfg10, "validation")) <= 155
    cfg0 = make_cfg(data_dir=digits_dir, eval_split="validation", holdout_percent=0)
    with pytest.raises(sources.DataConfigError, match=r"Available splits: \['test', 'train'\]"):
        registry.make_source(cfg0, "validation")
    assert len(registry.make_source(cfg0, "train")) == 1498
    for bad in (100, -1, 2.5, "5", True):
        with pytest.raises(sources.DataConfigError, match="data.holdout_percent"):
            registry.make_source(make_cfg(data_dir=digits_dir, holdout_percent=bad), "train")


def test_tfds_holdout_needs_a_plain_train_split(digits_dir):
    policy = sources.HoldoutPolicy("train[:50%]", "validation", 5)
    with pytest.raises(sources.DataConfigError, match=r"slice such as 'train\[95%:\]'"):
        sources.tfds_source(digits.NAME, "validation", digits_dir, holdout=policy)
    # eval_split == train_split (e.g. precomputing latents of a one-split set): no slicing.
    same = sources.HoldoutPolicy("train", "train", 5)
    assert sources.tfds_source(digits.NAME, "train", digits_dir, holdout=same).holdout is None


def test_dataset_info(digits_dir):
    info = pipeline.dataset_info(make_cfg(data_dir=digits_dir, image_size=16))
    assert info == {"num_train_examples": 1498, "num_eval_examples": 299,
                    "image_shape": (16, 16, 3), "num_classes": 10}


# ------------------------------------------------------------------------------------ train


def test_train_batch_format(digits_dir):
    it = pipeline.make_train_iterator(make_cfg(data_dir=digits_dir), global_batch_size=16,
                                      seed=0, process_index=0, process_count=1)
    batch = next(it)
    assert set(batch) == {"image", "label", "index"}
    assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0  # full range used
    assert set(batch["label"]) <= set(range(10))
    assert it.step == 1 and it.get_state() == {"step": 1}
    # No label_key -> no label; defaults for process index/count come from JAX (1 process).
    it = pipeline.make_train_iterator(make_cfg(data_dir=digits_dir, label_key=None),
                                      global_batch_size=4, seed=0)
    assert set(next(it)) == {"image", "index"}


def test_train_determinism_resume_and_epochs(digits_dir):
    cfg = make_cfg(data_dir=digits_dir)
    kw = dict(global_batch_size=256, process_index=0, process_count=1)
    ref = take(pipeline.make_train_iterator(cfg, seed=3, **kw), 8)  # crosses 1 epoch (~5.9)
    # Threaded prefetch must not change anything.
    threaded = pipeline.make_train_iterator(make_cfg(data_dir=digits_dir, num_threads=2,
                                                     prefetch=3), seed=3, **kw)
    for a, b in zip(ref, take(threaded, 8)):
        assert_batches_equal(a, b)
    threaded.close()
    # Resuming at step k == skipping k batches of an uninterrupted run.
    resumed = pipeline.make_train_iterator(cfg, seed=3, start_step=5, **kw)
    assert resumed.step == 5
    for a, b in zip(ref[5:], take(resumed, 3)):
        assert_batches_equal(a, b)
    assert resumed.step == 8
    # Another seed: different order and augmentation.
    other = next(pipeline.make_train_iterator(cfg, seed=4, **kw))
    assert not np.array_equal(other["index"], ref[0]["index"])
    # Epoch 0 visits every example once; epoch 1 is reshuffled.
    stream = np.concatenate([b["index"] for b in ref])
    assert sorted(stream[:1498]) == list(range(1498))
    assert not np.array_equal(stream[:100], stream[1498:1598])


def test_train_augmentation_varies_by_position(digits_dir):
    # Flip randomness is keyed by stream position, not by record: the same record seen in
    # two epochs is flipped independently (a given position is fixed, see the test above).
    it = pipeline.make_train_iterator(make_cfg(data_dir=digits_dir), global_batch_size=500,
                                      seed=0, process_index=0, process_count=1)
    batches = take(it, 6)  # 3000 positions: every record at least twice
    images = np.concatenate([b["image"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    first = {}
    same = differ = 0
    for img, i in zip(images, index):
        if i in first:
            if np.array_equal(first[i], img):
                same += 1
            else:
                differ += 1
        else:
            first[i] = img
    assert same > 100 and differ > 100  # ~half of the re-visits get the other flip


@pytest.mark.parametrize("process_count", [2, 4])
def test_multi_host_union_equals_global_batch(digits_dir, process_count):
    cfg = make_cfg(data_dir=digits_dir)
    kw = dict(global_batch_size=32, seed=11, start_step=40)  # past the first epoch
    single = take(pipeline.make_train_iterator(cfg, process_index=0, process_count=1, **kw), 3)
    hosts = [take(pipeline.make_train_iterator(cfg, process_index=p,
                                               process_count=process_count, **kw), 3)
             for p in range(process_count)]
    for step in range(3):
        parts = [h[step] for h in hosts]
        assert all(len(p["index"]) == 32 // process_count for p in parts)
        union = {k: np.concatenate([p[k] for p in parts]) for k in single[step]}
        assert_batches_equal(union, single[step])


# ------------------------------------------------------------------------------------- eval


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_each_example_once(digits_dir, process_count):
    cfg = make_cfg(data_dir=digits_dir)
    seen, padded, num_batches = [], 0, None
    for p in range(process_count):
        it = pipeline.make_eval_iterator(cfg, global_batch_size=64, process_index=p,
                                         process_count=process_count)
        num_batches = len(it)
        batches = list(it)
        assert len(batches) == num_batches == 5  # ceil(299 / 64)
        for b in batches:
            assert b["image"].shape == (64 // process_count, 32, 32, 3)
            assert b["mask"].dtype == np.bool_
            seen.extend(b["index"][b["mask"]].tolist())
            padded += int((~b["mask"]).sum())
            assert (b["index"][~b["mask"]] == -1).all()
    assert sorted(seen) == list(range(299))
    assert padded == 5 * 64 - 299


def test_eval_is_deterministic_center_crop_no_flip(digits_dir):
    cfg = make_cfg(data_dir=digits_dir, image_size=32)
    src = sources.digits_source("test", digits_dir)
    b = next(pipeline.make_eval_iterator(cfg, global_batch_size=8, process_index=0,
                                         process_count=1, num_examples=20))
    for j in range(8):
        expected = transforms.preprocess_image(src[int(b["index"][j])]["image"], 32)
        np.testing.assert_array_equal(b["image"][j], expected)
    it = pipeline.make_eval_iterator(cfg, global_batch_size=8, process_index=0,
                                     process_count=1, num_examples=20)
    assert len(it) == 3 and sum(int(x["mask"].sum()) for x in it) == 20


# ----------------------------------------------------------------------------------- folder


def _write_images(folder, names, size=(40, 30)):
    rng = np.random.default_rng(0)
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(path)


def test_folder_hash_split(tmp_path):
    names = [f"sub{i % 3}/img{i:03d}.png" for i in range(60)] + ["notes.txt"]
    _write_images(tmp_path, [n for n in names if n.endswith(".png")])
    (tmp_path / "notes.txt").write_text("not an image")
    Image.fromarray(np.full((20, 24), 128, np.uint8), mode="L").save(tmp_path / "grey.png")
    Image.fromarray(np.zeros((30, 30, 4), np.uint8), mode="RGBA").save(tmp_path / "rgba.webp")
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / "photo.JPG")

    train = folder_lib.folder_source(tmp_path, "train")
    test = folder_lib.folder_source(tmp_path, "test")
    assert len(train) + len(test) == 63 and len(test) >= 1
    assert not set(train.relpaths) & set(test.relpaths)
    assert folder_lib.folder_source(tmp_path, "train").relpaths == train.relpaths  # deterministic
    grey_split = train if "grey.png" in train.relpaths else test
    grey = grey_split[grey_split.relpaths.index("grey.png")]["image"]
    assert grey.shape == (20, 24)  # stays 2-D; the pipeline makes it RGB

    cfg = make_cfg(source="folder", folder=str(tmp_path), image_size=16, label_key=None)
    batches = take(pipeline.make_train_iterator(cfg, global_batch_size=21, seed=0,
                                                process_index=0, process_count=1), 4)
    stream = np.concatenate([b["index"] for b in batches])
    assert sorted(stream[: len(train)]) == list(range(len(train)))  # greyscale included
    assert batches[0]["image"].shape == (21, 16, 16, 3)
    info = pipeline.dataset_info(cfg)
    assert info["num_train_examples"] == len(train) and info["num_classes"] is None


def test_folder_split_subfolders_and_greyscale(tmp_path):
    _write_images(tmp_path, ["train/a.png", "train/deep/b.jpg", "test/c.png"])
    Image.fromarray(np.full((16, 16), 200, np.uint8), mode="L").save(tmp_path / "test/grey.png")
    assert len(folder_lib.folder_source(tmp_path, "train")) == 2
    cfg = make_cfg(source="folder", folder=str(tmp_path), image_size=8, label_key=None)
    batches = list(pipeline.make_eval_iterator(cfg, global_batch_size=4, process_index=0,
                                               process_count=1))
    assert len(batches) == 1 and batches[0]["mask"].tolist() == [True, True, False, False]
    grey = batches[0]["image"][1]  # sorted: test/c.png, test/grey.png
    assert grey.shape == (8, 8, 3)
    np.testing.assert_allclose(grey, 200 / 127.5 - 1, atol=1e-6)
    with pytest.raises(sources.DataConfigError,
                       match=r"splits \(sub-folders\) are \['test', 'train'\]"):
        folder_lib.folder_source(tmp_path, "validation")


# ----------------------------------------------------------------------------------- errors


def test_error_missing_dirs(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(sources.MissingDataError, match="data.data_dir"):
        registry.make_source(make_cfg(source="tfds", name="mnist", data_dir=missing), "train")
    with pytest.raises(sources.MissingDataError, match="data.data_dir"):
        registry.make_source(make_cfg(data_dir=missing), "train")
    with pytest.raises(sources.MissingDataError, match="data.folder"):
        registry.make_source(make_cfg(source="folder", folder=missing), "train")
    with pytest.raises(FileNotFoundError):
        folder_lib.folder_source(missing, "train")


def test_error_tfds_not_prepared(tmp_path):
    with pytest.raises(sources.DataNotPreparedError,
                       match=r"tfds build mnist --data_dir=.*--file_format=array_record"):
        sources.tfds_source("mnist", "train", tmp_path)
    with pytest.raises(sources.DataNotPreparedError, match="--manual_dir"):
        sources.tfds_source("celeb_a_hq/256", "train", tmp_path)
    with pytest.raises(sources.DataConfigError, match="data.name='no_such_set_xyz'"):
        sources.tfds_source("no_such_set_xyz", "train", tmp_path)


def test_error_tfrecord_without_tensorflow(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)

    class FakeBuilder:
        data_dir = "/data/foo/1.0.0"

    with pytest.raises(sources.DataConfigError, match="requirements-tf.txt.*array_record"):
        sources._load_tfrecord(FakeBuilder(), "foo", "train", {})


def test_error_unknown_split(digits_dir):
    with pytest.raises(sources.DataConfigError, match=r"Available splits: \['test', 'train'\]"):
        sources.digits_source("validation", digits_dir)
    # A missing eval split is held out of the train split (test_digits_holdout_slice); a
    # missing train split has nothing to come from.
    with pytest.raises(sources.DataConfigError, match="data.train_split"):
        pipeline.make_train_iterator(make_cfg(data_dir=digits_dir, train_split="trian"),
                                     global_batch_size=8, seed=0, process_index=0,
                                     process_count=1)
    with pytest.raises(sources.DataConfigError, match="Available splits"):
        registry.make_source(make_cfg(data_dir=digits_dir, train_split="trian",
                                      eval_split="valid"), "valid")


def test_error_empty_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("x")
    with pytest.raises(sources.DataConfigError, match="contains no images"):
        folder_lib.folder_source(tmp_path, "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(sources.DataConfigError, match="No images"):
        folder_lib.folder_source(tmp_path, "train")


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (8, 8, 5), (8, 8, 2), (8,)])
def test_error_bad_image_rank_or_channels(shape):
    src = ListSource([{"image": np.zeros(shape, np.uint8)}])
    cfg = make_cfg(image_size=8, label_key=None)
    with pytest.raises(ValueError, match=r"'image'.*\(H, W, 3\)"):
        pipeline.make_train_iterator(cfg, global_batch_size=2, seed=0, process_index=0,
                                     process_count=1, source=src)


def test_greyscale_array_becomes_rgb():
    src = ListSource([{"image": np.full((8, 8), 255, np.uint8), "label": np.int64(3)}])
    batch = next(pipeline.make_eval_iterator(make_cfg(image_size=8), global_batch_size=1,
                                             process_index=0, process_count=1, source=src))
    assert batch["image"].shape == (1, 8, 8, 3) and (batch["image"] == 1.0).all()
    assert batch["label"].tolist() == [3]


def test_error_batch_not_divisible(digits_dir):
    with pytest.raises(ValueError, match="global_batch_size=10.*process_count=4"):
        pipeline.make_train_iterator(make_cfg(data_dir=digits_dir), global_batch_size=10,
                                     seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="process_count=3"):
        pipeline.make_eval_iterator(make_cfg(data_dir=digits_dir), global_batch_size=8,
                                    process_index=1, process_count=3)


def test_error_unknown_source_and_keys(tmp_path, digits_dir):
    with pytest.raises(sources.DataConfigError, match="data.source='imagenet'"):
        pipeline.make_train_iterator(make_cfg(source="imagenet"), global_batch_size=2,
                                     seed=0, process_index=0, process_count=1)
    _write_images(tmp_path, ["train/a.png", "test/b.png"])
    cfg = make_cfg(source="folder", folder=str(tmp_path))  # label_key='label' by default
    # A folder without class sub-folders has no labels: its batches carry none.
    batch = next(pipeline.make_train_iterator(cfg, global_batch_size=2, seed=0,
                                              process_index=0, process_count=1))
    assert set(batch) == {"image", "index"}
    with pytest.raises(sources.DataConfigError, match="data.image_key='img'"):
        pipeline.make_train_iterator(make_cfg(data_dir=digits_dir, image_key="img"),
                                     global_batch_size=2, seed=0, process_index=0,
                                     process_count=1)


# ------------------------------------------------------------------------------- transforms


def test_transforms():
    img = np.arange(40 * 80 * 3, dtype=np.uint32).reshape(40, 80, 3).astype(np.uint8)
    assert transforms.resize_short_side(img, 20).shape == (20, 40, 3)
    assert transforms.resize_short_side(img.transpose(1, 0, 2), 20).shape == (40, 20, 3)
    assert transforms.resize_short_side(img, 40) is img
    np.testing.assert_array_equal(transforms.crop(img, 40), img[:, 20:60])
    out = transforms.preprocess_image(img, 16, rng=np.random.default_rng(1), random_crop=True,
                                      random_flip=True)
    again = transforms.preprocess_image(img, 16, rng=np.random.default_rng(1), random_crop=True,
                                        random_flip=True)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, again)
    flips = {transforms.maybe_flip(img, np.random.default_rng(s))[0, 0, 0] for s in range(20)}
    assert flips == {img[0, 0, 0], img[0, -1, 0]}
    u8 = np.arange(256, dtype=np.uint8)
    x = transforms.uint8_to_float(u8)
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_array_equal(transforms.images_to_uint8(x), u8)
    assert transforms.images_to_uint8(np.array([-3.0, 3.0])).tolist() == [0, 255]
    with pytest.raises(ValueError, match="dtype float32"):
        transforms.to_rgb_uint8(np.zeros((4, 4, 3), np.float32))

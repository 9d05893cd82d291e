"""Captions and layouts from the data sources to training batches: the canonical fields
(ldm_jax/data/conditioning_fields.py), the digits data sets with captions / layouts
(ldm_jax/data/digits_conditioned.py), image-folder caption files, box geometry under crop and
flip, precompute_latents carrying them into the shards, and the pipeline's condition_fn hook."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import TINY_FIRST_STAGE, smoke_config
from ldm_jax.config import defaults as config_defaults
from ldm_jax.data import conditioning_fields as cf
from ldm_jax.data import digits, digits_conditioned as dc
from ldm_jax.data import latents, pipeline, registry, transforms
from ldm_jax.data import precompute as precompute_lib
from ldm_jax.data.sources import DataConfigError

KW = dict(process_index=0, process_count=1)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def captions_train(tfds_dir):
    return dc.captions_source("train", tfds_dir)


@pytest.fixture(scope="module")
def layout_test(tfds_dir):
    return dc.layout_source("test", tfds_dir)


def data_cfg(**kw):
    return config_defaults.data_config(num_threads=0, **kw)


# ---------------------------------------------------------------------------- digits data sets


def test_digits_captions(tfds_dir, captions_train):
    test = dc.captions_source("test", tfds_dir)
    assert (len(captions_train), len(test)) == (1498, 299)  # the splits of `digits`
    assert captions_train.num_classes == {"label": 10}
    assert captions_train.canonical_keys == ("caption",)
    for source in (captions_train, test):
        for i in range(0, len(source), 97):
            ex = source[i]
            assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
            caption, label, sk = ex["caption"], int(ex["label"]), int(ex["id"])
            assert isinstance(caption, list) and len(caption) == 3 == len(set(caption))
            assert set(caption) <= set(dc.captions_for(label))  # train phrasings only
            assert caption == dc.draw_captions(sk, label)  # seeded by the image
            assert (sk % digits.TEST_EVERY == digits.TEST_EVERY - 1) == (source is test)
    # The same images as `digits`.
    from sklearn.datasets import load_digits
    ex = captions_train[5]
    np.testing.assert_array_equal(ex["image"],
                                  digits.digit_to_rgb32(load_digits().images[int(ex["id"])]))
    # Held-out phrasings never appear in the data.
    for d in range(10):
        assert not set(dc.captions_for(d, dc.HELDOUT_PHRASINGS)) & set(dc.captions_for(d))
    assert dc.captions_for(7)[:2] == ["a handwritten seven", "the digit 7"]
    assert len(dc.TRAIN_PHRASINGS) >= 8 and len(dc.HELDOUT_PHRASINGS) >= 3


def _pixel_box(box, size):
    x0, y0, x1, y1 = np.round(np.asarray(box) * size).astype(int)
    return x0, y0, x1, y1


def check_layout_example(image, boxes, labels):
    size = image.shape[0]
    assert image.shape == (size, size, 3) and boxes.dtype == np.float32
    assert labels.dtype == np.int64 and len(boxes) == len(labels) in dc.OBJECTS_PER_CANVAS
    assert np.all((boxes >= 0) & (boxes <= 1)) and np.all(labels >= 0) and np.all(labels < 10)
    sides = (boxes[:, 2:] - boxes[:, :2]) * dc.LAYOUT_SIZE
    assert np.all(sides >= dc.MIN_SIDE - 1e-4) and np.all(sides <= dc.MAX_SIDE + 1e-4)
    outside = np.ones((size, size), bool)
    for i, box in enumerate(boxes):
        x0, y0, x1, y1 = _pixel_box(box, size)
        assert image[y0:y1, x0:x1].max() > 0  # the digit is in its box
        outside[y0:y1, x0:x1] = False
        for other in boxes[i + 1:]:  # apart by the margin: IoU 0
            a, b = np.asarray(box) * dc.LAYOUT_SIZE, np.asarray(other) * dc.LAYOUT_SIZE
            assert (a[2] + dc.MARGIN <= b[0] + 1e-4 or b[2] + dc.MARGIN <= a[0] + 1e-4 or
                    a[3] + dc.MARGIN <= b[1] + 1e-4 or b[3] + dc.MARGIN <= a[1] + 1e-4)
    assert image[outside].max() == 0  # black background


def test_digits_layout(layout_test):
    assert len(layout_test) == dc.NUM_TEST_CANVASES
    assert layout_test.num_classes == {"box_labels": 10}
    assert layout_test.canonical_keys == ("boxes", "box_labels")
    counts = set()
    for i in range(0, len(layout_test), 37):
        ex = layout_test[i]
        assert "label" not in ex
        check_layout_example(ex["image"], ex["boxes"], ex["box_labels"])
        counts.add(len(ex["boxes"]))
        # Canvas i is a pure function of (split, i).
        image, boxes, labels = dc.canvas("test", int(ex["id"]))
        np.testing.assert_array_equal(image, ex["image"])
        np.testing.assert_array_equal(boxes, ex["boxes"])
        np.testing.assert_array_equal(labels, ex["box_labels"])
    assert counts == {2, 3}
    assert dc.NUM_TRAIN_CANVASES == 3000 and dc.NUM_TEST_CANVASES == 500


def test_layout_pipeline_at_64_and_flip(tfds_dir, layout_test):
    """data.image_size=64 reads the canvases as they are; under random_flip the boxes a
    condition_fn sees follow the flipped image."""
    seen = []

    def condition_fn(fields, rng, train):
        assert set(fields) == {"boxes", "box_labels", "image"} and train
        boxes = np.zeros((3, 4), np.float32)
        boxes[:len(fields["boxes"])] = fields["boxes"]
        seen.append(fields)
        return {"boxes_padded": boxes, "num_boxes": np.int32(len(fields["boxes"]))}

    cfg = data_cfg(source="digits_layout", data_dir=tfds_dir, image_size=64, label_key=None,
                   train_split="test", random_flip=True, boxes_key="boxes",
                   box_labels_key="box_labels")
    it = pipeline.make_train_iterator(cfg, global_batch_size=16, seed=0,
                                      condition_fn=condition_fn, **KW)
    batch = next(it)
    assert set(batch) == {"image", "index", "boxes_padded", "num_boxes"}
    assert batch["image"].shape == (16, 64, 64, 3) and batch["boxes_padded"].shape == (16, 3, 4)
    flipped = 0
    for j in range(16):
        n = int(batch["num_boxes"][j])
        image = transforms.images_to_uint8(batch["image"][j])
        stored = layout_test[int(batch["index"][j])]
        check_layout_example(image, batch["boxes_padded"][j, :n], stored["box_labels"])
        flipped += not np.allclose(batch["boxes_padded"][j, :n], stored["boxes"])
    assert 0 < flipped < 16
    # Without a condition_fn the boxes stay out of the batch (they do not stack).
    plain = next(pipeline.make_train_iterator(cfg, global_batch_size=16, seed=0, **KW))
    assert set(plain) == {"image", "index"}
    np.testing.assert_array_equal(plain["image"], batch["image"])


# ------------------------------------------------------------------------- canonical fields


def test_box_geometry_under_random_crop_and_flip():
    """A bright box on a non-square image: after resize, random crop and flip, the boxes the
    condition_fn gets still frame the bright pixels (and cut ones are clipped or dropped)."""
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(12):
        image = np.zeros((48, 80, 3), np.uint8)
        x0, y0 = int(rng.integers(0, 60)), int(rng.integers(0, 30))
        w, h = int(rng.integers(8, 20)), int(rng.integers(8, 18))
        image[y0:y0 + h, x0:x0 + w] = 255
        box = np.asarray([[x0 / 80, y0 / 48, (x0 + w) / 80, (y0 + h) / 48]], np.float32)
        examples.append({"image": image, "boxes": box, "box_labels": np.asarray([1], np.int64)})

    class ListSource:
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            return dict(examples[i])

    def condition_fn(fields, rng, train):
        out = np.full((4,), -1.0, np.float32)
        if len(fields["boxes"]):
            out[:] = fields["boxes"][0]
        return {"box": out, "kept": np.int32(len(fields["box_labels"]))}

    cfg = data_cfg(image_size=32, random_crop=True, random_flip=True)
    batch = next(pipeline.make_train_iterator(cfg, global_batch_size=12, seed=3,
                                              source=ListSource(), condition_fn=condition_fn,
                                              **KW))
    for image, box, kept in zip(batch["image"], batch["box"], batch["kept"]):
        bright = image[..., 0] > 0.0
        if not kept:
            assert bright.sum() <= 32  # at most a sliver of the box left the crop
            continue
        x0, y0, x1, y1 = box * 32
        ys, xs = np.nonzero(bright)
        # Bilinear/bicubic resizing blurs the edges by a pixel or two.
        assert abs(xs.min() - x0) <= 2 and abs(xs.max() + 1 - x1) <= 2
        assert abs(ys.min() - y0) <= 2 and abs(ys.max() + 1 - y1) <= 2


def test_tfds_style_nested_fields_and_yxyx():
    example = {"image": np.zeros((8, 8, 3), np.uint8),
               "captions": {"text": np.asarray([b" a cat ", b"two cats", b""], object),
                            "id": np.asarray([1, 2, 3])},
               "objects": {"bbox": np.asarray([[0.1, 0.2, 0.5, 0.6]], np.float32),
                           "label": np.asarray([4])}}

    class FakeTfds:
        num_classes, class_names, holdout, split, features = {}, {}, None, "train", None

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return example

    cfg = data_cfg(source="tfds", caption_key="captions/text", boxes_key="objects/bbox",
                   box_labels_key="objects/label", box_format="yxyx")
    source = cf.CanonicalFieldsSource(FakeTfds(), cf.FieldSpec.from_config(cfg))
    ex = source[0]
    assert ex["caption"] == ["a cat", "two cats"]
    np.testing.assert_allclose(ex["boxes"], [[0.2, 0.1, 0.6, 0.5]])  # ymin,xmin.. -> x0,y0..
    assert ex["box_labels"].dtype == np.int64 and ex["box_labels"].tolist() == [4]
    assert source.canonical_keys == ("caption", "boxes", "box_labels")
    assert source.consumed_keys == ("captions", "objects")
    np.testing.assert_array_equal(cf.boxes_to_xyxy(np.zeros((0,)), "yxyx"), np.zeros((0, 4)))
    assert cf.normalize_caption(np.asarray(b"one")) == "one"
    assert cf.normalize_caption([b"only"]) == "only" and cf.normalize_caption([]) == ""
    # Mistakes name the field.
    with pytest.raises(DataConfigError, match=r"data.caption_key='caption'.*captions/text"):
        cf.CanonicalFieldsSource(FakeTfds(), cf.FieldSpec(caption_keys=("caption",)))[0]
    with pytest.raises(DataConfigError, match="data.box_format='xywh'"):
        cf.FieldSpec.from_config(data_cfg(boxes_key="b", box_format="xywh"))
    with pytest.raises(DataConfigError, match="data.boxes_key is empty"):
        cf.FieldSpec.from_config(data_cfg(box_labels_key="objects/label"))
    # Several caption fields, comma separated, are joined.
    spec = cf.FieldSpec.from_config(data_cfg(caption_key="a, b"))
    assert cf.canonical_fields({"a": "x", "b": ["y", "z"]}, spec) == {"caption": ["x", "y", "z"]}


def _png(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((12, 16, 3), value, np.uint8)).save(path)


def test_folder_caption_files(tmp_path):
    root = tmp_path / "photos"
    for name in ("a", "b", "c", "d"):
        _png(str(root / "train" / f"{name}.png"), 50)
    (root / "train" / "a.txt").write_text("  a red square \n", encoding="utf-8")
    (root / "train" / "b.txt").write_text("first\n\n second \n", encoding="utf-8")
    (root / "train" / "c.txt").write_bytes("café".encode("utf-8-sig"))
    cfg = data_cfg(source="folder", folder=str(root), caption_key="caption", label_key=None,
                   image_size=8, eval_split="")
    source = registry.make_source(cfg, "train")
    got = {os.path.basename(p): source[i]["caption"] for i, p in enumerate(source.relpaths)}
    assert got == {"a.png": "a red square", "b.png": ["first", "second"], "c.png": "café",
                   "d.png": ""}
    assert source.canonical_keys == ("caption",)
    # Through the pipeline to a condition_fn.
    captions = []
    eval_cfg = data_cfg(source="folder", folder=str(root), caption_key="caption",
                        label_key=None, image_size=8, train_split="train", eval_split="train")
    it = pipeline.make_eval_iterator(
        eval_cfg, global_batch_size=4,
        condition_fn=lambda f, rng, train: captions.append(f["caption"]) or {
            "n": np.int32(len(cf.caption_list(f["caption"])))}, **KW)
    batch = next(it)
    assert sorted(batch["n"].tolist()) == [0, 1, 1, 2] and batch["mask"].all()
    assert "café" in captions
    # Without caption_key nothing is read; with it but no .txt at all: a clear error.
    assert "caption" not in registry.make_source(data_cfg(
        source="folder", folder=str(root), label_key=None, eval_split=""), "train")[0]
    bare = tmp_path / "bare"
    _png(str(bare / "x.png"), 10)
    with pytest.raises(DataConfigError, match=r"caption_key is set but no image.*bare.*x\.txt"):
        registry.make_source(data_cfg(source="folder", folder=str(bare), caption_key="caption",
                                      eval_split=""), "train")


def test_condition_fn_rng_is_per_position_and_resumable(tfds_dir):
    cfg = data_cfg(source="digits_captions", data_dir=tfds_dir, image_size=32,
                   caption_key="caption")

    def pick(fields, rng, train):
        caption = fields["caption"]
        assert isinstance(caption, list) and isinstance(fields["label"], int)
        return {"pick": np.int32(rng.integers(len(caption))),
                "label_again": np.int32(fields["label"])}

    def batches(start, n, seed=1):
        it = pipeline.make_train_iterator(cfg, global_batch_size=8, seed=seed, start_step=start,
                                          condition_fn=pick, **KW)
        return [next(it) for _ in range(n)]

    ref = batches(0, 3)
    assert set(ref[0]) == {"image", "label", "index", "pick", "label_again"}
    np.testing.assert_array_equal(ref[0]["label"], ref[0]["label_again"])
    resumed = batches(2, 1)[0]
    for key in ref[2]:
        np.testing.assert_array_equal(ref[2][key], resumed[key])
    assert len(set(np.concatenate([b["pick"] for b in ref]).tolist())) > 1
    # Two hosts see the same per-position choices.
    hosts = [next(pipeline.make_train_iterator(cfg, global_batch_size=8, seed=1,
                                               condition_fn=pick, process_index=p,
                                               process_count=2)) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["pick"] for h in hosts]), ref[0]["pick"])
    # Eval: rng None, train False.
    ev = next(pipeline.make_eval_iterator(cfg, global_batch_size=8, condition_fn=lambda f, r, t: {
        "flags": np.asarray([r is None, t], np.int32)}, **KW))
    assert ev["flags"].tolist() == [[1, 0]] * 8
    # Bad outputs are clear errors.
    with pytest.raises(TypeError, match="dtype"):
        pipeline.make_eval_iterator(cfg, global_batch_size=8, condition_fn=lambda f, r, t: {
            "text": np.asarray(f["caption"])}, **KW)
    with pytest.raises(ValueError, match="clashes"):
        pipeline.make_eval_iterator(cfg, global_batch_size=8, condition_fn=lambda f, r, t: {
            "image": np.zeros(3, np.float32)}, **KW)


# ------------------------------------------------------------------------------ precompute


@pytest.fixture(scope="module")
def tiny_first_stage(tmp_path_factory):
    """A randomly initialised tiny KL first stage saved as a run (no training needed)."""
    from ldm_jax.models import autoencoder as ae_models
    from ldm_jax.storage import first_stage

    ae = smoke_config("autoencoder_kl_f4_digits.py", *TINY_FIRST_STAGE)
    ae.model.resolution = ae.data.image_size
    model = ae_models.make_first_stage(ae.model)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    workdir = str(tmp_path_factory.mktemp("tiny_ae"))
    first_stage.save_first_stage_run(workdir, ae, jax.tree_util.tree_map(np.asarray, params))
    return workdir


class Head:
    """The first n examples of a source, with its attributes."""

    def __init__(self, source, n):
        self._source, self._n = source, n

    def __getattr__(self, name):
        return getattr(self._source, name)

    def __len__(self):
        return self._n

    def __getitem__(self, i):
        if not 0 <= int(i) < self._n:
            raise IndexError(i)
        return self._source[i]


def _precompute(tmp_path, monkeypatch, first_stage_dir, source_cfg, n=24):
    real = registry.make_source
    monkeypatch.setattr(precompute_lib.registry, "make_source",
                        lambda cfg, split: Head(real(cfg, split), n))
    c = ml_collections.ConfigDict()
    c.source_data = source_cfg
    c.latents = ml_collections.ConfigDict(
        {"scale_factor": 1.0, "scale_num_examples": 8, "seed": 0})
    c.batch_size = 8
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    out = str(tmp_path / "latents")
    meta = precompute_lib.precompute(c, first_stage_dir, out, splits=["test"],
                                     examples_per_shard=16)
    monkeypatch.setattr(precompute_lib.registry, "make_source", real)
    return out, meta


def test_precompute_carries_captions(tmp_path, monkeypatch, tfds_dir, tiny_first_stage):
    cfg = data_cfg(source="digits_captions", data_dir=tfds_dir, image_size=16,
                   caption_key="caption")
    out, meta = _precompute(tmp_path, monkeypatch, tiny_first_stage, cfg)
    assert meta["conditioning_keys"] == ["caption", "id", "label"]
    assert "Sequence(Text" in meta["features"]["caption"]
    source = dc.captions_source("test", tfds_dir)
    stored = latents.latents_source(out, "test")
    assert len(stored) == 24
    for i in (0, 17):
        assert [c.decode() for c in stored[i]["caption"]] == source[i]["caption"]
    # The latents pipeline: the condition_fn gets the caption list and the label ...
    lat_cfg = data_cfg(source="latents", latents_dir=out, train_split="test",
                       eval_split="test", caption_key="caption")
    got = {}

    def condition_fn(fields, rng, train):
        got[tuple(fields["caption"])] = fields["label"]
        return {"num_captions": np.int32(len(fields["caption"]))}

    batch = next(pipeline.make_eval_iterator(lat_cfg, global_batch_size=8,
                                             condition_fn=condition_fn, **KW))
    assert set(batch) == {"moments", "label", "index", "mask", "num_captions"}
    assert batch["num_captions"].tolist() == [3] * 8
    assert got[tuple(source[0]["caption"])] == int(source[0]["label"])
    # ... and without one the batches are what they were.
    plain = next(pipeline.make_eval_iterator(lat_cfg, global_batch_size=8, **KW))
    assert set(plain) == {"moments", "label", "index", "mask"}


def test_precompute_carries_layouts(tmp_path, monkeypatch, tfds_dir, tiny_first_stage,
                                    layout_test):
    cfg = data_cfg(source="digits_layout", data_dir=tfds_dir, image_size=16, label_key=None,
                   boxes_key="boxes", box_labels_key="box_labels")
    out, meta = _precompute(tmp_path, monkeypatch, tiny_first_stage, cfg)
    assert meta["conditioning_keys"] == ["box_labels", "boxes", "id"]
    assert meta["num_classes"] == {"box_labels": 10}
    assert meta["latent_shape"] == [8, 8, 3]
    stored = latents.latents_source(out, "test")
    for i in range(24):
        np.testing.assert_array_equal(stored[i]["boxes"], layout_test[i]["boxes"])
        np.testing.assert_array_equal(stored[i]["box_labels"], layout_test[i]["box_labels"])
        assert stored[i]["boxes"].dtype == np.float32
        assert stored[i]["box_labels"].dtype == np.int64
    # random_flip flips the boxes the condition_fn sees together with the latent.
    lat_cfg = data_cfg(source="latents", latents_dir=out, train_split="test", eval_split="test",
                       random_flip=True, label_key=None, boxes_key="boxes",
                       box_labels_key="box_labels")

    def condition_fn(fields, rng, train):
        boxes = np.zeros((3, 4), np.float32)
        boxes[:len(fields["boxes"])] = fields["boxes"]
        return {"boxes_padded": boxes}

    batch = next(pipeline.make_train_iterator(lat_cfg, global_batch_size=24, seed=0,
                                              condition_fn=condition_fn, **KW))
    flips = 0
    for moments, boxes, index in zip(batch["moments"], batch["boxes_padded"], batch["index"]):
        record = stored[int(index)]
        n = len(record["boxes"])
        if np.array_equal(moments, record["moments"]):
            np.testing.assert_allclose(boxes[:n], record["boxes"])
        else:
            np.testing.assert_array_equal(moments, record["moments"][:, ::-1])
            np.testing.assert_allclose(boxes[:n], transforms.flip_boxes(record["boxes"]))
            flips += 1
    assert 0 < flips < 24

"""Image-conditioned LDMs, the data side: the canonical image fields 'segmentation' and
'low_res' (ldm_jax/data/conditioning_fields.py) and their geometry, the digits_sr /
digits_semantic sources (ldm_jax/data/digits_image_tasks.py), label maps beside folder images
(`<stem>.seg.png`), precompute_latents with latents.keep_images storing the encoded image and
the image fields, and LatentExampleFn handing them to a condition_fn, flipped with the latent."""

import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from test_conditioned_data import Head, tiny_first_stage  # noqa: F401 (fixture)
from ldm_jax.config import defaults as config_defaults
from ldm_jax.data import conditioning_fields as cf
from ldm_jax.data import digits, digits_image_tasks as dit
from ldm_jax.data import latents, pipeline, registry, transforms
from ldm_jax.data import precompute as precompute_lib
from ldm_jax.data.sources import DataConfigError

KW = dict(process_index=0, process_count=1)
NUM_EXAMPLES = 24


def data_cfg(**kw):
    return config_defaults.data_config(num_threads=0, **kw)


# ----------------------------------------------------------------------------- digits sources


def test_digits_sr_low_res_upsamples_to_the_image(digits_dir):
    train = registry.make_source(data_cfg(source="digits_sr", data_dir=digits_dir), "train")
    test = registry.make_source(data_cfg(source="digits_sr", data_dir=digits_dir), "test")
    plain = registry.make_source(data_cfg(source="digits", data_dir=digits_dir), "test")
    assert (len(train), len(test)) == (1498, 299)  # the splits of `digits`
    assert train.canonical_keys == ("low_res",) and train.num_classes == {"label": 10}
    from sklearn.datasets import load_digits
    native = load_digits().images
    for i in range(0, len(test), 41):
        ex = test[i]
        assert int(ex["id"]) == int(plain[i]["id"]) and int(ex["label"]) == int(plain[i]["label"])
        low = ex["low_res"]
        assert low.shape == (8, 8, 3) and low.dtype == np.uint8
        np.testing.assert_array_equal(low[..., 0], low[..., 2])
        # The native digit, scaled 0..16 -> 0..255 ...
        np.testing.assert_allclose(low[..., 0], native[int(ex["id"])] * 255 / 16, atol=0.5)
        # ... whose bilinear upsampling is the 32 px image.
        up = np.asarray(Image.fromarray(low).resize((32, 32), Image.BILINEAR))
        np.testing.assert_array_equal(up, ex["image"])
        np.testing.assert_array_equal(ex["image"], digits.digit_to_rgb32(native[int(ex["id"])]))


def test_digits_semantic_classes(digits_dir):
    source = registry.make_source(data_cfg(source="digits_semantic", data_dir=digits_dir), "test")
    assert source.canonical_keys == ("segmentation",)
    assert source.num_classes == {"label": 10, "segmentation": 11}
    assert source.class_names["segmentation"] == ["background"] + [str(d) for d in range(10)]
    assert dit.NUM_SEGMENTATION_CLASSES == 11
    labels = set()
    for i in range(0, len(source), 23):
        ex = source[i]
        seg, label, grey = ex["segmentation"], int(ex["label"]), ex["image"][..., 0]
        assert seg.shape == (32, 32) and seg.dtype == np.uint8
        foreground = grey > dit.FOREGROUND_THRESHOLD * grey.max()
        assert 0 < foreground.sum() < 32 * 32
        assert np.all(seg[foreground] == label + 1) and np.all(seg[~foreground] == 0)
        labels.add(label)
    assert len(labels) > 5
    np.testing.assert_array_equal(dit.segmentation_of(np.zeros((4, 4), np.uint8), 3), 0)


# ----------------------------------------------------------------------------- field geometry


def test_center_geometry_is_the_pipelines():
    rng = np.random.default_rng(0)
    for h, w, size in [(32, 32, 16), (33, 47, 16), (47, 33, 16), (100, 10, 10), (17, 29, 16),
                       (16, 40, 16), (64, 64, 64)]:
        image = rng.integers(0, 255, (h, w, 3), np.uint8)
        _, geometry = transforms.preprocess_image_with_geometry(image, size)
        assert cf.center_geometry(h, w, size) == geometry


def test_image_fields_follow_crop_resize_and_flip():
    # A label map of vertical stripes: after the image's resize + crop + flip, each output
    # column's class is the class under its source column (NEAREST: no new ids).
    h, w = 24, 40
    seg = np.repeat((np.arange(w) // 5).astype(np.uint8)[None], h, axis=0)  # ids 0..7
    geometry = transforms.Geometry(resized_h=12, resized_w=20, top=0, left=2, size=12)
    out = cf.transform_segmentation(seg, geometry, (h, w))
    assert out.shape == (12, 12) and out.dtype == np.uint8
    expected = np.asarray(Image.fromarray(seg).resize((20, 12), Image.NEAREST))[:, 2:14]
    np.testing.assert_array_equal(out, expected)
    assert set(np.unique(out)) <= set(np.unique(seg))
    flipped = cf.transform_segmentation(seg, transforms.Geometry(12, 20, 0, 2, 12, True), (h, w))
    np.testing.assert_array_equal(flipped, expected[:, ::-1])
    # int32 maps (ids above 255) keep their dtype and ids.
    big = (seg.astype(np.int32) + 1000)
    assert cf.transform_segmentation(big, geometry, (h, w)).dtype == np.int32
    assert cf.segmentation_map(np.asarray([[1, 300]], np.int64)).dtype == np.int32
    assert cf.segmentation_map(np.asarray([[1, 3]], np.int64)).dtype == np.uint8
    with pytest.raises(DataConfigError, match=r"data.segmentation_key.*10x24 \(WxH\).*40x24"):
        cf.transform_segmentation(seg[:, :10], geometry, (h, w))
    with pytest.raises(DataConfigError, match="data.segmentation_key: a label map must be"):
        cf.segmentation_map(np.zeros((4, 4), np.float32))

    # low_res: an exact quarter of the image. At image_size 32 on a 32x48 image (no resize),
    # the center crop starts at x=8, i.e. x=2 in the low-res frame: a plain slice.
    low = np.random.default_rng(1).integers(0, 255, (8, 12, 3), np.uint8)
    g = cf.center_geometry(32, 48, 32)
    np.testing.assert_array_equal(cf.transform_low_res(low, g, (32, 48)), low[:, 2:10])
    g = transforms.Geometry(32, 48, 0, 8, 32, flipped=True)
    np.testing.assert_array_equal(cf.transform_low_res(low, g, (32, 48)), low[:, 2:10][:, ::-1])
    # At image_size 16 it is resized with the image (bicubic) to 16 * 8/32 = 4 px.
    g = cf.center_geometry(32, 48, 16)
    small = cf.transform_low_res(low, g, (32, 48))
    assert small.shape == (4, 4, 3) and small.dtype == np.uint8
    # Greyscale low-res images become RGB; sizes that cannot stay aligned are an error.
    assert cf.low_res_image(np.zeros((4, 4), np.uint8)).shape == (4, 4, 3)
    with pytest.raises(DataConfigError, match=r"data.low_res_key.*10x10.*30x30.*multiple of 3"):
        cf.transform_low_res(np.zeros((10, 10, 3), np.uint8), cf.center_geometry(30, 30, 16),
                             (30, 30))
    with pytest.raises(DataConfigError, match="data.low_res_key: a low-resolution image must"):
        cf.low_res_image(np.zeros((4, 4, 3), np.float32))


def test_field_spec_and_keep_images():
    spec = cf.FieldSpec.from_config(data_cfg(segmentation_key="mask", low_res_key="lr"))
    assert (spec.segmentation_key, spec.low_res_key) == ("mask", "lr") and spec.active
    assert cf.FieldSpec().filled(dit.SR_FIELDS).low_res_key == "low_res"
    with pytest.raises(DataConfigError, match="data.segmentation_key='a,b' names several"):
        cf.FieldSpec.from_config(data_cfg(segmentation_key="a,b"))

    def config(keep, kind=None):
        c = ml_collections.ConfigDict({"latents": {"keep_images": keep}})
        if kind:
            c.conditioning = ml_collections.ConfigDict({"kind": kind})
        return c

    assert latents.resolve_keep_images(config(None, "concat"))
    assert latents.resolve_keep_images(config(None, "hybrid"))
    assert not latents.resolve_keep_images(config(None, "text"))
    assert not latents.resolve_keep_images(config(None))
    assert latents.resolve_keep_images(config(True, "none"))
    assert not latents.resolve_keep_images(config(False, "concat"))
    assert not latents.resolve_keep_images(ml_collections.ConfigDict({"latents": {"seed": 0}}))


def test_latent_example_fn_flips_image_fields_with_the_latent():
    rng = np.random.default_rng(0)
    record = {"moments": rng.normal(size=(4, 4, 6)).astype(np.float32),
              "image": rng.integers(0, 255, (8, 8, 3), np.uint8),
              "segmentation": rng.integers(0, 11, (8, 8), np.uint8),
              "low_res": rng.integers(0, 255, (2, 2, 3), np.uint8),
              "boxes": np.asarray([[0.0, 0.0, 0.25, 0.5]], np.float32),
              "label": np.int64(3), "index": np.int64(0)}
    seen = []

    def condition_fn(fields, rng, train):
        seen.append(fields)
        return {"seg_sum": np.int32(0)}

    fn = latents.LatentExampleFn(data_cfg(random_flip=True), train=True,
                                 condition_fn=condition_fn)
    flips = 0
    for seed in range(16):
        out = fn((0, dict(record)), np.random.default_rng(seed))
        fields = seen[-1]
        assert {"image", "segmentation", "low_res", "boxes", "label"} <= set(fields)
        assert fields["image"].dtype == np.uint8 and isinstance(fields["segmentation"],
                                                                np.ndarray)
        flipped = not np.array_equal(out["moments"], record["moments"])
        if flipped:
            np.testing.assert_array_equal(out["moments"], record["moments"][:, ::-1])
        for key in ("image", "segmentation", "low_res"):
            want = record[key][:, ::-1] if flipped else record[key]
            np.testing.assert_array_equal(fields[key], want)
        np.testing.assert_allclose(fields["boxes"], [[0.75, 0.0, 1.0, 0.5]] if flipped
                                   else record["boxes"])
        flips += flipped
    assert 0 < flips < 16


# ---------------------------------------------------------------------------- image folders


def _png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _folder_with_maps(root, first_id=1):
    """Four 20x24 images with a bright left half, each with a label map of that half (class
    first_id + k; 16-bit PNGs when that is above 255)."""
    for k in range(4):
        image = np.zeros((20, 24, 3), np.uint8)
        image[:, :12] = 200 + k
        seg = np.zeros((20, 24), np.uint8 if first_id + 3 <= 255 else np.uint16)
        seg[:, :12] = first_id + k
        _png(str(root / "train" / f"im{k}.png"), image)
        _png(str(root / "train" / f"im{k}.seg.png"), seg)


def test_folder_segmentation_maps(tmp_path):
    root = tmp_path / "photos"
    _folder_with_maps(root)
    cfg = data_cfg(source="folder", folder=str(root), segmentation_key="any", label_key=None,
                   image_size=16, eval_split="")
    source = registry.make_source(cfg, "train")
    assert len(source) == 4  # the .seg.png files are not images
    assert source.canonical_keys == ("segmentation",)
    for i, relpath in enumerate(source.relpaths):
        ex = source[i]
        k = int(os.path.basename(relpath)[2])
        assert ex["segmentation"].shape == (20, 24) and ex["segmentation"].dtype == np.uint8
        assert set(np.unique(ex["segmentation"])) == {0, 1 + k}
    # Without segmentation_key nothing is read (and the maps are still no images).
    plain = registry.make_source(data_cfg(source="folder", folder=str(root), label_key=None,
                                          eval_split=""), "train")
    assert len(plain) == 4 and "segmentation" not in plain[0]
    # 16-bit maps: more than 256 classes, as int32.
    wide = tmp_path / "wide"
    _folder_with_maps(wide, first_id=1000)
    ex = registry.make_source(data_cfg(source="folder", folder=str(wide), segmentation_key="x",
                                       label_key=None, eval_split=""), "train")[0]
    assert ex["segmentation"].dtype == np.int32 and ex["segmentation"].max() >= 1000
    # A map of another size: a one-line error naming the file and both sizes.
    _png(str(root / "train" / "im2.seg.png"), np.zeros((20, 23), np.uint8))
    index = [os.path.basename(p) for p in source.relpaths].index("im2.png")
    with pytest.raises(DataConfigError,
                       match=r"Label map .*im2\.seg\.png' is 23x20 \(WxH\) but its image "
                             r".*im2\.png' is 24x20"):
        source[index]
    # An RGB map is not a label map; a missing one is an error when the source is made.
    _png(str(root / "train" / "im2.seg.png"), np.zeros((20, 24, 3), np.uint8))
    with pytest.raises(DataConfigError, match=r"im2\.seg\.png' has PIL mode 'RGB'"):
        source[index]
    os.remove(root / "train" / "im2.seg.png")
    with pytest.raises(DataConfigError,
                       match=r"segmentation_key is set but 1 of 4 images.*im2\.seg\.png"):
        registry.make_source(cfg, "train")
    with pytest.raises(DataConfigError, match="data.low_res_key='lr': image folders"):
        registry.make_source(data_cfg(source="folder", folder=str(root), low_res_key="lr"),
                             "train")


# ---------------------------------------------------------------------------- precompute


def _stage2(source_cfg, *, keep_images=None, kind=None):
    c = ml_collections.ConfigDict()
    c.source_data = source_cfg
    c.latents = ml_collections.ConfigDict(
        {"scale_factor": 1.0, "scale_num_examples": 8, "seed": 0,
         "keep_images": ml_collections.config_dict.placeholder(bool)})
    c.latents.keep_images = keep_images
    if kind:
        c.conditioning = ml_collections.ConfigDict({"kind": kind, "precompute_context": False})
    c.batch_size = 8
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    return c


def _precompute(config, first_stage_dir, out, split="test", n=NUM_EXAMPLES):
    real = registry.make_source
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precompute_lib.registry, "make_source",
                      lambda cfg, s: Head(real(cfg, s), n))
        return precompute_lib.precompute(config, first_stage_dir, out, splits=[split],
                                         examples_per_shard=16)


def _center_crop_uint8(image, size):
    return transforms.images_to_uint8(transforms.preprocess_image(image, size))


@pytest.fixture(scope="module")
def semantic_latents(tmp_path_factory, digits_dir, tiny_first_stage):  # noqa: F811
    out = str(tmp_path_factory.mktemp("semantic_latents"))
    config = _stage2(data_cfg(source="digits_semantic", data_dir=digits_dir, image_size=16),
                     keep_images=True)
    return out, config, _precompute(config, tiny_first_stage, out)


def test_precompute_keeps_images_and_label_maps(semantic_latents, digits_dir,
                                                tiny_first_stage):  # noqa: F811
    out, config, meta = semantic_latents
    assert meta["keep_images"] is True
    assert meta["conditioning_keys"] == ["id", "label", "segmentation"]
    assert meta["num_classes"] == {"label": 10, "segmentation": 11}
    assert meta["class_names"]["segmentation"][:2] == ["background", "0"]
    assert "uint8" in meta["features"]["image"] and "(16, 16, 3)" in meta["features"]["image"]
    assert "(16, 16)" in meta["features"]["segmentation"]
    with open(os.path.join(out, "progress", "run.json")) as f:
        assert json.load(f)["keep_images"] is True
    source = registry.make_source(config.source_data, "test")
    stored = latents.latents_source(out, "test")
    assert len(stored) == NUM_EXAMPLES
    for i in (0, 7, 23):
        record, raw = stored[i], source[i]
        # Exactly the center-cropped image that was encoded ...
        assert record["image"].dtype == np.uint8 and record["image"].shape == (16, 16, 3)
        np.testing.assert_array_equal(record["image"], _center_crop_uint8(raw["image"], 16))
        # ... and its label map, NEAREST-resized with it (classes: background and 1 + label).
        seg = record["segmentation"]
        assert seg.dtype == np.uint8 and seg.shape == (16, 16)
        np.testing.assert_array_equal(seg, cf.transform_segmentation(
            raw["segmentation"], cf.center_geometry(32, 32, 16), (32, 32)))
        assert set(np.unique(seg)) == {0, int(raw["label"]) + 1}
    # Resuming into it without keep_images is refused (run.json keeps keep_images).
    plain = _stage2(config.source_data, keep_images=False)
    with pytest.raises(precompute_lib.PrecomputeError, match="keep_images: existing true, now null.*Refusing to mix"):
        _precompute(plain, tiny_first_stage, out)


def test_condition_fn_gets_stored_fields_flipped_with_the_latent(semantic_latents):
    out, _, _ = semantic_latents
    cfg = data_cfg(source="latents", latents_dir=out, train_split="test", eval_split="test",
                   random_flip=True, segmentation_key="segmentation")

    def condition_fn(fields, rng, train):
        assert fields["segmentation"].dtype == np.uint8
        return {"image_seen": fields["image"], "seg_seen": fields["segmentation"]}

    batch = next(pipeline.make_train_iterator(cfg, global_batch_size=NUM_EXAMPLES, seed=0,
                                              condition_fn=condition_fn, **KW))
    stored = latents.latents_source(out, "test")
    flips = 0
    for moments, image, seg, index in zip(batch["moments"], batch["image_seen"],
                                          batch["seg_seen"], batch["index"]):
        record = stored[int(index)]
        flipped = not np.array_equal(moments, record["moments"])
        if flipped:
            np.testing.assert_array_equal(moments, record["moments"][:, ::-1])
        np.testing.assert_array_equal(image, record["image"][:, ::-1] if flipped
                                      else record["image"])
        np.testing.assert_array_equal(seg, record["segmentation"][:, ::-1] if flipped
                                      else record["segmentation"])
        flips += flipped
    assert 0 < flips < NUM_EXAMPLES
    # Eval hands them as stored, and without a condition_fn they stay out of the batch.
    plain = next(pipeline.make_eval_iterator(cfg, global_batch_size=8, **KW))
    assert set(plain) == {"moments", "label", "index", "mask"}


def test_precompute_digits_sr_and_folder_maps(tmp_path, digits_dir,
                                              tiny_first_stage):  # noqa: F811
    # digits_sr under conditioning.kind='concat': keep_images None resolves to True, and
    # low_res follows the image to 16 px (8 -> 4 px, bicubic).
    config = _stage2(data_cfg(source="digits_sr", data_dir=digits_dir, image_size=16),
                     kind="concat")
    out = str(tmp_path / "sr")
    meta = _precompute(config, tiny_first_stage, out, n=8)
    assert meta["keep_images"] is True and "low_res" in meta["conditioning_keys"]
    source = registry.make_source(config.source_data, "test")
    stored = latents.latents_source(out, "test")
    seen = []
    fn = latents.LatentExampleFn(data_cfg(label_key="label"), train=False,
                                 condition_fn=lambda f, r, t: seen.append(f) or {})
    for i in range(8):
        record, raw = stored[i], source[i]
        assert record["low_res"].shape == (4, 4, 3) and record["low_res"].dtype == np.uint8
        np.testing.assert_array_equal(record["low_res"], np.asarray(
            Image.fromarray(raw["low_res"]).resize((4, 4), Image.BICUBIC)))
        np.testing.assert_array_equal(record["image"], _center_crop_uint8(raw["image"], 16))
        fn((i, record))
        assert set(seen[-1]) == {"image", "low_res", "label"}
        np.testing.assert_array_equal(seen[-1]["low_res"], record["low_res"])

    # A folder of 20x24 images with 16-bit .seg.png maps (ids 1000..1003, stored int32), at
    # 16 px: resized to 16x19 and center-cropped at x=1, the map with them (NEAREST), and
    # keep_images off.
    root = tmp_path / "photos"
    _folder_with_maps(root, first_id=1000)
    folder_cfg = data_cfg(source="folder", folder=str(root), segmentation_key="seg",
                          label_key=None, image_size=16, train_split="train", eval_split="")
    out = str(tmp_path / "folder")
    meta = _precompute(_stage2(folder_cfg, keep_images=False), tiny_first_stage, out,
                       split="train", n=4)
    assert meta["keep_images"] is False and meta["conditioning_keys"] == ["segmentation"]
    assert "int32" in meta["features"]["segmentation"]
    with open(os.path.join(out, "progress", "run.json")) as f:
        assert "keep_images" not in json.load(f)  # as run.json files written before it
    source = registry.make_source(folder_cfg, "train")
    stored = latents.latents_source(out, "train")
    geometry = cf.center_geometry(20, 24, 16)
    assert (geometry.resized_h, geometry.resized_w, geometry.left) == (16, 19, 1)
    for i in range(4):
        record, raw = stored[i], source[i]
        assert "image" not in record and record["segmentation"].dtype == np.int32
        assert record["segmentation"].max() >= 1000
        np.testing.assert_array_equal(record["segmentation"], cf.transform_segmentation(
            raw["segmentation"], geometry, (20, 24)))
        # The map still marks the bright half of the encoded image.
        image = _center_crop_uint8(raw["image"], 16)[..., 0]
        assert np.all(image[record["segmentation"] > 0] > 150)

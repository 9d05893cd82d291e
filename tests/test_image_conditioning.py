"""Image-conditioned LDMs (concat / hybrid): channel bookkeeping, the conditions' maths, every new
config's smoke run, sampling at twice the training size, inpainting keeps the visible pixels,
and the command line's errors."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import smoke_config
from ldm_jax import sample
from ldm_jax.conditioning import encoders
from ldm_jax.conditioning import image as image_cond
from ldm_jax.config import defaults
from ldm_jax.config.loading import ConfigError
from ldm_jax.tasks.diffusion import DiffusionTask, make_sampler
from ldm_jax.training.trainer import train_and_evaluate

NEW_CONFIGS = ("ldm_bsr_sr.py", "ldm_inpainting.py", "ldm_semantic256.py", "ldm_digits_sr.py",
               "ldm_digits_inpaint.py", "ldm_digits_semantic.py")


def tiny(name, *overrides, **settings):
    return smoke_config(name, "async_checkpointing=false", "sampling.num_steps=2",
                        "eval_every_steps=0", "image_every_steps=0", *overrides, **settings)


def _cond_cfg(**kw):
    cfg = defaults.diffusion_config(first_stage_kind="kl", model_channels=1, channel_mult=(1,),
                                    attention_resolutions=()).conditioning
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("task,channels", [("sr", 6), ("inpaint", 7), ("semantic", 6)])
def test_in_channels_are_latent_plus_condition_channels(task, channels):
    config = tiny("ldm_digits_sr.py", **{"conditioning.image_task": task})
    if task == "semantic":
        config.data.segmentation_key = "segmentation"
        config.data.num_classes = 4
    assert DiffusionTask(config).config.model.in_channels == channels
    config.model.in_channels = 5
    with pytest.raises(ConfigError, match=rf"in_channels=5.*3 channels.*adds {channels - 3}.*"
                                          rf"set it to {channels}"):
        DiffusionTask(config)


def test_inpaint_condition_encodes_masked_image_and_subsamples_mask():
    calls = {}

    def encode_moments(params, x):  # a stand-in KL first stage with f = 4: mean | logvar
        calls["x"] = np.asarray(x)
        mean = x.reshape(x.shape[0], x.shape[1] // 4, 4, x.shape[2] // 4, 4, 3).mean((2, 4))
        return jnp.concatenate([mean, jnp.zeros_like(mean)], -1) + params

    cond = image_cond.ImageCondition(
        _cond_cfg(image_task="inpaint"), latent_shape=(4, 4, 3), downsampling_factor=4,
        latent_kind="kl", scale_factor=0.5, encode_moments=encode_moments)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[:, :9] = 1
    inputs = cond.inpaint_inputs(image, mask)
    # Filled pixels are -1 (black), kept ones the image in [-1, 1] (the reference's convention).
    np.testing.assert_array_equal(inputs["masked_image"][:, :9], -1.0)
    np.testing.assert_allclose(inputs["masked_image"][:, 9:], image[:, 9:] / 127.5 - 1, atol=1e-6)
    batch = {k: jnp.asarray(v[None]) for k, v in inputs.items()}
    out = np.asarray(cond.encode(None, {"first_stage": 1.0}, batch)["concat"])
    assert out.shape == (1, 4, 4, 4) and cond.channels == 4
    mean = calls["x"][0].reshape(4, 4, 4, 4, 3).mean((1, 3))
    np.testing.assert_allclose(out[0, ..., :3], 0.5 * (mean + 1.0), atol=1e-6)
    # The reference's nearest interpolation (rows/cols 0, 4, 8, 12 of the mask), as {-1, +1}.
    np.testing.assert_array_equal(out[0, ..., 3], 2.0 * mask[::4, ::4] - 1.0)


def test_semantic_condition_pools_one_hot_then_projects():
    cond = image_cond.ImageCondition(
        _cond_cfg(image_task="semantic", num_segmentation_classes=5, concat_channels=3),
        latent_shape=(2, 2, 3), downsampling_factor=4, latent_kind="vq", scale_factor=1.0)
    params = cond.init(jax.random.key(0))
    kernel = np.asarray(params["channel_mapper"]["kernel"])
    assert kernel.shape == (1, 1, 5, 3)
    seg = np.random.default_rng(1).integers(0, 5, (2, 8, 8))
    out = np.asarray(cond.encode(params, {}, {"segmentation": jnp.asarray(seg)})["concat"])
    one_hot = np.eye(5)[seg].reshape(2, 2, 4, 2, 4, 5).mean((2, 4))
    np.testing.assert_allclose(out, one_hot @ kernel[0, 0], atol=1e-6)
    # The null map (-1) is an all-zero one-hot; labels out of range are refused.
    null = cond.encode(params, {}, {"segmentation": jnp.asarray(cond.null(1)["segmentation"])})
    assert float(jnp.abs(null["concat"]).max()) == 0.0
    with pytest.raises(encoders.ConditionError, match=r"label 7 outside \[0, 5\)"):
        cond.condition_fn({"segmentation": np.full((8, 8), 7)}, None, True)


def test_sr_condition_resizes_to_the_latent_grid_and_checks_sizes():
    cond = image_cond.ImageCondition(_cond_cfg(image_task="sr", sr_factor=8, degradation="bicubic"),
                                     latent_shape=(8, 8, 4), downsampling_factor=4,
                                     latent_kind="kl", scale_factor=1.0)
    low = np.random.default_rng(0).uniform(-1, 1, (1, 4, 4, 3)).astype(np.float32)
    out = cond.encode(None, {}, {"low_res": jnp.asarray(low)})["concat"]
    assert out.shape == (1, 8, 8, 3) and cond.latent_hw({"low_res": low}) == (8, 8)
    # Inputs are degraded from the stored image, the same way for the same example in eval.
    image = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    a = cond.condition_fn({"image": image}, None, False)["low_res"]
    b = cond.condition_fn({"image": image}, None, False)["low_res"]
    assert a.shape == (4, 4, 3) and np.array_equal(a, b)
    with pytest.raises(encoders.ConditionError, match=r"--input: 5x4 pixels.*divisible by 2"):
        cond.request(1, inputs=np.zeros((1, 5, 4, 3), np.uint8), levels=4)
    with pytest.raises(encoders.ConditionError, match="latents.keep_images=True"):
        cond.condition_fn({}, None, True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One-step smoke runs of the six new configs (synthetic latents: no data set needed)."""
    runs = {}
    for name in NEW_CONFIGS:
        workdir = str(tmp_path_factory.mktemp(name.replace(".py", "")))
        result = train_and_evaluate(tiny(name, total_steps=1, checkpoint_every_steps=1), workdir)
        assert result["step"] == 1 and result["finite"] == 1.0, name
        runs[name] = workdir
    return runs


def test_every_new_config_smoke_run(trained):
    for name in NEW_CONFIGS:
        config = DiffusionTask(tiny(name)).config
        assert config.conditioning.kind == "concat"
        assert config.model.in_channels > 3 and config.model.out_channels == 3, name


def test_sr_samples_twice_the_training_size(tmp_path, trained):
    # Synthetic latents are 8x8 images (f = 1) super-resolved from 4x4 inputs; an 8x8 input
    # gives a 16x16 latent and output (convolutional sampling).
    inputs = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", images=inputs)
    out = tmp_path / "sr"
    assert sample.main([f"--workdir={trained['ldm_digits_sr.py']}", f"--out={out}", "--num=2",
                        f"--input={tmp_path / 'in.npz'}", "--steps=2", "--batch_size=8"]) == 0
    npz = np.load(out / "samples.npz")
    assert npz["images"].shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(npz["inputs"], inputs)


def test_inpainting_keeps_visible_pixels_at_twice_the_size(tmp_path, trained):
    rng = np.random.default_rng(1)
    inputs = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    masks = np.zeros((2, 16, 16), np.uint8)
    masks[0, :, :8] = 1
    masks[1, 4:12, 4:12] = 1
    np.savez(tmp_path / "in.npz", images=inputs)
    np.savez(tmp_path / "masks.npz", masks=masks)
    args = [f"--workdir={trained['ldm_digits_inpaint.py']}", "--num=2", "--steps=2",
            "--batch_size=8", f"--input={tmp_path / 'in.npz'}", f"--mask={tmp_path / 'masks.npz'}"]
    assert sample.main(args + [f"--out={tmp_path / 'a'}"]) == 0
    npz = np.load(tmp_path / "a" / "samples.npz")
    assert npz["images"].shape == (2, 16, 16, 3)
    keep = ~masks.astype(bool)
    np.testing.assert_array_equal(npz["images"][keep], inputs[keep])
    np.testing.assert_array_equal(npz["masks"], masks)
    assert sample.main(args + [f"--out={tmp_path / 'b'}", "--no_blend"]) == 0
    raw = np.load(tmp_path / "b" / "samples.npz")["images"]
    assert not np.array_equal(raw[keep], inputs[keep])
    np.testing.assert_array_equal(raw[~keep], npz["images"][~keep])


def test_semantic_samples_from_a_label_map_png(tmp_path, trained):
    from PIL import Image
    seg = np.zeros((16, 16), np.uint8)
    seg[4:12, 4:12] = 3
    Image.fromarray(seg).save(tmp_path / "map.png")
    out = tmp_path / "sem"
    assert sample.main([f"--workdir={trained['ldm_digits_semantic.py']}", f"--out={out}",
                        "--num=1", f"--input={tmp_path / 'map.png'}", "--steps=2",
                        "--batch_size=8"]) == 0
    assert np.load(out / "samples.npz")["images"].shape == (1, 16, 16, 3)
    Image.fromarray(np.full((16, 16), 9, np.uint8)).save(tmp_path / "bad.png")
    assert sample.main([f"--workdir={trained['ldm_digits_semantic.py']}", f"--out={tmp_path / 'x'}",
                        "--num=1", f"--input={tmp_path / 'bad.png'}"]) == 2
    assert not os.path.exists(tmp_path / "x")


def test_image_inputs_errors(tmp_path, trained, capsys):
    np.savez(tmp_path / "in.npz", images=np.zeros((1, 16, 16, 3), np.uint8))
    np.savez(tmp_path / "odd.npz", images=np.zeros((1, 15, 16, 3), np.uint8))
    np.savez(tmp_path / "m.npz", masks=np.ones((1, 8, 8), np.uint8))
    np.savez(tmp_path / "m0.npz", masks=np.zeros((1, 16, 16), np.uint8))
    inpaint = trained["ldm_digits_inpaint.py"]
    cases = [
        ([f"--workdir={inpaint}", f"--input={tmp_path / 'in.npz'}", f"--mask={tmp_path / 'm.npz'}"],
         "--mask=.*8x8 pixels but --input=.*16x16"),
        ([f"--workdir={inpaint}", f"--input={tmp_path / 'odd.npz'}",
          f"--mask={tmp_path / 'm.npz'}"], "8x8 pixels but"),
        ([f"--workdir={inpaint}", f"--input={tmp_path / 'in.npz'}"], "needs --mask"),
        ([f"--workdir={inpaint}"], "give --input"),
        ([f"--workdir={inpaint}", f"--input={tmp_path / 'nope.png'}"], "no such file"),
    ]
    for args, message in cases:
        out = tmp_path / "never"
        assert sample.main(args + [f"--out={out}", "--num=1", "--steps=2"]) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and __import__("re").search(message, err), err
        assert not out.exists()
    with pytest.warns(UserWarning, match="all zeros, nothing to fill"):
        assert sample.main([f"--workdir={inpaint}", f"--input={tmp_path / 'in.npz'}",
                            f"--mask={tmp_path / 'm0.npz'}", f"--out={tmp_path / 'z'}",
                            "--num=1", "--steps=2", "--batch_size=8"]) == 0


def test_input_given_to_an_unconditional_model_is_refused(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    train_and_evaluate(smoke_config("f4_celebahq.py", "async_checkpointing=false",
                                    "eval_every_steps=0", "image_every_steps=0",
                                    total_steps=1, checkpoint_every_steps=1), workdir)
    np.savez(tmp_path / "in.npz", images=np.zeros((1, 8, 8, 3), np.uint8))
    assert sample.main([f"--workdir={workdir}", f"--out={tmp_path / 'o'}",
                        f"--input={tmp_path / 'in.npz'}"]) == 2
    assert "this model takes no image" in capsys.readouterr().err


def test_hybrid_guidance_keeps_the_image_and_drops_the_context():
    config = tiny("ldm_digits_sr.py")
    config.conditioning.kind = "hybrid"
    config.conditioning.context_kind = "text"
    cond = config.conditioning
    cond.width, cond.depth, cond.heads, cond.dim_head, cond.max_length = 32, 1, 2, 16, 16
    config.data.caption_key = "caption"
    config.data.num_classes = 4
    task = DiffusionTask(config)
    assert task.config.model.use_spatial_transformer and task.config.model.context_dim == 32
    assert task.config.model.in_channels == 6
    state = task.init_state(jax.random.key(0))
    low = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
    batch = {"low_res": low, "tokens": jnp.asarray(task.condition.context.tokenize(["a", "b"]))}
    dropped = task.condition.drop(batch, jax.random.key(1), 1.0)
    np.testing.assert_array_equal(np.asarray(dropped["low_res"]), np.asarray(low))
    null_tokens = task.condition.context.null(2)["tokens"]
    np.testing.assert_array_equal(np.asarray(dropped["tokens"]), null_tokens)
    uncond = image_cond.guidance_null(task.condition, batch, 2)
    np.testing.assert_array_equal(np.asarray(uncond["low_res"]), np.asarray(low))
    sampler = make_sampler(task.config, task.schedule, name="ddim", num_steps=2)
    z = task.sample_latents(state.params["model"], jax.random.key(2), 2, cond=batch,
                            sampler=sampler, guidance_scale=2.0)
    assert z.shape == (2, 8, 8, 3) and bool(jnp.all(jnp.isfinite(z)))


def test_mosaics_and_foreground_iou():
    from ldm_jax.evaluation import image_tasks
    inputs = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    mosaics, labels = image_tasks.make_mosaics(inputs, np.arange(5))
    assert mosaics.shape == (1, 4, 4, 3) and labels.tolist() == [[0, 1, 2, 3]]
    np.testing.assert_array_equal(mosaics[0, :2, :2], inputs[0])
    np.testing.assert_array_equal(mosaics[0, :2, 2:], inputs[1])
    np.testing.assert_array_equal(mosaics[0, 2:, :2], inputs[2])
    np.testing.assert_array_equal(mosaics[0, 2:, 2:], inputs[3])
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[0, :2] = 200  # top half bright
    images[1, :, :1] = 100  # left column, dimmer: the threshold is relative to the brightest
    fg = np.zeros((2, 4, 4), bool)
    fg[0, :1] = True  # a quarter: IoU 4 / 8
    fg[1, :, :1] = True
    np.testing.assert_allclose(image_tasks.foreground_iou(images, fg), [0.5, 1.0])


def test_hybrid_with_a_class_context_trains_and_samples(tmp_path):
    config = tiny("ldm_digits_semantic.py", total_steps=1, checkpoint_every_steps=1)
    config.conditioning.kind = "hybrid"
    config.conditioning.context_kind = "class_crossattn"
    config.conditioning.width = 32
    config.conditioning.p_uncond = 0.5
    workdir = str(tmp_path / "run")
    result = train_and_evaluate(config, workdir)
    assert result["step"] == 1 and result["finite"] == 1.0
    task = DiffusionTask(config)
    assert task.class_conditional and task.config.conditioning.num_embed_classes == 5
    seg = np.zeros((2, 8, 8), np.uint8)
    seg[:, 2:6, 2:6] = 2
    cond = task.condition.request(2, inputs=seg, labels="1,3", levels=2)
    assert cond["label"].tolist() == [1, 3] and cond["segmentation"].shape == (2, 8, 8)

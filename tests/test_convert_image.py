"""Image-conditioned models (conditioning.kind='concat') through python -m ldm_jax.convert: CompVis
super-resolution (bsr_sr), inpainting and semantic-synthesis checkpoints, and diffusers'
LDMSuperResolutionPipeline folders, which sample as diffusers' own pipeline does and export back.

Tiny random weights, float32.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import require
from parity_utils import nchw_to_nhwc, nhwc_to_nchw, randomize, rel_err, state_dict_np

torch = require("torch")
diffusers = require("diffusers")
yaml = require("yaml")

from ldm_jax.conditioning.encoders import COND_STAGE_KEY  # noqa: E402
from ldm_jax.convert import compvis  # noqa: E402
from ldm_jax.convert.__main__ import main as convert_main  # noqa: E402
from ldm_jax.convert.common import ConversionError  # noqa: E402
from ldm_jax.diffusion.schedules import make_beta_schedule  # noqa: E402
from ldm_jax.models.autoencoder import make_first_stage  # noqa: E402
from ldm_jax.storage import bundle as bundle_lib  # noqa: E402
from ldm_jax.tasks.diffusion import make_unet  # noqa: E402

STEPS = 10
TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The torch references are tiny: one thread, instead of contending with XLA's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_params(module, *inputs, seed, std=0.2):
    """Every parameter of `module` N(0, std^2) (shapes from an abstract init: no compile)."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: (std * rng.standard_normal(s.shape)).astype(np.float32), shapes)


# ------------------------------------------------------------------------------------------------
# CompVis checkpoints: super-resolution, inpainting, semantic synthesis
# ------------------------------------------------------------------------------------------------

# As the reference's models/ldm/{bsr_sr,inpainting_big,semantic_synthesis256}/config.yaml, shrunk:
# a VQ-f2 first stage (16 px images, 8x8x3 latents) and a two-level UNet.
YAML = """\
model:
  base_learning_rate: 1.0e-06
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0155
    timesteps: 1000
    loss_type: l2
    first_stage_key: image
    image_size: 8
    channels: 3
{conditioning}
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 8
        in_channels: {in_channels}
        out_channels: 3
        model_channels: 32
        attention_resolutions: [2]
        num_res_blocks: 1
        channel_mult: [1, 2]
        num_head_channels: 16
    first_stage_config:
      target: ldm.models.autoencoder.VQModelInterface
      params:
        embed_dim: 3
        n_embed: 16
        ddconfig:
          double_z: false
          z_channels: 3
          resolution: 16
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 2]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
{cond_stage}
"""
CLASSES = 5  # segmentation classes of the semantic model
KINDS = {
    # bsr_sr writes no conditioning_key: the reference derives 'concat' from concat_mode.
    "sr": dict(in_channels=6, conditioning="    cond_stage_key: LR_image\n    concat_mode: true\n"
                                           "    cond_stage_trainable: false",
               cond_stage="    cond_stage_config:\n      target: torch.nn.Identity"),
    "inpaint": dict(in_channels=7, conditioning="    cond_stage_key: masked_image\n"
                                                "    conditioning_key: concat",
                    cond_stage="    cond_stage_config: __is_first_stage__"),
    "semantic": dict(in_channels=6, conditioning="    cond_stage_key: segmentation\n"
                                                 "    concat_mode: true\n"
                                                 "    cond_stage_trainable: true",
                     cond_stage="    cond_stage_config:\n"
                                "      target: ldm.modules.encoders.modules.SpatialRescaler\n"
                                "      params:\n        n_stages: 1\n"
                                f"        in_channels: {CLASSES}\n        out_channels: 3"),
}


def _compvis_checkpoint(kind, attn_type=None):
    """(state dict, YAML text) of a LatentDiffusion `kind` checkpoint with random weights
    (`attn_type`: the first stage's ddconfig.attn_type, when given)."""
    spec = KINDS[kind]
    text = YAML.format(**spec)
    if attn_type is not None:
        doc = yaml.safe_load(text)
        doc["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["attn_type"] = attn_type
        text = yaml.safe_dump(doc)
    params = yaml.safe_load(text)["model"]["params"]
    fields = compvis.unet_fields_from_compvis(params["unet_config"]["params"])
    unet = _random_params(make_unet(ml_collections.ConfigDict(dict(fields, attention_impl=None))),
                          jnp.zeros((1, 8, 8, spec["in_channels"])), jnp.zeros((1,), jnp.int32),
                          seed=1)
    fs = params["first_stage_config"]
    ae_fields = compvis.ae_fields_from_compvis(fs["target"], fs["params"])
    ae = _random_params(make_first_stage(ae_fields), jnp.zeros((1, 16, 16, 3)), seed=2)
    from ldm_jax import convert
    sd = {f"model.diffusion_model.{k}": v
          for k, v in convert.unet_params_to_compvis(unet, fields).items()}
    first_stage = convert.ae_params_to_compvis(ae, ae_fields)
    sd.update({f"first_stage_model.{k}": v for k, v in first_stage.items()})
    if kind == "inpaint":  # cond_stage_model IS the first stage: the state dict repeats it
        sd.update({f"cond_stage_model.{k}": v.copy() for k, v in first_stage.items()})
    if kind == "semantic":
        sd["cond_stage_model.channel_mapper.weight"] = np.random.default_rng(3).standard_normal(
            (3, CLASSES, 1, 1)).astype(np.float32)
    sd["betas"] = make_beta_schedule("linear", 1000, 0.0015, 0.0155).astype(np.float32)
    return sd, text


def _write(tmp_path, sd, text):
    ckpt, cfg = str(tmp_path / "model.ckpt"), str(tmp_path / "config.yaml")
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}}, ckpt)
    with open(cfg, "w") as f:
        f.write(text)
    return ckpt, cfg


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_compvis_image_checkpoint_converts_and_maps_back(kind, tmp_path, capsys):
    sd, text = _compvis_checkpoint(kind)
    # The reference's names: the UNet's first conv takes the latents + the condition.
    in_channels = KINDS[kind]["in_channels"]
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].shape == (32, in_channels, 3, 3)
    ckpt, cfg = _write(tmp_path, sd, text)
    out = str(tmp_path / "bundle")
    assert convert_main([f"--source={ckpt}", f"--config={cfg}", f"--output={out}"]) == 0
    log = capsys.readouterr().out

    b = bundle_lib.load_bundle(out)
    cond = b.config.conditioning
    assert cond.kind == "concat" and cond.image_task == kind
    assert b.config.model.in_channels == in_channels and b.config.model.out_channels == 3
    assert tuple(b.config.data.latent_shape) == (8, 8, 3)  # the latents, not the UNet input
    assert b.scale_factor == 1.0 and b.first_stage.kind == "vq"
    assert b.config.sampling.guidance_scale == 1.0
    if kind == "sr":
        assert (cond.sr_factor, cond.degradation) == (2, "bsr")
        assert "image_task='sr', sr_factor=2" in log
    elif kind == "inpaint":
        n = sum(k.startswith("first_stage_model.") for k in sd)
        assert f"dropped {n} 'cond_stage_model.*' tensors: the first stage repeated" in log
        assert COND_STAGE_KEY not in b.unet_params
    else:
        assert (cond.num_segmentation_classes, cond.concat_channels) == (CLASSES, 3)
        assert cond.segmentation_projection == "learned"
        kernel = b.unet_params[COND_STAGE_KEY]["channel_mapper"]["kernel"]
        assert kernel.shape == (1, 1, CLASSES, 3)  # flax Conv layout [1, 1, N, C]
        w = sd["cond_stage_model.channel_mapper.weight"]
        np.testing.assert_array_equal(kernel[0, 0], w[:, :, 0, 0].T)

    # Back to the CompVis names: every tensor of the checkpoint (but the schedule buffers).
    back = compvis.ldm_state_dict_to_compvis(b.config, b.unet_params, b.first_stage.config,
                                             b.first_stage.params)
    want = {k: v for k, v in sd.items() if k != "betas"}
    assert sorted(back) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(back[k], want[k], err_msg=k)

    exported = str(tmp_path / "d")
    if kind == "sr":  # bsr_sr's layout is diffusers' LDMSuperResolutionPipeline
        assert convert_main([f"--source={out}", f"--output={exported}", "--to=diffusers"]) == 0
        with open(os.path.join(exported, "model_index.json")) as f:
            assert json.load(f)["_class_name"] == "LDMSuperResolutionPipeline"
    else:  # diffusers has no inpainting / semantic pipeline: a one-line refusal
        assert convert_main([f"--source={out}", f"--output={exported}", "--to=diffusers"]) == 2
        err = capsys.readouterr().err
        assert f"image_task='{kind}'" in err and len(err.strip().splitlines()) == 1


def test_semantic_bundle_projects_label_maps_as_the_spatial_rescaler(tmp_path):
    pytest.importorskip("ldm_jax.conditioning.image")
    from ldm_jax.inference.sampling import load_bundle_task
    sd, text = _compvis_checkpoint("semantic")
    ckpt, cfg = _write(tmp_path, sd, text)
    out = str(tmp_path / "bundle")
    assert convert_main([f"--source={ckpt}", f"--config={cfg}", f"--output={out}"]) == 0
    _, task, b = load_bundle_task(out)
    seg = np.random.default_rng(5).integers(0, CLASSES, (2, 16, 16)).astype(np.int32)
    got = task.unet_inputs(b.unet_params, task.constants(),
                           {"segmentation": jnp.asarray(seg)})["concat"]
    # The reference's SpatialRescaler: the one-hot map, n_stages (here 1) bilinear halvings,
    # then the bias-free 1x1 channel_mapper with the checkpoint's weight.
    x = torch.nn.functional.one_hot(torch.from_numpy(seg).long(), CLASSES)
    x = torch.nn.functional.interpolate(x.permute(0, 3, 1, 2).float(), scale_factor=0.5,
                                        mode="bilinear")
    ref = torch.nn.functional.conv2d(
        x, torch.from_numpy(sd["cond_stage_model.channel_mapper.weight"])).numpy()
    assert rel_err(nhwc_to_nchw(got), ref) <= 1e-6


def _convert(sd, text, **changes):
    """compvis.convert_ldm_checkpoint of `sd` with the YAML's model.params updated."""
    doc = yaml.safe_load(text)
    doc["model"]["params"].update(changes)
    return compvis.convert_ldm_checkpoint(sd, doc, log=lambda msg: None)


def test_compvis_image_checkpoints_refuse_what_ldm_jax_cannot_represent(tmp_path, capsys):
    sd, text = _compvis_checkpoint("semantic")
    # An unsupported cond_stage_config: a one-line CLI error naming it and what converts.
    doc = yaml.safe_load(text)
    doc["model"]["params"]["cond_stage_config"] = {
        "target": "ldm.modules.encoders.modules.FrozenClipImageEmbedder"}
    ckpt, cfg = _write(tmp_path, sd, yaml.safe_dump(doc))
    assert convert_main([f"--source={ckpt}", f"--config={cfg}", f"--output={tmp_path}/b"]) == 2
    err = capsys.readouterr().err
    assert "FrozenClipImageEmbedder" in err and "SpatialRescaler" in err
    assert len(err.strip().splitlines()) == 1

    rescaler = yaml.safe_load(text)["model"]["params"]["cond_stage_config"]
    for field, value in (("multiplier", 0.25), ("method", "nearest"), ("n_stages", 2),
                         ("bias", True)):
        bad = {"target": rescaler["target"], "params": {**rescaler["params"], field: value}}
        with pytest.raises(ConversionError, match=f"cond_stage_config.params.{field}="):
            _convert(sd, text, cond_stage_config=bad)
    bad = {"target": rescaler["target"], "params": {**rescaler["params"], "in_channels": 7}}
    with pytest.raises(ConversionError, match="channel_mapper.weight has shape"):
        _convert(sd, text, cond_stage_config=bad)
    # The UNet must take the latents + the condition: a 7-channel UNet is not a 3 + 3 one.
    sd_inpaint, text_inpaint = _compvis_checkpoint("inpaint")
    no_cond = {k: v for k, v in sd_inpaint.items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(ConversionError, match="unet_config.params.in_channels=7"):
        _convert(no_cond, text_inpaint, cond_stage_config={"target": "torch.nn.Identity"},
                 conditioning_key=None)
    # Identity has no weights: cond_stage_model.* then means another YAML.
    with pytest.raises(ConversionError, match="Identity' has no weights"):
        _convert(sd_inpaint, text_inpaint, cond_stage_config={"target": "torch.nn.Identity"})
    # cond_stage_model.* of an inpainting model must be the first stage again.
    changed = dict(sd_inpaint)
    key = next(k for k in changed if k.startswith("cond_stage_model."))
    changed[key] = changed[key] + 1.0
    with pytest.raises(ConversionError, match="does not repeat first_stage_model"):
        _convert(changed, text_inpaint)
    # Attention kinds other than the reference's 'vanilla' and 'none' are named.
    doc = yaml.safe_load(text_inpaint)
    doc["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["attn_type"] = "linear"
    with pytest.raises(ConversionError, match="ddconfig.attn_type='linear'"):
        compvis.convert_ldm_checkpoint(sd_inpaint, doc, log=lambda msg: None)


def test_inpainting_checkpoint_whose_first_stage_has_no_attention(tmp_path):
    """The released inpainting_big's VQ-f4 has ddconfig.attn_type='none' (no attention blocks,
    not even in the middle): it converts, and its first stage has no attention parameters."""
    sd, text = _compvis_checkpoint("inpaint", attn_type="none")
    assert not any(".attn" in k for k in sd)
    out = _convert(sd, text)
    assert out["first_stage_config"].model.attn_type == "none"
    names = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_leaves_with_path(out["first_stage_params"])]
    assert names and not any("attn" in n for n in names)
    from ldm_jax.models.autoencoder import make_first_stage
    model = make_first_stage(out["first_stage_config"].model)
    x = jnp.zeros((1, 16, 16, 3))
    z = model.apply({"params": out["first_stage_params"]}, x, method=model.encode)
    assert model.apply({"params": out["first_stage_params"]}, z, method=model.decode).shape == x.shape


# ------------------------------------------------------------------------------------------------
# diffusers LDMSuperResolutionPipeline
# ------------------------------------------------------------------------------------------------

def _sr_pipeline(root):
    """LDMSuperResolutionPipeline: a UNet2DModel on latents + the low-res image (6 channels), a
    VQ-f2 VQModel (its default scaling_factor 0.18215, which the pipeline never applies) and
    the reference's DDIM settings."""
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=6, out_channels=3,
                                 block_out_channels=(32, 64), layers_per_block=1,
                                 attention_head_dim=16,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    vqvae = diffusers.VQModel(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                              layers_per_block=1, latent_channels=3, num_vq_embeddings=16,
                              sample_size=32, down_block_types=("DownEncoderBlock2D",) * 2,
                              up_block_types=("UpDecoderBlock2D",) * 2)
    randomize(unet, seed=1, std=0.05)
    randomize(vqvae, seed=2, std=0.2)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.0015,
                                        beta_end=0.0155, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False,
                                        steps_offset=1, timestep_spacing="leading")
    pipe = diffusers.LDMSuperResolutionPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    src = str(root / "sr")
    pipe.save_pretrained(src)
    return src, pipe


@pytest.fixture(scope="module")
def sr_bundle(tmp_path_factory):
    """(pipeline folder, pipeline, bundle folder, conversion log)."""
    root = tmp_path_factory.mktemp("sr")
    src, pipe = _sr_pipeline(root)
    out = str(root / "bundle")
    import contextlib
    import io
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        assert convert_main([f"--source={src}", f"--output={out}"]) == 0
    return src, pipe, out, log.getvalue()


def test_sr_pipeline_folder_converts_with_unet_parity_and_exports(sr_bundle, tmp_path, capsys):
    src, pipe, out, log = sr_bundle
    assert "latent scale factor 1.0 (LDMSuperResolutionPipeline scales nothing" in log
    b = bundle_lib.load_bundle(out)
    cond = b.config.conditioning
    assert (cond.kind, cond.image_task, cond.sr_factor, cond.degradation) == \
        ("concat", "sr", 2, "bicubic")
    assert b.scale_factor == 1.0 and b.config.latents.scale_factor == 1.0
    assert b.config.model.in_channels == 6 and tuple(b.config.data.latent_shape) == (16, 16, 3)
    d = b.config.diffusion
    assert (d.beta_schedule, d.linear_start, d.linear_end, d.timesteps) == \
        ("linear", 0.0015, 0.0155, 1000)

    # The UNet on a 6-channel input [z_t, low-res image]: diffusers' UNet2DModel's output.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 16, 16)).astype(np.float32)
    t = np.array([10, 700])
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    model = make_unet(b.config.model)
    got = model.apply({"params": b.unet_params}, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t))
    err = rel_err(nhwc_to_nchw(got), ref)
    print(f"6-channel UNet2DModel parity: rel err {err:.2e}")
    assert err <= 1e-5

    # Back to diffusers: exactly an LDMSuperResolutionPipeline folder with the same weights.
    exported = str(tmp_path / "exported")
    assert convert_main([f"--source={out}", f"--output={exported}", "--to=diffusers"]) == 0
    with open(os.path.join(exported, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "LDMSuperResolutionPipeline"
    pipe2 = diffusers.LDMSuperResolutionPipeline.from_pretrained(exported)
    for a, b2 in ((pipe.unet, pipe2.unet), (pipe.vqvae, pipe2.vqvae)):
        sa, sb = state_dict_np(a), state_dict_np(b2)
        assert sorted(sa) == sorted(sb)
        for k in sa:
            np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    # Converted again, the export is the same bundle.
    again = str(tmp_path / "again")
    assert convert_main([f"--source={exported}", f"--output={again}"]) == 0
    b2 = bundle_lib.load_bundle(again)
    assert b2.config.conditioning.to_dict() == cond.to_dict() and b2.scale_factor == 1.0
    jax.tree_util.tree_map(np.testing.assert_array_equal, b2.unet_params, b.unet_params)

    # A 6-channel UNet beside a 3-channel VQ without the pipeline's model_index.json is refused.
    rc = convert_main([f"--source={src}/unet", f"--vae={src}/vqvae", f"--output={tmp_path}/x"])
    assert rc == 2
    assert "LDMSuperResolutionPipeline" in capsys.readouterr().err
    # Scaled latents do not fit the pipeline (it decodes them as they are): no model_index.json.
    scaled = str(tmp_path / "scaled")
    assert convert_main([f"--source={src}", f"--output={scaled}", "--scale_factor=0.5"]) == 0
    assert convert_main([f"--source={scaled}", f"--output={tmp_path}/e2", "--to=diffusers"]) == 0
    assert "latent scale factor is 0.5 and the pipeline scales nothing" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(tmp_path, "e2", "model_index.json"))


def _diffusers_sr(pipe, low_res_nchw, seed):
    """diffusers' own call, and its loop reproduced from the same initial noise (for the
    latents): (latents NCHW, images NHWC in [0, 1] from the call, initial noise NCHW)."""
    with torch.no_grad():
        images = pipe(image=torch.from_numpy(low_res_nchw), num_inference_steps=STEPS, eta=0.0,
                      generator=torch.Generator().manual_seed(seed), output_type="np").images
        noise = torch.randn((low_res_nchw.shape[0], 3) + low_res_nchw.shape[2:],
                            generator=torch.Generator().manual_seed(seed))
        sched = pipe.scheduler
        sched.set_timesteps(STEPS)
        z = noise * sched.init_noise_sigma
        for t in sched.timesteps:
            eps = pipe.unet(torch.cat([z, torch.from_numpy(low_res_nchw)], 1), t).sample
            z = sched.step(eps, t, z, eta=0.0).prev_sample
        again = (pipe.vqvae.decode(z).sample.clamp(-1, 1) / 2 + 0.5).permute(0, 2, 3, 1)
    np.testing.assert_allclose(again.numpy(), images, atol=1e-6)  # the same noise as the call
    return z.numpy(), images, noise.numpy()


def test_sr_bundle_samples_as_the_diffusers_pipeline(sr_bundle):
    pytest.importorskip("ldm_jax.conditioning.image")
    from ldm_jax.inference.sampling import load_bundle_task
    from ldm_jax.tasks.diffusion import make_sampler
    _, pipe, out, _ = sr_bundle
    x = np.random.default_rng(4).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    low_res = nhwc_to_nchw(2.0 * (x.astype(np.float32) / 255.0) - 1.0)  # the pipeline's [-1, 1]
    ref_z, ref_images, noise = _diffusers_sr(pipe, low_res, seed=0)

    config, task, b = load_bundle_task(out)
    cond = task.condition.request(2, inputs=x)
    np.testing.assert_allclose(cond["low_res"], nchw_to_nhwc(low_res), atol=1e-6)
    ddim = make_sampler(config, task.schedule, name="ddim", num_steps=STEPS, eta=0.0)
    x_T = jnp.asarray(nchw_to_nhwc(noise))
    constants = task.constants()

    @jax.jit
    def run(cond):
        z = task.sample_latents(b.unet_params, jax.random.key(0), 2, cond=cond,
                                constants=constants, guidance_scale=1.0,
                                sampler=lambda fn, shape, rng: ddim(fn, shape, rng, x_T=x_T))
        return z, task.decode(constants, z)

    z, images = run(jax.tree_util.tree_map(jnp.asarray, cond))
    images = (np.clip(np.asarray(images), -1.0, 1.0) + 1.0) / 2.0
    err_z, err_img = rel_err(nhwc_to_nchw(z), ref_z), rel_err(images, ref_images)
    print(f"LDMSuperResolutionPipeline DDIM {STEPS} steps: latents rel err {err_z:.2e}, "
          f"images rel err {err_img:.2e}")
    assert err_z <= TOL and err_img <= TOL

"""python -m ldm_jax.convert: diffusers folders and CompVis checkpoints in, diffusers folders out."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, require

torch = require("torch")
diffusers = require("diffusers")
yaml = require("yaml")

from ldm_jax.storage import bundle as bundle_lib# noqa: E402
from ldm_jax import convert  # noqa: E402
from ldm_jax.convert.__main__ import main as convert_main  # noqa: E402
from ldm_jax.diffusion.samplers import make_ddim_sampler, make_ddim_timesteps  # noqa: E402
from ldm_jax.diffusion.schedules import make_beta_schedule  # noqa: E402
from ldm_jax.storage.first_stage import load_first_stage  # noqa: E402
from ldm_jax.models.autoencoder import make_first_stage  # noqa: E402
from ldm_jax.tasks.diffusion import make_schedule, make_unet  # noqa: E402
from parity_utils import nchw_to_nhwc, nhwc_to_nchw, randomize, rel_err, state_dict_np  # noqa: E402

STEPS = 10


def _diffusers_pipeline(root):
    """A small CompVis-unconditional-structured UNet2DModel + AutoencoderKL + DDIM scheduler."""
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3,
                                 block_out_channels=(32, 64), layers_per_block=1,
                                 attention_head_dim=16,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                  layers_per_block=1, latent_channels=3, sample_size=16,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.7)
    # Small weights keep the 10-step trajectory in a sane range (x0 = (x - s eps) / sqrt(abar)).
    randomize(unet, seed=1, std=0.05)
    randomize(vae, seed=2, std=0.2)
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195,
                                    beta_schedule="scaled_linear", clip_sample=False,
                                    set_alpha_to_one=False, steps_offset=1,
                                    timestep_spacing="leading")
    unet.save_pretrained(os.path.join(root, "unet"))
    vae.save_pretrained(os.path.join(root, "vae"))
    sched.save_pretrained(os.path.join(root, "scheduler"))
    return unet, vae, sched


def _diffusers_ddim(unet, vae, sched, noise_nchw):
    sched.set_timesteps(STEPS)
    x = torch.from_numpy(noise_nchw)
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet(x, t).sample
            x = sched.step(eps, t, x, eta=0.0).prev_sample
        img = vae.decode(x / vae.config.scaling_factor).sample
    return x.numpy(), img.numpy(), np.asarray(sched.timesteps)


def test_diffusers_pipeline_converts_samples_and_exports(tmp_path):
    src = str(tmp_path / "pipe")
    unet, vae, sched = _diffusers_pipeline(src)
    out = str(tmp_path / "bundle")
    # The real command line once (a subprocess), as a user runs it.
    proc = subprocess.run([sys.executable, "-m", "ldm_jax.convert", f"--source={src}",
                           f"--output={out}"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr
    assert "scale factor 0.7" in proc.stdout

    b = bundle_lib.load_bundle(out)
    assert b.config.diffusion.beta_schedule == "linear" and b.scale_factor == pytest.approx(0.7)
    assert b.first_stage.kind == "kl"
    noise = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    ref_z, ref_img, ref_ts = _diffusers_ddim(unet, vae, sched, noise)
    np.testing.assert_array_equal(ref_ts, make_ddim_timesteps(1000, STEPS)[::-1])

    model = make_unet(b.config.model)
    sampler = make_ddim_sampler(make_schedule(b.config.diffusion), num_steps=STEPS)
    model_fn = lambda x, t: model.apply({"params": b.unet_params}, x, t)
    z = jax.jit(lambda: sampler(model_fn, (2, 8, 8, 3), jax.random.key(0),
                                x_T=jnp.asarray(nchw_to_nhwc(noise))))()
    fs = b.first_stage
    img = fs.model.apply({"params": fs.params}, z / b.scale_factor, method=fs.model.decode)
    err_z, err_img = rel_err(nhwc_to_nchw(z), ref_z), rel_err(nhwc_to_nchw(img), ref_img)
    print(f"DDIM {STEPS} steps: latents rel err {err_z:.2e}, decoded rel err {err_img:.2e}")
    assert err_z <= 1e-4 and err_img <= 1e-4

    # Export back: diffusers loads the folders and reproduces the original outputs exactly.
    exported = str(tmp_path / "exported")
    assert convert_main([f"--source={out}", f"--output={exported}", "--to=diffusers"]) == 0
    unet2 = diffusers.UNet2DModel.from_pretrained(os.path.join(exported, "unet")).eval()
    vae2 = diffusers.AutoencoderKL.from_pretrained(os.path.join(exported, "vae")).eval()
    sched2 = diffusers.DDIMScheduler.from_pretrained(os.path.join(exported, "scheduler"))
    for a, b_ in ((unet, unet2), (vae, vae2)):
        sa, sb = state_dict_np(a), state_dict_np(b_)
        assert sorted(sa) == sorted(sb)
        for k in sa:
            np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    z2, img2, _ = _diffusers_ddim(unet2, vae2, sched2, noise)
    np.testing.assert_array_equal(z2, ref_z)
    np.testing.assert_array_equal(img2, ref_img)

    # A lone UNet folder needs --vae; a lone VAE folder becomes a first-stage run.
    rc = convert_main([f"--source={src}/unet", f"--output={tmp_path}/x"])
    assert rc == 2
    run = str(tmp_path / "ae_run")
    assert convert_main([f"--source={src}/vae", f"--output={run}"]) == 0
    loaded = load_first_stage(run)
    np.testing.assert_array_equal(loaded.params["decoder"]["conv_out"]["kernel"],
                                  fs.params["decoder"]["conv_out"]["kernel"])


# ------------------------------------------------------------------------------------------------
# CompVis checkpoints
# ------------------------------------------------------------------------------------------------

UNET_YAML = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32,
                 attention_resolutions=[2], num_res_blocks=1, channel_mult=[1, 2],
                 num_head_channels=16, use_scale_shift_norm=True, legacy=False)
DD = dict(double_z=False, z_channels=3, resolution=16, in_channels=3, out_ch=3, ch=32,
          ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
LDM_PARAMS = dict(linear_start=0.0015, linear_end=0.0195, timesteps=1000, image_size=8,
                  channels=3, scale_factor=0.5, conditioning_key=None,
                  unet_config={"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                               "params": UNET_YAML},
                  first_stage_config={"target": "ldm.models.autoencoder.VQModelInterface",
                                      "params": {"embed_dim": 3, "n_embed": 32, "ddconfig": DD}},
                  cond_stage_config="__is_unconditional__")

# Names and shapes of the public CompVis layout (ldm/modules/diffusionmodules/openaimodel.py,
# model.py): an independent check that the converter speaks the reference's naming.
KNOWN_COMPVIS = {
    "model.diffusion_model.time_embed.0.weight": (128, 32),
    "model.diffusion_model.input_blocks.0.0.weight": (32, 3, 3, 3),
    "model.diffusion_model.input_blocks.1.0.in_layers.0.weight": (32,),
    "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight": (64, 128),  # scale-shift: 2C
    "model.diffusion_model.input_blocks.2.0.op.weight": (32, 32, 3, 3),
    "model.diffusion_model.input_blocks.3.1.qkv.weight": (192, 64, 1),
    "model.diffusion_model.middle_block.1.proj_out.weight": (64, 64, 1),
    "model.diffusion_model.output_blocks.1.2.conv.weight": (64, 64, 3, 3),
    "model.diffusion_model.output_blocks.0.0.skip_connection.weight": (64, 128, 1, 1),
    "model.diffusion_model.out.2.weight": (3, 32, 3, 3),
    "first_stage_model.encoder.down.0.block.0.norm1.weight": (32,),
    "first_stage_model.encoder.down.0.downsample.conv.weight": (32, 32, 3, 3),
    "first_stage_model.encoder.down.1.attn.0.q.weight": (64, 64, 1, 1),
    "first_stage_model.decoder.up.1.upsample.conv.weight": (64, 64, 3, 3),
    "first_stage_model.quantize.embedding.weight": (32, 3),
    "first_stage_model.post_quant_conv.weight": (3, 3, 1, 1),
}


def _init_params():
    from ldm_jax.convert.compvis import ae_fields_from_compvis, unet_fields_from_compvis
    fields = unet_fields_from_compvis(UNET_YAML)
    m = dict(fields, attention_impl=None)
    import ml_collections
    unet = make_unet(ml_collections.ConfigDict(m))
    x = jnp.zeros((1, 8, 8, 3))
    init = lambda k: unet.init(jax.random.key(k), x, jnp.zeros((1,), jnp.int32))["params"]
    ae_fields = ae_fields_from_compvis(LDM_PARAMS["first_stage_config"]["target"],
                                       LDM_PARAMS["first_stage_config"]["params"])
    ae = make_first_stage(ae_fields).init(jax.random.key(3), jnp.zeros((1, 16, 16, 3)))["params"]
    return fields, init(1), init(2), ae_fields, ae


def _write_ckpt(path, sd):
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
                "global_step": 7}, path)


def test_compvis_ckpt_with_ema_converts(tmp_path, capsys):
    fields, raw, ema, ae_fields, ae = _init_params()
    sd = {f"model.diffusion_model.{k}": v for k, v in convert.unet_params_to_compvis(raw, fields).items()}
    ema_cv = convert.unet_params_to_compvis(ema, fields)
    sd.update({"model_ema.diffusion_model" + k.replace(".", ""): v for k, v in ema_cv.items()})
    sd["model_ema.decay"] = np.asarray(0.9999, np.float32)
    sd["model_ema.num_updates"] = np.asarray(10, np.int32)
    sd.update({f"first_stage_model.{k}": v for k, v in convert.ae_params_to_compvis(ae, ae_fields).items()})
    betas = make_beta_schedule("linear", 1000, 0.0015, 0.0195)
    sd["betas"] = betas.astype(np.float32)
    sd["alphas_cumprod"] = np.cumprod(1 - betas).astype(np.float32)
    sd["cond_stage_model.embedding.weight"] = np.zeros((4, 8), np.float32)
    for k, shape in KNOWN_COMPVIS.items():
        assert k in sd and sd[k].shape == shape, (k, sd.get(k, np.zeros(0)).shape)

    ckpt, cfg = str(tmp_path / "model.ckpt"), str(tmp_path / "config.yaml")
    _write_ckpt(ckpt, sd)
    with open(cfg, "w") as f:
        yaml.safe_dump({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                                  "params": LDM_PARAMS}}, f)
    out = str(tmp_path / "bundle")
    # The condition encoder is an error naming its keys and the flag that drops it.
    assert convert_main([f"--source={ckpt}", f"--config={cfg}", f"--output={out}"]) == 2
    err = capsys.readouterr().err
    assert "cond_stage_model.embedding.weight" in err and "--drop=cond_stage_model" in err
    assert convert_main([f"--source={ckpt}", f"--config={cfg}", f"--output={out}",
                         "--drop=cond_stage_model"]) == 0
    log = capsys.readouterr().out
    assert "dropped 1 'cond_stage_model.*'" in log and "EMA" in log

    b = bundle_lib.load_bundle(out)
    assert b.scale_factor == 0.5 and b.config.model.use_scale_shift_norm
    assert b.config.diffusion.linear_end == 0.0195 and b.first_stage.kind == "vq"
    jax.tree.map(np.testing.assert_array_equal, b.unet_params, ema)  # EMA preferred
    jax.tree.map(np.testing.assert_array_equal, b.first_stage.params, ae)

    # --no_ema picks the raw weights; a missing EMA twin or an unknown key is named.
    out2 = str(tmp_path / "bundle_raw")
    assert convert_main([f"--source={ckpt}", f"--config={cfg}", f"--output={out2}",
                         "--drop=cond_stage_model", "--no_ema"]) == 0
    jax.tree.map(np.testing.assert_array_equal, bundle_lib.load_bundle(out2).unet_params, raw)
    bad = dict(sd)
    del bad["model_ema.diffusion_modelout2weight"]
    bad["model.diffusion_model.bogus.weight"] = np.zeros(2, np.float32)
    _write_ckpt(ckpt, bad)
    assert convert_main([f"--source={ckpt}", f"--config={cfg}", f"--output={tmp_path}/b3",
                         "--drop=cond_stage_model"]) == 2
    err = capsys.readouterr().err
    assert "diffusion_modelout2weight" in err


def test_compvis_autoencoder_ckpt_becomes_first_stage_run(tmp_path, capsys):
    _, _, _, ae_fields, ae = _init_params()
    sd = convert.ae_params_to_compvis(ae, ae_fields)
    sd["loss.discriminator.main.0.weight"] = np.zeros((8, 3, 4, 4), np.float32)
    ckpt, cfg = str(tmp_path / "ae.ckpt"), str(tmp_path / "ae.yaml")
    _write_ckpt(ckpt, sd)
    with open(cfg, "w") as f:
        yaml.safe_dump({"model": {"target": "ldm.models.autoencoder.VQModel",
                                  "params": LDM_PARAMS["first_stage_config"]["params"]}}, f)
    run = str(tmp_path / "run")
    assert convert_main([f"--source={ckpt}", f"--config={cfg}", f"--output={run}"]) == 0
    assert "training-only 'loss.*'" in capsys.readouterr().out
    fs = load_first_stage(run)
    jax.tree.map(np.testing.assert_array_equal, fs.params, ae)
    # An unknown key outside loss.* is an error naming it.
    sd["encoder.extra.weight"] = np.zeros(1, np.float32)
    _write_ckpt(ckpt, sd)
    assert convert_main([f"--source={ckpt}", f"--config={cfg}", f"--output={tmp_path}/r2"]) == 2
    assert "encoder.extra.weight" in capsys.readouterr().err

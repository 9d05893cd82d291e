"""Image conditions (conditioning.kind='concat') of CompVis checkpoints and diffusers folders.

The condition c is concatenated AFTER z_t on the channel axis (the reference's DiffusionWrapper:
cat([x] + c_concat, 1)), so the UNet's in_channels = latent channels + condition channels:

  CompVis (conditioning_key concat)        ldm_jax conditioning (kind='concat')    c channels
  cond_stage_config torch.nn.Identity      image_task='sr', sr_factor = f,         3 (the low-res
    (bsr_sr: cond_stage_key LR_image)        degradation='bsr'                      image at the
                                                                                    latent grid)
  cond_stage_config '__is_first_stage__'   image_task='inpaint'                    latent + 1 (the
    (inpainting: the first stage again                                              masked image's
    under cond_stage_model.*, not kept)                                             latent, mask)
  ...encoders.modules.SpatialRescaler      image_task='semantic',                  C
    (n_stages = log2 f, multiplier 0.5,      num_segmentation_classes = N,
    bilinear, in_channels N, out_channels    concat_channels = C; channel_mapper
    C, bias False)                           weight [C, N, 1, 1] -> kernel [1, 1, N, C]

  diffusers LDMSuperResolutionPipeline     image_task='sr', sr_factor = the VQ's f,
    (unet/ UNet2DModel in_channels 6,        degradation='bicubic', latent scale 1.0
    vqvae/ VQModel, scheduler/)              (the pipeline scales nothing)

The semantic projection is trained jointly with the UNet: its kernel lives in the stage-2
parameter tree under `cond_stage_model/channel_mapper` (flax Conv layout), as the text encoders'
weights do (convert/text_io.py). Export: an 'sr' bundle with a VQ first stage, a UNet2DModel and
latent scale 1 is exactly diffusers' LDMSuperResolutionPipeline; inpainting and semantic models
have no diffusers pipeline. `cond_stage_to_compvis` gives the CompVis `cond_stage_model.*`
tensors back.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from ldm_jax.convert.common import ConversionError, _fmt_list

Log = Callable[[str], None]

SR_PIPELINE = "LDMSuperResolutionPipeline"
SR_CHANNELS = 3  # the low-resolution RGB image
MAPPER = "channel_mapper"  # SpatialRescaler.channel_mapper, and our module of the same name
_RESCALER_DEFAULTS = {"n_stages": 1, "method": "bilinear", "multiplier": 0.5, "bias": False}


def downsampling_factor(ae_fields: Mapping[str, Any]) -> int:
    """The first stage's f = 2 ** (len(ch_mult) - 1)."""
    return 2 ** (len(tuple(ae_fields["ch_mult"])) - 1)


def condition_channels(conditioning: Mapping[str, Any], latent_channels: int) -> int:
    """Channels of the concatenated condition c (after z_t in the UNet input)."""
    task = conditioning["image_task"]
    if task == "sr":
        return SR_CHANNELS
    if task == "inpaint":
        return int(latent_channels) + 1
    return int(conditioning["concat_channels"])


def _check_channels(unet_fields: Mapping[str, Any], conditioning: Mapping[str, Any],
                    latent_channels: int, where: str, what: str) -> None:
    """in_channels = latent + condition channels; out_channels = latent channels (eps / x0 / v
    are latents)."""
    cond = condition_channels(conditioning, latent_channels)
    if int(unet_fields["in_channels"]) != latent_channels + cond:
        raise ConversionError(f"{where}in_channels={unet_fields['in_channels']}, but the first "
                              f"stage's latents have {latent_channels} channels and {what} adds "
                              f"{cond}: it must be {latent_channels + cond}.")
    if int(unet_fields["out_channels"]) != latent_channels:
        raise ConversionError(f"{where}out_channels={unet_fields['out_channels']}, but the first "
                              f"stage's latents have {latent_channels} channels; they must be "
                              f"equal.")


# ------------------------------------------------------------------------------------------------
# CompVis
# ------------------------------------------------------------------------------------------------

def compvis_concat_stage(cond_config: Any, cond_sd: Mapping[str, np.ndarray], *,
                         first_stage_sd: Mapping[str, np.ndarray], unet_fields: Mapping[str, Any],
                         ae_fields: Mapping[str, Any], log: Log) -> Tuple[dict, Optional[dict]]:
    """(conditioning fields, cond_stage_model params or None) of a `conditioning_key: concat`
    LatentDiffusion: its YAML `cond_stage_config` and the checkpoint's `cond_stage_model.*`
    tensors (keys without that prefix; `first_stage_sd` likewise)."""
    latent = int(ae_fields["embed_dim"])
    f = downsampling_factor(ae_fields)
    params: Optional[dict] = None
    if cond_config == "__is_first_stage__":
        _check_repeated_first_stage(cond_sd, first_stage_sd, log)
        conditioning = dict(kind="concat", image_task="inpaint")
        what = "the inpainting condition (the masked image's latent + the mask)"
        log(f"inpainting: condition = the first stage's latent of the masked image ({latent} "
            f"channels) + the mask at the latent grid -> conditioning.image_task='inpaint'.")
    else:
        if not isinstance(cond_config, Mapping) or "target" not in cond_config:
            raise ConversionError(f"--config YAML cond_stage_config={cond_config!r} with "
                                  f"conditioning_key 'concat': ldm_jax converts torch.nn.Identity "
                                  f"(super-resolution), '__is_first_stage__' (inpainting) and "
                                  f"SpatialRescaler (semantic synthesis).")
        target = str(cond_config["target"])
        name = target.rsplit(".", 1)[-1]
        if target == "torch.nn.Identity":
            if cond_sd:
                raise ConversionError(f"--config YAML cond_stage_config.target={target!r} has no "
                                      f"weights, but the checkpoint has cond_stage_model.* "
                                      f"({_fmt_list(cond_sd, 10)}); is --config the YAML of this "
                                      f"checkpoint?")
            conditioning = dict(kind="concat", image_task="sr", sr_factor=f, degradation="bsr")
            what = "the low-resolution image (3 channels at the latent grid)"
            log(f"super-resolution: condition = the low-resolution image at the latent grid "
                f"(x{f}, the first stage's f) -> conditioning.image_task='sr', sr_factor={f}, "
                f"degradation='bsr' (the reference's BSR-degraded training data).")
        elif name == "SpatialRescaler":
            conditioning, params = _spatial_rescaler(dict(cond_config.get("params") or {}),
                                                     cond_sd, f, log)
            what = (f"the projected segmentation map ({conditioning['concat_channels']} "
                    f"channels)")
        else:
            raise ConversionError(f"--config YAML cond_stage_config.target={target!r} with "
                                  f"conditioning_key 'concat' is not supported: ldm_jax converts "
                                  f"torch.nn.Identity (super-resolution), '__is_first_stage__' "
                                  f"(inpainting) and SpatialRescaler (semantic synthesis).")
    _check_channels(unet_fields, conditioning, latent, "--config YAML unet_config.params.", what)
    return conditioning, params


def _check_repeated_first_stage(cond_sd: Mapping[str, np.ndarray],
                                first_stage_sd: Mapping[str, np.ndarray], log: Log) -> None:
    """'__is_first_stage__' makes cond_stage_model the first stage itself, so the state dict
    repeats first_stage_model.* under cond_stage_model.*: nothing new, not converted."""
    if not cond_sd:
        return
    missing = sorted(set(first_stage_sd) - set(cond_sd))
    extra = sorted(set(cond_sd) - set(first_stage_sd))
    differ = sorted(k for k in set(cond_sd) & set(first_stage_sd)
                    if np.shape(cond_sd[k]) != np.shape(first_stage_sd[k])
                    or not np.array_equal(cond_sd[k], first_stage_sd[k]))
    if missing or extra or differ:
        raise ConversionError(
            f"cond_stage_config '__is_first_stage__' makes cond_stage_model the first stage, but "
            f"cond_stage_model.* does not repeat first_stage_model.* (missing: "
            f"{_fmt_list(missing, 5) or 'none'}; extra: {_fmt_list(extra, 5) or 'none'}; "
            f"different: {_fmt_list(differ, 5) or 'none'}); pass --drop=cond_stage_model to "
            f"convert without it.")
    log(f"dropped {len(cond_sd)} 'cond_stage_model.*' tensors: the first stage repeated "
        f"(cond_stage_config '__is_first_stage__').")


def _spatial_rescaler(params: Mapping[str, Any], sd: Mapping[str, np.ndarray], f: int,
                      log: Log) -> Tuple[dict, dict]:
    """The reference's SpatialRescaler: n_stages x (interpolate by `multiplier`, `method`) then a
    1x1 conv `channel_mapper` (in_channels -> out_channels, no bias)."""
    p = {**_RESCALER_DEFAULTS, **params}
    where = "--config YAML cond_stage_config.params"
    stages = math.log2(f)
    if int(p["n_stages"]) != stages:
        raise ConversionError(f"{where}.n_stages={p['n_stages']}: ldm_jax resizes the label map "
                              f"to the latent grid, so it must be log2(f) = {int(stages)} for "
                              f"this first stage (f = {f}).")
    if float(p["multiplier"]) != 0.5:
        raise ConversionError(f"{where}.multiplier={p['multiplier']}: ldm_jax halves the label "
                              f"map per stage, so it must be 0.5.")
    if p["method"] != "bilinear":
        raise ConversionError(f"{where}.method={p['method']!r}: ldm_jax resizes the label map "
                              f"bilinearly, so it must be 'bilinear'.")
    if p["bias"]:
        raise ConversionError(f"{where}.bias={p['bias']!r}: ldm_jax's segmentation projection "
                              f"is a 1x1 conv without bias, so it must be false.")
    if p.get("out_channels") is None or "in_channels" not in p:
        raise ConversionError(f"{where} needs in_channels (the segmentation classes) and "
                              f"out_channels (the projected channels): ldm_jax always projects "
                              f"the one-hot map with channel_mapper.")
    key = f"{MAPPER}.weight"
    if set(sd) != {key}:
        raise ConversionError(f"cond_stage_model (SpatialRescaler): expected exactly "
                              f"'cond_stage_model.{key}', got {_fmt_list(sd) or 'none'}.")
    w = np.asarray(sd[key], np.float32)
    classes, channels = int(p["in_channels"]), int(p["out_channels"])
    if w.shape != (channels, classes, 1, 1):
        raise ConversionError(f"cond_stage_model.{key} has shape {w.shape}, but {where} "
                              f"in_channels={classes}, out_channels={channels} need "
                              f"{(channels, classes, 1, 1)}.")
    log(f"semantic synthesis: SpatialRescaler {classes} classes -> {channels} channels (1x1 "
        f"channel_mapper, {int(stages)} bilinear halvings) -> conditioning.image_task='semantic'.")
    conditioning = dict(kind="concat", image_task="semantic", num_segmentation_classes=classes,
                        concat_channels=channels, segmentation_projection="learned")
    return conditioning, {MAPPER: {"kernel": np.ascontiguousarray(w[:, :, 0, 0].T[None, None])}}


def cond_stage_to_compvis(conditioning, cond_params: Optional[Mapping],
                          first_stage_sd: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The CompVis `cond_stage_model.*` tensors (keys without that prefix) of an image-conditioned
    bundle: none for 'sr' (Identity), the first stage again for 'inpaint', the SpatialRescaler's
    channel_mapper for 'semantic'."""
    task = conditioning.image_task
    if task == "sr":
        return {}
    if task == "inpaint":
        return {k: np.asarray(v, np.float32) for k, v in first_stage_sd.items()}
    if task != "semantic":
        raise ConversionError(f"conditioning.image_task={task!r} has no CompVis equivalent.")
    if conditioning.segmentation_projection != "learned" or not cond_params \
            or MAPPER not in cond_params:
        raise ConversionError("a CompVis SpatialRescaler needs the learned projection "
                              "(conditioning.segmentation_projection='learned' with weights under "
                              "cond_stage_model/channel_mapper); this bundle has none.")
    kernel = np.asarray(cond_params[MAPPER]["kernel"], np.float32)
    return {f"{MAPPER}.weight": np.ascontiguousarray(kernel[0, 0].T[:, :, None, None])}


# ------------------------------------------------------------------------------------------------
# diffusers
# ------------------------------------------------------------------------------------------------

def diffusers_sr_conditioning(unet_fields: Mapping[str, Any], ae_fields: Mapping[str, Any],
                              unet_dir: str, log: Log) -> dict:
    """conditioning fields of an LDMSuperResolutionPipeline folder (UNet2DModel + VQModel)."""
    if unet_fields["use_spatial_transformer"]:
        raise ConversionError(f"{unet_dir}: {SR_PIPELINE} takes a UNet2DModel, not a "
                              f"UNet2DConditionModel.")
    if ae_fields["kind"] != "vq":
        raise ConversionError(f"{SR_PIPELINE}'s first stage (vqvae/) must be a VQModel, got an "
                              f"AutoencoderKL.")
    latent, f = int(ae_fields["embed_dim"]), downsampling_factor(ae_fields)
    conditioning = dict(kind="concat", image_task="sr", sr_factor=f, degradation="bicubic")
    _check_channels(unet_fields, conditioning, latent, f"{unet_dir}/config.json: ",
                    "the low-resolution image (3 channels)")
    log(f"super-resolution ({SR_PIPELINE}): the UNet takes the latents + the low-resolution "
        f"image at the latent grid -> conditioning.image_task='sr', sr_factor={f} (the VQ's f), "
        f"degradation='bicubic'.")
    return conditioning


def check_exportable(config) -> None:
    """Refuses image-conditioned bundles diffusers has no pipeline for (a one-line error)."""
    cond = config.conditioning
    if cond.kind == "hybrid" or (cond.kind == "concat" and cond.image_task != "sr"):
        what = (f"conditioning.kind='concat' with image_task={cond.image_task!r}"
                if cond.kind == "concat" else "conditioning.kind='hybrid'")
        raise ConversionError(f"{what} has no diffusers pipeline; diffusers export takes "
                              f"unconditional, class, text and super-resolution "
                              f"(image_task='sr') models.")


def export_index(conditioning, first_stage_kind: str, first_stage_f: int, unet_class: str,
                 scale_factor: float, vae_class: list, log: Log) -> Optional[dict]:
    """model_index.json entries of an 'sr' bundle: LDMSuperResolutionPipeline where it fits (VQ
    first stage, UNet2DModel, the low-res image at the latent grid, no latent scaling), else
    None (the folders load one by one)."""
    why = ""
    if first_stage_kind != "vq":
        why = "its first stage is an AutoencoderKL (the pipeline takes a VQModel)"
    elif unet_class != "UNet2DModel":
        why = f"its UNet is a {unet_class} (the pipeline takes a UNet2DModel)"
    elif int(conditioning.sr_factor) != int(first_stage_f):
        why = (f"its sr_factor {conditioning.sr_factor} is not the first stage's f "
               f"{first_stage_f} (the pipeline takes the low-res image at the latent grid)")
    elif abs(float(scale_factor) - 1.0) > 1e-12:
        why = (f"its latent scale factor is {scale_factor} and the pipeline scales nothing "
               f"(it would decode unscaled latents)")
    if why:
        log(f"no model_index.json: diffusers' {SR_PIPELINE} does not fit this bundle ({why}); "
            f"load the folders one by one.")
        return None
    return {"_class_name": SR_PIPELINE, "vqvae": vae_class}

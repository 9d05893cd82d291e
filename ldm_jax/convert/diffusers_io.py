"""diffusers folders <-> ldm_jax bundles and first-stage runs.

Reading: a model folder is `config.json` + `diffusion_pytorch_model.safetensors` (or `.bin`,
read with the restricted unpickler). A pipeline folder has `unet/` and `vae/` (or `vqvae/`, as
diffusers' LDMPipeline names it) and optionally `scheduler/scheduler_config.json`; a text
pipeline adds `bert/` (LDMTextToImagePipeline) or `text_encoder/` (StableDiffusionPipeline) and
`tokenizer/` (convert/text_io.py), and its bundle samples from prompts. An
LDMSuperResolutionPipeline folder (model_index.json; a 6-channel UNet2DModel: latents + the
low-resolution image) becomes a super-resolution bundle (convert/image_io.py) with latent scale
1.0, as that pipeline scales nothing.

Writing (`--to=diffusers`): `unet/`, `vae/` (AutoencoderKL) or `vqvae/` (VQModel),
`scheduler/scheduler_config.json` (a DDIMScheduler matching ldm_jax's DDIM), for text models
`bert/` or `text_encoder/` + `tokenizer/`, and a `model_index.json` where a stock pipeline fits:
LDMPipeline (VQ + UNet2DModel), LDMTextToImagePipeline ('bert' text encoder; its first stage
folder is `vqvae/` whatever its kind, as that pipeline names it), StableDiffusionPipeline
(CLIP text encoder + KL), LDMSuperResolutionPipeline (image_task='sr', VQ + UNet2DModel,
latent scale 1). Each model folder loads with diffusers' / transformers' `from_pretrained`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from ldm_jax.storage import weights_io
from ldm_jax.convert import configs, image_io
from ldm_jax.convert.common import ConversionError

_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_VAE_DIRS = ("vae", "vqvae")
_DIFFUSERS_VERSION = "0.42.1"  # the release these folders were checked against


def is_model_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def is_pipeline_folder(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "unet")) and any(
        os.path.isdir(os.path.join(path, d)) for d in _VAE_DIRS)


def pipeline_class(path: str) -> str:
    """The `_class_name` of a pipeline folder's model_index.json ('' without one)."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        return ""
    with open(index) as f:
        return str(json.load(f).get("_class_name") or "")


def read_model_folder(path: str) -> Tuple[dict, Dict[str, np.ndarray]]:
    """(config.json as a dict, flat state dict) of a diffusers model folder."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConversionError(f"{path}: not a diffusers model folder (no config.json).")
    with open(cfg_path) as f:
        cfg = json.load(f)
    for name in _WEIGHTS:
        weights = os.path.join(path, name)
        if os.path.isfile(weights):
            sd = (weights_io.load_safetensors(weights) if name.endswith(".safetensors")
                  else weights_io.load_torch_state_dict(weights))
            return cfg, {k: np.asarray(v, np.float32) for k, v in sd.items()}
    raise ConversionError(f"{path}: no weights ({' or '.join(_WEIGHTS)}); sharded or variant "
                          f"weight files are not supported.")


def _vae_dir(path: str) -> str:
    for d in _VAE_DIRS:
        if os.path.isdir(os.path.join(path, d)):
            return os.path.join(path, d)
    raise ConversionError(f"{path}: no vae/ or vqvae/ subfolder.")


def convert_vae_folder(path: str) -> Tuple[Any, dict, float]:
    """diffusers AutoencoderKL / VQModel folder -> (autoencoder config, params, scaling_factor)."""
    from ldm_jax import convert
    cfg, sd = read_model_folder(path)
    fields = convert.ae_fields_from_diffusers(cfg)
    params = convert.ae_params_from_diffusers(sd, fields)
    return configs.autoencoder_config(fields), params, float(cfg.get("scaling_factor", 1.0))


def convert_unet_folder(path: str) -> Tuple[dict, dict, int]:
    """diffusers UNet folder -> (config.model fields, params, latent size)."""
    from ldm_jax import convert
    cfg, sd = read_model_folder(path)
    fields = convert.unet_fields_from_diffusers(cfg)
    size = cfg.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ConversionError(f"{path}/config.json sample_size={size}: ldm_jax's latents are "
                                  f"square.")
        size = size[0]
    if not isinstance(size, int) or size <= 0:
        raise ConversionError(f"{path}/config.json: sample_size (the latent size) is missing.")
    return fields, convert.unet_params_from_diffusers(sd, fields), size


def convert_to_bundle_kwargs(unet_dir: str, vae_dir: str, scheduler_json: Optional[str], *,
                             scale_factor: Optional[float] = None, text_folder: str = "",
                             pipeline: str = "", log: Callable[[str], None] = print) -> dict:
    """UNet + VAE folders (+ scheduler config) -> keyword arguments of bundle.save_bundle.
    `text_folder`: a pipeline folder whose bert/ or text_encoder/ + tokenizer/ condition it.
    `pipeline`: the folder's model_index.json class (LDMSuperResolutionPipeline: an 'sr' UNet)."""
    from ldm_jax.conditioning.encoders import COND_STAGE_KEY
    from ldm_jax.convert import text_io
    fields, unet, size = convert_unet_folder(unet_dir)
    ae_config, ae, vae_scale = convert_vae_folder(vae_dir)
    latent = int(ae_config.model.embed_dim)
    image_cond = {}
    if pipeline == image_io.SR_PIPELINE:
        image_cond = image_io.diffusers_sr_conditioning(fields, ae_config.model, unet_dir, log)
    elif int(fields["in_channels"]) != latent:
        raise ConversionError(f"{unet_dir}: the UNet takes {fields['in_channels']} input channels "
                              f"but the autoencoder's latents have {latent}; an image-conditioned "
                              f"UNet converts from its pipeline folder (model_index.json naming "
                              f"{image_io.SR_PIPELINE}).")
    sched = None
    if scheduler_json is not None:
        with open(scheduler_json) as f:
            sched = json.load(f)
    else:
        log("no scheduler config given: using ldm_jax's default schedule (linear 0.0015..0.0195, "
            "1000 steps, eps).")
    diffusion = configs.diffusion_from_scheduler(sched)
    differ = configs.sampling_differences(sched)
    if differ:
        log(f"note: the scheduler's {', '.join(differ)} step DDIM differently from ldm_jax, which "
            f"follows the reference (steps_offset=1, set_alpha_to_one=False, 'leading'): same "
            f"betas, slightly different samples.")
    if scale_factor is not None:
        scale, origin = float(scale_factor), "--scale_factor"
    elif image_cond:  # the pipeline decodes its latents as they are
        scale, origin = 1.0, (f"{image_io.SR_PIPELINE} scales nothing; the vqvae config's "
                              f"scaling_factor {vae_scale} is unused")
    else:
        scale, origin = vae_scale, "the VAE config scaling_factor"
    log(f"latent scale factor {scale} ({origin}).")
    conditioning, cond_params = {}, None
    if text_folder:
        if not fields["use_spatial_transformer"]:
            raise ConversionError(f"--source={text_folder} has a text encoder but its UNet "
                                  f"({unet_dir}) takes no cross-attention context.")
        conditioning, cond_params = text_io.diffusers_text_encoder(
            text_folder, context_dim=fields["context_dim"], log=log)
    elif fields["use_spatial_transformer"]:
        log("note: this UNet cross-attends to a context (UNet2DConditionModel) but no text "
            "encoder came with it (a pipeline folder's bert/ or text_encoder/ + tokenizer/), "
            "so the bundle is for inspection/export, not sampling.")
    config = configs.stage2_config(fields, latent_size=size, first_stage_kind=ae_config.model.kind,
                                   diffusion=diffusion, num_classes_conditioning=True,
                                   latent_channels=latent)
    config.latents.scale_factor = scale
    source = {"format": "diffusers", "unet": os.path.abspath(unet_dir),
              "vae": os.path.abspath(vae_dir)}
    if image_cond:
        config.conditioning.update(image_cond)
        source["pipeline"] = pipeline
    if conditioning:
        config.conditioning.update(conditioning)
        config.sampling.guidance_scale = text_io.GUIDANCE[conditioning["text_encoder"]]
        log(f"sampling.guidance_scale={config.sampling.guidance_scale} (the reference pipeline's "
            f"default; --guidance_scale overrides it when sampling).")
        source["text_encoder"] = conditioning.get("encoder_path") or os.path.abspath(
            os.path.join(text_folder, "bert"))
        source["tokenizer"] = conditioning["tokenizer_path"]
    if cond_params is not None:
        unet = {**unet, COND_STAGE_KEY: cond_params}
    return dict(config=config, unet_params=unet, first_stage_config=ae_config,
                first_stage_params=ae, scale_factor=scale, source=source)


def unconverted_parts(path: str) -> list:
    """Sub-folders of a pipeline folder that a bundle does not take (safety_checker/, ...)."""
    from ldm_jax.convert.text_io import TEXT_PARTS
    known = ("unet", "scheduler") + _VAE_DIRS + TEXT_PARTS
    return sorted(d for d in os.listdir(path)
                  if os.path.isdir(os.path.join(path, d)) and d not in known)


def pipeline_parts(path: str) -> Tuple[str, str, Optional[str]]:
    """(unet dir, vae dir, scheduler_config.json or None) of a pipeline folder."""
    sched = os.path.join(path, "scheduler", "scheduler_config.json")
    return os.path.join(path, "unet"), _vae_dir(path), sched if os.path.isfile(sched) else None


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------

def write_model_folder(path: str, config: Mapping[str, Any], state_dict: Mapping[str, np.ndarray]
                       ) -> None:
    """Write config.json + diffusion_pytorch_model.safetensors (diffusers layout)."""
    os.makedirs(path, exist_ok=False)
    cfg = dict(config, _diffusers_version=_DIFFUSERS_VERSION)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    weights_io.save_safetensors(dict(state_dict), os.path.join(path, _WEIGHTS[0]),
                                metadata={"format": "pt"})


def export_first_stage(out_dir: str, ae_config, params, scale_factor: float) -> str:
    """Write a first stage as a diffusers AutoencoderKL / VQModel folder; returns its path."""
    from ldm_jax import convert
    fields = ae_config.model
    cfg = convert.ae_diffusers_config(fields, scale_factor)
    write_model_folder(out_dir, cfg, convert.ae_params_to_diffusers(params, fields))
    return out_dir


def export_bundle(out_dir: str, bundle, log: Callable[[str], None] = print) -> None:
    """Write a loaded bundle as a diffusers pipeline-style folder."""
    from ldm_jax import convert
    from ldm_jax.conditioning.encoders import split_params
    from ldm_jax.convert import text_io
    text_io.check_exportable(bundle.config)
    image_io.check_exportable(bundle.config)
    unet_params, cond_params = split_params(bundle.unet_params)
    if bundle.first_stage is None:
        raise ConversionError(f"{bundle.directory}: the bundle has no first stage, which a "
                              f"diffusers pipeline needs.")
    m = bundle.config.model
    h, w, _ = bundle.config.data.latent_shape
    if h != w:
        raise ConversionError(f"latent shape {h}x{w} is not square; diffusers' sample_size is one "
                              f"number.")
    os.makedirs(out_dir, exist_ok=False)
    unet_cfg = convert.unet_diffusers_config(m, int(h))
    write_model_folder(os.path.join(out_dir, "unet"), unet_cfg,
                       convert.unet_params_to_diffusers(unet_params, m))
    kind = bundle.first_stage.kind
    cond = bundle.config.conditioning
    text = cond.kind == "text"
    # LDMTextToImagePipeline names its first stage `vqvae` (a KL one too).
    vae_name = "vqvae" if kind == "vq" or (text and cond.text_encoder == "bert") else "vae"
    export_first_stage(os.path.join(out_dir, vae_name), bundle.first_stage.config,
                       bundle.first_stage.params, bundle.scale_factor)
    os.makedirs(os.path.join(out_dir, "scheduler"))
    with open(os.path.join(out_dir, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(dict(configs.scheduler_from_diffusion(bundle.config.diffusion),
                       _diffusers_version=_DIFFUSERS_VERSION), f, indent=2, sort_keys=True)
    components = text_io.write_text_parts(out_dir, bundle.config, cond_params, log)
    vae_class = ["diffusers", "AutoencoderKL" if kind == "kl" else "VQModel"]
    index = None
    if cond.kind == "concat":  # image_task='sr' (check_exportable refused the others)
        index = image_io.export_index(cond, kind, bundle.first_stage.downsampling_factor,
                                      unet_cfg["_class_name"], bundle.scale_factor, vae_class,
                                      log)
    elif kind == "vq" and unet_cfg["_class_name"] == "UNet2DModel":
        # Exactly diffusers' unconditional LDMPipeline (vqvae + unet + scheduler); KL latent
        # diffusion without text has no stock pipeline, so its folders are loaded one by one.
        index = {"_class_name": "LDMPipeline", "vqvae": vae_class}
    elif text and cond.text_encoder == "bert":
        index = {"_class_name": "LDMTextToImagePipeline", "vqvae": vae_class, **components}
    elif text and cond.text_encoder == "clip_text" and kind == "kl":
        index = {"_class_name": "StableDiffusionPipeline", "vae": vae_class, **components,
                 "safety_checker": [None, None], "feature_extractor": [None, None],
                 "image_encoder": [None, None], "requires_safety_checker": False}
    elif text:
        log(f"no model_index.json: diffusers has no stock pipeline for a {cond.text_encoder} "
            f"text encoder with a {kind.upper()} first stage; load the folders one by one.")
    if index is not None:
        index.update(_diffusers_version=_DIFFUSERS_VERSION,
                     unet=["diffusers", unet_cfg["_class_name"]],
                     scheduler=["diffusers", "DDIMScheduler"])
        with open(os.path.join(out_dir, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)

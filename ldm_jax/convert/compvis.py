"""CompVis (latent-diffusion) checkpoints -> ldm_jax bundles and first-stage runs.

A LatentDiffusion `.ckpt` is a Lightning checkpoint whose state dict holds these groups:

  model.diffusion_model.*   the UNet (raw weights)
  model_ema.*               its EMA: the diffusion_model names with the dots removed
                            (model_ema.diffusion_modelinput_blocks00weight) + decay, num_updates
  first_stage_model.*       the autoencoder
  cond_stage_model.*        the condition encoder: BERTEmbedder (text2img) and ClassEmbedder
                            (cin256-v2) convert (convert/text_io.py), and with conditioning_key
                            concat the image conditions (convert/image_io.py): Identity
                            (bsr_sr), '__is_first_stage__' (inpainting: the first stage again,
                            not kept) and SpatialRescaler (semantic synthesis); others need --drop
  betas, alphas_cumprod...  schedule buffers (recomputed from the YAML; betas are checked)
  scale_factor              present when the model was trained with scale_by_std

The YAML (`--config`) gives the architecture (unet_config / first_stage_config params), the
schedule and the conditioning: `conditioning_key`, or as the reference defaults it, 'concat' when
`concat_mode` (default true) else 'crossattn', and none for '__is_unconditional__'. A standalone
autoencoder checkpoint (encoder.*, decoder.*, quant_conv, ...; training keeps `loss.*`: LPIPS and
discriminator weights) becomes a first-stage run. Pickles are read with
ldm_jax.storage.weights_io's restricted unpickler: no code inside the file runs.
`ldm_state_dict_to_compvis` maps a bundle's weights back to these names.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np

from ldm_jax.conditioning.encoders import COND_STAGE_KEY
from ldm_jax.convert import configs, image_io, text_io
from ldm_jax.convert.common import ConversionError, _fmt_list
from ldm_jax.diffusion.schedules import make_beta_schedule

_SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights", "logvar")

# openaimodel.UNetModel params ldm_jax can represent only at these values.
_UNET_FIXED = {"dims": 2, "use_new_attention_order": False, "n_embed": None,
               "conv_resample": True, "use_fp16": False}
_UNET_IGNORED = ("image_size", "use_checkpoint", "legacy", "num_heads_upsample")
_UNET_FIELDS = ("in_channels", "out_channels", "model_channels", "num_res_blocks",
                "attention_resolutions", "channel_mult", "num_heads", "num_head_channels",
                "use_scale_shift_norm", "resblock_updown", "use_spatial_transformer",
                "transformer_depth", "context_dim", "num_classes", "use_linear_in_transformer",
                "dropout")


def _target_params(cfg: Mapping, where: str) -> Tuple[str, dict]:
    if not isinstance(cfg, Mapping) or "target" not in cfg:
        raise ConversionError(f"--config YAML: {where} needs 'target' and 'params'.")
    return str(cfg["target"]), dict(cfg.get("params") or {})


def unet_fields_from_compvis(params: Mapping[str, Any]) -> Dict[str, Any]:
    """config.model fields from an openaimodel.UNetModel `params:` block of a CompVis YAML."""
    for key, want in _UNET_FIXED.items():
        if params.get(key, want) != want:
            raise ConversionError(f"--config YAML unet_config.params.{key}={params[key]!r} is not "
                                  f"supported by ldm_jax's UNet (it needs {want!r}).")
    known = set(_UNET_FIELDS) | set(_UNET_FIXED) | set(_UNET_IGNORED)
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConversionError(f"--config YAML unet_config.params has options ldm_jax does not "
                              f"know: {unknown}.")
    heads, head_ch = int(params.get("num_heads", -1)), int(params.get("num_head_channels", -1))
    if head_ch != -1:
        heads = -1  # the reference lets num_head_channels override num_heads
    up = int(params.get("num_heads_upsample", -1))
    if up not in (-1, heads) and head_ch == -1:
        raise ConversionError(f"--config YAML unet_config.params.num_heads_upsample={up} differs "
                              f"from num_heads={heads}; ldm_jax uses one head count.")
    ctx = params.get("context_dim")
    if isinstance(ctx, (list, tuple)):
        raise ConversionError("--config YAML unet_config.params.context_dim is a list "
                              "(per-level contexts); ldm_jax needs one int.")
    return dict(in_channels=int(params["in_channels"]), out_channels=int(params["out_channels"]),
                model_channels=int(params["model_channels"]),
                num_res_blocks=int(params["num_res_blocks"]),
                attention_resolutions=tuple(int(a) for a in params["attention_resolutions"]),
                channel_mult=tuple(int(c) for c in params.get("channel_mult", (1, 2, 4, 8))),
                num_heads=heads, num_head_channels=head_ch,
                use_scale_shift_norm=bool(params.get("use_scale_shift_norm", False)),
                resblock_updown=bool(params.get("resblock_updown", False)),
                use_spatial_transformer=bool(params.get("use_spatial_transformer", False)),
                transformer_depth=int(params.get("transformer_depth", 1)),
                context_dim=int(ctx or 0), num_classes=int(params.get("num_classes") or 0),
                use_linear_in_transformer=bool(params.get("use_linear_in_transformer", False)),
                dropout=float(params.get("dropout", 0.0)))


def ae_fields_from_compvis(target: str, params: Mapping[str, Any]) -> Dict[str, Any]:
    """Autoencoder config.model fields from a CompVis first_stage_config (target + params)."""
    name = target.rsplit(".", 1)[-1]
    if name in ("AutoencoderKL",):
        kind = "kl"
    elif name in ("VQModel", "VQModelInterface"):
        kind = "vq"
    else:
        raise ConversionError(f"--config YAML first_stage_config.target={target!r}: ldm_jax "
                              f"converts AutoencoderKL, VQModel and VQModelInterface.")
    dd = params.get("ddconfig")
    if not isinstance(dd, Mapping):
        raise ConversionError("--config YAML first_stage_config.params.ddconfig is missing.")
    attn_type = dd.get("attn_type", "vanilla")
    if attn_type not in ("vanilla", "none"):
        raise ConversionError(f"--config YAML ddconfig.attn_type={attn_type!r} is not "
                              f"supported: ldm_jax's autoencoder has the reference's 'vanilla' "
                              f"attention blocks, or none at all ('none').")
    if kind == "kl" and not dd.get("double_z", True):
        raise ConversionError("--config YAML ddconfig.double_z=False for an AutoencoderKL: the "
                              "KL encoder must output mean and log-variance (double_z=True).")
    fields = dict(kind=kind, ch=int(dd["ch"]), ch_mult=tuple(int(c) for c in dd["ch_mult"]),
                  num_res_blocks=int(dd["num_res_blocks"]),
                  attn_resolutions=tuple(int(a) for a in dd.get("attn_resolutions", ())),
                  resolution=int(dd["resolution"]), in_channels=int(dd.get("in_channels", 3)),
                  out_ch=int(dd.get("out_ch", 3)), z_channels=int(dd["z_channels"]),
                  embed_dim=int(params["embed_dim"]), dropout=float(dd.get("dropout", 0.0)),
                  norm_groups=32, n_embed=0, beta=0.25, legacy_beta=False,
                  attn_type=attn_type)
    if kind == "vq":
        # taming's VectorQuantizer2 (used by LDM's VQModel) defaults to legacy=True.
        fields.update(n_embed=int(params["n_embed"]), legacy_beta=True)
    return fields


def split_groups(sd: Mapping[str, np.ndarray], prefixes: Iterable[str]) -> Dict[str, dict]:
    """{prefix: {key without prefix: array}} plus '' for keys matching no prefix."""
    groups: Dict[str, dict] = {p: {} for p in prefixes}
    groups[""] = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                groups[p][k[len(p):]] = v
                break
        else:
            groups[""][k] = v
    return groups


def apply_drop(groups: Dict[str, dict], drop: Iterable[str], log: Callable[[str], None]) -> None:
    """Drop the groups named in --drop (printing what goes); a named group that is absent is an
    error, so a typo cannot pass unnoticed."""
    for name in drop:
        key = name if name.endswith(".") else name + "."
        if key not in groups or not groups[key]:
            raise ConversionError(f"--drop={name}: the checkpoint has no '{key}*' keys "
                                  f"(groups present: {sorted(k for k, v in groups.items() if k and v)}).")
        log(f"dropped {len(groups[key])} '{key}*' tensors (--drop={name}): "
            f"{_fmt_list((key + k for k in groups[key]), 8)}")
        groups[key] = {}


def pick_ema(unet_sd: Mapping[str, np.ndarray], ema_sd: Mapping[str, np.ndarray],
             use_ema: bool, log: Callable[[str], None]) -> Dict[str, np.ndarray]:
    """The UNet weights to convert: the EMA copy when present (and use_ema), else the raw ones.

    EMA names are 'diffusion_model' + the raw name with the dots removed; every raw weight must
    have its EMA twin and vice versa (besides `decay` / `num_updates`).
    """
    ema = {k: v for k, v in ema_sd.items() if k not in ("decay", "num_updates")}
    if not ema:
        log("no model_ema.* weights in the checkpoint: converting the raw UNet weights.")
        return dict(unet_sd)
    names: Dict[str, str] = {}
    for k in unet_sd:
        flat = "diffusion_model" + k.replace(".", "")
        if flat in names:
            raise ConversionError(f"EMA names of '{names[flat]}' and '{k}' collide ('{flat}').")
        names[flat] = k
    missing = sorted(set(names) - set(ema))
    unknown = sorted(set(ema) - set(names))
    if missing or unknown:
        raise ConversionError(f"model_ema.* does not mirror model.diffusion_model.*: missing EMA "
                              f"keys: {_fmt_list(missing) or 'none'}; unexpected EMA keys: "
                              f"{_fmt_list(unknown) or 'none'}.")
    if not use_ema:
        log("--no_ema: converting the raw UNet weights (model_ema.* ignored).")
        return dict(unet_sd)
    log(f"using the EMA weights (model_ema.*, {len(ema)} tensors); the raw "
        f"model.diffusion_model.* weights are not converted.")
    return {names[k]: v for k, v in ema.items()}


def check_schedule(rest: Dict[str, np.ndarray], diffusion: Mapping[str, Any],
                   log: Callable[[str], None]) -> Optional[float]:
    """Consume the schedule buffers (checking betas against the YAML) and `scale_factor`.

    Returns the checkpoint's scale_factor buffer, if any.
    """
    if "betas" in rest:
        want = make_beta_schedule(diffusion["beta_schedule"], diffusion["timesteps"],
                                  diffusion["linear_start"], diffusion["linear_end"])
        have = np.asarray(rest["betas"], np.float64)
        if have.shape != want.shape or not np.allclose(have, want, rtol=1e-5, atol=1e-8):
            raise ConversionError("the checkpoint's betas do not match the YAML's schedule "
                                  "(timesteps / beta_schedule / linear_start / linear_end); is "
                                  "--config the YAML this checkpoint was trained with?")
    found = [k for k in _SCHEDULE_BUFFERS if k in rest]
    for k in found:
        del rest[k]
    if found:
        log(f"schedule buffers {found} not converted: ldm_jax recomputes them from the YAML "
            f"(betas checked equal).")
    scale = rest.pop("scale_factor", None)
    return None if scale is None else float(np.asarray(scale).reshape(()))


def diffusion_fields(ldm_params: Mapping[str, Any]) -> Dict[str, Any]:
    """config.diffusion values from a LatentDiffusion `params:` block."""
    param = ldm_params.get("parameterization", "eps")
    if param not in ("eps", "x0", "v"):
        raise ConversionError(f"--config YAML model.params.parameterization={param!r} is not "
                              f"supported (eps, x0, v).")
    return {"timesteps": int(ldm_params.get("timesteps", 1000)),
            "beta_schedule": str(ldm_params.get("beta_schedule", "linear")),
            "linear_start": float(ldm_params.get("linear_start", 1e-4)),
            "linear_end": float(ldm_params.get("linear_end", 2e-2)),
            "parameterization": param}


def conditioning_key(target: str, ldm_params: Mapping[str, Any]) -> Optional[str]:
    """The conditioning key LatentDiffusion really uses: `conditioning_key`, else 'concat' when
    `concat_mode` (default true) else 'crossattn'; None for an '__is_unconditional__' (or
    missing) cond_stage_config. A DDPM takes `conditioning_key` as written."""
    key = ldm_params.get("conditioning_key")
    if not target.endswith("LatentDiffusion"):
        return key
    cond_stage = ldm_params.get("cond_stage_config")
    if cond_stage is None or cond_stage == "__is_unconditional__":
        return None
    if key is None:
        key = "concat" if ldm_params.get("concat_mode", True) else "crossattn"
    return key


def load_yaml(path: str) -> dict:
    import yaml
    with open(path) as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, Mapping) or "model" not in doc:
        raise ConversionError(f"--config={path}: expected a CompVis YAML with a top-level 'model'.")
    return dict(doc)


def convert_ldm_checkpoint(sd: Mapping[str, np.ndarray], yaml_doc: Mapping, *, drop=(),
                           use_ema: bool = True, log: Callable[[str], None] = print,
                           tokenizer_path: str = text_io.SHIPPED_WORDPIECE) -> dict:
    """A LatentDiffusion state dict + YAML -> keyword arguments of bundle.save_bundle.

    `tokenizer_path`: the WordPiece vocabulary of a BERTEmbedder condition encoder."""
    from ldm_jax import convert
    target, ldm_params = _target_params(yaml_doc["model"], "model")
    unet_target, unet_params = _target_params(ldm_params.get("unet_config"), "unet_config")
    fs_target, fs_params = _target_params(ldm_params.get("first_stage_config"),
                                          "first_stage_config")
    groups = split_groups(sd, ("model.diffusion_model.", "model_ema.", "first_stage_model.",
                               "cond_stage_model."))
    apply_drop(groups, drop, log)
    diffusion = diffusion_fields(ldm_params)
    scale_buffer = check_schedule(groups[""], diffusion, log)
    if groups[""]:
        raise ConversionError(f"unexpected keys outside the known groups: "
                              f"{_fmt_list(groups[''])}.")
    fields = unet_fields_from_compvis(unet_params)
    unet_sd = pick_ema(groups["model.diffusion_model."], groups["model_ema."], use_ema, log)
    unet = convert.unet_params_from_compvis(unet_sd, fields)
    ae_fields = ae_fields_from_compvis(fs_target, fs_params)
    ae = convert.ae_params_from_compvis(groups["first_stage_model."], ae_fields)

    cond_key = conditioning_key(target, ldm_params)
    if cond_key not in (None, "crossattn", "adm", "concat"):
        raise ConversionError(f"--config YAML model.params.conditioning_key={cond_key!r} is not "
                              f"supported (None, 'crossattn', 'adm', 'concat').")
    conditioning, cond_params = {}, None
    if cond_key == "concat":
        if fields["use_spatial_transformer"]:
            raise ConversionError("--config YAML unet_config.params.use_spatial_transformer=True "
                                  "with conditioning_key 'concat': the UNet's cross-attention "
                                  "would get no context ('hybrid' models are not converted).")
        conditioning, cond_params = image_io.compvis_concat_stage(
            ldm_params.get("cond_stage_config"), groups["cond_stage_model."],
            first_stage_sd=groups["first_stage_model."], unet_fields=fields,
            ae_fields=ae_fields, log=log)
    elif groups["cond_stage_model."]:
        if not fields["use_spatial_transformer"] or cond_key != "crossattn":
            cond_sd = groups["cond_stage_model."]
            raise ConversionError(
                f"the checkpoint has a condition encoder (cond_stage_model.*, {len(cond_sd)} "
                f"tensors: {_fmt_list(('cond_stage_model.' + k for k in cond_sd), 10)}) but its "
                f"UNet takes no cross-attention context (conditioning_key={cond_key!r}); pass "
                f"--drop=cond_stage_model to convert without it.")
        conditioning, cond_params = text_io.compvis_cond_stage(
            ldm_params.get("cond_stage_config"), groups["cond_stage_model."],
            context_dim=fields["context_dim"], tokenizer_path=tokenizer_path, log=log)
    elif fields["use_spatial_transformer"]:
        log("note: this UNet cross-attends to a context but the checkpoint has no condition "
            "encoder (cond_stage_model.*) ldm_jax converts, so the bundle is for "
            "inspection/export, not sampling.")
    scale = scale_buffer if scale_buffer is not None else float(ldm_params.get("scale_factor", 1.0))
    size = int(ldm_params.get("image_size", unet_params.get("image_size", 0)))
    if size <= 0:
        raise ConversionError("--config YAML model.params.image_size (latent size) is missing.")
    config = configs.stage2_config(fields, latent_size=size, first_stage_kind=ae_fields["kind"],
                                   diffusion=diffusion,
                                   num_classes_conditioning=cond_key == "adm",
                                   latent_channels=(int(ae_fields["embed_dim"])
                                                    if cond_key == "concat" else None))
    config.latents.scale_factor = scale
    if cond_key == "concat":
        config.conditioning.update(conditioning)
        if cond_params is not None:
            unet = {**unet, COND_STAGE_KEY: cond_params}
    elif cond_params is not None:
        config.conditioning.update(conditioning)
        name = conditioning.get("text_encoder", conditioning["kind"])
        config.sampling.guidance_scale = text_io.GUIDANCE[name]
        log(f"sampling.guidance_scale={config.sampling.guidance_scale} (the reference's default; "
            f"--guidance_scale overrides it when sampling).")
        unet = {**unet, COND_STAGE_KEY: cond_params}
    return dict(config=config, unet_params=unet,
                first_stage_config=configs.autoencoder_config(ae_fields),
                first_stage_params=ae, scale_factor=scale,
                source={"format": "compvis", "target": target})


def ldm_state_dict_to_compvis(config, unet_params, first_stage_config,
                              first_stage_params) -> Dict[str, np.ndarray]:
    """The inverse of convert_ldm_checkpoint's weight mapping: a LatentDiffusion state dict
    (model.diffusion_model.*, first_stage_model.*, cond_stage_model.* as the reference names
    them; no model_ema.* twin, no schedule buffers) of a bundle's parameters."""
    from ldm_jax import convert
    from ldm_jax.conditioning.encoders import split_params
    unet, cond_params = split_params(unet_params)
    sd = {f"model.diffusion_model.{k}": v
          for k, v in convert.unet_params_to_compvis(unet, config.model).items()}
    first_stage = convert.ae_params_to_compvis(first_stage_params, first_stage_config.model)
    sd.update({f"first_stage_model.{k}": v for k, v in first_stage.items()})
    kind = config.conditioning.kind
    if kind == "concat":
        cond_sd = image_io.cond_stage_to_compvis(config.conditioning, cond_params, first_stage)
    elif kind == "class_crossattn":
        cond_sd = {"embedding.weight": np.asarray(cond_params["embedding"], np.float32)}
    elif cond_params is not None:
        raise ConversionError(f"conditioning.kind={kind!r}: writing its condition encoder as a "
                              f"CompVis cond_stage_model is not supported (image conditions and "
                              f"class embeddings are).")
    else:
        cond_sd = {}
    sd.update({f"cond_stage_model.{k}": v for k, v in cond_sd.items()})
    return sd


def convert_ae_checkpoint(sd: Mapping[str, np.ndarray], yaml_doc: Mapping, *, drop=(),
                          log: Callable[[str], None] = print) -> Tuple[Any, dict]:
    """A standalone CompVis autoencoder state dict + YAML -> (autoencoder config, params)."""
    from ldm_jax import convert
    target, params = _target_params(yaml_doc["model"], "model")
    fields = ae_fields_from_compvis(target, params)
    groups = split_groups(sd, ("loss.",))
    if "loss" not in [d.rstrip(".") for d in drop] and groups["loss."]:
        # Training-only weights (LPIPS, discriminator) never affect encoding/decoding.
        log(f"dropped {len(groups['loss.'])} training-only 'loss.*' tensors (LPIPS / "
            f"discriminator): not part of the autoencoder.")
        groups["loss."] = {}
    apply_drop(groups, drop, log)
    return configs.autoencoder_config(fields), convert.ae_params_from_compvis(groups[""], fields)

"""Full ldm_jax configs (stage 2 and autoencoder) built from converted model fields."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import ml_collections

from ldm_jax.config import defaults as config_defaults
from ldm_jax.convert.common import ConversionError

# diffusers scheduler beta_schedule -> ldm_jax beta_schedule (same formulas).
DIFFUSERS_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear",
                       "squaredcos_cap_v2": "cosine"}
DIFFUSERS_PREDICTION = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def stage2_config(fields: Mapping[str, Any], *, latent_size: int, first_stage_kind: str,
                  diffusion: Mapping[str, Any], num_classes_conditioning: bool = False,
                  latent_channels: Optional[int] = None) -> ml_collections.ConfigDict:
    """A stage-2 ConfigDict (config_defaults.diffusion_config structure) for UNet ``fields``.

    ``diffusion``: timesteps, beta_schedule, linear_start, linear_end, parameterization.
    ``latent_channels``: the latents' channels where the UNet also takes a concatenated image
    condition (in_channels = latent + condition channels); default in_channels.
    """
    c = config_defaults.diffusion_config(
        first_stage_kind=first_stage_kind,
        model_channels=int(fields["model_channels"]), channel_mult=tuple(fields["channel_mult"]),
        attention_resolutions=tuple(fields["attention_resolutions"]),
        num_heads=int(fields["num_heads"]), num_head_channels=int(fields["num_head_channels"]))
    for key, value in fields.items():
        if key not in c.model:
            raise ConversionError(f"internal: config.model has no field {key!r}")
        c.model[key] = tuple(value) if isinstance(value, list) else value
    for key, value in diffusion.items():
        c.diffusion[key] = value
    channels = int(fields["in_channels"]) if latent_channels is None else int(latent_channels)
    c.data.latent_shape = (latent_size, latent_size, channels)
    if fields.get("num_classes") and num_classes_conditioning:
        c.conditioning.kind = "class"
    return c


def autoencoder_config(fields: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """An autoencoder ConfigDict (config_defaults.autoencoder_config structure) for ``fields``."""
    c = config_defaults.autoencoder_config(
        kind=fields["kind"], ch_mult=tuple(fields["ch_mult"]), z_channels=int(fields["z_channels"]),
        embed_dim=int(fields["embed_dim"]), attn_resolutions=tuple(fields["attn_resolutions"]),
        n_embed=int(fields.get("n_embed", 0)), resolution=int(fields["resolution"]))
    for key, value in fields.items():
        if key not in c.model:
            raise ConversionError(f"internal: autoencoder config.model has no field {key!r}")
        c.model[key] = tuple(value) if isinstance(value, list) else value
    return c


def diffusion_from_scheduler(sched: Optional[Mapping[str, Any]]) -> dict:
    """ldm_jax `config.diffusion` values from a diffusers scheduler_config.json (or defaults)."""
    if sched is None:
        d = config_defaults.diffusion_config(first_stage_kind="kl", model_channels=32, channel_mult=(1,),
                                             attention_resolutions=(), num_heads=1).diffusion
        return {k: d[k] for k in ("timesteps", "beta_schedule", "linear_start", "linear_end",
                                  "parameterization")}
    if sched.get("trained_betas") is not None:
        raise ConversionError("scheduler_config.json: trained_betas (an explicit beta list) is "
                              "not supported; ldm_jax builds betas from beta_schedule.")
    kind = sched.get("beta_schedule", "linear")
    if kind not in DIFFUSERS_SCHEDULES:
        raise ConversionError(f"scheduler_config.json: beta_schedule={kind!r} is not supported "
                              f"(use one of {sorted(DIFFUSERS_SCHEDULES)}).")
    pred = sched.get("prediction_type", "epsilon")
    if pred not in DIFFUSERS_PREDICTION:
        raise ConversionError(f"scheduler_config.json: prediction_type={pred!r} is not supported "
                              f"(use one of {sorted(DIFFUSERS_PREDICTION)}).")
    return {"timesteps": int(sched.get("num_train_timesteps", 1000)),
            "beta_schedule": DIFFUSERS_SCHEDULES[kind],
            "linear_start": float(sched.get("beta_start", 0.0001)),
            "linear_end": float(sched.get("beta_end", 0.02)),
            "parameterization": DIFFUSERS_PREDICTION[pred]}


# What ldm_jax's DDIM does (the reference's timesteps, +1, and abar_0 at the last step), in
# diffusers' scheduler options and their defaults.
_DDIM_AS_REFERENCE = {"steps_offset": (1, 0), "set_alpha_to_one": (False, True),
                      "timestep_spacing": ("leading", "leading")}


def sampling_differences(sched: Optional[Mapping[str, Any]]) -> list:
    """The scheduler_config.json options whose values make diffusers' DDIM step differently from
    ldm_jax's (which follows the reference): ['steps_offset=0', ...]; [] when none do."""
    if not sched or sched.get("_class_name", "DDIMScheduler") != "DDIMScheduler":
        return []
    out = []
    for key, (want, default) in _DDIM_AS_REFERENCE.items():
        have = sched.get(key, default)
        if have != want:
            out.append(f"{key}={have!r}")
    return out


def scheduler_from_diffusion(d: Mapping[str, Any]) -> dict:
    """A diffusers DDIMScheduler config equivalent to ldm_jax's DDIM on ``config.diffusion``.

    timestep_spacing 'leading' + steps_offset 1 reproduce the reference's DDIM timesteps
    (uniform stride, +1); set_alpha_to_one False makes the last step land on abar_0.
    """
    inverse = {v: k for k, v in DIFFUSERS_SCHEDULES.items()}
    pred = {v: k for k, v in DIFFUSERS_PREDICTION.items()}
    if d["beta_schedule"] not in inverse:
        raise ConversionError(f"config.diffusion.beta_schedule={d['beta_schedule']!r} has no "
                              f"diffusers equivalent (supported: {sorted(inverse)}).")
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": int(d["timesteps"]),
            "beta_start": float(d["linear_start"]), "beta_end": float(d["linear_end"]),
            "beta_schedule": inverse[d["beta_schedule"]], "clip_sample": False,
            "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
            "prediction_type": pred[d["parameterization"]]}

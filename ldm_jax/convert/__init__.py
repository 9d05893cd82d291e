"""Weight converters: CompVis checkpoints and diffusers folders <-> ldm_jax (bundles, runs).

Library functions (flat torch-style state dicts of numpy arrays <-> flax params trees):

  unet_fields_from_diffusers(config)           diffusers UNet config -> config.model fields
  unet_params_from_diffusers(sd, fields)       diffusers UNet state dict -> flax params
  unet_params_to_diffusers(params, fields)     and back
  unet_params_from_compvis(sd, fields) / unet_params_to_compvis(params, fields)
  ae_fields_from_diffusers(config)             AutoencoderKL / VQModel config -> config.model
  ae_params_from_diffusers / ae_params_to_diffusers / ae_params_from_compvis / ae_params_to_compvis

File-level conversion (what `python -m ldm_jax.convert` runs) lives in
`ldm_jax.convert.compvis` (.ckpt + YAML) and `ldm_jax.convert.diffusers_io` (folders, export);
`ldm_jax.convert.text_io` converts condition encoders (CompVis BERTEmbedder / ClassEmbedder,
diffusers LDMBertModel / CLIPTextModel folders with their tokenizers) both ways;
`ldm_jax.convert.image_io` the image conditions (conditioning.kind='concat': CompVis
super-resolution, inpainting and semantic synthesis, diffusers' LDMSuperResolutionPipeline).
Unknown or missing keys and unrepresentable options raise `ConversionError` naming them.
"""

from __future__ import annotations

from typing import Dict, Mapping

import numpy as np

from ldm_jax.convert.common import ConversionError, from_flax, to_flax
from ldm_jax.convert.unet_map import (diffusers_config_from_model, model_fields_from_diffusers,
                                      unet_leaves)
from ldm_jax.convert.vae_map import (ae_diffusers_config_from_model, ae_fields_from_diffusers,
                                     ae_leaves)

__all__ = [
    "ConversionError", "unet_fields_from_diffusers", "unet_params_from_diffusers",
    "unet_params_to_diffusers", "unet_params_from_compvis", "unet_params_to_compvis",
    "unet_diffusers_config", "ae_fields_from_diffusers", "ae_params_from_diffusers",
    "ae_params_to_diffusers", "ae_params_from_compvis", "ae_params_to_compvis",
    "ae_diffusers_config",
]

unet_fields_from_diffusers = model_fields_from_diffusers
unet_diffusers_config = diffusers_config_from_model
ae_diffusers_config = ae_diffusers_config_from_model


def unet_params_from_diffusers(state_dict: Mapping[str, np.ndarray], fields: Mapping) -> dict:
    """diffusers UNet2DModel / UNet2DConditionModel state dict -> ldm_jax UNet params."""
    return to_flax(state_dict, unet_leaves(fields), "diffusers", "diffusers UNet")


def unet_params_to_diffusers(params: Mapping, fields: Mapping) -> Dict[str, np.ndarray]:
    """ldm_jax UNet params -> diffusers UNet state dict (float32 numpy)."""
    return from_flax(params, unet_leaves(fields), "diffusers", "ldm_jax UNet")


def unet_params_from_compvis(state_dict: Mapping[str, np.ndarray], fields: Mapping) -> dict:
    """CompVis openaimodel UNet state dict (keys without 'model.diffusion_model.') -> params."""
    return to_flax(state_dict, unet_leaves(fields), "compvis", "CompVis UNet")


def unet_params_to_compvis(params: Mapping, fields: Mapping) -> Dict[str, np.ndarray]:
    """ldm_jax UNet params -> CompVis UNet state dict (keys without the model prefix)."""
    return from_flax(params, unet_leaves(fields), "compvis", "ldm_jax UNet")


def ae_params_from_diffusers(state_dict: Mapping[str, np.ndarray], fields: Mapping) -> dict:
    """diffusers AutoencoderKL / VQModel state dict -> ldm_jax first-stage params."""
    return to_flax(state_dict, ae_leaves(fields), "diffusers", "diffusers autoencoder")


def ae_params_to_diffusers(params: Mapping, fields: Mapping) -> Dict[str, np.ndarray]:
    """ldm_jax first-stage params -> diffusers AutoencoderKL / VQModel state dict."""
    return from_flax(params, ae_leaves(fields), "diffusers", "ldm_jax autoencoder")


def ae_params_from_compvis(state_dict: Mapping[str, np.ndarray], fields: Mapping) -> dict:
    """CompVis autoencoder state dict (encoder.*, decoder.*, quant_conv, ...) -> params."""
    return to_flax(state_dict, ae_leaves(fields), "compvis", "CompVis autoencoder")


def ae_params_to_compvis(params: Mapping, fields: Mapping) -> Dict[str, np.ndarray]:
    """ldm_jax first-stage params -> CompVis autoencoder state dict."""
    return from_flax(params, ae_leaves(fields), "compvis", "ldm_jax autoencoder")

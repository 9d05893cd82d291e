"""A frozen CLIP text transformer (transformers ``CLIPTextModel``; Stable Diffusion's text_encoder).

    token embedding + position embedding
    depth x [ x + SelfAttention(LayerNorm(x), causal) ;  x + fc2(act(fc1(LayerNorm(x)))) ]
    final LayerNorm -> last_hidden_state [B, L, width]

q/k/v/out projections all have biases; the attention is causal (each token sees itself and the
tokens before it) with scale dim_head**-0.5; act is config.hidden_act (quick_gelu for SD-1.x's
ViT-L/14 text tower, gelu for SD-2's OpenCLIP one). Like the SD pipelines, no padding mask is
applied (the causal mask already keeps real tokens from seeing the padding after them).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from ldm_jax.convert.common import ConversionError, from_flax, leaf, to_flax
from ldm_jax.conditioning.ldm_bert import (SelfAttention, activation, check_params_match,
                                           check_sequence_length, embedding_init, layer_count,
                                           read_transformers_folder, torch_layer_norm)
from ldm_jax.models.attention import torch_default_init

Dtype = Any

__all__ = ["CLIPTextTransformer", "clip_text_params_from_transformers",
           "clip_text_params_to_transformers", "clip_text_from_config", "load_clip_text"]

_PREFIX = "text_model."  # transformers 4 (and every SD text_encoder file); transformers 5 has none
_BUFFERS = ("embeddings.position_ids",)  # non-parameter buffers older files carry


class CLIPEncoderLayer(nn.Module):
    width: int
    heads: int
    ff_dim: int
    eps: float
    hidden_act: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = torch_layer_norm(x, "layer_norm1", self.eps)
        x = x + SelfAttention(self.heads, self.width // self.heads, self.width, qkv_bias=True,
                              names=("q_proj", "k_proj", "v_proj", "out_proj"),
                              dtype=self.dtype, name="self_attn")(h, causal=True)
        h = torch_layer_norm(x, "layer_norm2", self.eps)
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32,
                                         kernel_init=torch_default_init, name=name)
        h = dense(self.width, "fc2")(activation(self.hidden_act)(dense(self.ff_dim, "fc1")(h)))
        return x + h


class CLIPTextTransformer(nn.Module):
    """tokens [B, L] int32 (L <= max_length) -> last_hidden_state [B, L, width] float32."""

    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    depth: int = 12
    heads: int = 12
    ff_dim: int = 3072
    eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        del train  # frozen, and CLIP's text tower has no dropout at inference
        check_sequence_length(tokens, self.max_length, "CLIPTextTransformer")
        if self.width % self.heads:
            raise ValueError(f"CLIP width {self.width} is not divisible by heads {self.heads}")
        embed = lambda n, name: nn.Embed(n, self.width, embedding_init=embedding_init,
                                         param_dtype=jnp.float32, name=name)
        x = embed(self.vocab_size, "token_embedding")(tokens)
        x = x + embed(self.max_length, "position_embedding")(jnp.arange(tokens.shape[1]))[None]
        x = x.astype(self.dtype)
        for i in range(self.depth):
            x = CLIPEncoderLayer(self.width, self.heads, self.ff_dim, self.eps, self.hidden_act,
                                 dtype=self.dtype, name=f"layers_{i}")(x)
        return torch_layer_norm(x, "final_layer_norm", self.eps).astype(jnp.float32)


def _leaves(depth: int):
    def lf(ldm, kind, key):  # one layout: the same key on both sides
        return leaf(ldm, kind, key, key)

    out = [lf("token_embedding", "embed", "embeddings.token_embedding"),
           lf("position_embedding", "embed", "embeddings.position_embedding")]
    for i in range(depth):
        p, k = f"layers_{i}", f"encoder.layers.{i}"
        out += [lf(f"{p}/layer_norm1", "norm", f"{k}.layer_norm1"),
                lf(f"{p}/layer_norm2", "norm", f"{k}.layer_norm2"),
                lf(f"{p}/fc1", "dense", f"{k}.mlp.fc1"),
                lf(f"{p}/fc2", "dense", f"{k}.mlp.fc2")]
        out += [lf(f"{p}/self_attn/{n}", "dense", f"{k}.self_attn.{n}")
                for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
    out.append(lf("final_layer_norm", "norm", "final_layer_norm"))
    return out


def clip_text_params_from_transformers(sd: Mapping[str, np.ndarray]) -> Dict:
    """Params from a CLIPTextModel state dict, keys with or without the 'text_model.' prefix."""
    sd = {k[len(_PREFIX):] if k.startswith(_PREFIX) else k: v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if k not in _BUFFERS}
    depth = layer_count(sd, "encoder.layers.", "CLIP text encoder", "CLIPTextModel")
    return to_flax(sd, _leaves(depth), "diffusers", "CLIP text encoder")


def clip_text_params_to_transformers(params: Mapping,
                                     prefix: str = _PREFIX) -> Dict[str, np.ndarray]:
    """A CLIPTextModel state dict; `prefix` 'text_model.' (the layout of SD text_encoder files,
    read by transformers 4 and 5) or '' (transformers 5's own state_dict)."""
    depth = sum(1 for k in params if k.startswith("layers_"))
    sd = from_flax(params, _leaves(depth), "diffusers", "CLIP text encoder")
    return {prefix + k: v for k, v in sd.items()}


def clip_text_from_config(config: Mapping[str, Any], dtype: Dtype = jnp.float32):
    """The module for a CLIPTextConfig dict (a full CLIPConfig's text_config is used)."""
    config = config.get("text_config", config)
    try:
        return CLIPTextTransformer(
            vocab_size=int(config["vocab_size"]), max_length=int(config["max_position_embeddings"]),
            width=int(config["hidden_size"]), depth=int(config["num_hidden_layers"]),
            heads=int(config["num_attention_heads"]), ff_dim=int(config["intermediate_size"]),
            eps=float(config.get("layer_norm_eps", 1e-5)),
            hidden_act=str(config.get("hidden_act", "quick_gelu")), dtype=dtype)
    except KeyError as e:
        raise ConversionError(f"CLIP text config lacks {e}; expected a CLIPTextConfig") from None


def load_clip_text(directory: str, dtype: Dtype = jnp.float32):
    """(module, params) of a diffusers/transformers `text_encoder/` folder (config.json +
    model.safetensors); params float32 numpy arrays, checked against the config's shapes."""
    config, sd = read_transformers_folder(directory, "CLIP text encoder")
    module = clip_text_from_config(config, dtype)
    activation(module.hidden_act)  # an unsupported activation fails here, naming it
    params = clip_text_params_from_transformers(sd)
    check_params_match(module, params, module.max_length, f"CLIP text encoder '{directory}'")
    return module, params

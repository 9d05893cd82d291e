"""A frozen transformers ``BertModel`` as a text encoder (e.g. the shipped MiniLM-L6, 384 wide).

    LayerNorm(word + position + token_type[0] embeddings)
    depth x post-LN [ x = LN(x + Attention(x, mask)) ;  x = LN(x + out(act(intermediate(x)))) ]
    -> last_hidden_state [B, L, width]   (the pooler is not used)

The attention ignores padding keys: the mask is tokens != pad_id, as the attention_mask a
transformers tokenizer returns (transformers adds a large negative to masked scores; masking to
exactly zero weight is the same result). Padding positions still get outputs, computed from the
real tokens, exactly as in transformers.
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

__all__ = ["BertEncoder", "hf_bert_params_from_transformers", "hf_bert_params_to_transformers",
           "bert_encoder_from_config", "load_hf_bert"]

# Keys that are not encoder parameters: buffers, the pooler (unused for per-token context).
_IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids", "pooler.")


class BertLayer(nn.Module):
    width: int
    heads: int
    ff_dim: int
    eps: float
    hidden_act: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        attn = SelfAttention(self.heads, self.width // self.heads, self.width, qkv_bias=True,
                             names=("query", "key", "value", "output"), dtype=self.dtype,
                             name="attention")(x, mask=mask)
        x = torch_layer_norm(x + attn, "attention_norm", self.eps)
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32,
                                         kernel_init=torch_default_init, name=name)
        h = activation(self.hidden_act)(dense(self.ff_dim, "intermediate")(x))
        return torch_layer_norm(x + dense(self.width, "output")(h), "output_norm", self.eps)


class BertEncoder(nn.Module):
    """tokens [B, L] int32 (L <= max_positions) -> last_hidden_state [B, L, width] float32.
    Defaults: MiniLM-L6-H384-uncased."""

    vocab_size: int = 30522
    max_positions: int = 512
    width: int = 384
    depth: int = 6
    heads: int = 12
    ff_dim: int = 1536
    eps: float = 1e-12
    hidden_act: str = "gelu"
    type_vocab_size: int = 2
    pad_id: int = 0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        del train  # frozen: no dropout
        check_sequence_length(tokens, self.max_positions, "BertEncoder")
        if self.width % self.heads:
            raise ValueError(f"BERT width {self.width} is not divisible by heads {self.heads}")
        embed = lambda n, name: nn.Embed(n, self.width, embedding_init=embedding_init,
                                         param_dtype=jnp.float32, name=name)
        x = embed(self.vocab_size, "word_embeddings")(tokens)
        x = x + embed(self.type_vocab_size, "token_type_embeddings")(jnp.zeros((), jnp.int32))
        x = x + embed(self.max_positions, "position_embeddings")(jnp.arange(tokens.shape[1]))[None]
        x = torch_layer_norm(x, "embeddings_norm", self.eps).astype(self.dtype)
        mask = (tokens != self.pad_id)[:, None, None, :]  # [B, heads, queries, keys]
        for i in range(self.depth):
            x = BertLayer(self.width, self.heads, self.ff_dim, self.eps, self.hidden_act,
                          dtype=self.dtype, name=f"layers_{i}")(x, mask)
        return x.astype(jnp.float32)


def _leaves(depth: int):
    def lf(ldm, kind, key):  # one layout: the same key on both sides
        return leaf(ldm, kind, key, key)

    out = [lf("word_embeddings", "embed", "embeddings.word_embeddings"),
           lf("position_embeddings", "embed", "embeddings.position_embeddings"),
           lf("token_type_embeddings", "embed", "embeddings.token_type_embeddings"),
           lf("embeddings_norm", "norm", "embeddings.LayerNorm")]
    for i in range(depth):
        p, k = f"layers_{i}", f"encoder.layer.{i}"
        out += [lf(f"{p}/attention/{n}", "dense", f"{k}.attention.self.{n}")
                for n in ("query", "key", "value")]
        out += [lf(f"{p}/attention/output", "dense", f"{k}.attention.output.dense"),
                lf(f"{p}/attention_norm", "norm", f"{k}.attention.output.LayerNorm"),
                lf(f"{p}/intermediate", "dense", f"{k}.intermediate.dense"),
                lf(f"{p}/output", "dense", f"{k}.output.dense"),
                lf(f"{p}/output_norm", "norm", f"{k}.output.LayerNorm")]
    return out


def _encoder_keys(sd: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The BertModel's own keys: a task model's 'bert.' prefix stripped (its heads, e.g. 'cls.',
    dropped), buffers and the pooler dropped."""
    if any(k.startswith("bert.") for k in sd):
        sd = {k[len("bert."):]: v for k, v in sd.items() if k.startswith("bert.")}
    return {k: v for k, v in sd.items() if not k.startswith(_IGNORED)}


def hf_bert_params_from_transformers(sd: Mapping[str, np.ndarray]) -> Dict:
    """Params from a BertModel state dict (keys with or without 'bert.')."""
    sd = _encoder_keys(sd)
    depth = layer_count(sd, "encoder.layer.", "BERT encoder", "BertModel")
    return to_flax(sd, _leaves(depth), "diffusers", "BERT encoder")


def hf_bert_params_to_transformers(params: Mapping) -> Dict[str, np.ndarray]:
    """A BertModel state dict without the pooler (load it with strict=False)."""
    depth = sum(1 for k in params if k.startswith("layers_"))
    return from_flax(params, _leaves(depth), "diffusers", "BERT encoder")


def bert_encoder_from_config(config: Mapping[str, Any], dtype: Dtype = jnp.float32) -> BertEncoder:
    """The module for a BertConfig dict."""
    kind = config.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ConversionError(f"BERT position_embedding_type {kind!r} is not supported "
                              "(only 'absolute')")
    try:
        return BertEncoder(
            vocab_size=int(config["vocab_size"]),
            max_positions=int(config["max_position_embeddings"]),
            width=int(config["hidden_size"]), depth=int(config["num_hidden_layers"]),
            heads=int(config["num_attention_heads"]), ff_dim=int(config["intermediate_size"]),
            eps=float(config.get("layer_norm_eps", 1e-12)),
            hidden_act=str(config.get("hidden_act", "gelu")),
            type_vocab_size=int(config.get("type_vocab_size", 2)),
            pad_id=int(config.get("pad_token_id", 0) or 0), dtype=dtype)
    except KeyError as e:
        raise ConversionError(f"BERT config lacks {e}; expected a BertConfig") from None


def load_hf_bert(directory: str, dtype: Dtype = jnp.float32):
    """(module, params) of a transformers BERT folder (config.json + model.safetensors, keys
    with or without 'bert.'); params float32 numpy arrays, checked against the config."""
    config, sd = read_transformers_folder(directory, "BERT encoder")
    module = bert_encoder_from_config(config, dtype)
    activation(module.hidden_act)  # an unsupported activation fails here, naming it
    params = hf_bert_params_from_transformers(sd)
    check_params_match(module, params, 8, f"BERT encoder '{directory}'")
    return module, params

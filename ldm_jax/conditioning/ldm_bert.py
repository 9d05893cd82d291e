"""The paper's text encoder tau_theta ("LDM-BERT"), trained jointly with the UNet from scratch.

Structure of the CompVis ``BERTEmbedder`` (ldm/modules/encoders/modules.py), i.e. an x-transformers
``TransformerWrapper(num_tokens, max_seq_len=77, attn_layers=Encoder(dim=width, depth))``:

    token embedding + learned absolute position embedding (both N(0, 0.02), no scaling)
    depth x [ x + Attention(LayerNorm(x)) ;  x + FeedForward(LayerNorm(x)) ]     (pre-LN)
    final LayerNorm -> [B, L, width]

Attention: to_q/to_k/to_v without bias, inner width heads * dim_head (8 x 64 by default, which
need not equal the model width), softmax(q k^T / sqrt(dim_head)), to_out with bias. No attention
mask: the reference attends to padding tokens too, and so does this module. FeedForward:
Linear(width, ff_mult * width) -> exact (erf) GELU -> Linear back. All LayerNorms use eps 1e-5
(torch's default). diffusers' ``LDMBertModel`` is the same network under other names.

Weights convert both ways with the two reference layouts (`ldm_bert_params_from_compvis` /
`..._from_diffusers` and their inverses). Both references also carry an LM head (``to_logits``)
that the LDM never uses; it is not part of these params (it would cost vocab x width optimizer
state for nothing), is dropped on import and written on export (zeros unless given).

The end of this file holds the pieces the other text encoders (clip_text.py, hf_bert.py) share:
a torch-exact LayerNorm, multi-head self-attention, activations, and the folder/shape checks.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from ldm_jax.convert.common import ConversionError, from_flax, leaf, to_flax
from ldm_jax.models.attention import torch_default_init
from ldm_jax.models.remat import check_remat, remat_block
from ldm_jax.storage.weights_io import MissingWeightsError, load_safetensors

Dtype = Any

__all__ = ["LDMBert", "ldm_bert_params_from_diffusers", "ldm_bert_params_to_diffusers",
           "ldm_bert_params_from_compvis", "ldm_bert_params_to_compvis",
           "ldm_bert_diffusers_config", "ldm_bert_from_fields", "LDM_BERT_FIELDS"]

# x-transformers / CompVis embedding init (TransformerWrapper.init_, AbsolutePositionalEmbedding).
embedding_init = nn.initializers.normal(stddev=0.02)


# ================================================================================================
# shared layers (also used by clip_text.py and hf_bert.py)
# ================================================================================================

def torch_layer_norm(x: jax.Array, name: str, epsilon: float) -> jax.Array:
    """torch.nn.LayerNorm computed in (at least) float32 with the two-pass variance, as torch,
    cast back to x's dtype. Must be called inside a compact method (child named `name`)."""
    compute = jnp.promote_types(x.dtype, jnp.float32)
    y = nn.LayerNorm(epsilon=epsilon, dtype=compute, param_dtype=jnp.float32,
                     use_fast_variance=False, name=name)(x.astype(compute))
    return y.astype(x.dtype)


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names -> functions. 'gelu' is the exact (erf) GELU.
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": _quick_gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ConversionError(f"hidden_act {name!r} is not supported; expected one of "
                              f"{', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class SelfAttention(nn.Module):
    """Multi-head self-attention: q/k/v Dense (width -> heads*dim_head), softmax(q k^T /
    sqrt(dim_head)) v, output Dense (-> out_features, with bias). `names` are the four Dense
    children's names (each reference model's own, so the converters read naturally)."""

    heads: int
    dim_head: int
    out_features: int
    qkv_bias: bool
    names: Tuple[str, str, str, str] = ("to_q", "to_k", "to_v", "to_out")
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None,
                 causal: bool = False) -> jax.Array:
        """x [B, L, C]; mask: optional bool, broadcastable to [B, heads, L, L], True = attend."""
        b, n, _ = x.shape
        inner = self.heads * self.dim_head

        def proj(name, bias):
            return nn.Dense(inner, use_bias=bias, dtype=self.dtype, param_dtype=jnp.float32,
                            kernel_init=torch_default_init, name=name)(x)

        q, k, v = (proj(nm, self.qkv_bias).reshape(b, n, self.heads, self.dim_head)
                   for nm in self.names[:3])
        # Softmax in float32 whatever the compute dtype (jax.nn.dot_product_attention does so).
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
        return nn.Dense(self.out_features, dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=torch_default_init, name=self.names[3])(
                            out.reshape(b, n, inner))


def check_sequence_length(tokens: jax.Array, max_length: int, what: str) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"{what} takes tokens [batch, length], got shape {tokens.shape}")
    if tokens.shape[1] > max_length:
        raise ValueError(f"{what}: {tokens.shape[1]} tokens exceed its {max_length} positions; "
                         "tokenize with max_length <= the encoder's")


def check_params_match(module: nn.Module, params: Mapping, length: int, what: str) -> None:
    """Raise ConversionError when `params` does not have exactly the shapes `module` creates
    (a checkpoint that does not match its config fails here, not deep inside apply)."""
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    expected = jax.eval_shape(module.init, jax.random.PRNGKey(0), tokens)["params"]
    flat_e = {"/".join(map(str, p)): tuple(v.shape)
              for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    flat_g = {"/".join(map(str, p)): tuple(np.shape(v))
              for p, v in jax.tree_util.tree_leaves_with_path(params)}
    bad = [f"{k}: {flat_g.get(k)} vs config {v}" for k, v in flat_e.items() if flat_g.get(k) != v]
    bad += [f"{k}: not in the model" for k in flat_g if k not in flat_e]
    if bad:
        raise ConversionError(f"{what}: the weights do not match the config ({len(bad)} "
                              f"params differ, e.g. {'; '.join(bad[:4])})")


def layer_count(sd: Mapping[str, np.ndarray], prefix: str, what: str, model: str) -> int:
    """Number of transformer layers in a transformers state dict whose layer keys read
    `<prefix><i>.`; ConversionError when there are none or the indices have gaps."""
    layers = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    if not layers or layers != set(range(len(layers))):
        raise ConversionError(f"{what}: no (or non-contiguous) {prefix}{{i}} keys; the state dict "
                              f"does not hold a {model} (first keys: {sorted(sd)[:5]})")
    return len(layers)


def read_transformers_folder(directory: str, what: str) -> Tuple[Dict, Dict[str, np.ndarray]]:
    """(config.json as a dict, the weights) of a transformers model folder (model.safetensors,
    else pytorch_model.bin). MissingWeightsError names the missing file."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise MissingWeightsError(f"{what}: '{config_path}' does not exist; point the path at a "
                                  "transformers model folder (config.json + model.safetensors)")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            if name.endswith(".bin"):
                from ldm_jax.storage.weights_io import load_torch_state_dict
                return config, load_torch_state_dict(path)
            return config, load_safetensors(path)
    raise MissingWeightsError(f"{what}: '{os.path.join(directory, 'model.safetensors')}' does "
                              "not exist; save the model with save_pretrained(safe_serialization"
                              "=True) or copy its weights there")


# ================================================================================================
# the model
# ================================================================================================

class LDMBertLayer(nn.Module):
    width: int
    heads: int
    dim_head: int
    ff_mult: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = torch_layer_norm(x, "attn_norm", 1e-5)
        x = x + SelfAttention(self.heads, self.dim_head, self.width, qkv_bias=False,
                              dtype=self.dtype, name="attn")(h)
        h = torch_layer_norm(x, "ff_norm", 1e-5)
        h = nn.Dense(self.width * self.ff_mult, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=torch_default_init, name="ff_in")(h)
        h = ACTIVATIONS["gelu"](h)
        h = nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=torch_default_init, name="ff_out")(h)
        return x + h


class LDMBert(nn.Module):
    """tokens [B, L] int32 (L <= max_length) -> context [B, L, width] float32.

    Defaults of the CompVis BERTEmbedder (x-transformers): 8 heads of 64, ff_mult 4; the
    paper's text-to-image model uses width 1280, depth 32. Params are float32; `dtype` is the
    compute dtype (LayerNorms and the softmax stay float32). `train` is accepted for a uniform
    encoder interface: the reference uses no dropout in this network.
    """

    vocab_size: int
    max_length: int = 77
    width: int = 1280
    depth: int = 32
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    # Layout tokens only (ldm_jax.conditioning.layout): with coord_frequencies F > 0, a token
    # that names a corner cell (ids coord_offset .. coord_offset + coord_grid**2 - 1) also gets
    # a learned projection (`coord_emb`) of F-frequency Fourier features of its (x, y), so that
    # nearby cells start out alike instead of as unrelated ids. Not in the reference BERTEmbedder.
    coord_offset: int = 0
    coord_grid: int = 0
    coord_frequencies: int = 0
    # Per-layer rematerialisation (ldm_jax/models/remat.py); the stage-2 task sets it to
    # config.model.remat, since this network is trained jointly with the UNet and its stored
    # activations count in the same step. Parameter names do not depend on it.
    remat: str = "nothing"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        del train
        check_sequence_length(tokens, self.max_length, "LDMBert")
        x = nn.Embed(self.vocab_size, self.width, embedding_init=embedding_init,
                     param_dtype=jnp.float32, name="token_emb")(tokens)
        if self.coord_frequencies:
            from ldm_jax.models.attention import fourier_features
            cell = tokens - self.coord_offset
            is_corner = (cell >= 0) & (cell < self.coord_grid * self.coord_grid)
            cell = jnp.clip(cell, 0, self.coord_grid * self.coord_grid - 1)
            scale = 1.0 / (self.coord_grid - 1)
            xy = jnp.stack([(cell % self.coord_grid) * scale, (cell // self.coord_grid) * scale],
                           axis=-1).astype(jnp.float32)
            coord = nn.Dense(self.width, param_dtype=jnp.float32, name="coord_emb")(
                fourier_features(xy, self.coord_frequencies))
            x = x + jnp.where(is_corner[..., None], coord, 0.0)
        positions = nn.Embed(self.max_length, self.width, embedding_init=embedding_init,
                             param_dtype=jnp.float32, name="pos_emb")(
                                 jnp.arange(tokens.shape[1]))
        x = (x + positions[None]).astype(self.dtype)
        layer = remat_block(LDMBertLayer, check_remat(self.remat, "LDMBert.remat"))
        for i in range(self.depth):
            x = layer(self.width, self.heads, self.dim_head, self.ff_mult, dtype=self.dtype,
                      name=f"layers_{i}")(x)
        return torch_layer_norm(x, "norm", 1e-5).astype(jnp.float32)


LDM_BERT_FIELDS = ("vocab_size", "max_length", "width", "depth", "heads", "dim_head", "ff_mult")


# ================================================================================================
# conversion (flat numpy state dicts <-> params)
# ================================================================================================

_CV = "transformer"          # BERTEmbedder.state_dict(): every key under .transformer
_CV_PREFIX = "cond_stage_model."  # ... and under this in a whole LDM checkpoint
_LOGITS = {"compvis": "transformer.to_logits", "diffusers": "to_logits"}


def _leaves(depth: int):
    out = [leaf("token_emb", "embed", f"{_CV}.token_emb", "model.embed_tokens"),
           leaf("pos_emb", "embed", f"{_CV}.pos_emb.emb", "model.embed_positions")]
    for i in range(depth):
        # x-transformers interleaves the blocks: layers[2i] = (norm, attention, residual),
        # layers[2i + 1] = (norm, feedforward, residual); FeedForward.net = [Sequential(Linear,
        # GELU), Dropout, Linear].
        a, f, d, m = f"layers_{i}", f"{_CV}.attn_layers.layers", f"model.layers.{i}", "dense"
        out += [leaf(f"{a}/attn_norm", "norm", f"{f}.{2 * i}.0", f"{d}.self_attn_layer_norm"),
                leaf(f"{a}/attn/to_q", m, f"{f}.{2 * i}.1.to_q", f"{d}.self_attn.q_proj",
                     bias=False),
                leaf(f"{a}/attn/to_k", m, f"{f}.{2 * i}.1.to_k", f"{d}.self_attn.k_proj",
                     bias=False),
                leaf(f"{a}/attn/to_v", m, f"{f}.{2 * i}.1.to_v", f"{d}.self_attn.v_proj",
                     bias=False),
                leaf(f"{a}/attn/to_out", m, f"{f}.{2 * i}.1.to_out", f"{d}.self_attn.out_proj"),
                leaf(f"{a}/ff_norm", "norm", f"{f}.{2 * i + 1}.0", f"{d}.final_layer_norm"),
                leaf(f"{a}/ff_in", m, f"{f}.{2 * i + 1}.1.net.0.0", f"{d}.fc1"),
                leaf(f"{a}/ff_out", m, f"{f}.{2 * i + 1}.1.net.2", f"{d}.fc2")]
    out.append(leaf("norm", "norm", f"{_CV}.norm", "model.layer_norm"))
    return out


def _infer_fields(sd: Mapping[str, np.ndarray], layout: str, heads: int) -> Dict[str, int]:
    if layout == "compvis":
        names = dict(tok=f"{_CV}.token_emb.weight", pos=f"{_CV}.pos_emb.emb.weight",
                     q=f"{_CV}.attn_layers.layers.0.1.to_q.weight",
                     ff=f"{_CV}.attn_layers.layers.1.1.net.0.0.weight")
        pattern, per_layer = re.compile(rf"{_CV}\.attn_layers\.layers\.(\d+)\."), 2
    else:
        names = dict(tok="model.embed_tokens.weight", pos="model.embed_positions.weight",
                     q="model.layers.0.self_attn.q_proj.weight", ff="model.layers.0.fc1.weight")
        pattern, per_layer = re.compile(r"model\.layers\.(\d+)\."), 1
    missing = [k for k in names.values() if k not in sd]
    if missing:
        sample = sorted(sd)[:5]
        raise ConversionError(f"LDM-BERT ({layout} layout): missing keys {missing}; the state "
                              f"dict does not hold this model (its first keys: {sample})")
    vocab_size, width = np.shape(sd[names["tok"]])
    inner = np.shape(sd[names["q"]])[0]
    ff = np.shape(sd[names["ff"]])[0]
    blocks = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    if heads <= 0 or inner % heads:
        raise ConversionError(f"LDM-BERT: attention width {inner} is not divisible by heads="
                              f"{heads}; pass the heads the model was trained with")
    if ff % width:
        raise ConversionError(f"LDM-BERT: feed-forward width {ff} is not a multiple of the "
                              f"model width {width}")
    if len(blocks) % per_layer:
        raise ConversionError(f"LDM-BERT ({layout}): {len(blocks)} attention-layer blocks, "
                              "expected an attention and a feed-forward block per layer")
    return dict(vocab_size=int(vocab_size), max_length=int(np.shape(sd[names["pos"]])[0]),
                width=int(width), depth=len(blocks) // per_layer, heads=int(heads),
                dim_head=int(inner // heads), ff_mult=int(ff // width))


def _check_fields(fields: Mapping[str, int]) -> Dict[str, int]:
    missing = [k for k in LDM_BERT_FIELDS if k not in fields]
    if missing:
        raise ConversionError(f"LDM-BERT fields lack {missing}; expected {LDM_BERT_FIELDS}")
    return {k: int(fields[k]) for k in LDM_BERT_FIELDS}


def _from_layout(sd: Mapping[str, np.ndarray], layout: str, heads: int):
    fields = _infer_fields(sd, layout, heads)
    sd = {k: v for k, v in sd.items() if not k.startswith(_LOGITS[layout] + ".")}
    params = to_flax(sd, _leaves(fields["depth"]), layout, f"LDM-BERT ({layout})")
    return params, fields


def _to_layout(params: Mapping, fields: Mapping[str, int], layout: str,
               to_logits: Optional[Tuple[np.ndarray, np.ndarray]]) -> Dict[str, np.ndarray]:
    fields = _check_fields(fields)
    if "coord_emb" in params:
        raise ConversionError("this layout encoder was trained with "
                              "conditioning.layout_coord_frequencies > 0: its corner-coordinate "
                              "features (`coord_emb`) have no counterpart in the CompVis / "
                              "diffusers BERT, so it cannot be exported to them.")
    sd = from_flax(params, _leaves(fields["depth"]), layout, f"LDM-BERT ({layout})")
    v, w = fields["vocab_size"], fields["width"]
    if to_logits is None:
        to_logits = (np.zeros((v, w), np.float32), np.zeros((v,), np.float32))
    weight, bias = (np.asarray(a, np.float32) for a in to_logits)
    if weight.shape != (v, w) or bias.shape != (v,):
        raise ConversionError(f"to_logits must be ([{v}, {w}], [{v}]), got {weight.shape}, "
                              f"{bias.shape}")
    sd[_LOGITS[layout] + ".weight"], sd[_LOGITS[layout] + ".bias"] = weight, bias
    return sd


def ldm_bert_params_from_diffusers(sd: Mapping[str, np.ndarray], *, heads: int = 8):
    """(params, fields) from a diffusers LDMBertModel state dict (model.*, to_logits.*).
    `heads` cannot be read from shapes: LDMBertConfig.encoder_attention_heads (default 8)."""
    return _from_layout(sd, "diffusers", heads)


def ldm_bert_params_to_diffusers(params: Mapping, fields: Mapping[str, int], *,
                                 to_logits=None) -> Dict[str, np.ndarray]:
    """A diffusers LDMBertModel state dict (strict-loadable); to_logits = (weight [V, W],
    bias [V]) of the unused LM head, zeros when None."""
    return _to_layout(params, fields, "diffusers", to_logits)


def ldm_bert_params_from_compvis(sd: Mapping[str, np.ndarray], *, heads: int = 8):
    """(params, fields) from a CompVis BERTEmbedder state dict: keys 'transformer.*' (also
    accepted: with the LDM checkpoint's 'cond_stage_model.' prefix, or the bare
    TransformerWrapper's 'token_emb.weight', ...). `heads`: the Encoder's heads (default 8)."""
    sd = {k[len(_CV_PREFIX):] if k.startswith(_CV_PREFIX) else k: v for k, v in sd.items()}
    if "token_emb.weight" in sd:
        sd = {f"{_CV}.{k}": v for k, v in sd.items()}
    return _from_layout(sd, "compvis", heads)


def ldm_bert_params_to_compvis(params: Mapping, fields: Mapping[str, int], *,
                               to_logits=None) -> Dict[str, np.ndarray]:
    """A CompVis BERTEmbedder state dict ('transformer.*'; prefix 'cond_stage_model.' for a
    whole LDM checkpoint). to_logits as in `ldm_bert_params_to_diffusers`."""
    return _to_layout(params, fields, "compvis", to_logits)


def ldm_bert_diffusers_config(fields: Mapping[str, int]) -> Dict[str, Any]:
    """LDMBertConfig keyword arguments for these fields (eval: no dropout)."""
    f = _check_fields(fields)
    return dict(vocab_size=f["vocab_size"], max_position_embeddings=f["max_length"],
                d_model=f["width"], encoder_layers=f["depth"],
                encoder_attention_heads=f["heads"], head_dim=f["dim_head"],
                encoder_ffn_dim=f["width"] * f["ff_mult"], activation_function="gelu",
                dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def ldm_bert_from_fields(fields: Mapping[str, int], dtype: Dtype = jnp.float32) -> LDMBert:
    """The module for converted fields."""
    return LDMBert(**_check_fields(fields), dtype=dtype)

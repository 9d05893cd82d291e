"""Fused attention for XLA:CPU: `cpu_attention.cc` (forward and backward) behind a custom_vjp.

The same recurrence and residuals as `ldm_jax.models.chunked_attention` (q, k, v, the output
and the per-row log-sum-exp; the backward pass recomputes the probabilities), but each block of
queries goes from scores through softmax to the next matmul while its rows are in cache, where
XLA:CPU makes separate passes over the score matrix in memory. No score matrix exists outside
the kernel's per-thread blocks, so no query or group chunking is needed at any size.

Float32 inside: other input dtypes are cast to float32 for the call and the results cast back.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.kernels import build

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_attention.cc")
_FORWARD, _BACKWARD = "ldm_jax_attention_forward", "ldm_jax_attention_backward"
_FORWARD_PACKED = "ldm_jax_attention_forward_packed"
_BACKWARD_PACKED = "ldm_jax_attention_backward_packed"


_TARGETS = {_FORWARD: "LdmAttentionForward", _BACKWARD: "LdmAttentionBackward",
            _FORWARD_PACKED: "LdmAttentionForwardPacked",
            _BACKWARD_PACKED: "LdmAttentionBackwardPacked"}


def ensure_registered() -> None:
    """Build (first use on a machine) and register the kernels with XLA:CPU; raises
    `build.KernelBuildError` with the reason when that is not possible."""
    build.register_targets(_SOURCE, _TARGETS)


def available() -> bool:
    """Whether the fused CPU kernel can be used in this process (builds it if needed)."""
    return build.available(_SOURCE, _TARGETS)


def _forward_call(q, k, v, scale):
    *lead, lq, heads, _ = q.shape
    out = (jax.ShapeDtypeStruct((*lead, lq, heads, v.shape[-1]), jnp.float32),
           jax.ShapeDtypeStruct((*lead, heads, lq), jnp.float32))
    return jax.ffi.ffi_call(_FORWARD, out, vmap_method="broadcast_all")(
        q, k, v, scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(q, k, v, scale):
    return _forward_call(q, k, v, scale)[0]


def _fused_fwd(q, k, v, scale):
    o, lse = _forward_call(q, k, v, scale)
    return o, (q, k, v, o, lse)


def _fused_bwd(scale, residuals, do):
    q, k, v, o, lse = residuals
    out = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    return jax.ffi.ffi_call(_BACKWARD, out, vmap_method="broadcast_all")(
        q, k, v, o, lse, do.astype(jnp.float32), scale=np.float32(scale))


_fused.defvjp(_fused_fwd, _fused_bwd)


def cpu_fused_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        scale: Optional[float] = None) -> jax.Array:
    """softmax(scale q k^T) v for q [B, Lq, heads, d], k [B, Lk, heads, d], v [B, Lk, heads,
    dv] -> [B, Lq, heads, dv] in q's dtype (the layout and result of
    `jax.nn.dot_product_attention`); scale defaults to 1 / sqrt(d). The kernel reads and writes
    this layout directly, so no transposes surround it."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("cpu_fused_attention takes [batch, length, heads, width] q, k, v; got "
                         f"shapes {q.shape}, {k.shape}, {v.shape}")
    ensure_registered()
    scale = float(q.shape[-1]) ** -0.5 if scale is None else float(scale)
    f32 = jnp.float32
    return _fused(q.astype(f32), k.astype(f32), v.astype(f32), scale).astype(q.dtype)


# Self-attention straight from a packed projection [B, L, heads, 3 * d] (per head q, k, v: the
# reference AttentionBlock's qkv layout): the kernel reads q, k and v in place and its
# backward pass writes one packed gradient, so no slices of the projection are copied out and
# no concatenation of three gradients is made (about 20 ms per 32x32 layer at batch 4).

def _packed_forward_call(qkv, scale):
    *lead, length, heads, width = qkv.shape
    out = (jax.ShapeDtypeStruct((*lead, length, heads, width // 3), jnp.float32),
           jax.ShapeDtypeStruct((*lead, heads, length), jnp.float32))
    return jax.ffi.ffi_call(_FORWARD_PACKED, out, vmap_method="broadcast_all")(
        qkv, scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _packed(qkv, scale):
    return _packed_forward_call(qkv, scale)[0]


def _packed_fwd(qkv, scale):
    o, lse = _packed_forward_call(qkv, scale)
    return o, (qkv, o, lse)


def _packed_bwd(scale, residuals, do):
    qkv, o, lse = residuals
    out = jax.ShapeDtypeStruct(qkv.shape, jnp.float32)
    return (jax.ffi.ffi_call(_BACKWARD_PACKED, out, vmap_method="broadcast_all")(
        qkv, o, lse, do.astype(jnp.float32), scale=np.float32(scale)),)


_packed.defvjp(_packed_fwd, _packed_bwd)


def cpu_fused_self_attention(qkv: jax.Array) -> jax.Array:
    """Self-attention of a packed projection qkv [B, L, heads, 3 * d] (q, k, v per head, in
    that order) -> [B, L, heads, d] in qkv's dtype; scale 1 / sqrt(d)."""
    if qkv.ndim != 4 or qkv.shape[-1] % 3:
        raise ValueError("cpu_fused_self_attention takes qkv [batch, length, heads, 3 * width]; "
                         f"got shape {qkv.shape}")
    ensure_registered()
    scale = float(qkv.shape[-1] // 3) ** -0.5
    return _packed(qkv.astype(jnp.float32), scale).astype(qkv.dtype)

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


def ensure_registered() -> None:
    """Build (first use on a machine) and register the kernels with XLA:CPU; raises
    `build.KernelBuildError` with the reason when that is not possible."""
    build.register_targets(_SOURCE, {_FORWARD: "LdmAttentionForward",
                                     _BACKWARD: "LdmAttentionBackward"})


def available() -> bool:
    """Whether the fused CPU kernel can be used in this process (builds it if needed)."""
    try:
        ensure_registered()
    except build.KernelBuildError:
        return False
    return True


def unavailable_reason() -> str:
    return build.registration_error(_SOURCE)


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

"""Attention that never stores the [Lq, Lk] probabilities, for backends without a fused kernel.

`jax.nn.dot_product_attention(implementation='xla')` keeps the softmax probabilities for the
backward pass and lays the scores out as [B, heads, Lq, Lk] between [B, L, heads, d] operands,
so XLA:CPU spends most of the attention's time in transposes and passes over that matrix
(bench/README.md, "Where the UNet step's time goes"): 119 ms against torch's fused 35 ms for
4 x 4 heads x 1024 positions, fwd + bwd. This formulation:

* works heads-major ([B, heads, L, d]), so every contraction is a plain batched matmul;
* saves only q, k, v, the output and the per-row log-sum-exp, and recomputes the probabilities
  in the backward pass (the flash-attention recurrence: dS = P * (dP - rowsum(dO * O))), so
  no [Lq, Lk] buffer outlives the layer: 66 ms for the case above, and less memory;
* walks the queries in chunks when Lq * Lk is large, so the largest buffer is
  [B, heads, chunk, Lk]: the pixel-space UNet at 256 px (16,384 positions) trains in memory
  where the full scores would need 17 GB per image and head.

Scores, softmax and the log-sum-exp are float32 whatever the input dtype; the matmuls take the
input dtype with float32 accumulation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Largest score block per (batch, head) before the queries are chunked: 1024 x 1024 runs as
# one block (fastest here), 16,384 x 16,384 in chunks of 64 queries.
MAX_BLOCK_ELEMENTS = 1 << 20


def query_chunk(lq: int, lk: int, max_block_elements: int = MAX_BLOCK_ELEMENTS) -> int:
    """The query chunk for an [lq, lk] attention: lq itself when the whole score block is small
    enough, otherwise the largest divisor of lq whose block [chunk, lk] fits."""
    if lq * lk <= max_block_elements:
        return lq
    limit = max(1, max_block_elements // lk)
    return max(c for c in range(1, min(lq, limit) + 1) if lq % c == 0)


def _scores(q, k, scale):
    return jnp.einsum("bnqd,bnkd->bnqk", q, k, preferred_element_type=jnp.float32) * scale


def _forward_block(q, k, v, scale):
    s = _scores(q, k, scale)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bnqk,bnkd->bnqd", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32) / denom
    return o, m + jnp.log(denom)


def _backward_block(q, k, v, o, lse, do, scale):
    # Keys-major [b, n, Lk, Lq] probabilities: dV and dK are then plain matmuls, and only dQ
    # contracts over the leading axis (the queries-major form needs two such contractions,
    # which XLA:CPU runs at a third of its matmul speed: 62 -> 54 ms per layer measured).
    f32 = jnp.float32
    p_t = jnp.exp(jnp.einsum("bnkd,bnqd->bnkq", k, q, preferred_element_type=f32) * scale
                  - jnp.swapaxes(lse, -1, -2))
    dv = jnp.einsum("bnkq,bnqd->bnkd", p_t.astype(do.dtype), do, preferred_element_type=f32)
    dp_t = jnp.einsum("bnkd,bnqd->bnkq", v, do, preferred_element_type=f32)
    rows = jnp.swapaxes(jnp.sum(do.astype(f32) * o, axis=-1, keepdims=True), -1, -2)
    ds_t = (p_t * (dp_t - rows)).astype(q.dtype)
    dk = jnp.einsum("bnkq,bnqd->bnkd", ds_t, q, preferred_element_type=f32) * scale
    dq = jnp.einsum("bnkq,bnkd->bnqd", ds_t, k, preferred_element_type=f32) * scale
    return dq, dk, dv


def _split(x, chunk):  # [b, n, L, d] -> [L / chunk, b, n, chunk, d]
    b, n, length, d = x.shape
    return x.reshape(b, n, length // chunk, chunk, d).transpose(2, 0, 1, 3, 4)


def _merge(x):  # inverse of _split
    c, b, n, chunk, d = x.shape
    return x.transpose(1, 2, 0, 3, 4).reshape(b, n, c * chunk, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _heads_major_attention(q, k, v, scale, chunk):
    return _forward(q, k, v, scale, chunk)[0]


def _forward(q, k, v, scale, chunk):
    if chunk >= q.shape[2]:
        o, lse = _forward_block(q, k, v, scale)
    else:
        o, lse = jax.lax.map(lambda qc: _forward_block(qc, k, v, scale), _split(q, chunk))
        o, lse = _merge(o), _merge(lse)
    return o.astype(q.dtype), (q, k, v, o, lse)


def _backward(scale, chunk, residuals, do):
    q, k, v, o, lse = residuals
    if chunk >= q.shape[2]:
        dq, dk, dv = _backward_block(q, k, v, o, lse, do, scale)
    else:
        def body(carry, xs):
            dq_c, dk_c, dv_c = _backward_block(xs[0], k, v, xs[1], xs[2], xs[3], scale)
            return (carry[0] + dk_c, carry[1] + dv_c), dq_c

        zeros = jnp.zeros(k.shape, jnp.float32)
        (dk, dv), dq = jax.lax.scan(body, (zeros, zeros),
                                    tuple(_split(x, chunk) for x in (q, o, lse, do)))
        dq = _merge(dq)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_heads_major_attention.defvjp(_forward, _backward)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                      max_block_elements: int = MAX_BLOCK_ELEMENTS) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v for q [B, Lq, heads, d], k/v [B, Lk, heads, d] -> [B, Lq,
    heads, d] in q's dtype (same layout and result as `jax.nn.dot_product_attention`)."""
    scale = float(q.shape[-1]) ** -0.5
    chunk = query_chunk(q.shape[1], k.shape[1], max_block_elements)
    heads_major = lambda t: jnp.swapaxes(t, 1, 2)
    out = _heads_major_attention(heads_major(q), heads_major(k), heads_major(v), scale, chunk)
    return heads_major(out)

"""Attention that never stores the [Lq, Lk] probabilities, for backends without a fused kernel.

`jax.nn.dot_product_attention(implementation='xla')` keeps the softmax probabilities for the
backward pass and lays the scores out as [B, heads, Lq, Lk] between [B, L, heads, d] operands,
so XLA:CPU spends most of the attention's time in transposes and passes over that matrix
(bench/README.md, "Where the UNet step's time goes"): 119 ms against torch's fused 35 ms for
4 x 4 heads x 1024 positions, fwd + bwd. This formulation:

* works heads-major ([B * heads, L, d]), so every contraction is a plain batched matmul;
* saves only q, k, v, the output and the per-row log-sum-exp, and recomputes the probabilities
  in the backward pass (the flash-attention recurrence: dS = P * (dP - rowsum(dO * O))), so
  no [Lq, Lk] buffer outlives the layer: 66 ms for the case above, and less memory;
* walks the queries in chunks when Lq * Lk is large, so the largest buffer is
  [B, heads, chunk, Lk]: the pixel-space UNet at 256 px (16,384 positions) trains in memory
  where the full scores would need 17 GB per image and head;
* walks the (batch, head) pairs in groups when all their score blocks together are large: at
  the paper's batch sizes the score tensor of one layer would otherwise be gigabytes, live
  at the peak of the step under every remat policy (docs/performance.md, "Memory").

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
# Largest score tensor over all (batch, head) pairs at once (64 MB in float32) before they are
# walked in groups: batch 4 x 4 heads x 1024^2 (the CPU benchmarks) is one step; the paper's
# batch 48 x 14 heads at 32 x 32 positions (2.8 GB per score tensor, and the backward pass
# holds three) runs as 42 steps of 16 heads.
MAX_STEP_ELEMENTS = 1 << 24


def query_chunk(lq: int, lk: int, max_block_elements: int = MAX_BLOCK_ELEMENTS) -> int:
    """The query chunk for an [lq, lk] attention: lq itself when the whole score block is small
    enough, otherwise the largest divisor of lq whose block [chunk, lk] fits."""
    if lq * lk <= max_block_elements:
        return lq
    limit = max(1, max_block_elements // lk)
    return max(c for c in range(1, min(lq, limit) + 1) if lq % c == 0)


def group_chunk(groups: int, block_elements: int,
                max_step_elements: int = MAX_STEP_ELEMENTS) -> int:
    """How many (batch, head) pairs run together when each has a score block of
    `block_elements`: all `groups` when they fit `max_step_elements`, otherwise the largest
    divisor of `groups` that does (at least 1)."""
    limit = max(1, max_step_elements // max(1, block_elements))
    if groups <= limit:
        return groups
    return max(c for c in range(1, limit + 1) if groups % c == 0)


# Inside, q/k/v/o are [groups, L, d] (groups = batch x heads) and lse is [groups, L, 1].

def _scores(q, k, scale):
    return jnp.einsum("gqd,gkd->gqk", q, k, preferred_element_type=jnp.float32) * scale


def _forward_block(q, k, v, scale):
    s = _scores(q, k, scale)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("gqk,gkd->gqd", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32) / denom
    return o, m + jnp.log(denom)


def _backward_block(q, k, v, o, lse, do, scale):
    # Keys-major [g, Lk, Lq] probabilities: dV and dK are then plain matmuls, and only dQ
    # contracts over the leading axis (the queries-major form needs two such contractions,
    # which XLA:CPU runs at a third of its matmul speed: 62 -> 54 ms per layer measured).
    f32 = jnp.float32
    p_t = jnp.exp(jnp.einsum("gkd,gqd->gkq", k, q, preferred_element_type=f32) * scale
                  - jnp.swapaxes(lse, -1, -2))
    dv = jnp.einsum("gkq,gqd->gkd", p_t.astype(do.dtype), do, preferred_element_type=f32)
    dp_t = jnp.einsum("gkd,gqd->gkq", v, do, preferred_element_type=f32)
    rows = jnp.swapaxes(jnp.sum(do.astype(f32) * o, axis=-1, keepdims=True), -1, -2)
    ds_t = (p_t * (dp_t - rows)).astype(q.dtype)
    dk = jnp.einsum("gkq,gqd->gkd", ds_t, q, preferred_element_type=f32) * scale
    dq = jnp.einsum("gkq,gkd->gqd", ds_t, k, preferred_element_type=f32) * scale
    return dq, dk, dv


def _zeros_when_ready(shapes, inputs):
    """Zero buffers for a chunk loop's results that XLA cannot allocate before `inputs` exist.

    A plain `jnp.zeros` is a constant: XLA:CPU's scheduler hoists it (and the copy each loop
    makes of it) to the start of the step, so every attention layer's result buffers would
    be live through the whole step (1.7 GB at the paper's batch, measured). Routing the zeros
    through an optimization barrier with the loop's inputs ties them to the layer."""
    zeros = tuple(jnp.zeros(shape, dtype) for shape, dtype in shapes)
    return jax.lax.optimization_barrier((zeros, inputs))


def _map_chunks(fn, chunk, axis, *arrays):
    """fn over `chunk`-sized slices of every array along `axis` (same length in all), results
    (a tuple) concatenated along `axis`: a loop writing into its result buffers in place."""
    length = arrays[0].shape[axis]
    if chunk >= length:
        return fn(*arrays)
    piece = lambda x, i: jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis)
    out = jax.eval_shape(fn, *(piece(x, 0) for x in arrays))
    shapes = [(o.shape[:axis] + (length,) + o.shape[axis + 1:], o.dtype) for o in out]
    results, arrays = _zeros_when_ready(shapes, arrays)

    def body(i, results):
        ys = fn(*(piece(x, i) for x in arrays))
        return tuple(jax.lax.dynamic_update_slice_in_dim(r, y, i * chunk, axis)
                     for r, y in zip(results, ys))

    return jax.lax.fori_loop(0, length // chunk, body, results)


def _forward_groups(q, k, v, scale, q_chunk):
    return _map_chunks(lambda qc: _forward_block(qc, k, v, scale), q_chunk, 1, q)


def _backward_groups(q, k, v, o, lse, do, scale, q_chunk):
    if q_chunk >= q.shape[1]:
        return _backward_block(q, k, v, o, lse, do, scale)
    f32 = jnp.float32
    (dq, dk, dv), (q, k, v, o, lse, do) = _zeros_when_ready(
        [(q.shape, f32), (k.shape, f32), (k.shape, f32)], (q, k, v, o, lse, do))
    piece = lambda x, i: jax.lax.dynamic_slice_in_dim(x, i * q_chunk, q_chunk, 1)

    def body(i, carry):
        dq, dk, dv = carry
        dq_c, dk_c, dv_c = _backward_block(piece(q, i), k, v, piece(o, i), piece(lse, i),
                                           piece(do, i), scale)
        return (jax.lax.dynamic_update_slice_in_dim(dq, dq_c, i * q_chunk, 1),
                dk + dk_c, dv + dv_c)

    return jax.lax.fori_loop(0, q.shape[1] // q_chunk, body, (dq, dk, dv))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _grouped_attention(q, k, v, scale, q_chunk, g_chunk):
    return _forward(q, k, v, scale, q_chunk, g_chunk)[0]


def _forward(q, k, v, scale, q_chunk, g_chunk):
    # g_chunk (batch, head) pairs at a time (one call when it covers them all).
    o, lse = _map_chunks(lambda q, k, v: _forward_groups(q, k, v, scale, q_chunk),
                         g_chunk, 0, q, k, v)
    return o.astype(q.dtype), (q, k, v, o, lse)


def _backward(scale, q_chunk, g_chunk, residuals, do):
    q, k, v, o, lse = residuals
    dq, dk, dv = _map_chunks(lambda *xs: _backward_groups(*xs, scale, q_chunk),
                             g_chunk, 0, q, k, v, o, lse, do)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_grouped_attention.defvjp(_forward, _backward)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                      max_block_elements: int = MAX_BLOCK_ELEMENTS,
                      max_step_elements: int = MAX_STEP_ELEMENTS) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v for q [B, Lq, heads, d], k/v [B, Lk, heads, d] -> [B, Lq,
    heads, d] in q's dtype (same layout and result as `jax.nn.dot_product_attention`)."""
    batch, lq, heads, d = q.shape
    lk = k.shape[1]
    scale = float(d) ** -0.5
    q_chunk = query_chunk(lq, lk, max_block_elements)
    g_chunk = group_chunk(batch * heads, q_chunk * lk, max_step_elements)
    # [B, L, heads, d] -> [B * heads, L, d]: every contraction is then a plain batched matmul.
    grouped = lambda t: jnp.swapaxes(t, 1, 2).reshape(batch * heads, t.shape[1], d)
    out = _grouped_attention(grouped(q), grouped(k), grouped(v), scale, q_chunk, g_chunk)
    return jnp.swapaxes(out.reshape(batch, heads, lq, d), 1, 2)

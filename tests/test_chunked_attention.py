"""ldm_jax/models/chunked_attention.py: values and gradients against a float64 recomputation,
with and without query chunking, float32 and bfloat16, and the memory it exists to save."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.attention import attention
from ldm_jax.models.chunked_attention import chunked_attention, group_chunk, query_chunk


def _reference64(q, k, v, cotangent):
    """Output and (dq, dk, dv) of sum(attention * cotangent), in float64 numpy."""
    q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, cotangent))
    scale = q.shape[-1] ** -0.5
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p, v)
    dp = np.einsum("bqhd,bkhd->bhqk", g, v)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = np.einsum("bhqk,bkhd->bqhd", ds, k) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    dv = np.einsum("bhqk,bqhd->bkhd", p, g)
    return out, (dq, dk, dv)


def _inputs(lq, lk, heads=3, d=8, batch=2, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, lq, heads, d)) * 2.0   # peaked softmax rows too
    k = jax.random.normal(keys[1], (batch, lk, heads, d))
    v = jax.random.normal(keys[2], (batch, lk, heads, d))
    g = jax.random.normal(keys[3], (batch, lq, heads, d))
    return q, k, v, g


def test_query_chunk_rule():
    assert query_chunk(1024, 1024) == 1024                     # one block
    assert query_chunk(16384, 16384) == 64                     # 64 x 16384 = 2^20
    assert query_chunk(12, 10, max_block_elements=40) == 4     # largest divisor of 12 <= 4
    assert query_chunk(7, 1000, max_block_elements=2000) == 1  # prime length: single rows
    assert query_chunk(4096, 77) == 4096                       # cross-attention to a context


def test_group_chunk_rule():
    assert group_chunk(16, 1 << 20) == 16                      # CPU benchmark: one step
    assert group_chunk(48 * 14, 1 << 20) == 16                 # paper batch: 42 steps of 16
    assert group_chunk(6, 10, max_step_elements=45) == 3       # largest divisor of 6 <= 4
    assert group_chunk(7, 10, max_step_elements=45) == 1       # prime: one pair per step
    assert group_chunk(5, 1000, max_step_elements=10) == 1     # a block above the budget alone


@pytest.mark.parametrize("max_block,max_step", [(1 << 20, 24 * 24 * 2), (100, 200),
                                                (1 << 20, 1)])
def test_group_chunking_matches_float64(max_block, max_step):
    q, k, v, g = _inputs(24, 24, heads=3, batch=2)
    fn = lambda q, k, v: chunked_attention(q, k, v, max_block_elements=max_block,
                                           max_step_elements=max_step)
    out, vjp = jax.vjp(fn, q, k, v)
    ref_out, ref_grads = _reference64(q, k, v, g)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=2e-6)
    for got, want in zip(vjp(g), ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("lq,lk,max_block", [(24, 24, 1 << 20), (24, 24, 100), (30, 11, 60),
                                             (16, 5, 1 << 20)])
def test_values_and_gradients_match_float64(lq, lk, max_block):
    q, k, v, g = _inputs(lq, lk)
    fn = lambda q, k, v: chunked_attention(q, k, v, max_block_elements=max_block)
    out, vjp = jax.vjp(fn, q, k, v)
    ref_out, ref_grads = _reference64(q, k, v, g)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=2e-6)
    for got, want in zip(vjp(g), ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_chunking_does_not_change_results():
    q, k, v, g = _inputs(64, 64)
    whole = jax.vjp(lambda *a: chunked_attention(*a), q, k, v)
    chunked = jax.vjp(lambda *a: chunked_attention(*a, max_block_elements=64 * 8), q, k, v)
    assert query_chunk(64, 64, 64 * 8) == 8
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(chunked[1](g), whole[1](g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_inputs():
    q, k, v, g = _inputs(32, 32)
    half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out, vjp = jax.vjp(lambda *a: chunked_attention(*a, max_block_elements=256), *half)
    assert out.dtype == jnp.bfloat16
    grads = vjp(g.astype(jnp.bfloat16))
    assert all(x.dtype == jnp.bfloat16 for x in grads)
    ref_out, ref_grads = _reference64(*half, g)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=0.05)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.15)


def test_same_result_as_jax_dot_product_attention_through_the_wrapper():
    q, k, v, g = _inputs(40, 17)
    outs = {impl: jax.vjp(lambda *a, i=impl: attention(*a, implementation=i), q, k, v)
            for impl in ("chunked", "xla", None)}
    for impl in ("chunked", None):
        np.testing.assert_allclose(outs[impl][0], outs["xla"][0], rtol=1e-5, atol=1e-6)
        for a, b in zip(outs[impl][1](g), outs["xla"][1](g)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_backward_keeps_no_score_matrix():
    """The point of the formulation: the gradient's temporaries hold no [Lq, Lk] matrix per
    head (the 'xla' implementation stores the probabilities), and with chunking not even one."""
    q, k, v, g = _inputs(2048, 2048, heads=2, d=16, batch=1)

    def temp_bytes(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v) * g)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    scores = 2 * 2048 * 2048 * 4                                  # one float32 [2, L, L]
    xla = temp_bytes(lambda *a: attention(*a, implementation="xla"))
    chunked = temp_bytes(lambda *a: chunked_attention(*a, max_block_elements=256 * 2048))
    assert xla >= scores, xla
    assert chunked < scores / 2, (chunked, scores)


def test_many_heads_walked_in_groups_keep_less_memory():
    """Batch x heads score blocks that are small one by one but large together (the paper's
    batch sizes) are walked in groups: the gradient's temporaries drop below one full score
    tensor."""
    q, k, v, g = _inputs(256, 256, heads=8, d=8, batch=8)

    def temp_bytes(max_step):
        fn = lambda q, k, v: chunked_attention(q, k, v, max_step_elements=max_step)
        loss = lambda q, k, v: jnp.sum(fn(q, k, v) * g)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    scores = 64 * 256 * 256 * 4                                   # float32 [64, 256, 256]
    whole = temp_bytes(1 << 30)
    grouped = temp_bytes(8 * 256 * 256)
    assert whole >= scores, whole
    assert grouped < scores / 2, (grouped, scores)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("cudnn_accepts", [False, True])
def test_gpu_default_asks_for_cudnn_and_falls_back_to_xla(packed, cudnn_accepts):
    """On a GPU with bfloat16 inputs the default ('auto' inside the module) asks jax for cuDNN's
    flash attention and takes XLA's where jax refuses (it raises while tracing). Not jax's
    implementation=None: that is XLA's, which an H200 profile showed at 31 % of the
    f4_celebahq step. Both entry points must run it (an H200 run once failed on exactly that in
    packed_self_attention). The backend is reported as 'gpu' here; on this CPU jax refuses
    cuDNN for real ('cuDNN is not detected'), or a stand-in accepts it."""
    from unittest import mock

    from ldm_jax.models import attention as attention_module
    rng = np.random.default_rng(3)
    qkv = jnp.asarray(rng.standard_normal((2, 24, 2, 3 * 16)), jnp.bfloat16)
    q, k, v = (qkv.reshape(2, 24, 2, 3, 16)[..., i, :] for i in range(3))
    want = np.asarray(chunked_attention(q, k, v), np.float32)
    jax_attention, asked = jax.nn.dot_product_attention, []

    def recorded(*args, implementation=None, **kwargs):
        asked.append(implementation)
        if implementation == "cudnn" and cudnn_accepts:
            implementation = "xla"   # a GPU's cuDNN would run here
        return jax_attention(*args, implementation=implementation, **kwargs)

    with mock.patch.object(attention_module.jax, "default_backend", lambda: "gpu"), \
            mock.patch.object(jax.nn, "dot_product_attention", recorded):
        assert attention_module.default_implementation(jnp.bfloat16) == "auto"
        got = (attention_module.packed_self_attention(qkv) if packed
               else attention_module.attention(q, k, v))
    assert asked == (["cudnn"] if cudnn_accepts else ["cudnn", "xla"])
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2)

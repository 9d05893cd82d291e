"""UNet and attention layers at tiny width.

Compilation dominates on a small CPU box (and jitting flax's random initialisers is by far the
most expensive part), so most tests take the parameter *shapes* from `jax.eval_shape(init)`
and fill them with host-side random values: a "perturbed" model whose output is not the
all-zero output of a fresh init (zero-initialised output convs), so conditioning effects are
visible. Conditioning is checked within a single batch: examples that share x and t but
differ in context / label / extra channels. Real initialisation (and the zero output it
implies) is tested once on a small model.
"""

import math

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from ldm_jax.models.attention import (SelfAttentionBlock, SpatialTransformer, attention,
                                      resolve_heads)
from ldm_jax.models.unet import ResBlock, UNetModel, timestep_embedding
from ldm_jax.diffusion.samplers import get_sampler, guided_model_fn
from ldm_jax.diffusion.schedules import DiffusionSchedule

B, H = 2, 16


def random_params(shapes, seed=0):
    """Random variables with the structure of ``shapes`` (fan-in scaled kernels)."""
    rs = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path[-1:])
        if "kernel" in name:
            std = 1.0 / math.sqrt(max(1, int(np.prod(s.shape[:-1]))))
            val = rs.normal(0.0, std, s.shape)
        elif "scale" in name:
            val = 1.0 + 0.1 * rs.normal(size=s.shape)
        else:  # biases, embeddings
            val = (0.1 if "bias" in name else 1.0) * rs.normal(size=s.shape)
        return jnp.asarray(val, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def build_and_apply(model, x, t, **kw):
    """-> (output with random params, params) using a single compiled apply."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, **kw)
    variables = random_params(shapes)
    out = jax.jit(model.apply)(variables, x, t, **kw)
    return out, variables["params"]


def inputs(channels, key=0):
    x = jax.random.normal(jax.random.key(key), (1, H, H, channels))
    x = jnp.repeat(x, B, axis=0)  # identical examples: any output difference is conditioning
    return x, jnp.array([10, 10], jnp.int32)


def assert_differs(out):
    assert out.shape[0] == B
    diff = float(jnp.abs(out[0] - out[1]).max())
    assert diff > 1e-5 * (1 + float(jnp.abs(out).max())), diff


def test_celebahq_like():
    m = UNetModel(in_channels=3, out_channels=3, model_channels=32, num_res_blocks=2,
                  attention_resolutions=(8, 4, 2), channel_mult=(1, 2, 3, 4),
                  num_head_channels=8)
    x, t = inputs(3)
    out, params = build_and_apply(m, x, t)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert np.isfinite(out).all() and float(jnp.abs(out).max()) > 0
    # Attention is placed at ds 2, 4, 8 only (8x8, 4x4, 2x2 maps), both down and up paths.
    assert "input_blocks_1_1" not in params and "input_blocks_4_1" in params
    assert "output_blocks_0_1" in params and "output_blocks_11_1" not in params
    assert "qkv" in params["middle_block_1"]
    # 4 levels x 2 res blocks + 3 downsamples + stem; 4 x 3 output blocks.
    assert sum(k.startswith("input_blocks_") and k.endswith("_0") for k in params) == 12
    assert sum(k.startswith("output_blocks_") and k.endswith("_0") for k in params) == 12
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))


def test_churches_like_float_timesteps():
    m = UNetModel(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                  attention_resolutions=(1, 2, 4, 8), channel_mult=(1, 2, 2, 4, 4),
                  num_heads=8)
    x, _ = inputs(4)
    out, params = build_and_apply(m, x, jnp.array([3.5, 999.0]))
    assert out.shape == x.shape
    assert "input_blocks_1_1" in params and "input_blocks_10_1" not in params  # ds 1 yes, 16 no
    assert_differs(out)  # different timesteps -> different outputs


def test_text_like_spatial_transformer():
    m = UNetModel(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                  attention_resolutions=(4, 2, 1), channel_mult=(1, 2, 4), num_heads=2,
                  use_spatial_transformer=True, transformer_depth=2, context_dim=16)
    x, t = inputs(4)
    context = jax.random.normal(jax.random.key(7), (B, 77, 16))
    out, params = build_and_apply(m, x, t, context=context)
    assert out.shape == x.shape
    st = params["middle_block_1"]
    assert {"transformer_blocks_0", "transformer_blocks_1", "proj_in", "proj_out"} <= set(st)
    attn2 = st["transformer_blocks_0"]["attn2"]
    assert set(attn2) == {"to_q", "to_k", "to_v", "to_out"}
    assert set(attn2["to_q"]) == {"kernel"} and set(attn2["to_out"]) == {"kernel", "bias"}
    assert attn2["to_k"]["kernel"].shape == (16, 128)  # context_dim -> heads * dim_head
    assert st["proj_in"]["kernel"].shape == (1, 1, 128, 128)  # LDM: 1x1 conv
    assert_differs(out)  # same x and t, different context


def test_class_conditional():
    m = UNetModel(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                  attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=8,
                  num_classes=10)
    x, t = inputs(4)
    out, params = build_and_apply(m, x, t, y=jnp.array([1, 3]))
    assert out.shape == x.shape and params["label_emb"]["embedding"].shape == (10, 128)
    assert_differs(out)


def test_concat_conditioning():
    m = UNetModel(in_channels=6, out_channels=3, model_channels=32, num_res_blocks=1,
                  attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=8)
    x, t = inputs(6)
    x = x.at[1, ..., 3:].set(jax.random.normal(jax.random.key(9), (H, H, 3)))
    out, _ = build_and_apply(m, x, t)
    assert out.shape == (B, H, H, 3)
    assert_differs(out)  # only the extra (conditioning) channels differ


def test_scale_shift_resblock_updown_dropout():
    m = UNetModel(in_channels=4, out_channels=8, model_channels=32, num_res_blocks=1,
                  attention_resolutions=(2,), channel_mult=(1, 2, 2), num_head_channels=16,
                  use_scale_shift_norm=True, resblock_updown=True, dropout=0.1,
                  conv_resample=False)
    x, t = inputs(4)

    shapes = jax.eval_shape(m.init, jax.random.key(0), x, t)
    variables = random_params(shapes)
    # rbg keys: much cheaper to compile on CPU than the default threefry.
    key = lambda i: jax.random.key(i, impl="rbg")

    @jax.jit
    def f(variables, x, t):
        det = m.apply(variables, x, t)
        train = m.apply(variables, x, t, train=True, rngs={"dropout": key(2)})
        return det, train

    det, train = f(variables, x, t)
    params = shapes["params"]
    assert det.shape == (B, H, H, 8)
    assert params["input_blocks_0_0"]["kernel"].shape == (3, 3, 4, 32)
    # Downsampling is a ResBlock (has emb_layers of width 2*C for scale/shift), not a conv.
    assert params["input_blocks_2_0"]["emb_layers"]["kernel"].shape == (128, 64)
    # Upsampling ResBlocks: right after the res block at ds 4, after the attention at ds 2.
    assert "emb_layers" in params["output_blocks_1_1"]
    assert "qkv" in params["output_blocks_3_1"] and "emb_layers" in params["output_blocks_3_2"]
    np.testing.assert_array_equal(det[0], det[1])
    # Dropout is active only with train=True, and differs across the (identical) examples.
    assert float(jnp.abs(train - det).max()) > 0 and float(jnp.abs(train[0] - train[1]).max()) > 0


def test_real_init_zero_output_bfloat16():
    """Fresh init: float32 params, zero output (zero-init head); bf16 compute runs finite."""
    # A single level keeps the (expensive to compile) random initialisers few.
    m = UNetModel(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                  attention_resolutions=(1,), channel_mult=(1,), num_head_channels=8,
                  use_spatial_transformer=True, context_dim=8, dtype=jnp.bfloat16)
    x, t = inputs(4)
    ctx = jnp.ones((B, 5, 8))

    rand = random_params(jax.eval_shape(m.init, jax.random.key(0), x, t, context=ctx))

    @jax.jit
    def f(x, t, ctx, rand):
        variables = m.init(jax.random.key(0, impl="rbg"), x, t, context=ctx)
        return (m.apply(variables, x, t, context=ctx), variables["params"],
                m.apply(rand, x, t, context=ctx))

    fresh, params, out = f(x, t, ctx, rand)
    assert fresh.dtype == jnp.float32 and fresh.shape == x.shape
    np.testing.assert_array_equal(fresh, 0.0)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    np.testing.assert_array_equal(params["out_conv"]["kernel"], 0.0)
    np.testing.assert_array_equal(params["middle_block_1"]["proj_out"]["kernel"], 0.0)
    assert out.dtype == jnp.float32 and np.isfinite(out).all()
    assert float(jnp.abs(out).max()) > 0


def _shape_init(model, x, t, **kw):
    return jax.eval_shape(model.init, jax.random.key(0), x, t, **kw)


def test_config_errors():
    x, t = jnp.zeros((B, H, H, 4)), jnp.zeros((B,), jnp.int32)
    base = dict(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                attention_resolutions=(2,), channel_mult=(1, 2))
    with pytest.raises(ValueError, match="exactly one of num_heads / num_head_channels"):
        _shape_init(UNetModel(**base), x, t)
    with pytest.raises(ValueError, match="exactly one of num_heads / num_head_channels"):
        _shape_init(UNetModel(**base, num_heads=2, num_head_channels=8), x, t)
    with pytest.raises(ValueError, match="num_head_channels"):
        _shape_init(UNetModel(**base, num_head_channels=12), x, t)  # 32 % 12 != 0
    ok = dict(base, num_head_channels=8)
    with pytest.raises(ValueError, match="num_classes is None"):
        _shape_init(UNetModel(**ok), x, t, y=jnp.zeros((B,), jnp.int32))
    with pytest.raises(ValueError, match="labels y"):
        _shape_init(UNetModel(**ok, num_classes=3), x, t)
    with pytest.raises(ValueError, match="use_spatial_transformer=False"):
        _shape_init(UNetModel(**ok), x, t, context=jnp.zeros((B, 7, 8)))
    with pytest.raises(ValueError, match="requires context_dim"):
        _shape_init(UNetModel(**ok, use_spatial_transformer=True), x, t,
                    context=jnp.zeros((B, 7, 8)))
    with pytest.raises(ValueError, match="requires a context"):
        _shape_init(UNetModel(**ok, use_spatial_transformer=True, context_dim=8), x, t)
    with pytest.raises(ValueError, match="divisible"):
        _shape_init(UNetModel(**ok), jnp.zeros((B, 15, 15, 4)), t)
    with pytest.raises(ValueError, match="channels"):
        _shape_init(UNetModel(**ok), jnp.zeros((B, H, H, 3)), t)


def test_timestep_embedding_reference_formula():
    t = np.array([0.0, 1.0, 17.0, 999.0])
    dim = 10
    emb = np.asarray(timestep_embedding(jnp.asarray(t), dim))
    half = dim // 2
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    expected = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-4)
    odd = timestep_embedding(jnp.asarray(t), 7)
    assert odd.shape == (4, 7) and np.all(np.asarray(odd[:, -1]) == 0)


def test_attention_wrapper():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(k1, (2, 5, 3, 4))
    k = jax.random.normal(k2, (2, 7, 3, 4))
    v = jax.random.normal(k3, (2, 7, 3, 4))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = np.einsum("bhqk,bkhd->bqhd", p, v)
    for impl in (None, "chunked", "xla"):
        np.testing.assert_allclose(attention(q, k, v, implementation=impl), expected,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="implementation"):
        attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="bfloat16"):
        attention(q, k, v, implementation="cudnn")
    assert resolve_heads(64, num_heads=4) == (4, 16)
    assert resolve_heads(64, num_head_channels=8) == (8, 8)


def test_attention_blocks_identity_at_init():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 32))
    ctx = jax.random.normal(jax.random.key(2), (2, 3, 12))
    sa = SelfAttentionBlock(num_heads=1, num_head_channels=8)  # head width overrides count
    st = SpatialTransformer(n_heads=2, d_head=16)
    st_lin = SpatialTransformer(n_heads=2, d_head=16, use_linear=True)  # SD 2.x variant

    @jax.jit
    def f(x, ctx):
        key = jax.random.key(1, impl="rbg")
        v_sa, v_st, v_self = sa.init(key, x), st.init(key, x, ctx), st.init(key, x)
        v_lin = st_lin.init(key, x, ctx)
        outs = (sa.apply(v_sa, x), st.apply(v_st, x, ctx), st.apply(v_self, x),
                st_lin.apply(v_lin, x, ctx))
        return outs, (v_sa, v_self, v_lin)

    outs, (v_sa, v_self, v_lin) = f(x, ctx)
    for o in outs:  # zero-initialised proj_out: identity at init
        np.testing.assert_allclose(o, x, atol=1e-6)
    assert v_sa["params"]["qkv"]["kernel"].shape == (32, 96)
    assert v_lin["params"]["proj_in"]["kernel"].shape == (32, 32)
    # context=None turns the cross-attention into self-attention (to_k reads x: 32 -> 32).
    assert v_self["params"]["transformer_blocks_0"]["attn2"]["to_k"]["kernel"].shape == (32, 32)


def test_guided_ddim_sampling_with_unet():
    """End to end: CFG (one batched UNet pass per step) inside the jitted DDIM loop."""
    m = UNetModel(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                  attention_resolutions=(2,), channel_mult=(1, 2), num_heads=2,
                  use_spatial_transformer=True, context_dim=8)
    shape = (2, 8, 8, 4)
    cond = jax.random.normal(jax.random.key(1), (2, 6, 8))
    uncond = jnp.zeros_like(cond)
    shapes = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros(shape), jnp.zeros((2,)),
                            context=cond)
    variables = random_params(shapes)
    sampler = get_sampler("ddim")(DiffusionSchedule.from_config("linear", 1000, 0.00085, 0.012),
                                  num_steps=4)

    @jax.jit
    def sample(variables, cond, uncond, rng):
        apply = lambda x, t, c: m.apply(variables, x, t, context=c)
        return sampler(guided_model_fn(apply, cond, uncond, 3.0), shape, rng)

    out = sample(variables, cond, uncond, jax.random.key(0, impl="rbg"))
    assert out.shape == shape and np.isfinite(out).all()


def test_decoder_skip_concatenation_value_and_gradients():
    """ResBlock(skip=...) concatenates inside the block with a custom backward pass (two
    materialised halves); values and gradients equal a plain concatenation's, and the skip's
    gradient comes back in its own dtype."""
    from ldm_jax.models.unet import _concat_skip

    keys = jax.random.split(jax.random.key(3), 3)
    h = jax.random.normal(keys[0], (2, 4, 4, 40))
    skip = jax.random.normal(keys[1], (2, 4, 4, 24))
    g = jax.random.normal(keys[2], (2, 4, 4, 64))
    ours, ours_vjp = jax.vjp(lambda a, b: _concat_skip(a, b, 40), h, skip)
    plain, plain_vjp = jax.vjp(lambda a, b: jnp.concatenate([a, b], -1), h, skip)
    np.testing.assert_array_equal(ours, plain)
    for a, b in zip(ours_vjp(g), plain_vjp(g)):
        np.testing.assert_array_equal(a, b)

    block = ResBlock(32)
    emb = jax.random.normal(keys[2], (2, 16))
    params = block.init(jax.random.key(0), h, emb, False, skip.astype(jnp.bfloat16))
    grads = jax.grad(lambda s: jnp.sum(block.apply(params, h, emb, False, s)))(
        skip.astype(jnp.bfloat16))
    assert grads.dtype == jnp.bfloat16 and bool(jnp.any(grads != 0))
    by_hand = jax.grad(lambda s: jnp.sum(block.apply(
        params, jnp.concatenate([h, s.astype(h.dtype)], -1), emb, False)))(
        skip.astype(jnp.bfloat16))
    np.testing.assert_array_equal(grads, by_hand)

"""bench.conv_formulations: every impl matches lax.conv_general_dilated / nn.Conv (values and grads)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bench.conv_formulations import CONV_IMPLS, Conv, conv2d, resolve_conv_impl

IMPLS = ("xla", "im2col", "shifted")

# (N, H, W, Cin, Cout, kernel, stride, padding)
CASES = [
    (2, 7, 5, 3, 4, 3, 1, 1),    # odd sizes, 3x3 same
    (2, 8, 8, 5, 6, 3, 2, 1),    # stride 2 (UNet / KL Downsample uses (1,1) padding)
    (1, 9, 7, 4, 3, 3, 2, 1),    # stride 2, odd size
    (2, 6, 5, 4, 7, 1, 1, 0),    # 1x1
    (1, 8, 6, 3, 2, 4, 2, 1),    # discriminator: 4x4, stride 2, padding 1
    (1, 5, 5, 3, 2, 4, 1, 1),    # discriminator: 4x4, stride 1, padding 1
    (2, 6, 6, 2, 3, 5, 1, 2),    # 5x5 same
]


def _ref(x, w, stride, pad):
    return lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)


def _data(case, dtype=jnp.float32, seed=0):
    n, h, w, ci, co, k, _, _ = case
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, (n, h, w, ci), jnp.float32)
    wt = jax.random.normal(kw, (k, k, ci, co), jnp.float32) / np.sqrt(k * k * ci)
    return x.astype(dtype), wt.astype(dtype), kg


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_value_and_grads_float32(impl, case):
    _, _, _, _, _, _, s, p = case
    x, w, kg = _data(case)
    pad = ((p, p), (p, p))
    fn = jax.jit(lambda x, w: conv2d(x, w, (s, s), pad, impl))
    y, y_ref = fn(x, w), _ref(x, w, s, p)
    assert y.shape == y_ref.shape and y.dtype == jnp.float32
    assert _rel(y, y_ref) < 1e-5
    ct = jax.random.normal(kg, y_ref.shape)
    dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(conv2d(x, w, (s, s), pad, impl) * ct),
                              argnums=(0, 1)))(x, w)
    dx_ref, dw_ref = jax.grad(lambda x, w: jnp.sum(_ref(x, w, s, p) * ct), argnums=(0, 1))(x, w)
    assert _rel(dx, dx_ref) < 1e-5
    assert _rel(dw, dw_ref) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]], ids=str)
def test_bfloat16(impl, case):
    _, _, _, _, _, _, s, p = case
    x, w, kg = _data(case, jnp.bfloat16)
    pad = ((p, p), (p, p))
    y = jax.jit(lambda x, w: conv2d(x, w, (s, s), pad, impl))(x, w)
    y_xla = jax.jit(lambda x, w: conv2d(x, w, (s, s), pad, "xla"))(x, w)
    assert y.dtype == jnp.bfloat16 and y.shape == y_xla.shape
    y_ref = _ref(x.astype(jnp.float32), w.astype(jnp.float32), s, p)
    assert _rel(y, y_ref) < 2e-2
    ct = jax.random.normal(kg, y.shape).astype(jnp.bfloat16)
    loss = lambda x, w: jnp.sum((conv2d(x, w, (s, s), pad, impl) * ct).astype(jnp.float32))
    dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    f32 = lambda x, w: jnp.sum(_ref(x, w, s, p) * ct.astype(jnp.float32))
    dx_ref, dw_ref = jax.grad(f32, argnums=(0, 1))(x.astype(jnp.float32), w.astype(jnp.float32))
    assert _rel(dx, dx_ref) < 3e-2
    assert _rel(dw, dw_ref) < 3e-2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kernel,stride,pad,use_bias", [(3, 1, 1, True), (3, 2, 1, True),
                                                        (1, 1, 0, True), (4, 2, 1, False)])
def test_module_matches_nn_conv(impl, kernel, stride, pad, use_bias):
    init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    kw = dict(strides=(stride, stride), padding=((pad, pad), (pad, pad)), use_bias=use_bias,
              param_dtype=jnp.float32, kernel_init=init,
              bias_init=nn.initializers.normal(0.1), name="c")
    ref = nn.Conv(6, (kernel, kernel), **kw)
    mine = Conv(6, (kernel, kernel), impl=impl, **kw)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 7, 5))
    p_ref = ref.init(jax.random.PRNGKey(2), x)
    p_mine = mine.init(jax.random.PRNGKey(2), x)
    assert jax.tree_util.tree_structure(p_ref) == jax.tree_util.tree_structure(p_mine)
    for a, b in zip(jax.tree_util.tree_leaves(p_ref), jax.tree_util.tree_leaves(p_mine)):
        np.testing.assert_array_equal(a, b)   # identical init (same names, rngs, shapes)
    y_ref, y = ref.apply(p_ref, x), mine.apply(p_ref, x)
    if impl == "xla":
        np.testing.assert_array_equal(y, y_ref)  # the default is nn.Conv, bitwise
    assert _rel(y, y_ref) < 1e-5
    g_ref = jax.grad(lambda p: jnp.sum(ref.apply(p, x) ** 2))(p_ref)
    g = jax.grad(lambda p: jnp.sum(mine.apply(p, x) ** 2))(p_ref)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        assert _rel(a, b) < 1e-5


def test_resolve():
    assert resolve_conv_impl("im2col") == "im2col"
    assert resolve_conv_impl("auto") in CONV_IMPLS
    assert resolve_conv_impl(None) == resolve_conv_impl("auto")
    with pytest.raises(ValueError, match="conv_impl"):
        resolve_conv_impl("cudnn")

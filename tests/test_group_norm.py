"""ldm_jax/models/group_norm.py: GroupNorm (+ SiLU) with its hand-written backward pass, in XLA
and in the C++ kernel (ldm_jax/kernels/cpu_norm.cc), against flax's GroupNorm and autodiff in
float32 and against a float64 recomputation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.group_norm import GroupNorm, group_norm


def _flax(x, scale, bias, groups, eps, fast, act):
    y = nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=fast).apply(
        {"params": {"scale": scale, "bias": bias}}, x)
    return jax.nn.silu(y) if act == "silu" else y


def _inputs(shape, offset=0.0, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    c = shape[-1]
    x = jax.random.normal(k[0], shape) * 1.7 + offset
    scale = 1.0 + 0.3 * jax.random.normal(k[1], (c,))
    bias = 0.2 * jax.random.normal(k[2], (c,))
    cot = jax.random.normal(k[3], shape)
    return x, scale, bias, cot


@pytest.mark.parametrize("shape,groups", [((2, 6, 5, 64), 32), ((3, 7, 12), 4), ((4, 48), 4),
                                          ((1, 3, 4, 2, 6), 3)])
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("impl", ["xla", "cpu_fused"])
def test_matches_flax_values_and_gradients(shape, groups, fast, act, impl):
    x, scale, bias, cot = _inputs(shape, offset=0.4)
    ours = lambda x, s, b: group_norm(x, s, b, groups, 1e-5, fast, act, impl)
    ref = lambda x, s, b: _flax(x, s, b, groups, 1e-5, fast, act)
    y, vjp = jax.vjp(ours, x, scale, bias)
    y_ref, vjp_ref = jax.vjp(ref, x, scale, bias)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=2e-6, rtol=1e-5)
    for got, want in zip(jax.jit(vjp)(cot), vjp_ref(cot)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                                   atol=2e-5 * float(jnp.abs(want).max()), rtol=1e-4)


def _float64_reference(x, scale, bias, groups, eps, cot):
    """Values and input/parameter gradients of GroupNorm + SiLU in float64 numpy, by hand."""
    x, scale, bias, cot = (np.asarray(a, np.float64) for a in (x, scale, bias, cot))
    n, c = x.shape[0], x.shape[-1]
    xg = x.reshape(n, -1, groups, c // groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    rstd = 1.0 / np.sqrt(xg.var(axis=(1, 3), keepdims=True) + eps)
    xhat = ((xg - mean) * rstd).reshape(x.shape)
    h = xhat * scale + bias
    sig = 1.0 / (1.0 + np.exp(-h))
    y = h * sig
    dh = cot * sig * (1.0 + h * (1.0 - sig))
    axes = tuple(range(x.ndim - 1))
    dscale, dbias = (dh * xhat).sum(axis=axes), dh.sum(axis=axes)
    dxhat = (dh * scale).reshape(xg.shape)
    xhat_g = xhat.reshape(xg.shape)
    dx = rstd * (dxhat - dxhat.mean(axis=(1, 3), keepdims=True)
                 - xhat_g * (dxhat * xhat_g).mean(axis=(1, 3), keepdims=True))
    return y, (dx.reshape(x.shape), dscale, dbias)


@pytest.mark.parametrize("offset", [0.0, 30.0])
@pytest.mark.parametrize("impl", ["xla", "cpu_fused"])
def test_two_pass_variance_matches_float64_far_from_zero_mean(offset, impl):
    # the autoencoder's setting (use_fast_variance=False): exact also when the mean is large;
    # 700 positions: several of the kernel's work items per sample, channels not a whole vector
    x, scale, bias, cot = _inputs((2, 20, 35, 40), offset=offset, seed=3)
    y, vjp = jax.vjp(lambda x, s, b: group_norm(x, s, b, 8, 1e-6, False, "silu", impl),
                     x, scale, bias)
    y64, grads64 = _float64_reference(x, scale, bias, 8, 1e-6, cot)
    np.testing.assert_allclose(np.asarray(y), y64, atol=1e-5, rtol=1e-5)
    for got, want in zip(vjp(cot), grads64):
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5 * np.abs(want).max(),
                                   rtol=1e-4)


def test_module_has_flax_parameters_and_rejects_bad_input():
    x = jnp.ones((2, 4, 4, 64), jnp.bfloat16)
    params = GroupNorm(num_groups=32, activation="silu").init(jax.random.key(0), x)
    ref = nn.GroupNorm(num_groups=32).init(jax.random.key(0), x.astype(jnp.float32))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == \
        jax.tree.map(lambda a: (a.shape, a.dtype), ref)
    y = GroupNorm(num_groups=32).apply(params, x)
    assert y.dtype == jnp.float32       # computed and returned in float32, as flax's dtype=f32
    with pytest.raises(ValueError, match="32 groups must divide the channels"):
        GroupNorm(num_groups=32).init(jax.random.key(0), jnp.ones((1, 4, 4, 48)))
    with pytest.raises(ValueError, match="impl='fast' is not one of"):
        GroupNorm(num_groups=4, impl="fast").init(jax.random.key(0), jnp.ones((1, 4, 8)))
    with pytest.raises(ValueError, match="impl='cpu_fused' takes float32 inputs on CPU"):
        group_norm(jnp.ones((1, 4, 8), jnp.bfloat16), jnp.ones(8), jnp.zeros(8), 4, 1e-5,
                   impl="cpu_fused")
    with pytest.raises(ValueError, match="activation='gelu' is not one of"):
        GroupNorm(num_groups=4, activation="gelu").init(jax.random.key(0), jnp.ones((1, 4, 8)))

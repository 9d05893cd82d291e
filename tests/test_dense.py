"""ldm_jax.models.dense.Dense against flax.linen.Dense: parameters, outputs and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.kernels import cpu_conv
from ldm_jax.models.dense import Dense, use_kernel


def _value_and_grads(module, params, x, g):
    y, vjp = jax.vjp(lambda p, x: module.apply(p, x), params, x)
    return y, vjp(g)


@pytest.mark.parametrize("shape,features,use_bias", [
    ((2, 5, 7, 24), 40, True),     # an [N, H, W, C] map, the attention blocks' case
    ((3, 77, 33), 17, True),       # [B, L, C], odd widths (vector tails in the kernel)
    ((300, 8), 520, False),        # rank 2, several of the kernel's row blocks
])
def test_matches_flax_dense(shape, features, use_bias):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    g = jnp.asarray(rng.standard_normal(shape[:-1] + (features,)), jnp.float32)
    ref, ours = nn.Dense(features, use_bias=use_bias), Dense(features, use_bias=use_bias)
    params = ref.init(jax.random.key(0), x)
    same_init = ours.init(jax.random.key(0), x)
    assert jax.tree.structure(params) == jax.tree.structure(same_init)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(same_init)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    y_ref, g_ref = jax.jit(lambda: _value_and_grads(ref, params, x, g))()
    y, grads = jax.jit(lambda: _value_and_grads(ours, params, x, g))()
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))  # the same dot
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_ref)):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-6 * scale)


def test_kernel_only_for_float32_on_one_cpu_device():
    x32, w32 = jnp.ones((4, 8)), jnp.ones((8, 3))
    expect = jax.device_count() == 1 and cpu_conv.available()
    assert use_kernel(x32, w32) == expect
    assert not use_kernel(x32.astype(jnp.bfloat16), w32)
    # bfloat16 compute: flax's computation, bit for bit.
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 6, 10)), jnp.float32)
    ref, ours = nn.Dense(5, dtype=jnp.bfloat16), Dense(5, dtype=jnp.bfloat16)
    params = ref.init(jax.random.key(0), x)
    g = jnp.ones((3, 6, 5), jnp.bfloat16)
    y_ref, g_ref = _value_and_grads(ref, params, x, g)
    y, grads = _value_and_grads(ours, params, x, g)
    for a, b in zip(jax.tree.leaves((y, grads)), jax.tree.leaves((y_ref, g_ref))):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))

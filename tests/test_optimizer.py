"""The optimiser step: the fused CPU kernel (ldm_jax/kernels/cpu_adam.cc) against optax in XLA
and against a float64 recomputation of Adam; state layout, donation, and errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ldm_jax.config.loading import ConfigError
from ldm_jax.kernels import cpu_adam
from ldm_jax.training.optimizer import make_optimizer

pytestmark = pytest.mark.skipif(not cpu_adam.available(), reason="no C++ compiler for the kernel")


def opt_config(name="adamw", clip=0.0, impl="auto", warmup=2, schedule="cosine", wd=0.01):
    return ml_collections.ConfigDict(dict(
        name=name, base_learning_rate=3e-3, scale_lr_by_batch=False, b1=0.9, b2=0.99, eps=1e-8,
        weight_decay=wd, warmup_steps=warmup, schedule=schedule, grad_clip_norm=clip, impl=impl))


def tree(rng, scale=1.0):
    # Odd sizes (vector tails), a scalar, and a leaf spanning several of the kernel's work items.
    shapes = {"a": (37, 5), "b": {"c": (70003,), "d": (7,), "e": ()}, "f": (3, 3, 4, 16)}
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s) * scale, jnp.float32),
                        shapes, is_leaf=lambda x: isinstance(x, tuple))


def run(cfg, params, grads_list, ema_decay=0.9, with_ema=True):
    opt = make_optimizer(cfg, global_batch_size=1, total_steps=20)
    p, s = params, opt.init(params)
    e = jax.tree.map(lambda x: x + 0.5, params) if with_ema else None
    step = jax.jit(lambda p, s, g, e: opt.step(p, s, g, e, jnp.float32(ema_decay) if with_ema else None))
    norms = []
    for g in grads_list:
        p, s, e, n = step(p, s, g, e)
        norms.append(float(n))
    return p, s, e, norms


def assert_trees_close(a, b, rtol=2e-6, atol=1e-7):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name,clip,with_ema", [
    ("adamw", 0.0, True), ("adam", 0.0, True), ("adamw", 0.0, False),
    ("adamw", 50.0, True),    # clipping active (norms are ~300)
    ("adam", 1e6, False),     # clipping configured, never active
])
def test_fused_matches_optax(name, clip, with_ema):
    rng = np.random.default_rng(0)
    params = tree(rng)
    grads = [tree(rng, scale=1.0 + i) for i in range(4)]
    ref = run(opt_config(name, clip, impl="xla"), params, grads, with_ema=with_ema)
    got = run(opt_config(name, clip, impl="cpu_fused"), params, grads, with_ema=with_ema)
    assert_trees_close(got[0], ref[0])        # params
    assert_trees_close(got[1], ref[1])        # the whole optax state, counts included
    if with_ema:
        assert_trees_close(got[2], ref[2])
    else:
        assert got[2] is None
    np.testing.assert_allclose(got[3], ref[3], rtol=1e-6)
    # The step did something: params moved.
    assert float(jnp.max(jnp.abs(got[0]["b"]["c"] - params["b"]["c"]))) > 1e-4


def test_fused_matches_float64_adamw():
    """Two steps of AdamW + EMA against closed-form float64 arithmetic."""
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.standard_normal(1000), jnp.float32)}
    grads = [{"w": jnp.asarray(rng.standard_normal(1000), jnp.float32)} for _ in range(2)]
    cfg = opt_config("adamw", impl="cpu_fused", warmup=0, schedule="constant")
    p, s, e, norms = run(cfg, params, grads, ema_decay=0.75)
    b1, b2, eps, lr, wd = 0.9, 0.99, 1e-8, 3e-3, 0.01
    w = np.asarray(params["w"], np.float64)
    ema = w + 0.5
    m = v = np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g["w"], np.float64)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps) + wd * w
        w = w - lr * u
        ema = ema - 0.25 * (ema - w)
    np.testing.assert_allclose(np.asarray(p["w"]), w, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(e["w"]), ema, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(norms[-1], np.linalg.norm(g), rtol=1e-6)


def test_donated_and_not_donated():
    """Donated, the kernel updates in place; not donated, the caller's arrays are untouched."""
    rng = np.random.default_rng(2)
    params, grads = tree(rng), tree(rng)
    opt = make_optimizer(opt_config(impl="cpu_fused"), global_batch_size=1, total_steps=20)
    state = opt.init(params)
    keep = jax.tree.map(np.asarray, (params, state))
    plain = jax.jit(opt.step)(params, state, grads)
    assert_trees_close((params, state), keep, rtol=0, atol=0)
    donated = jax.jit(opt.step, donate_argnums=(0, 1))(
        jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, state), grads)
    assert_trees_close(donated[:2], plain[:2], rtol=0, atol=0)


def test_auto_picks_the_kernel_on_one_cpu_device():
    opt = make_optimizer(opt_config(impl="auto"), global_batch_size=1, total_steps=20)
    params = {"w": jnp.ones(3)}
    expect = "cpu_fused" if jax.device_count() == 1 else "xla"
    assert opt.resolve_impl(params) == expect
    # bfloat16 leaves: XLA.
    assert opt.resolve_impl({"w": jnp.ones(3, jnp.bfloat16)}) == "xla"


def test_errors_name_the_field():
    with pytest.raises(ConfigError, match="config.optimizer.impl"):
        make_optimizer(opt_config(impl="fast"), global_batch_size=1, total_steps=2)
    opt = make_optimizer(opt_config(impl="cpu_fused"), global_batch_size=1, total_steps=2)
    bf = {"w": jnp.ones(3, jnp.bfloat16)}
    with pytest.raises(ValueError, match="impl='cpu_fused'"):
        opt.step(bf, opt.init(bf), bf)
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="gradients tree differs"):
        opt.step(params, opt.init(params), {"v": jnp.ones(3)})
    with pytest.raises(ValueError, match="together"):
        opt.step(params, opt.init(params), params, ema_params=params)
    with pytest.raises(ValueError, match="not one built by make_optimizer"):
        opt.step(params, optax.sgd(0.1).init(params), params)


def test_state_layout_is_optax():
    """Checkpoints hold optax's state whichever implementation wrote it."""
    params = {"w": jnp.ones(5)}
    for clip in (0.0, 1.0):
        fused = make_optimizer(opt_config(clip=clip, impl="cpu_fused"), global_batch_size=1,
                               total_steps=2)
        xla = make_optimizer(opt_config(clip=clip, impl="xla"), global_batch_size=1, total_steps=2)
        s = fused.init(params)
        out = jax.jit(fused.step)(params, s, params)[1]
        ref = jax.jit(xla.step)(params, xla.init(params), params)[1]
        assert jax.tree.structure(out) == jax.tree.structure(ref) == jax.tree.structure(s)

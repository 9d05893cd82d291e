"""Schedules, forward process, training loss and EMA."""

import math

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from ldm_jax.diffusion import schedules as sch
from ldm_jax.diffusion.ema import ema_decay, ema_update
from ldm_jax.diffusion.losses import make_diffusion_loss, min_snr_weight


def test_linear_schedule_closed_form():
    betas = sch.make_beta_schedule("linear", 1000, 0.0015, 0.0195)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    expected = np.array([(math.sqrt(0.0015) + i * (math.sqrt(0.0195) - math.sqrt(0.0015)) / 999)
                         ** 2 for i in range(1000)])
    np.testing.assert_allclose(betas, expected, rtol=1e-12)
    assert betas[0] == pytest.approx(0.0015, rel=1e-12)
    assert betas[-1] == pytest.approx(0.0195, rel=1e-12)
    np.testing.assert_allclose(sch.make_beta_schedule("sqrt_linear", 5, 0.1, 0.5),
                               [0.1, 0.2, 0.3, 0.4, 0.5], rtol=1e-12)


def test_cosine_schedule_direct_formula():
    T, s = 1000, 8e-3
    betas = sch.make_beta_schedule("cosine", T, cosine_s=s)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    expected = np.array([min(max(1 - f(t + 1) / f(t), 0.0), 0.999) for t in range(T)])
    np.testing.assert_allclose(betas, expected, rtol=1e-10, atol=1e-15)
    assert betas.max() == pytest.approx(0.999)
    # Away from the clipped end, cumprod(1 - beta) reproduces abar(t) = f(t+1) / f(0).
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(abar[:900], [f(t + 1) / f(0) for t in range(900)], rtol=1e-9)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        sch.make_beta_schedule("sigmoid", 10)


def test_schedule_coefficients_float64_then_cast():
    s = sch.DiffusionSchedule.from_config("linear", 1000, 0.00085, 0.012)
    betas = sch.make_beta_schedule("linear", 1000, 0.00085, 0.012)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    assert s.num_timesteps == 1000
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(s))
    np.testing.assert_allclose(s.alphas_cumprod, abar, rtol=1e-6)
    np.testing.assert_allclose(s.alphas_cumprod_prev, abar_prev, rtol=1e-6)
    # 1 - abar is the precision-critical term at small t; it must be right to float32 eps.
    np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - abar), rtol=1e-6)
    post_var = betas * (1 - abar_prev) / (1 - abar)
    np.testing.assert_allclose(s.posterior_variance, post_var, rtol=1e-6)
    assert s.posterior_variance[0] == 0 and np.isfinite(s.posterior_log_variance_clipped).all()
    np.testing.assert_allclose(s.posterior_log_variance_clipped[1:], np.log(post_var[1:]),
                               rtol=1e-6)
    np.testing.assert_allclose(s.posterior_mean_coef1, betas * np.sqrt(abar_prev) / (1 - abar),
                               rtol=1e-6)
    np.testing.assert_allclose(s.posterior_mean_coef2,
                               (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar), rtol=1e-6)


def test_q_sample_statistics():
    s = sch.DiffusionSchedule.from_config("linear", 1000, 0.0015, 0.0195)
    n = 200_000
    x0 = jnp.array([1.5, -0.8, 0.0])
    for t_int in (0, 250, 999):
        t = jnp.full((n,), t_int)
        noise = jax.random.normal(jax.random.key(t_int), (n, 3))
        xt = np.asarray(sch.q_sample(s, jnp.broadcast_to(x0, (n, 3)), t, noise))
        abar = float(s.alphas_cumprod[t_int])
        np.testing.assert_allclose(xt.mean(0), np.sqrt(abar) * np.asarray(x0), atol=0.01)
        np.testing.assert_allclose(xt.var(0), 1 - abar, rtol=0.02, atol=1e-5)


def test_prediction_conversions_roundtrip():
    s = sch.DiffusionSchedule.from_config("cosine", 1000)
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(k1, (6, 4, 4, 2))
    noise = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 10, 200, 500, 800, 990])
    xt = sch.q_sample(s, x0, t, noise)
    v = sch.v_target(s, x0, t, noise)
    np.testing.assert_allclose(sch.predict_x0_from_eps(s, xt, t, noise)[1:], x0[1:], atol=1e-3)
    np.testing.assert_allclose(sch.predict_eps_from_x0(s, xt, t, x0)[:-1], noise[:-1], atol=1e-3)
    np.testing.assert_allclose(sch.predict_x0_from_v(s, xt, t, v), x0, atol=1e-4)
    np.testing.assert_allclose(sch.predict_eps_from_v(s, xt, t, v), noise, atol=1e-4)


def _perfect_apply(s, parameterization, x0):
    """apply_fn that returns the exact target, computed from (x_t, t) and the known x0."""
    def apply_fn(params, x_t, t, cond):
        a = sch.extract(s.alphas_cumprod, t, x_t.ndim)
        eps = (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
        return {"eps": eps, "x0": x0, "v": jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[
            parameterization]
    return apply_fn


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_loss_zero_for_perfect_model(parameterization, loss_type):
    s = sch.DiffusionSchedule.from_config("linear", 1000, 0.0015, 0.0195)
    x0 = jax.random.normal(jax.random.key(1), (8, 8, 8, 4))
    # Eager on purpose: jit compile time dominates for these tiny arrays (jit is covered below).
    loss_fn = make_diffusion_loss(s, parameterization, loss_type)
    loss, aux = loss_fn(_perfect_apply(s, parameterization, x0), None, x0, jax.random.key(2))
    tol = 1e-8 if loss_type == "l2" else 1e-4
    assert float(loss) < tol, float(loss)
    assert aux["loss_per_example"].shape == (8,) and aux["t"].shape == (8,)
    # A wrong model is penalised: zero output for eps gives E[noise^2] (l2) = 1.
    bad, _ = loss_fn(lambda p, x, t, c: jnp.zeros_like(x), None, x0, jax.random.key(2))
    assert float(bad) > 0.3


def test_loss_t_uniform_and_mean():
    s = sch.DiffusionSchedule.from_config("linear", 100)
    x0 = jnp.zeros((4096, 2))
    loss_fn = jax.jit(make_diffusion_loss(s, "eps", "l2"), static_argnums=0)
    loss, aux = loss_fn(lambda p, x, t, c: jnp.zeros_like(x), None, x0, jax.random.key(0))
    t = np.asarray(aux["t"])
    assert t.min() == 0 and t.max() == 99 and abs(t.mean() - 49.5) < 2.5
    np.testing.assert_allclose(loss, aux["loss_per_example"].mean(), rtol=1e-6)
    assert abs(float(loss) - 1.0) < 0.05


def test_cond_is_passed_through():
    s = sch.DiffusionSchedule.from_config("linear", 100)
    seen = {}
    loss_fn = make_diffusion_loss(s)
    loss_fn(lambda p, x, t, c: seen.setdefault("c", c) * 0 + x, {"w": 1}, jnp.ones((2, 3)),
            jax.random.key(0), cond=jnp.float32(3.0))
    assert float(seen["c"]) == 3.0


def test_min_snr_weights_hand_values():
    snr = jnp.array([0.5, 5.0, 20.0])
    np.testing.assert_allclose(min_snr_weight(snr, 5.0, "eps"), [1.0, 1.0, 0.25], rtol=1e-6)
    np.testing.assert_allclose(min_snr_weight(snr, 5.0, "v"), [0.5 / 1.5, 5 / 6, 5 / 21],
                               rtol=1e-6)
    np.testing.assert_allclose(min_snr_weight(snr, 5.0, "x0"), [0.5, 5.0, 5.0], rtol=1e-6)


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
def test_min_snr_loss_applies_weight_per_example(parameterization):
    s = sch.DiffusionSchedule.from_config("linear", 1000)
    x0 = jax.random.normal(jax.random.key(0), (16, 4, 4, 1))
    zero = lambda p, x, t, c: jnp.zeros_like(x)
    rng = jax.random.key(5)
    _, plain = make_diffusion_loss(s, parameterization)(zero, None, x0, rng)
    loss, weighted = make_diffusion_loss(s, parameterization, min_snr_gamma=5.0)(
        zero, None, x0, rng)
    np.testing.assert_array_equal(plain["t"], weighted["t"])
    w = min_snr_weight(sch.snr(s, plain["t"]), 5.0, parameterization)
    np.testing.assert_allclose(weighted["loss_per_example"], plain["loss_per_example"] * w,
                               rtol=1e-6)
    np.testing.assert_allclose(loss, jnp.mean(plain["loss_per_example"] * w), rtol=1e-6)


def test_loss_factory_validation():
    s = sch.DiffusionSchedule.from_config("linear", 10)
    with pytest.raises(ValueError, match="parameterization"):
        make_diffusion_loss(s, "score")
    with pytest.raises(ValueError, match="loss_type"):
        make_diffusion_loss(s, loss_type="huber")


def test_ema_decay_warmup():
    assert float(ema_decay(0)) == pytest.approx(0.1)
    assert float(ema_decay(1)) == pytest.approx(2 / 11)
    assert float(ema_decay(10)) == pytest.approx(11 / 20)
    assert float(ema_decay(1_000_000)) == pytest.approx(0.9999)
    assert float(ema_decay(5, use_warmup=False)) == pytest.approx(0.9999)
    assert float(jax.jit(ema_decay)(jnp.int32(10))) == pytest.approx(0.55)


def test_ema_update():
    ema = {"a": jnp.ones(3), "b": {"c": jnp.zeros((2,), jnp.bfloat16)}}
    params = {"a": jnp.full(3, 3.0), "b": {"c": jnp.ones((2,), jnp.bfloat16)}}
    out = jax.jit(ema_update)(ema, params, 0.75)
    np.testing.assert_allclose(out["a"], 0.75 * 1 + 0.25 * 3, rtol=1e-6)
    assert out["b"]["c"].dtype == jnp.bfloat16
    np.testing.assert_allclose(out["b"]["c"].astype(jnp.float32), 0.25)
    same = ema_update(params, params, ema_decay(3))
    np.testing.assert_array_equal(same["a"], params["a"])

"""Samplers against Gaussian data, where the optimal denoiser is known in closed form.

For x0 ~ N(mu, sigma^2 I) the exact noise predictor is
    eps*(x_t, t) = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar sigma^2 + 1 - abar),
and the probability-flow ODE (which DDIM with eta = 0 and PLMS integrate) maps x at noise
level a1 to level a2 affinely:
    x2 = sqrt(a2) mu + sqrt(a2 s^2 + 1 - a2) / sqrt(a1 s^2 + 1 - a1) (x1 - sqrt(a1) mu).
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from ldm_jax.diffusion.schedules import DiffusionSchedule, alphas_cumprod_f64
from ldm_jax.diffusion import samplers as S

MU, SIGMA, DIM, N = 0.5, 0.7, 16, 4000
SCHED = DiffusionSchedule.from_config("linear", 1000, 0.0015, 0.0195)
ABAR64 = alphas_cumprod_f64(SCHED)
SHAPE = (N, DIM)


def eps_model(x, t):
    a = SCHED.alphas_cumprod[t][:, None]
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * SIGMA ** 2 + 1 - a)


def x0_model(x, t):
    a = SCHED.alphas_cumprod[t][:, None]
    return (x - jnp.sqrt(1 - a) * eps_model(x, t)) / jnp.sqrt(a)


def v_model(x, t):
    a = SCHED.alphas_cumprod[t][:, None]
    return jnp.sqrt(a) * eps_model(x, t) - jnp.sqrt(1 - a) * x0_model(x, t)


MODELS = {"eps": eps_model, "x0": x0_model, "v": v_model}


def run(name, model=eps_model, rng=0, x_T=None, **kw):
    sample = jax.jit(S.get_sampler(name)(SCHED, **kw), static_argnums=(0, 1))
    return np.asarray(sample(model, SHAPE, jax.random.key(rng), x_T=x_T))


def exact_flow(x_T, t_start):
    """Exact probability-flow map from level abar[t_start] to abar[0] (the samplers' end)."""
    a1, a2 = ABAR64[t_start], ABAR64[0]
    scale = np.sqrt(a2 * SIGMA ** 2 + 1 - a2) / np.sqrt(a1 * SIGMA ** 2 + 1 - a1)
    return np.sqrt(a2) * MU + scale * (np.asarray(x_T, np.float64) - np.sqrt(a1) * MU)


@pytest.fixture(scope="module")
def x_T():
    return jax.random.normal(jax.random.key(123), SHAPE, jnp.float32)


def check_moments(x, mean_tol=0.02, var_tol=0.03):
    # DDPM ends at t=0 with x0_hat (data distribution); DDIM/PLMS end at level abar_0, whose
    # marginal differs from the data's by O(beta_0): covered by the tolerances.
    assert abs(x.mean() - MU) < mean_tol, x.mean()
    assert abs(x.var() - SIGMA ** 2) < var_tol, x.var()


def test_ddpm_matches_gaussian_moments():
    check_moments(run("ddpm"))


def test_ddim_matches_gaussian_moments():
    check_moments(run("ddim", num_steps=200, eta=0.0))


@pytest.mark.parametrize("param", ["x0", "v"])
def test_parameterizations_agree(param, x_T):
    ref = run("ddim", num_steps=50, x_T=x_T)
    out = run("ddim", model=MODELS[param], num_steps=50, parameterization=param, x_T=x_T)
    np.testing.assert_allclose(out, ref, atol=2e-4)
    ref = run("ddpm", rng=3)
    out = run("ddpm", model=MODELS[param], parameterization=param, rng=3)
    np.testing.assert_allclose(out, ref, atol=2e-3)


def test_ddim_eta0_is_deterministic(x_T):
    a = run("ddim", num_steps=100, rng=0)
    b = run("ddim", num_steps=100, rng=0)
    np.testing.assert_array_equal(a, b)
    # With a fixed x_T the rng is irrelevant: eta = 0 is a deterministic map of the noise.
    c = run("ddim", num_steps=100, rng=1, x_T=x_T)
    d = run("ddim", num_steps=100, rng=2, x_T=x_T)
    np.testing.assert_array_equal(c, d)
    # ... and that map is (to first order in the step size) the exact probability flow.
    err = np.abs(c - exact_flow(x_T, S.make_ddim_timesteps(1000, 100)[-1])).max()
    assert err < 0.1, err


def test_ddim_eta1_is_stochastic(x_T):
    a = run("ddim", num_steps=50, eta=1.0, rng=1, x_T=x_T)
    b = run("ddim", num_steps=50, eta=1.0, rng=2, x_T=x_T)
    assert np.abs(a - b).mean() > 0.01
    assert abs(a.mean() - MU) < 0.03


def test_plms_agrees_with_fine_ddim(x_T):
    # PLMS with 50 uniform steps starts at t=981; DDIM with 981 steps (stride 1) starts there
    # too, so both integrate the same ODE from the same point.
    plms = run("plms", num_steps=50, x_T=x_T)
    ddim_fine = run("ddim", num_steps=981, x_T=x_T)
    ddim_coarse = run("ddim", num_steps=50, x_T=x_T)
    assert S.make_ddim_timesteps(1000, 50)[-1] == S.make_ddim_timesteps(1000, 981)[-1] == 981
    exact = exact_flow(x_T, 981)
    err_plms = np.abs(plms - exact).max()
    err_coarse = np.abs(ddim_coarse - exact).max()
    assert np.abs(plms - ddim_fine).max() < 2e-2
    assert err_plms < 1.5e-2, err_plms
    # Higher order: far more accurate than DDIM at the same number of steps.
    assert err_plms < err_coarse / 5, (err_plms, err_coarse)
    check_moments(plms)


def test_plms_rejects_eta():
    with pytest.raises(ValueError, match="eta"):
        S.make_plms_sampler(SCHED, num_steps=10, eta=0.5)


def test_plms_single_step_runs(x_T):
    out = run("plms", num_steps=1, x_T=x_T)
    assert out.shape == SHAPE and np.isfinite(out).all()


def test_ddim_timesteps():
    ts = S.make_ddim_timesteps(1000, 50)
    np.testing.assert_array_equal(ts, np.arange(0, 1000, 20) + 1)
    ts = S.make_ddim_timesteps(1000, 3)  # T % S != 0: still S steps, all in range
    np.testing.assert_array_equal(ts, [1, 334, 667])
    q = S.make_ddim_timesteps(1000, 10, "quad")
    np.testing.assert_array_equal(q, (np.linspace(0, np.sqrt(800), 10) ** 2).astype(int) + 1)
    with pytest.raises(ValueError, match="spacing"):
        S.make_ddim_timesteps(1000, 10, "bogus")
    with pytest.raises(ValueError, match="num_steps"):
        S.make_ddim_timesteps(1000, 1000)


def test_guided_model_fn_single_batched_pass():
    calls = []

    def apply(x, t, c):
        calls.append(x.shape[0])
        return x * c["scale"][:, None] + t[:, None]

    b = 5
    x = jax.random.normal(jax.random.key(0), (b, DIM))
    t = jnp.arange(b, dtype=jnp.int32)
    cond = {"scale": jnp.full((b,), 2.0)}
    uncond = {"scale": jnp.full((b,), 0.5)}
    out_c, out_u = apply(x, t, cond), apply(x, t, uncond)
    calls.clear()

    out = S.guided_model_fn(apply, cond, uncond, 1.0)(x, t)
    assert calls == [2 * b]  # one call, on the concatenated batch
    np.testing.assert_allclose(out, out_c, rtol=1e-6)
    np.testing.assert_allclose(S.guided_model_fn(apply, cond, uncond, 0.0)(x, t), out_u,
                               rtol=1e-6)
    np.testing.assert_allclose(S.guided_model_fn(apply, cond, uncond, 7.5)(x, t),
                               out_u + 7.5 * (out_c - out_u), rtol=1e-5, atol=1e-5)


def test_guided_sampling_with_scale_one_equals_conditional(x_T):
    apply = lambda x, t, c: eps_model(x, t) + 0.0 * c
    guided = S.guided_model_fn(apply, jnp.ones((N, 1)), jnp.zeros((N, 1)), 1.0)
    np.testing.assert_allclose(run("ddim", model=guided, num_steps=20, x_T=x_T),
                               run("ddim", num_steps=20, x_T=x_T), atol=1e-5)


def test_registry():
    assert set(S.SAMPLERS) >= {"ddpm", "ddim", "plms"}
    assert S.get_sampler("ddim") is S.make_ddim_sampler
    assert S.get_sampler("plms") is S.make_plms_sampler
    assert S.get_sampler("ddpm") is S.make_ddpm_sampler
    with pytest.raises(ValueError, match="unknown sampler 'euler'.*ddim"):
        S.get_sampler("euler")
    with pytest.raises(ValueError, match="already registered"):
        S.register_sampler("ddim")(lambda *a, **k: None)
    S.register_sampler("_test_dummy")(S.make_ddim_sampler)
    try:
        assert S.get_sampler("_test_dummy") is S.make_ddim_sampler
    finally:
        S.SAMPLERS.pop("_test_dummy")


def test_bad_parameterization_and_shape(x_T):
    with pytest.raises(ValueError, match="parameterization"):
        S.make_ddim_sampler(SCHED, parameterization="score")
    with pytest.raises(ValueError, match="shape"):
        S.make_ddim_sampler(SCHED, num_steps=5)(eps_model, (2, DIM), jax.random.key(0),
                                                x_T=x_T)


@pytest.mark.parametrize("name", ["ddpm", "ddim_eta1", "plms"])
def test_per_example_keys_make_samples_independent_of_the_batch(name):
    """With one key per example, example b's sample is the same in any batch (and != others)."""
    schedule = DiffusionSchedule.from_config("linear", 50)
    if name == "ddim_eta1":
        sampler = S.get_sampler("ddim")(schedule, num_steps=5, eta=1.0)
    else:
        sampler = S.get_sampler(name)(schedule, **({} if name == "ddpm" else {"num_steps": 5}))
    model_fn = lambda x, t: 0.1 * x + 0.001 * t[:, None, None, None]
    keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.key(0), j))(jnp.arange(6))
    full = sampler(model_fn, (6, 2, 2, 1), keys)
    part = sampler(model_fn, (2, 2, 2, 1), keys[3:5])
    np.testing.assert_allclose(part, full[3:5], rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(full[0] - full[1]).max()) > 1e-3
    with pytest.raises(ValueError, match="one key per example"):
        sampler(model_fn, (4, 2, 2, 1), keys)

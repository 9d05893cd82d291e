"""The fast samplers of ldm_jax.diffusion.solvers against diffusers' scheduler loops.

A deterministic, nonlinear toy model (the Gaussian-data denoiser of a continuous-time
approximation of the schedule plus a tanh term) is evaluated identically in JAX and in torch;
both chains start from the same x_T (and, for Euler ancestral, add the same per-step noises),
and the final samples must agree to max|a-b| / max|b| <= 1e-5 in float32.
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from conftest import require
from parity_utils import rel_err

from ldm_jax.diffusion import samplers as S
from ldm_jax.diffusion import solvers
from ldm_jax.diffusion.schedules import DiffusionSchedule

# diffusers 0.42's set_timesteps calls np.array(tensor ** 0.5), which numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

TOL = 1e-5
T, BETA0, BETA1 = 1000, 0.0015, 0.0195
# The repo's LDM 'linear' schedule = diffusers' 'scaled_linear' (linspace of sqrt(beta), squared).
SCHED = DiffusionSchedule.from_config("linear", T, BETA0, BETA1)
SHAPE = (3, 4, 4, 2)
MEAN = np.linspace(-0.8, 0.8, int(np.prod(SHAPE[1:])), dtype=np.float32).reshape(SHAPE[1:])
DATA_STD = 0.5
# diffusers' prediction_type for each parameterisation.
PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def toy_model(xp, x, t, parameterization):
    """Output of the toy network for model input x (the VP x_t) at (possibly fractional) t.

    abar(t) = exp(-int_0^t beta) with the continuous scaled-linear beta; the denoiser is the
    exact one for x0 ~ N(MEAN, DATA_STD^2) plus 0.05 tanh(3 x) (nonlinear in x). ``xp`` is
    jax.numpy or torch; everything is float32.
    """
    if xp is jnp:
        t = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
        mean = jnp.asarray(MEAN)
    else:
        t = t.to(xp.float32)
        mean = xp.from_numpy(MEAN)
    s0, s1 = BETA0 ** 0.5, BETA1 ** 0.5
    u = s0 + (s1 - s0) * t / T
    abar = xp.exp(-(T / (3 * (s1 - s0))) * (u ** 3 - s0 ** 3))
    a, s = xp.sqrt(abar), xp.sqrt(1 - abar)
    den = abar * DATA_STD ** 2 + 1 - abar
    wiggle = 0.05 * xp.tanh(3 * x)
    eps = s * (x - a * mean) / den + s * wiggle
    x0 = mean + a * DATA_STD ** 2 * (x - a * mean) / den + wiggle
    return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[parameterization]


def jax_model(parameterization):
    return lambda x, t: toy_model(jnp, x, t, parameterization)


def x_T_and_noises(num_steps):
    rng = np.random.default_rng(num_steps)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    noises = rng.standard_normal((num_steps,) + SHAPE).astype(np.float32)
    return x_T, noises


def run_jax(name, parameterization, num_steps, x_T, schedule=SCHED, **kw):
    factory_kw = {k: v for k, v in kw.items() if k != "noises"}
    sample = S.get_sampler(name)(schedule, num_steps=num_steps,
                                 parameterization=parameterization, **factory_kw)
    call_kw = {"noises": jnp.asarray(kw["noises"])} if "noises" in kw else {}
    fn = jax.jit(lambda x: sample(jax_model(parameterization), SHAPE, jax.random.key(0),
                                  x_T=x, **call_kw))
    return np.asarray(fn(jnp.asarray(x_T)))


def diffusers_scheduler(cls_name, parameterization, beta_schedule="scaled_linear",
                        beta_start=BETA0, beta_end=BETA1, **kw):
    diffusers = require("diffusers")
    cls = getattr(diffusers, cls_name)
    return cls(num_train_timesteps=T, beta_start=beta_start, beta_end=beta_end,
               beta_schedule=beta_schedule, prediction_type=PREDICTION[parameterization], **kw)


def diffusers_chain(sched, parameterization, x_T):
    """diffusers' sampling loop (the pipeline's) on the toy model, from x_T."""
    torch = require("torch")
    x = torch.from_numpy(x_T) * sched.init_noise_sigma
    for t in sched.timesteps:
        out = toy_model(torch, sched.scale_model_input(x, t), t, parameterization)
        x = sched.step(out, t, x).prev_sample
    return x.numpy()


# ------------------------------------------------------------------------------ dpmpp_2m

DPM_CASES = [(p, n, k) for p in ("eps", "v") for n in (20, 7) for k in (False, True)]
DPM_CASES += [("x0", 20, False), ("x0", 7, True)]


@pytest.mark.parametrize("parameterization,num_steps,karras", DPM_CASES)
def test_dpmpp_2m_matches_diffusers(parameterization, num_steps, karras):
    torch = require("torch")
    sched = diffusers_scheduler("DPMSolverMultistepScheduler", parameterization,
                                algorithm_type="dpmsolver++", solver_order=2,
                                solver_type="midpoint", lower_order_final=True,
                                use_karras_sigmas=karras)
    sched.set_timesteps(num_steps)
    ts, sigmas = solvers.dpmpp_2m_schedule(SCHED, num_steps, karras)
    np.testing.assert_array_equal(ts, sched.timesteps.numpy())
    np.testing.assert_allclose(sigmas, sched.sigmas.numpy(), rtol=1e-6)

    x_T, _ = x_T_and_noises(num_steps)
    theirs = diffusers_chain(sched, parameterization, x_T)
    ours = run_jax("dpmpp_2m", parameterization, num_steps, x_T, karras_sigmas=karras)
    err = rel_err(ours, theirs)
    print(f"dpmpp_2m {parameterization} steps={num_steps} karras={karras}: rel err {err:.2e}")
    assert err <= TOL


# ------------------------------------------------------------------------------ euler_a


@pytest.mark.parametrize("parameterization,num_steps", [("eps", 20), ("eps", 7), ("v", 20),
                                                        ("v", 7)])
def test_euler_a_matches_diffusers(parameterization, num_steps, monkeypatch):
    torch = require("torch")
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_module
    sched = diffusers_scheduler("EulerAncestralDiscreteScheduler", parameterization)
    sched.set_timesteps(num_steps)
    ts, sigmas = solvers.euler_a_schedule(SCHED, num_steps)
    np.testing.assert_array_equal(ts, sched.timesteps.numpy())
    np.testing.assert_allclose(sigmas, sched.sigmas.numpy(), rtol=1e-6)

    x_T, noises = x_T_and_noises(num_steps)
    queue = [torch.from_numpy(n) for n in noises]
    monkeypatch.setattr(euler_module, "randn_tensor", lambda shape, **kw: queue.pop(0))
    x = torch.from_numpy(x_T) * sched.init_noise_sigma
    for t in sched.timesteps:
        out = toy_model(torch, sched.scale_model_input(x, t), t, parameterization)
        x = sched.step(out, t, x).prev_sample
    assert not queue  # one noise per step, in order
    ours = run_jax("euler_a", parameterization, num_steps, x_T, noises=noises)
    err = rel_err(ours, x.numpy())
    print(f"euler_a {parameterization} steps={num_steps}: rel err {err:.2e}")
    assert err <= TOL


# The repo's schedule names against diffusers' beta_schedule, with each one's beta range.
OTHER_SCHEDULES = {
    "sd": (("linear", 0.00085, 0.012), "scaled_linear"),  # Stable Diffusion's
    "ddpm": (("sqrt_linear", 1e-4, 0.02), "linear"),
    "cosine": (("cosine", 1e-4, 0.02), "squaredcos_cap_v2"),
}


@pytest.mark.parametrize("schedule,name,parameterization,num_steps,karras", [
    ("ddpm", "dpmpp_2m", "eps", 7, True),
    ("ddpm", "euler_a", "v", 1, False),  # a one-step chain: t = 0 alone (sigma_0)
    ("sd", "dpmpp_2m", "v", 1, True),
    ("sd", "euler_a", "eps", 1, False),
    ("cosine", "dpmpp_2m", "eps", 20, False),
    ("cosine", "euler_a", "eps", 7, False),
])
def test_other_schedules_match_diffusers(schedule, name, parameterization, num_steps, karras,
                                         monkeypatch):
    """Other beta schedules and step counts down to one. At t = 0, diffusers' float32
    sigma_0 = sqrt((1 - abar_0) / abar_0) carries ~1e-4 relative cancellation error; the
    samplers take diffusers' noise levels as they are, so these chains match too."""
    torch = require("torch")
    (kind, beta0, beta1), theirs_kind = OTHER_SCHEDULES[schedule]
    ours_sched = DiffusionSchedule.from_config(kind, T, beta0, beta1)
    kw = dict(beta_schedule=theirs_kind, beta_start=beta0, beta_end=beta1)
    if name == "dpmpp_2m":
        sched = diffusers_scheduler("DPMSolverMultistepScheduler", parameterization,
                                    algorithm_type="dpmsolver++", solver_order=2,
                                    solver_type="midpoint", lower_order_final=True,
                                    use_karras_sigmas=karras, **kw)
        ours_kw = dict(karras_sigmas=karras)
    else:
        sched = diffusers_scheduler("EulerAncestralDiscreteScheduler", parameterization, **kw)
    sched.set_timesteps(num_steps)
    x_T, noises = x_T_and_noises(num_steps)
    if name == "euler_a":
        from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_module
        queue = [torch.from_numpy(n) for n in noises]
        monkeypatch.setattr(euler_module, "randn_tensor", lambda shape, **kw: queue.pop(0))
        ours_kw = dict(noises=noises)
    theirs = diffusers_chain(sched, parameterization, x_T)
    ours = run_jax(name, parameterization, num_steps, x_T, schedule=ours_sched, **ours_kw)
    err = rel_err(ours, theirs)
    print(f"{name} {schedule} {parameterization} steps={num_steps}: rel err {err:.2e}")
    assert err <= TOL


def test_euler_a_x0_parameterization_agrees_with_eps():
    """diffusers' Euler ancestral has no 'sample' prediction: an x0 model equivalent to the eps
    model (converted with the sampler's own sigma(t)) must give the same chain."""
    num_steps = 7
    x_T, noises = x_T_and_noises(num_steps)
    train = jnp.asarray(solvers.train_sigmas(SCHED), jnp.float32)

    def x0_model(x, t):
        sigma = jnp.interp(t, jnp.arange(T, dtype=jnp.float32), train)[:, None, None, None]
        # x is the VP x_t = x_sigma / sqrt(1 + sigma^2); x0 = x_sigma - sigma eps.
        return x * jnp.sqrt(1 + sigma ** 2) - sigma * toy_model(jnp, x, t, "eps")

    outs = {}
    for p, model in (("eps", jax_model("eps")), ("x0", x0_model)):
        sample = S.get_sampler("euler_a")(SCHED, num_steps=num_steps, parameterization=p)
        outs[p] = np.asarray(sample(model, SHAPE, jax.random.key(0), x_T=jnp.asarray(x_T),
                                    noises=jnp.asarray(noises)))
    assert rel_err(outs["x0"], outs["eps"]) <= 1e-5


# ------------------------------------------------------------------------------ interface


def test_registered_and_made_by_the_task():
    import ml_collections
    from ldm_jax.tasks.diffusion import make_sampler
    assert {"dpmpp_2m", "euler_a"} <= set(S.SAMPLERS)
    config = ml_collections.ConfigDict({
        "diffusion": {"parameterization": "eps"},
        "sampling": {"sampler": "dpmpp_2m", "num_steps": 5, "eta": 0.0,
                     "karras_sigmas": True}})
    shape, rng = (2,) + SHAPE[1:], jax.random.key(1)
    outs = {}
    for name in ("dpmpp_2m", "euler_a", "ddim"):
        outs[name] = make_sampler(config, SCHED, name=name)(jax_model("eps"), shape, rng)
        assert outs[name].shape == shape and bool(jnp.all(jnp.isfinite(outs[name])))
    # sampling.karras_sigmas reaches dpmpp_2m (and only the samplers that take it).
    factory = S.get_sampler("dpmpp_2m")
    for karras in (True, False):
        direct = factory(SCHED, num_steps=5, karras_sigmas=karras)(jax_model("eps"), shape, rng)
        assert np.array_equal(np.asarray(direct), np.asarray(outs["dpmpp_2m"])) == karras


def test_a_refused_sampler_setting_is_a_config_error():
    import ml_collections
    from ldm_jax.config.loading import ConfigError
    from ldm_jax.tasks.diffusion import make_sampler
    config = ml_collections.ConfigDict({
        "diffusion": {"parameterization": "eps"},
        "sampling": {"sampler": "dpmpp_2m", "num_steps": 5, "eta": 0.5, "karras_sigmas": False}})
    # A UserError: the command line prints it as one line and exits 2.
    with pytest.raises(ConfigError, match="sampler 'dpmpp_2m'.*eta must be 0, got 0.5"):
        make_sampler(config, SCHED)


def test_dpmpp_2m_rejects_eta():
    with pytest.raises(ValueError, match="dpmpp_2m is a deterministic ODE solver: eta must be 0"):
        S.get_sampler("dpmpp_2m")(SCHED, num_steps=10, eta=0.5)


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler_a"])
def test_per_example_keys_are_batch_independent(name):
    shape = (3, 5)
    model = lambda x, t: 0.3 * jnp.tanh(x) + 0.01 * t.astype(jnp.float32)[:, None] / T
    sample = jax.jit(S.get_sampler(name)(SCHED, num_steps=6), static_argnums=(0, 1))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(3))
    full = np.asarray(sample(model, shape, keys))
    alone = np.asarray(sample(model, (1, 5), keys[1:2]))
    np.testing.assert_allclose(full[1:2], alone, rtol=1e-6, atol=1e-6)
    assert not np.allclose(full[0], full[1])

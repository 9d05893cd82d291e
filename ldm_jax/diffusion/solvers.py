"""Fast samplers in diffusers' sigma parameterisation: DPM-Solver++ (2M) and Euler ancestral.

Both are registered in `samplers.SAMPLERS` (samplers.py imports this module at its end) and
follow the same contract as DDIM/PLMS: a factory taking the schedule and settings returns a pure

    sample(model_fn, shape, rng, *, x_T=None) -> x0 sample of ``shape``

with the whole chain in one `jax.lax.fori_loop`, per-step coefficients computed on the host in
float64 (baked in as float32 constants) from diffusers' float32 noise levels (see
`train_sigmas`), and ``rng`` one key or one key per example.

Both reproduce a diffusers scheduler loop step for step (diffusers 0.42, default settings
unless stated; tests/test_solvers.py checks the final samples to <= 1e-5 relative for the
scaled-linear, linear and cosine beta schedules and 1 to 50 steps):

* ``dpmpp_2m`` = ``DPMSolverMultistepScheduler(algorithm_type='dpmsolver++', solver_order=2,
  solver_type='midpoint', lower_order_final=True, final_sigmas_type='zero',
  timestep_spacing='linspace', use_karras_sigmas=karras_sigmas)``.
* ``euler_a`` = ``EulerAncestralDiscreteScheduler(timestep_spacing='linspace')``, with the
  pipeline's ``latents = x_T * init_noise_sigma`` and ``scale_model_input``.

Noise levels: sigma_t = sqrt((1 - abar_t) / abar_t) (so x_t / sqrt(abar_t) = x0 + sigma eps),
alpha(sigma) = 1 / sqrt(1 + sigma^2), and the VP pair (alpha, alpha sigma) = (sqrt(abar),
sqrt(1 - abar)) at the training timesteps. The model output is converted to x0 with the
noise level of the solver's step (for Karras sigmas this is the Karras sigma, not the one of
the rounded timestep handed to the model, exactly as diffusers does), so these samplers do not
go through `model_output_to_eps_x0` (which needs an integer t). 'x0' parameterisation is
diffusers' prediction_type='sample'.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import jax
import jax.numpy as jnp

from ldm_jax.diffusion.schedules import DiffusionSchedule
from ldm_jax.diffusion.sampler_registry import (_check_parameterization, _fold_in,
                                                _initial_noise, _normal, _split,
                                                register_sampler)


def train_sigmas(schedule: DiffusionSchedule) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0..T-1 (increasing in t), in diffusers'
    arithmetic, returned as float64.

    diffusers builds these in float32 torch: alphas = 1 - betas in float32, abar their
    cumulative product (torch's CPU cumprod accumulates in float64 and rounds each entry to
    float32), and sigma from that float32 abar in float32. At small t, 1 - abar cancels in
    float32 (beta_0 = 1e-4 keeps only about four digits), so sigma_0 there differs from the
    float64 value by up to ~1e-4 relative. The solvers reproduce diffusers' levels, rounding
    included: every Karras level is spaced from sigma_0 up to sigma_max, the last Euler step
    of a chain runs at t = 0, and an exact sigma_0 moved such chains by up to 8e-5 against
    diffusers, more than the 1e-5 parity.
    """
    alphas = np.float32(1.0) - np.asarray(schedule.betas, np.float32)
    abar = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    sigmas = np.sqrt((np.float32(1.0) - abar) / abar)
    return sigmas.astype(np.float64)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int,
                  rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels, decreasing from sigma_max to sigma_min."""
    ramp = np.linspace(0.0, 1.0, num_steps)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Fractional timesteps of noise levels: linear interpolation of t in log sigma, clamped
    to [0, T-1] (diffusers' `_sigma_to_t`)."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    return np.interp(log_sigma, np.log(train), np.arange(len(train), dtype=np.float64))


def _check_steps(num_steps: int, num_timesteps: int, *, allow_all: bool) -> None:
    top = num_timesteps if allow_all else num_timesteps - 1
    if not 1 <= num_steps <= top:
        raise ValueError(f"num_steps must be in [1, {top}], got {num_steps}")


def dpmpp_2m_schedule(schedule: DiffusionSchedule, num_steps: int, karras: bool = False):
    """The model timesteps (int64 [S], decreasing) and the noise levels (float64 [S + 1],
    ending with 0) of diffusers' DPMSolverMultistepScheduler.set_timesteps.

    Without Karras sigmas: timestep_spacing='linspace', i.e. round(linspace(0, T-1, S+1))
    reversed, the last (0) dropped, and sigma the training sigma there. With Karras sigmas: S
    Karras levels between the training sigmas at t=0 and t=T-1, and the timesteps their
    log-sigma interpolation, rounded (diffusers keeps them fractional only for its
    'squaredcos_cap_v2' schedule). final_sigmas_type='zero': the chain ends at sigma 0.
    """
    num_t = schedule.num_timesteps
    _check_steps(num_steps, num_t, allow_all=False)
    train = train_sigmas(schedule)
    if karras:
        sigmas = karras_sigmas(float(train[0]), float(train[-1]), num_steps)
        ts = np.round(sigma_to_t(sigmas, train))
    else:
        ts = np.linspace(0, num_t - 1, num_steps + 1).round()[::-1][:-1]
        sigmas = train[ts.astype(np.int64)]
    return ts.astype(np.int64), np.append(sigmas, 0.0)


def euler_a_schedule(schedule: DiffusionSchedule, num_steps: int):
    """The model timesteps (float32 [S], fractional, decreasing) and noise levels (float64
    [S + 1], ending with 0) of EulerAncestralDiscreteScheduler.set_timesteps ('linspace'):
    linspace(0, T-1, S) reversed, sigma interpolated linearly in t."""
    num_t = schedule.num_timesteps
    _check_steps(num_steps, num_t, allow_all=True)
    ts = np.linspace(0, num_t - 1, num_steps, dtype=np.float32)[::-1].copy()
    sigmas = np.interp(ts.astype(np.float64), np.arange(num_t, dtype=np.float64),
                       train_sigmas(schedule))
    return ts, np.append(sigmas, 0.0)


def _vp(sigma):
    """(alpha, sigma_vp) of a noise level: x_t = alpha x0 + sigma_vp eps."""
    alpha = 1.0 / np.sqrt(sigma ** 2 + 1.0)
    return alpha, sigma * alpha


def _dpmpp_2m_tables(sigmas: np.ndarray) -> dict:
    """Per step i (sigma_i -> sigma_{i+1}): x_{i+1} = cx x_i + c0 D_i + c1 D_{i-1} in float64,
    with D the data (x0) predictions. First order at the first step and at the last (to
    sigma 0, which gives x_{i+1} = D_i); second-order midpoint (DPM-Solver++ 2M) between:
    x' = (s_t/s_0) x - alpha_t (e^-h - 1) (D0 + (D0 - D1) / (2 r0)), r0 = h_prev / h."""
    steps = len(sigmas) - 1
    cx, c0, c1 = np.zeros(steps), np.zeros(steps), np.zeros(steps)
    with np.errstate(divide="ignore"):
        lam = -np.log(sigmas)  # lambda = log(alpha) - log(sigma_vp) = -log(sigma); inf at 0
    alpha, sig_vp = _vp(sigmas)
    for i in range(steps):
        if sigmas[i + 1] == 0.0:  # the final step to sigma 0: the data prediction itself
            c0[i] = 1.0
            continue
        h = lam[i + 1] - lam[i]
        em1 = np.expm1(-h)
        cx[i] = sig_vp[i + 1] / sig_vp[i]
        if i == 0:
            c0[i] = -alpha[i + 1] * em1
        else:
            r0 = (lam[i] - lam[i - 1]) / h
            c0[i] = -alpha[i + 1] * em1 * (1.0 + 0.5 / r0)
            c1[i] = alpha[i + 1] * em1 * (0.5 / r0)
    return dict(cx=cx, c0=c0, c1=c1)


def _f32(v) -> jax.Array:
    return jnp.asarray(np.asarray(v, np.float64), jnp.float32)


@register_sampler("dpmpp_2m")
def make_dpmpp_2m_sampler(schedule: DiffusionSchedule, num_steps: int = 20, eta: float = 0.0,
                          parameterization: str = "eps", karras_sigmas: bool = False):
    """DPM-Solver++(2M) (Lu et al. 2022), the deterministic multistep data-prediction solver.

    One model call per step on diffusers' timesteps (see `dpmpp_2m_schedule`); ``karras_sigmas``
    spaces the noise levels as Karras et al. (rho = 7). The first step is first order (DDIM),
    the last goes to sigma 0 (first order, i.e. returns the last x0 prediction). ``eta`` is
    accepted for the common sampler interface and must be 0.
    """
    _check_parameterization(parameterization)
    if eta != 0:
        raise ValueError(f"dpmpp_2m is a deterministic ODE solver: eta must be 0, got {eta} "
                         "(use euler_a or ddim for stochastic sampling)")
    ts, sigmas = dpmpp_2m_schedule(schedule, num_steps, karras_sigmas)
    alpha, sig_vp = _vp(sigmas[:-1])
    tab = {k: _f32(v) for k, v in _dpmpp_2m_tables(sigmas).items()}
    tab.update(t=jnp.asarray(ts, jnp.int32), alpha=_f32(alpha), sig_vp=_f32(sig_vp))

    def sample(model_fn: Callable, shape, rng: jax.Array, *,
               x_T: Optional[jax.Array] = None) -> jax.Array:
        x = _initial_noise(rng, shape, x_T)  # init_noise_sigma = 1 (VP space)
        batch = shape[0]

        def body(i, carry):
            x, d_prev = carry
            t = jnp.full((batch,), tab["t"][i], jnp.int32)
            out = model_fn(x, t).astype(jnp.float32)
            a, s = tab["alpha"][i], tab["sig_vp"][i]
            if parameterization == "eps":
                d = (x - s * out) / a
            elif parameterization == "v":
                d = a * x - s * out
            else:
                d = out
            x = tab["cx"][i] * x + tab["c0"][i] * d + tab["c1"][i] * d_prev
            return x, d

        x, _ = jax.lax.fori_loop(0, num_steps, body, (x, jnp.zeros(shape, jnp.float32)))
        return x

    return sample


@register_sampler("euler_a")
def make_euler_a_sampler(schedule: DiffusionSchedule, num_steps: int = 20, eta: float = 1.0,
                         parameterization: str = "eps"):
    """Euler ancestral sampling in sigma space (Karras et al. 2022 / k-diffusion).

    x starts at x_T * sigma_max (x = x_t / sqrt(abar)); each step feeds the model
    x / sqrt(1 + sigma^2) (the VP x_t) at diffusers' fractional timestep, predicts x0, takes an
    Euler step of dx/dsigma = (x - x0) / sigma down to sigma_down and adds sigma_up noise:
    sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)),
    sigma_down = sqrt(sigma_next^2 - sigma_up^2). eta = 1 is the standard ancestral sampler
    (diffusers' EulerAncestralDiscreteScheduler); eta = 0 is the deterministic Euler sampler;
    values in between scale the fresh noise (k-diffusion's `eta`). The last step ends at
    sigma 0 (returns the x0 prediction; no noise).

    The model gets float32 timesteps (fractional: linspace(0, T-1, S)), as in diffusers; the
    UNet's sinusoidal embedding takes them as they are.

    ``sample(..., noises=...)`` takes the per-step noises [num_steps, *shape] (step i adds
    noises[i] * sigma_up_i) instead of drawing them; otherwise step i draws
    normal(fold_in(loop_key, i)) like DDIM with eta > 0 (per example for a key batch).
    """
    _check_parameterization(parameterization)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ts, sigmas = euler_a_schedule(schedule, num_steps)
    s_from, s_to = sigmas[:-1], sigmas[1:]
    s_up = np.minimum(s_to, eta * np.sqrt(s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2))
    s_down = np.sqrt(s_to ** 2 - s_up ** 2)
    tab = dict(t=jnp.asarray(ts, jnp.float32), sigma=_f32(s_from), dt=_f32(s_down - s_from),
               up=_f32(s_up), c_in=_f32(1.0 / np.sqrt(s_from ** 2 + 1.0)),
               c_in2=_f32(1.0 / (s_from ** 2 + 1.0)),
               v_out=_f32(-s_from / np.sqrt(s_from ** 2 + 1.0)))
    init_sigma = float(np.float32(sigmas.max()))

    def sample(model_fn: Callable, shape, rng: jax.Array, *, x_T: Optional[jax.Array] = None,
               noises: Optional[jax.Array] = None) -> jax.Array:
        if noises is not None and tuple(noises.shape) != (num_steps,) + tuple(shape):
            raise ValueError(f"noises shape {tuple(noises.shape)} != "
                             f"{(num_steps,) + tuple(shape)} (num_steps, *shape)")
        if noises is not None:
            noises = jnp.asarray(noises, jnp.float32)
        init_rng, loop_rng = _split(rng, shape)
        x = _initial_noise(init_rng, shape, x_T) * init_sigma
        batch = shape[0]

        def body(i, x):
            sigma = tab["sigma"][i]
            t = jnp.full((batch,), tab["t"][i], jnp.float32)
            out = model_fn(x * tab["c_in"][i], t).astype(jnp.float32)
            if parameterization == "eps":
                x0 = x - sigma * out
            elif parameterization == "v":
                x0 = out * tab["v_out"][i] + x * tab["c_in2"][i]
            else:
                x0 = out
            x = x + (x - x0) / sigma * tab["dt"][i]
            if eta > 0:  # static: eta = 0 (plain Euler) draws no noise
                if noises is not None:
                    noise = noises[i]
                else:
                    noise = _normal(_fold_in(loop_rng, i, shape), shape)
                x = x + noise * tab["up"][i]
            return x

        return jax.lax.fori_loop(0, num_steps, body, x)

    return sample

"""Reverse-process samplers: DDPM (ancestral), DDIM and PLMS, plus classifier-free guidance.

DPM-Solver++ (2M) and Euler ancestral, in diffusers' sigma parameterisation, live in
solvers.py; they are registered here too (this module imports it at its end).

Every sampler is a *factory* registered under a name; the factory takes the schedule and the
sampler settings and returns a pure function

    sample(model_fn, shape, rng, *, x_T=None) -> x0 sample of ``shape``

``rng`` is one key, or a batch of ``shape[0]`` keys (typed keys, ``jax.random.key``): then
example b draws all its noise from ``rng[b]`` alone, so a sample does not depend on the batch
it is drawn in (the sample command gives sample j the key fold_in(key(seed), j), which makes
samples independent of the batch size and the device count).

where ``model_fn(x_t, t)`` returns the network output for a batch (``t`` is an int32 [B]
array of training-time indices) in the parameterisation given to the factory ('eps', 'x0' or
'v'). The whole reverse chain is a single `jax.lax.fori_loop`, so
``jax.jit(sample, static_argnums=(0, 1))`` compiles the model once, not once per step.

Per-step coefficients are computed on the host in float64 and baked in as float32 constants.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import jax
import jax.numpy as jnp

from ldm_jax.diffusion.schedules import (DiffusionSchedule, alphas_cumprod_f64,
                                         model_output_to_eps_x0, q_posterior_mean_variance)

# The registry and the rng helpers live in sampler_registry.py, shared with solvers.py (which
# this module imports at its end, so that importing this module registers every sampler).
from ldm_jax.diffusion.sampler_registry import (  # noqa: E402,F401  (re-exported)
    SAMPLERS, _check_parameterization, _fold_in, _initial_noise, _is_key_batch, _normal, _split,
    get_sampler, register_sampler)


@register_sampler("ddpm")
def make_ddpm_sampler(schedule: DiffusionSchedule, parameterization: str = "eps",
                      clip_denoised: bool = False):
    """Ancestral DDPM sampler over all T steps with the true posterior variance.

    Each step predicts x0 (optionally clipped to [-1, 1]: useful in pixel space, wrong for
    latents, hence off by default) and samples q(x_{t-1} | x_t, x0_hat); no noise is added at
    the final step t = 0.
    """
    _check_parameterization(parameterization)
    num_t = schedule.num_timesteps

    def sample(model_fn: Callable, shape, rng: jax.Array, *,
               x_T: Optional[jax.Array] = None) -> jax.Array:
        init_rng, loop_rng = _split(rng, shape)
        x = _initial_noise(init_rng, shape, x_T)
        batch = shape[0]

        def body(i, x):
            t_int = num_t - 1 - i
            t = jnp.full((batch,), t_int, jnp.int32)
            out = model_fn(x, t).astype(jnp.float32)
            _, x0 = model_output_to_eps_x0(schedule, parameterization, x, t, out)
            if clip_denoised:
                x0 = jnp.clip(x0, -1.0, 1.0)
            mean, _, log_var = q_posterior_mean_variance(schedule, x0, x, t)
            noise = _normal(_fold_in(loop_rng, i, shape), shape)
            keep_noise = (t_int > 0).astype(jnp.float32)
            return mean + keep_noise * jnp.exp(0.5 * log_var) * noise

        return jax.lax.fori_loop(0, num_t, body, x)

    return sample


def make_ddim_timesteps(num_train_timesteps: int, num_steps: int,
                        spacing: str = "uniform") -> np.ndarray:
    """DDIM time indices (ascending int array of length ``num_steps``), as in the reference.

    'uniform': 0, c, 2c, ... with stride c = T // S; 'quad': (linspace(0, sqrt(0.8 T), S)**2)
    truncated to ints. Both are shifted by +1 (the reference offset, so the last step lands on
    t=1 and the final alpha is abar_0). The uniform range is cut to S entries because when
    T % S != 0 ``range`` yields one extra index.
    """
    if not 1 <= num_steps < num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}), got {num_steps} "
                         "(use the 'ddpm' sampler for all steps)")
    if spacing == "uniform":
        stride = num_train_timesteps // num_steps
        ts = np.arange(0, num_train_timesteps, stride)[:num_steps]
    elif spacing == "quad":
        ts = (np.linspace(0, np.sqrt(num_train_timesteps * 0.8), num_steps) ** 2).astype(int)
    else:
        raise ValueError(f"unknown DDIM spacing {spacing!r}; expected 'uniform' or 'quad'")
    return (ts + 1).astype(np.int64)


def _ddim_tables(schedule: DiffusionSchedule, num_steps: int, spacing: str, eta: float):
    """float32 per-step tables (index i = i-th ascending DDIM step), computed in float64."""
    abar = alphas_cumprod_f64(schedule)
    ts = make_ddim_timesteps(schedule.num_timesteps, num_steps, spacing)
    a = abar[ts]
    a_prev = np.concatenate([abar[:1], abar[ts[:-1]]])
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    return dict(t=jnp.asarray(ts, jnp.int32), sqrt_a=f32(np.sqrt(a)),
                sqrt_1ma=f32(np.sqrt(1 - a)), sqrt_a_prev=f32(np.sqrt(a_prev)),
                dir_coef=f32(np.sqrt(np.maximum(1 - a_prev - sigma ** 2, 0.0))),
                sigma=f32(sigma))


@register_sampler("ddim")
def make_ddim_sampler(schedule: DiffusionSchedule, num_steps: int = 50, eta: float = 0.0,
                      parameterization: str = "eps", spacing: str = "uniform"):
    """DDIM sampler (Song et al. 2021) over ``num_steps`` sub-sampled timesteps.

    x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma z with
    sigma = eta sqrt((1 - a_prev)/(1 - a) (1 - a/a_prev)); eta = 0 is the deterministic
    probability-flow-like sampler, eta = 1 matches DDPM's variance. As in the reference the
    final step goes to noise level abar_0 (not 1), and that x is returned.
    """
    _check_parameterization(parameterization)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    tab = _ddim_tables(schedule, num_steps, spacing, eta)

    def sample(model_fn: Callable, shape, rng: jax.Array, *,
               x_T: Optional[jax.Array] = None) -> jax.Array:
        init_rng, loop_rng = _split(rng, shape)
        x = _initial_noise(init_rng, shape, x_T)
        batch = shape[0]

        def body(i, x):
            idx = num_steps - 1 - i
            t = jnp.full((batch,), tab["t"][idx], jnp.int32)
            out = model_fn(x, t).astype(jnp.float32)
            eps, x0 = model_output_to_eps_x0(schedule, parameterization, x, t, out)
            x = tab["sqrt_a_prev"][idx] * x0 + tab["dir_coef"][idx] * eps
            if eta > 0:  # static: the deterministic sampler draws no per-step noise at all
                noise = _normal(_fold_in(loop_rng, i, shape), shape)
                x = x + tab["sigma"][idx] * noise
            return x

        return jax.lax.fori_loop(0, num_steps, body, x)

    return sample


# Adams-Bashforth coefficients for [eps_t, eps_{t+1}, eps_{t+2}, eps_{t+3}] by history length.
_AB_COEFS = np.array([
    [1.0, 0.0, 0.0, 0.0],                       # unused (the first step is improved Euler)
    [3 / 2, -1 / 2, 0.0, 0.0],                   # 2nd order
    [23 / 12, -16 / 12, 5 / 12, 0.0],            # 3rd order
    [55 / 24, -59 / 24, 37 / 24, -9 / 24],       # 4th order
], dtype=np.float32)


@register_sampler("plms")
def make_plms_sampler(schedule: DiffusionSchedule, num_steps: int = 50, eta: float = 0.0,
                      parameterization: str = "eps", spacing: str = "uniform"):
    """PLMS sampler (pseudo linear multistep, Liu et al. 2022) on the DDIM timesteps.

    The first step is a pseudo improved-Euler (2nd order) step: take a DDIM step with eps_t,
    evaluate eps at the result and the next timestep, and redo the step with their mean (two
    model calls). Later steps reuse the stored eps history with Adams-Bashforth orders 2, 3
    and then 4 (55, -59, 37, -9)/24. Only the deterministic variant (eta = 0) exists.
    """
    _check_parameterization(parameterization)
    if eta != 0:
        raise ValueError(f"PLMS is deterministic: eta must be 0, got {eta}")
    tab = _ddim_tables(schedule, num_steps, spacing, 0.0)
    coefs = jnp.asarray(_AB_COEFS)

    def sample(model_fn: Callable, shape, rng: jax.Array, *,
               x_T: Optional[jax.Array] = None) -> jax.Array:
        x = _initial_noise(rng, shape, x_T)
        batch = shape[0]

        def eps_at(x, idx):
            t = jnp.full((batch,), tab["t"][idx], jnp.int32)
            out = model_fn(x, t).astype(jnp.float32)
            return model_output_to_eps_x0(schedule, parameterization, x, t, out)[0]

        def ddim_step(x, eps, idx):
            x0 = (x - tab["sqrt_1ma"][idx] * eps) / tab["sqrt_a"][idx]
            return tab["sqrt_a_prev"][idx] * x0 + tab["dir_coef"][idx] * eps

        # First step, peeled out of the loop because it needs two model evaluations.
        first, nxt = num_steps - 1, max(num_steps - 2, 0)
        e_t = eps_at(x, first)
        e_next = eps_at(ddim_step(x, e_t, first), nxt)
        x = ddim_step(x, 0.5 * (e_t + e_next), first)
        # history[k] = eps from k+1 steps ago; zeros get zero weight until filled.
        history = jnp.stack([e_t, jnp.zeros_like(e_t), jnp.zeros_like(e_t)])

        def body(i, carry):
            x, history = carry
            idx = num_steps - 1 - i
            e_t = eps_at(x, idx)
            c = coefs[jnp.minimum(i, 3)]
            e_prime = c[0] * e_t + c[1] * history[0] + c[2] * history[1] + c[3] * history[2]
            x = ddim_step(x, e_prime, idx)
            history = jnp.concatenate([e_t[None], history[:2]], axis=0)
            return x, history

        x, _ = jax.lax.fori_loop(1, num_steps, body, (x, history))
        return x

    return sample


def guided_model_fn(apply: Callable[[jax.Array, jax.Array, Any], jax.Array], cond: Any,
                    uncond: Any, scale: float) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Classifier-free guidance wrapper: returns ``model_fn(x_t, t)`` for the samplers.

    ``apply(x, t, c)`` is the conditional network; ``cond``/``uncond`` are conditioning pytrees
    with batch-leading leaves (e.g. a context array, or a dict of context and labels). The
    conditional and unconditional predictions come from ONE batched call on
    concat([uncond, cond]), and are combined as out_u + scale * (out_c - out_u) (valid for
    any parameterisation, since all are affine in the model output).
    """
    def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
        both = lambda u, c: jnp.concatenate([u, c], axis=0)
        c_in = jax.tree_util.tree_map(both, uncond, cond)
        out = apply(both(x_t, x_t), both(t, t), c_in)
        out_u, out_c = jnp.split(out, 2, axis=0)
        return out_u + scale * (out_c - out_u)

    return model_fn


# The fast samplers (DPM-Solver++ 2M, Euler ancestral) live in solvers.py, which imports the
# helpers above; importing it here registers them whenever `samplers` is imported.
from ldm_jax.diffusion import solvers as _solvers  # noqa: E402,F401  (after the definitions)

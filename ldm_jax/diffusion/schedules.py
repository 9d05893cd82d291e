"""Discrete-time diffusion noise schedules (DDPM / LDM conventions).

All schedule quantities are derived in float64 numpy and only then cast to float32: terms such
as 1 - alphas_cumprod at small t, or the posterior variance, lose several digits if the
cumulative product is formed in float32.

Conventions: t is an integer index in [0, T); x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with
abar_t = prod_{s<=t} (1 - beta_s).
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from flax import struct


def make_beta_schedule(kind: str, num_timesteps: int, linear_start: float = 1e-4,
                       linear_end: float = 2e-2, cosine_s: float = 8e-3) -> np.ndarray:
    """Return the beta schedule [T] as float64 numpy.

    kinds (names and formulas as in the LDM reference):
      'linear':      linspace(sqrt(start), sqrt(end), T) ** 2 (the LDM "scaled linear").
      'sqrt_linear': linspace(start, end, T) (the DDPM linear schedule; the name is LDM's).
      'sqrt':        linspace(start, end, T) ** 0.5.
      'cosine':      Nichol & Dhariwal: abar(t) = cos^2(((t/T + s) / (1 + s)) pi/2), normalised
                     by abar(0); beta_t = 1 - abar(t+1)/abar(t) clipped to [0, 0.999].
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if kind == "linear":
        betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, num_timesteps,
                            dtype=np.float64) ** 2
    elif kind == "sqrt_linear":
        betas = np.linspace(linear_start, linear_end, num_timesteps, dtype=np.float64)
    elif kind == "sqrt":
        betas = np.linspace(linear_start, linear_end, num_timesteps, dtype=np.float64) ** 0.5
    elif kind == "cosine":
        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps + cosine_s
        abar = np.cos(steps / (1 + cosine_s) * np.pi / 2) ** 2
        abar = abar / abar[0]
        betas = np.clip(1 - abar[1:] / abar[:-1], 0.0, 0.999)
    else:
        raise ValueError(f"unknown beta schedule {kind!r}; expected one of "
                         "'linear', 'sqrt_linear', 'sqrt', 'cosine'")
    return betas


@struct.dataclass
class DiffusionSchedule:
    """Precomputed per-timestep diffusion coefficients, each a float32 [T] array.

    A pytree, so it can be passed through `jax.jit` / closed over freely.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array

    @property
    def num_timesteps(self) -> int:
        """T, the number of discrete diffusion steps (static: read from the array shape)."""
        return self.betas.shape[0]

    @classmethod
    def from_betas(cls, betas, v_posterior: float = 0.0) -> "DiffusionSchedule":
        """Build every coefficient from ``betas`` in float64, then cast to float32.

        ``v_posterior`` interpolates the posterior variance between the true posterior
        variance (0, the LDM default) and beta_t (1).
        """
        betas = np.asarray(betas, dtype=np.float64)
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = ((1 - v_posterior) * betas * (1 - abar_prev) / (1 - abar)
                    + v_posterior * betas)
        f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
        return cls(
            betas=f32(betas),
            alphas_cumprod=f32(abar),
            alphas_cumprod_prev=f32(abar_prev),
            sqrt_alphas_cumprod=f32(np.sqrt(abar)),
            sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1 - abar)),
            log_one_minus_alphas_cumprod=f32(np.log(1 - abar)),
            sqrt_recip_alphas_cumprod=f32(np.sqrt(1 / abar)),
            sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1 / abar - 1)),
            posterior_variance=f32(post_var),
            # The posterior variance is 0 at t=0; clip before the log so it stays finite.
            posterior_log_variance_clipped=f32(np.log(np.maximum(post_var, 1e-20))),
            posterior_mean_coef1=f32(betas * np.sqrt(abar_prev) / (1 - abar)),
            posterior_mean_coef2=f32((1 - abar_prev) * np.sqrt(alphas) / (1 - abar)),
        )

    @classmethod
    def from_config(cls, kind: str = "linear", num_timesteps: int = 1000,
                    linear_start: float = 1e-4, linear_end: float = 2e-2,
                    cosine_s: float = 8e-3, v_posterior: float = 0.0) -> "DiffusionSchedule":
        """Schedule from the LDM config keys (beta_schedule, timesteps, linear_start/end)."""
        return cls.from_betas(make_beta_schedule(kind, num_timesteps, linear_start, linear_end,
                                                 cosine_s), v_posterior)


def alphas_cumprod_f64(schedule: DiffusionSchedule) -> np.ndarray:
    """abar recomputed in float64 from the (float32) betas, for host-side sampler setup."""
    return np.cumprod(1.0 - np.asarray(schedule.betas, dtype=np.float64))


def extract(coef: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """Gather ``coef[t]`` for a [B] index and reshape to [B, 1, ..., 1] (``ndim`` dims)."""
    out = jnp.take(coef, jnp.asarray(t, jnp.int32))
    return out.reshape(out.shape + (1,) * (ndim - out.ndim))


def q_sample(schedule: DiffusionSchedule, x0: jax.Array, t: jax.Array,
             noise: jax.Array) -> jax.Array:
    """Sample x_t ~ q(x_t | x0) = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def snr(schedule: DiffusionSchedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio abar_t / (1 - abar_t) at integer times ``t`` (same shape)."""
    abar = jnp.take(schedule.alphas_cumprod, jnp.asarray(t, jnp.int32))
    return abar / (1.0 - abar)


def predict_x0_from_eps(schedule: DiffusionSchedule, x_t, t, eps):
    """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
            - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)


def predict_eps_from_x0(schedule: DiffusionSchedule, x_t, t, x0):
    """eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    return ((extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0)
            / extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))


def v_target(schedule: DiffusionSchedule, x0, t, noise):
    """v = sqrt(abar) noise - sqrt(1 - abar) x0 (Salimans & Ho 2022)."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * noise
            - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)


def predict_x0_from_v(schedule: DiffusionSchedule, x_t, t, v):
    """x0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
            - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v)


def predict_eps_from_v(schedule: DiffusionSchedule, x_t, t, v):
    """eps = sqrt(1 - abar) x_t + sqrt(abar) v."""
    return (extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t
            + extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * v)


def model_output_to_eps_x0(schedule: DiffusionSchedule, parameterization: str, x_t, t, out):
    """Convert a model output of the given parameterisation to ``(eps, x0)`` predictions."""
    if parameterization == "eps":
        return out, predict_x0_from_eps(schedule, x_t, t, out)
    if parameterization == "x0":
        return predict_eps_from_x0(schedule, x_t, t, out), out
    if parameterization == "v":
        return predict_eps_from_v(schedule, x_t, t, out), predict_x0_from_v(schedule, x_t, t, out)
    raise ValueError(f"unknown parameterization {parameterization!r}; expected 'eps', 'x0' "
                     "or 'v'")


def q_posterior_mean_variance(schedule: DiffusionSchedule, x0, x_t, t):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)."""
    mean = (extract(schedule.posterior_mean_coef1, t, x_t.ndim) * x0
            + extract(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t)
    return (mean, extract(schedule.posterior_variance, t, x_t.ndim),
            extract(schedule.posterior_log_variance_clipped, t, x_t.ndim))

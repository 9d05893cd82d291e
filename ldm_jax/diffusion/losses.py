"""Denoising training loss (LDM "simple" loss) with optional min-SNR weighting."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.schedules import DiffusionSchedule, q_sample, snr, v_target

_PARAMETERIZATIONS = ("eps", "x0", "v")
_LOSS_TYPES = ("l2", "l1")


def min_snr_weight(snr_t: jax.Array, gamma: float, parameterization: str) -> jax.Array:
    """Min-SNR-gamma loss weight (Hang et al. 2023) for each element of ``snr_t``.

    The paper's weight for an x0-space loss is min(SNR, gamma); expressed for the loss in the
    model's own output space this becomes
      eps: min(SNR, gamma) / SNR,  v: min(SNR, gamma) / (SNR + 1),  x0: min(SNR, gamma).
    """
    clipped = jnp.minimum(snr_t, gamma)
    if parameterization == "eps":
        return clipped / snr_t
    if parameterization == "v":
        return clipped / (snr_t + 1.0)
    if parameterization == "x0":
        return clipped
    raise ValueError(f"unknown parameterization {parameterization!r}")


def make_diffusion_loss(schedule: DiffusionSchedule, parameterization: str = "eps",
                        loss_type: str = "l2", min_snr_gamma: Optional[float] = None
                        ) -> Callable[..., tuple[jax.Array, dict]]:
    """Build ``loss_fn(apply_fn, params, x0, rng, cond=None) -> (loss, aux)``.

    ``loss_fn`` draws t ~ U{0, ..., T-1} and noise ~ N(0, I) per example, forms x_t by
    `q_sample`, calls ``apply_fn(params, x_t, t, cond)`` and regresses its output onto the
    parameterisation's target (eps: the noise, x0: the clean input, v: sqrt(abar) eps -
    sqrt(1-abar) x0). The per-example loss is the mean squared (l2) or absolute (l1) error over
    all non-batch dims, optionally min-SNR weighted; the returned loss is its batch mean.

    ``aux`` holds ``loss_per_example`` [B] (after weighting) and ``t`` [B]. The function is
    pure and jittable (``apply_fn`` is static); pass a dropout rng to the model through the
    ``apply_fn`` closure.
    """
    if parameterization not in _PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {_PARAMETERIZATIONS}, "
                         f"got {parameterization!r}")
    if loss_type not in _LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {_LOSS_TYPES}, got {loss_type!r}")
    if min_snr_gamma is not None and min_snr_gamma <= 0:
        raise ValueError(f"min_snr_gamma must be positive, got {min_snr_gamma}")

    def loss_fn(apply_fn: Callable, params: Any, x0: jax.Array, rng: jax.Array,
                cond: Any = None) -> tuple[jax.Array, dict]:
        batch = x0.shape[0]
        t_rng, noise_rng = jax.random.split(rng)
        t = jax.random.randint(t_rng, (batch,), 0, schedule.num_timesteps, dtype=jnp.int32)
        noise = jax.random.normal(noise_rng, x0.shape, dtype=jnp.float32)
        x0 = x0.astype(jnp.float32)
        x_t = q_sample(schedule, x0, t, noise)
        out = apply_fn(params, x_t, t, cond).astype(jnp.float32)

        if parameterization == "eps":
            target = noise
        elif parameterization == "x0":
            target = x0
        else:
            target = v_target(schedule, x0, t, noise)
        err = out - target
        err = err * err if loss_type == "l2" else jnp.abs(err)
        per_example = jnp.mean(err.reshape(batch, -1), axis=1)
        if min_snr_gamma is not None:
            per_example = per_example * min_snr_weight(snr(schedule, t), min_snr_gamma,
                                                       parameterization)
        return jnp.mean(per_example), {"loss_per_example": per_example, "t": t}

    return loss_fn

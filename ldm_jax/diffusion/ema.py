"""Exponential moving average of parameters (reference ``LitEma``), as pure functions."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def ema_decay(step, decay: float = 0.9999, use_warmup: bool = True) -> jax.Array:
    """EMA decay for update number ``step``: min(decay, (1 + n) / (10 + n)) with warm-up.

    The warm-up keeps the average from being dominated by the random initial weights during
    the first thousands of steps. ``step`` may be a traced integer; returns a float32 scalar.
    """
    decay = jnp.asarray(decay, jnp.float32)
    if not use_warmup:
        return decay
    n = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def ema_update(ema_params: Any, params: Any, decay) -> Any:
    """Return ``decay * ema + (1 - decay) * params`` leaf-wise (pure, jittable).

    Written as ema - (1 - decay) * (ema - params), which is exact when ema == params and
    keeps each leaf's dtype.
    """
    def upd(e, p):
        d = jnp.asarray(decay, jnp.float32)
        return (e - (1.0 - d) * (e - p.astype(e.dtype))).astype(e.dtype)

    return jax.tree_util.tree_map(upd, ema_params, params)

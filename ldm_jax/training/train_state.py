"""The train state shared by every stage, and optimiser construction from the config."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from ldm_jax.config.loading import ConfigError


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; saved whole in checkpoints.

    params / opt_state are dicts keyed by parameter group ('generator' and 'discriminator' for
    the first stage, 'model' for the diffusion stage); each group has its own optimiser.
    ema_params is None where a stage keeps no EMA. rng is raw key data (uint32) so it
    checkpoints as a plain array; each step folds the step number into it.
    """

    step: jax.Array
    params: dict
    opt_state: dict
    ema_params: Any
    rng: jax.Array

    def step_rng(self) -> jax.Array:
        """A fresh typed key for this step (a function of the seed and the step only)."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def learning_rate_schedule(opt_cfg, *, global_batch_size: int, total_steps: int,
                           multiplier: float = 1.0) -> Callable[[jax.Array], jax.Array]:
    """Warm-up (linear from 0) then constant or cosine decay; base lr optionally x batch size."""
    peak = float(opt_cfg.base_learning_rate) * multiplier
    if opt_cfg.scale_lr_by_batch:
        peak *= global_batch_size
    warmup = int(opt_cfg.warmup_steps)
    if opt_cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif opt_cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1))
    else:
        raise ConfigError(f"config.optimizer.schedule={opt_cfg.schedule!r}: use 'constant' or 'cosine'.")
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(opt_cfg, *, global_batch_size: int, total_steps: int,
                   multiplier: float = 1.0) -> tuple[optax.GradientTransformation, Callable]:
    """Adam / AdamW with optional global-norm clipping; returns (transformation, lr schedule)."""
    schedule = learning_rate_schedule(opt_cfg, global_batch_size=global_batch_size,
                                      total_steps=total_steps, multiplier=multiplier)
    name = opt_cfg.name
    if name == "adam":
        core = optax.adam(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps)
    elif name == "adamw":
        core = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                           weight_decay=opt_cfg.weight_decay)
    else:
        raise ConfigError(f"config.optimizer.name={name!r}: use 'adam' or 'adamw'.")
    parts = []
    if opt_cfg.grad_clip_norm and opt_cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip_norm))
    parts.append(core)
    return optax.chain(*parts), schedule


def apply_gradients(tx: optax.GradientTransformation, params, opt_state, grads):
    """One optimiser update; returns (new params, new opt state)."""
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def global_norm(tree) -> jax.Array:
    return optax.tree.norm(tree)


def all_finite(*values) -> jax.Array:
    """True when every given scalar/array is finite (used for the NaN/Inf stop)."""
    ok = jnp.array(True)
    for v in values:
        ok = ok & jnp.all(jnp.isfinite(v))
    return ok


def compute_dtype(name: str):
    """config.dtype -> jnp dtype, with a clear error."""
    if name == "float32":
        return jnp.float32
    if name == "bfloat16":
        return jnp.bfloat16
    raise ConfigError(f"config.dtype={name!r}: use 'float32' or 'bfloat16'.")

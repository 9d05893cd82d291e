"""The train state shared by every stage (the optimiser: ldm_jax/training/optimizer.py)."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

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

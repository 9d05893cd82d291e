"""What every condition kind shares: the error type, condition dropout, refusing a request that
does not fit the model, reading an example's class label. Kept apart from encoders.py so that
the image conditions (image.py) and the token conditions can both use it without importing
each other."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import UserError


class ConditionError(UserError, ValueError):
    """A condition that does not fit the model (a prompt for a class model, no caption...)."""


def drop_rows(cond: jax.Array, null: jax.Array, rng, p: float) -> jax.Array:
    drop = jax.random.bernoulli(rng, p, (cond.shape[0],))
    drop = drop.reshape((-1,) + (1,) * (cond.ndim - 1))
    return jnp.where(drop, null.astype(cond.dtype), cond)


def refuse(kind: str, **given) -> None:
    flags = {"prompts": "--prompt/--prompts_file", "layouts": "--layout", "labels": "--labels"}
    for name, value in given.items():
        if value:
            raise ConditionError(f"{flags[name]} was given, but this model takes no such "
                                 f"condition (conditioning.kind={kind!r}).")


def label_of(fields: dict, key_hint: str) -> np.ndarray:
    if "label" not in fields:
        raise ConditionError(f"the example has no class label; set data.label_key to the label "
                             f"feature ({key_hint}) and precompute again.")
    return np.asarray(fields["label"], np.int32)

"""The sampler registry and the noise helpers every sampler shares (samplers.py, solvers.py).

A factory registered with `register_sampler(name)` is found by `get_sampler(name)`; the
sample command takes its `--sampler` choices from `SAMPLERS`. The rng helpers accept one key
or a batch of per-example typed keys (see samplers.py).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

SAMPLERS: dict[str, Callable[..., Callable]] = {}


def register_sampler(name: str):
    """Decorator registering a sampler factory under ``name`` (duplicate names are an error)."""
    def deco(factory):
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} is already registered")
        SAMPLERS[name] = factory
        return factory
    return deco


def get_sampler(name: str) -> Callable[..., Callable]:
    """Return the sampler factory registered as ``name``."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; available: {sorted(SAMPLERS)}") from None


def _check_parameterization(p: str) -> None:
    if p not in ("eps", "x0", "v"):
        raise ValueError(f"parameterization must be 'eps', 'x0' or 'v', got {p!r}")


def _is_key_batch(rng, shape) -> bool:
    """True for a batch of typed keys, one per example; checks its length."""
    if not (jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.ndim == 1):
        return False
    if rng.shape[0] != shape[0]:
        raise ValueError(f"a batch of {rng.shape[0]} keys was given for {shape[0]} examples; "
                         f"pass one key, or one key per example")
    return True


def _split(rng, shape):
    if _is_key_batch(rng, shape):
        keys = jax.vmap(jax.random.split)(rng)
        return keys[:, 0], keys[:, 1]
    return tuple(jax.random.split(rng))


def _fold_in(rng, i, shape):
    if _is_key_batch(rng, shape):
        return jax.vmap(lambda k: jax.random.fold_in(k, i))(rng)
    return jax.random.fold_in(rng, i)


def _normal(rng, shape):
    if _is_key_batch(rng, shape):
        return jax.vmap(lambda k: jax.random.normal(k, tuple(shape[1:]), jnp.float32))(rng)
    return jax.random.normal(rng, shape, jnp.float32)


def _initial_noise(rng, shape, x_T):
    if x_T is not None:
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T shape {x_T.shape} != requested shape {tuple(shape)}")
        return jnp.asarray(x_T, jnp.float32)
    return _normal(rng, shape)

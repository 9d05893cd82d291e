"""Adam / AdamW (+ EMA + gradient sum of squares) over a whole parameter tree in one pass on
XLA:CPU: `cpu_adam.cc`, called by `ldm_jax.training.optimizer` with the scalars it computes."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.kernels import build

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_adam.cc")
_UPDATE = "ldm_jax_adam_update"
_TARGETS = {_UPDATE: "LdmAdamUpdate"}
# The order of cpu_adam.cc's `Scalar` enum.
SCALARS = ("one_minus_b1", "b1", "one_minus_b2", "b2", "bc1", "bc2", "eps", "weight_decay",
           "step", "clip_active", "clip_norm", "clip_max", "one_minus_decay")


def ensure_registered() -> None:
    """Build (first use on a machine) and register the kernel with XLA:CPU; raises
    `build.KernelBuildError` with the reason when that is not possible."""
    build.register_targets(_SOURCE, _TARGETS)


def available() -> bool:
    """Whether the CPU kernel can be used in this process (builds it if needed)."""
    return build.available(_SOURCE, _TARGETS)


def update(scalars: dict, grads: list, mu: list, nu: list, params: list, ema: list | None,
           *, decoupled_decay: bool):
    """One step over lists of float32 leaves; returns (sum of the raw gradients' squares,
    new mu, new nu, new params, new ema or None). `scalars` maps each name in SCALARS to a
    float32 scalar. The moments, weights and EMA are updated in place where the caller's jit
    donates them (each result is aliased to its operand)."""
    ensure_registered()
    missing = [k for k in SCALARS if k not in scalars]
    if missing:
        raise ValueError(f"cpu_adam.update: scalars missing {missing}")
    vec = jnp.stack([jnp.asarray(scalars[k], jnp.float32).reshape(()) for k in SCALARS])
    with_ema = ema is not None
    per_in = 5 if with_ema else 4
    operands, out_types, aliases = [vec], [jax.ShapeDtypeStruct((1,), jnp.float32)], {}
    for i, leaf in enumerate(zip(grads, mu, nu, params, *([ema] if with_ema else []))):
        if any(x.dtype != jnp.float32 for x in leaf):
            raise ValueError("cpu_adam.update takes float32 leaves only")
        operands += list(leaf)
        for j in range(1, per_in):  # mu, nu, params, ema: result i*(per_in-1)+j-1, after sumsq
            out_types.append(jax.ShapeDtypeStruct(leaf[j].shape, jnp.float32))
            aliases[1 + i * per_in + j] = 1 + i * (per_in - 1) + (j - 1)
    outs = jax.ffi.ffi_call(_UPDATE, tuple(out_types), input_output_aliases=aliases)(
        *operands, leaves=np.int64(len(params)), ema=np.int64(with_ema),
        decay=np.int64(decoupled_decay))
    sumsq, rest = outs[0][0], outs[1:]
    k = per_in - 1
    new_mu, new_nu, new_p = list(rest[0::k]), list(rest[1::k]), list(rest[2::k])
    new_ema = list(rest[3::k]) if with_ema else None
    return sumsq, new_mu, new_nu, new_p, new_ema

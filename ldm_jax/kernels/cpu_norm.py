"""GroupNorm (+ SiLU) for XLA:CPU: `cpu_norm.cc`'s forward and backward passes, called by
`ldm_jax.models.group_norm` (which owns the custom_vjp) on float32 inputs."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.kernels import build

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_norm.cc")
_FORWARD, _BACKWARD = "ldm_jax_group_norm_forward", "ldm_jax_group_norm_backward"
_TARGETS = {_FORWARD: "LdmGroupNormForward", _BACKWARD: "LdmGroupNormBackward"}


def ensure_registered() -> None:
    """Build (first use on a machine) and register the kernels with XLA:CPU; raises
    `build.KernelBuildError` with the reason when that is not possible."""
    build.register_targets(_SOURCE, _TARGETS)


def available() -> bool:
    """Whether the CPU kernel can be used in this process (builds it if needed)."""
    return build.available(_SOURCE, _TARGETS)


def forward(x, scale, bias, num_groups: int, epsilon: float, fast_variance: bool, silu: bool):
    """(y, mean [N, G], rstd [N, G]) for float32 x [N, ..., C]."""
    ensure_registered()
    f32 = jnp.float32
    stats = jax.ShapeDtypeStruct((x.shape[0], num_groups), f32)
    out = (jax.ShapeDtypeStruct(x.shape, f32), stats, stats)
    # 'sequential': the kernel reads axis 0 as the samples, so a vmapped axis must not be
    # folded into the call.
    return jax.ffi.ffi_call(_FORWARD, out, vmap_method="sequential")(
        x, scale.astype(f32), bias.astype(f32), groups=np.int64(num_groups),
        epsilon=np.float32(epsilon), fast_variance=np.int64(fast_variance), silu=np.int64(silu))


def backward(x, scale, bias, mean, rstd, dy, num_groups: int, silu: bool):
    """(dx, dscale, dbias) for the forward pass above."""
    ensure_registered()
    f32 = jnp.float32
    out = (jax.ShapeDtypeStruct(x.shape, f32), jax.ShapeDtypeStruct(scale.shape, f32),
           jax.ShapeDtypeStruct(bias.shape, f32))
    return jax.ffi.ffi_call(_BACKWARD, out, vmap_method="sequential")(
        x, scale.astype(f32), bias.astype(f32), mean, rstd, dy.astype(f32),
        groups=np.int64(num_groups), silu=np.int64(silu))

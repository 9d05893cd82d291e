"""GroupNorm (optionally followed by SiLU) with a hand-written backward pass.

Why: autodiff of `flax.linen.GroupNorm` (and of the SiLU after it) turns into many passes over
the activation, and XLA:CPU runs its per-(sample, channel) broadcasts well below memory speed:
a GroupNorm(32) + SiLU of 4 x 64x64x384 took 8.6 ms forward and 19.2 ms with its gradients,
against torch's 3.5 and 11.4 (`bench/norm_kernels.py`). Here the forward pass is one
reduction (per-channel sums over the positions, then per group on the tiny [N, C] result) and
one elementwise pass, y = act(x * a + b) with a, b per (sample, channel); the backward pass is
one reduction of the output gradient (and of it times the centred input) and one elementwise
pass, dx = A * dh + B * (x - mean) + C, with the SiLU's derivative recomputed from x, so only x
and the [N, G] statistics are saved: 5.3 and 14.4 ms in XLA. On CPU the same passes run in
ldm_jax/kernels/cpu_norm.cc ('cpu_fused', the default there): 2.1 and 7.3 ms. Values equal
flax's to float32 rounding (tests/test_group_norm.py).

Parameters `scale` and `bias` [C], as flax's GroupNorm names them, so checkpoints and the
converters see the same tree.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = (None, "silu")
IMPLS = ("auto", "xla", "cpu_fused")


def _resolve_impl(impl: str, x) -> str:
    """'cpu_fused' (ldm_jax/kernels/cpu_norm.cc) or 'xla'. 'auto': the kernel for float32 on a
    single CPU device when it builds (a custom call cannot be partitioned over a mesh), else XLA."""
    if impl not in IMPLS:
        raise ValueError(f"group_norm impl={impl!r} is not one of {IMPLS}")
    if impl == "auto":
        from ldm_jax.kernels import build, cpu_norm
        use = (x.dtype == jnp.float32 and build.single_cpu_device()
               and cpu_norm.available())
        return "cpu_fused" if use else "xla"
    if impl == "cpu_fused" and (x.dtype != jnp.float32 or jax.default_backend() != "cpu"):
        raise ValueError(f"group_norm impl='cpu_fused' takes float32 inputs on CPU (got "
                         f"{x.dtype} on {jax.default_backend()}); use impl='auto'")
    return impl


def _check(x, num_groups: int, activation: Optional[str]) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"group_norm activation={activation!r} is not one of {ACTIVATIONS}")
    if x.ndim < 2 or x.shape[-1] % num_groups:
        raise ValueError(f"group_norm: {num_groups} groups must divide the channels (last axis) "
                         f"of an input of shape {x.shape}")


def _per_channel(v, groups: int, channels: int):
    """[N, G] -> [N, C]: each group's value for each of its channels."""
    return jnp.repeat(v, channels // groups, axis=1)


def _broadcast(v, x):
    """[N, C] -> [N, 1, ..., 1, C], to broadcast against x."""
    return v.reshape((v.shape[0],) + (1,) * (x.ndim - 2) + (v.shape[1],))


def _group_sum(v, groups: int):
    """[N, C] -> [N, G]."""
    return v.reshape(v.shape[0], groups, -1).sum(-1)


def _statistics(x, groups: int, epsilon: float, fast_variance: bool):
    """mean and 1/std per (sample, group), [N, G]. Sums over the positions first, per channel,
    then per group on the [N, C] result: XLA:CPU reduces the positions (a major axis) of an
    NHWC tensor quickly and the group axis of the 5-D view slowly."""
    n, c = x.shape[0], x.shape[-1]
    axes = tuple(range(1, x.ndim - 1))
    count = x.size // (n * groups)
    mean = _group_sum(jnp.sum(x, axis=axes), groups) / count
    if fast_variance:   # E[x^2] - E[x]^2, as flax's use_fast_variance=True
        var = _group_sum(jnp.sum(x * x, axis=axes), groups) / count - mean * mean
    else:               # E[(x - E[x])^2]: one more pass, exact for inputs far from zero mean
        centred = x - _broadcast(_per_channel(mean, groups, c), x)
        var = _group_sum(jnp.sum(centred * centred, axis=axes), groups) / count
    return mean, jax.lax.rsqrt(jnp.maximum(var, 0.0) + epsilon)


def _pre_activation(x, scale, bias, mean, rstd, groups: int):
    c = x.shape[-1]
    a = _per_channel(rstd, groups, c) * scale
    b = bias - _per_channel(mean, groups, c) * a
    return x * _broadcast(a, x) + _broadcast(b, x)


def group_norm(x, scale, bias, num_groups: int, epsilon: float, fast_variance: bool = True,
               activation: Optional[str] = None, impl: str = "auto"):
    """act((x - mean) / sqrt(var + eps) * scale + bias) with the statistics per sample and
    group of channels (the last axis) over every other axis; x float32 [N, ..., C]. `impl`:
    'auto', 'xla' (the formulation in this file) or 'cpu_fused' (the C++ kernel)."""
    _check(x, num_groups, activation)
    return _group_norm(x, scale, bias, num_groups, float(epsilon), bool(fast_variance),
                       activation, _resolve_impl(impl, x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _group_norm(x, scale, bias, num_groups, epsilon, fast_variance, activation, impl):
    return _forward(x, scale, bias, num_groups, epsilon, fast_variance, activation, impl)[0]


def _forward(x, scale, bias, num_groups, epsilon, fast_variance, activation, impl):
    if impl == "cpu_fused":
        from ldm_jax.kernels import cpu_norm
        y, mean, rstd = cpu_norm.forward(x, scale, bias, num_groups, epsilon, fast_variance,
                                         activation == "silu")
        return y, (x, scale, bias, mean, rstd)
    mean, rstd = _statistics(x, num_groups, epsilon, fast_variance)
    h = _pre_activation(x, scale, bias, mean, rstd, num_groups)
    y = jax.nn.silu(h) if activation == "silu" else h
    return y, (x, scale, bias, mean, rstd)


def _backward(num_groups, epsilon, fast_variance, activation, impl, residuals, dy):
    del epsilon, fast_variance
    x, scale, bias, mean, rstd = residuals
    if impl == "cpu_fused":
        from ldm_jax.kernels import cpu_norm
        return cpu_norm.backward(x, scale, bias, mean, rstd, dy, num_groups,
                                 activation == "silu")
    n, c = x.shape[0], x.shape[-1]
    if activation == "silu":
        h = _pre_activation(x, scale, bias, mean, rstd, num_groups)
        sig = jax.nn.sigmoid(h)
        dh = dy * (sig * (1.0 + h * (1.0 - sig)))
    else:
        dh = dy
    axes = tuple(range(1, x.ndim - 1))
    mean_c, rstd_c = _per_channel(mean, num_groups, c), _per_channel(rstd, num_groups, c)
    centred = x - _broadcast(mean_c, x)
    s1 = jnp.sum(dh, axis=axes)              # [N, C]: sum of dh
    s2 = jnp.sum(dh * centred, axis=axes)    # [N, C]: sum of dh * (x - mean)
    dscale = jnp.sum(rstd_c * s2, axis=0)
    dbias = jnp.sum(s1, axis=0)
    # With xhat = (x - mean) * rstd and dxhat = dh * scale, per group:
    # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
    count = x.size // (n * num_groups)
    g1 = _group_sum(scale * s1, num_groups) / count                  # mean(dxhat)
    g2 = _group_sum(scale * s2, num_groups) * rstd / count           # mean(dxhat * xhat)
    coef_dh = rstd_c * scale
    coef_centred = _per_channel(-(rstd * rstd) * g2, num_groups, c)
    const = _per_channel(-rstd * g1, num_groups, c)
    dx = (dh * _broadcast(coef_dh, x) + centred * _broadcast(coef_centred, x)
          + _broadcast(const, x))
    return dx, dscale, dbias


_group_norm.defvjp(_forward, _backward)


class GroupNorm(nn.Module):
    """`flax.linen.GroupNorm(dtype=float32)` over the last axis (same `scale`/`bias`
    parameters, a float32 result), with an optional SiLU fused after it."""

    num_groups: int = 32
    epsilon: float = 1e-5
    use_fast_variance: bool = True
    activation: Optional[str] = None
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return group_norm(x.astype(jnp.float32), scale, bias, self.num_groups, self.epsilon,
                          self.use_fast_variance, self.activation, self.impl)


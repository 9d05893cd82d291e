"""`Dense`: flax.linen.Dense (same parameters, initialisers and forward computation) whose
weight gradient runs in ldm_jax's CPU convolution kernel, as a 1x1 convolution.

Why: for a projection over the channels of an [N, H, W, C] map, dW = X^T dY contracts over all
N*H*W positions, the leading axis of both operands. XLA:CPU's dot wants the contraction minor
on its right-hand side, so it first transposes dY into [C, N*H*W], at about 1 GB/s: in the
width-128 UNet step the attention blocks' qkv projections alone moved 96 MB that way (11.7 ms
for one 4x32x32x768 gradient). The kernel's weight gradient reads X and dY as they are
(ldm_jax/kernels/cpu_conv.cc, 8-channel planes of X times row panels of dY). The forward pass
and the input gradient stay XLA's dots. On CPU with one device and float32 operands when the
kernel builds; elsewhere (GPU/TPU, a mesh, bfloat16) it is flax's computation exactly.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ldm_jax.kernels import build as kernel_build
from ldm_jax.kernels import cpu_conv


def _matmul(x, w):
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def _dense_kernel_wgrad(x, w):
    return _matmul(x, w)


def _fwd(x, w):
    return _matmul(x, w), (x, w)


def _bwd(residuals, dy):
    x, w = residuals
    dx = lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())))
    k, n = w.shape
    # [M, K] and [M, N] as images of M x 1 pixels: a 1x1 convolution's weight gradient.
    dw = cpu_conv.weight_grad(x.reshape(1, -1, 1, k), dy.reshape(1, -1, 1, n), (1, 1, k, n),
                              ((0, 0), (0, 0)))
    return dx, dw.reshape(k, n)


_dense_kernel_wgrad.defvjp(_fwd, _bwd)


def use_kernel(x, w) -> bool:
    """Whether `dense` takes the kernel's weight gradient for these operands."""
    return (x.dtype == jnp.float32 and w.dtype == jnp.float32 and x.ndim >= 2
            and kernel_build.single_cpu_device() and cpu_conv.available())


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] @ w [K, N], as flax's Dense computes it."""
    return _dense_kernel_wgrad(x, w) if use_kernel(x, w) else _matmul(x, w)


class Dense(nn.Module):
    """`flax.linen.Dense` with the CPU weight gradient above. Parameters `kernel` [K, N] and
    `bias` [N], as in flax."""

    features: int
    use_bias: bool = True
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = dense(x, kernel)
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y

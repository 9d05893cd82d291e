"""Stride-1 convolution for XLA:CPU: `cpu_conv.cc` (forward / input gradient, weight gradient)
behind a custom_vjp. Same parameters and results as XLA's convolution (NHWC x HWIO, explicit
padding below the kernel size), float32 inside (other dtypes are cast for the call and back).
"""

from __future__ import annotations

import functools
import os
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.kernels import build

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_conv.cc")
_FORWARD, _WEIGHT_GRAD = "ldm_jax_conv_forward", "ldm_jax_conv_weight_grad"
_FLIP_TRANSPOSE = "ldm_jax_flip_transpose"

Padding = Tuple[Tuple[int, int], Tuple[int, int]]


_TARGETS = {_FORWARD: "LdmConvForward", _WEIGHT_GRAD: "LdmConvWeightGrad",
            _FLIP_TRANSPOSE: "LdmFlipTranspose"}


def ensure_registered() -> None:
    build.register_targets(_SOURCE, _TARGETS)


def available() -> bool:
    """Whether the kernel can be used in this process (builds it on first use)."""
    return build.available(_SOURCE, _TARGETS)


def supports(kernel_hw, strides, padding: Padding) -> bool:
    """Whether a layer can run here: stride 1 and every padding in [0, kernel size)."""
    (kh, kw) = kernel_hw
    return (tuple(strides) == (1, 1) and 0 <= min(padding[0]) and max(padding[0]) < kh
            and 0 <= min(padding[1]) and max(padding[1]) < kw)


def _pads(padding: Padding) -> dict:
    (pt, pb), (pl, pr) = padding
    return dict(pad_top=np.int64(pt), pad_bottom=np.int64(pb), pad_left=np.int64(pl),
                pad_right=np.int64(pr))


def forward(x, w, padding: Padding, *, flipped: bool = False):
    """The kernel's forward pass (float32 operands). With `flipped`, `w` is a layer's kernel
    [kh, kw, C, K] and the convolution uses flip_transpose(w) (K -> C channels) without
    materialising it: the kernel packs its weights from w directly."""
    n, h, wd, _ = x.shape
    kh, kw = w.shape[:2]
    cout = w.shape[2] if flipped else w.shape[3]
    ho = h + sum(padding[0]) - kh + 1
    wo = wd + sum(padding[1]) - kw + 1
    out = jax.ShapeDtypeStruct((n, ho, wo, cout), jnp.float32)
    return jax.ffi.ffi_call(_FORWARD, out, vmap_method="broadcast_all")(
        x, w, flipped=np.int64(flipped), **_pads(padding))


# Below this many weights flip_transpose leaves the copy to XLA: 3x3x64x48 took 0.05 ms in the
# kernel and 0.01 ms in XLA; from 3x3x130x70 on the kernel is as fast or faster (3x3x1024x512:
# 5.7 ms against 10.0 ms, on 2 cores).
FLIP_MIN_WEIGHTS = 1 << 16


def flips_in_kernel(kernel_shape) -> bool:
    """Whether flip_transpose copies a kernel of this shape in C++ (else XLA does)."""
    return int(np.prod(kernel_shape)) >= FLIP_MIN_WEIGHTS


def flip_transpose(w):
    """jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2) of a float32 HWIO kernel, in C++ for large
    kernels (XLA:CPU's copy of them is slower) and in XLA for small ones (the call's fixed
    cost outweighs XLA's slower copy)."""
    if not flips_in_kernel(w.shape):
        return jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    kh, kw, cin, cout = w.shape
    out = jax.ShapeDtypeStruct((kh, kw, cout, cin), jnp.float32)
    return jax.ffi.ffi_call(_FLIP_TRANSPOSE, out, vmap_method="sequential")(w)


def input_grad_padding(kernel_hw, padding: Padding) -> Padding:
    """The padding of the input gradient as a stride-1 forward convolution of dY with
    flip_transpose(w): k - 1 - p on each side."""
    (kh, kw), ((pt, pb), (pl, pr)) = kernel_hw, padding
    return (kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)


def input_grad(dy, w, padding: Padding):
    """dX: the 'full' correlation of dY with the flipped kernel, input and output channels
    swapped: the forward kernel with padding k - 1 - p."""
    return forward(dy, w, input_grad_padding(w.shape[:2], padding), flipped=True)


def weight_grad(x, dy, kernel_shape, padding: Padding):
    """dW [kh, kw, Cin, Cout] (float32 operands)."""
    kh, kw = kernel_shape[:2]
    out = jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32)
    return jax.ffi.ffi_call(_WEIGHT_GRAD, out, vmap_method="sequential")(
        x, dy, kernel_h=np.int64(kh), kernel_w=np.int64(kw), **_pads(padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, w, padding):
    return forward(x, w, padding)


def _conv_fwd(x, w, padding):
    return forward(x, w, padding), (x, w)


def _conv_bwd(padding, residuals, dy):
    x, w = residuals
    return input_grad(dy, w, padding), weight_grad(x, dy, w.shape, padding)


_conv.defvjp(_conv_fwd, _conv_bwd)


def check(w_shape, padding: Padding) -> Padding:
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    if not supports(w_shape[:2], (1, 1), padding):
        raise ValueError(f"cpu_conv2d: padding {padding} must lie in [0, kernel size) for a "
                         f"{w_shape[0]}x{w_shape[1]} kernel")
    ensure_registered()
    return padding


def cpu_conv2d(x: jax.Array, w: jax.Array, padding: Padding) -> jax.Array:
    """Stride-1 NHWC x HWIO convolution with explicit ((top, bottom), (left, right)) padding,
    each in [0, kernel size); the result in x's dtype."""
    padding = check(w.shape, padding)
    f32 = jnp.float32
    return _conv(x.astype(f32), w.astype(f32), padding).astype(x.dtype)

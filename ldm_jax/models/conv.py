"""The models' 2-D convolution: XLA's, or on CPU ldm_jax's C++ kernel or a GEMM weight gradient.

Why: XLA:CPU computes a convolution's weight gradient as a convolution over the batch and
spatial dims, and on the 2-core AVX-512 CPU that runs at 40-120 GFLOP/s where its forward
convolution and its matmuls run at 180-330 (bench/README.md, "Where the UNet step's time goes").
In the f4_celebahq UNet step at width 64 the weight gradients were 0.8 s of a 2.3 s step.

`Conv` is a drop-in for `flax.linen.Conv` as the models use it (same parameters, names,
initialisers and forward computation). With `weight_grad='gemm'` its backward pass keeps
XLA's own input gradient and computes the weight gradient as

    dW[kh, kw, ci, co] = (dY^T [co, N*Ho*Wo]) @ (patches(X) [N*Ho*Wo, kh*kw*ci])

where patches(X) is the im2col matrix of the padded (strided) input: a plain row-major GEMM
that XLA:CPU runs near its matmul peak (2.8x faster than XLA's weight gradient for 3x3,
64 -> 64 channels at 64x64, batch 4; 1.1x at 16x16x256). The result equals autodiff's to
float32 rounding (tests/test_conv.py), not bitwise: the summation order differs.

With `weight_grad='cpu_fused'` the whole convolution (forward, input and weight gradients) of
a stride-1 layer runs in ldm_jax's C++ kernel (ldm_jax/kernels/cpu_conv.cc, an implicit GEMM
over output rows with register-blocked AVX-512 microkernels, built on first use): 2.4x faster
fwd+bwd than XLA for 3x3, 64 -> 64 channels at 64x64, batch 4.

Which implementation runs: the module field `weight_grad` when set, else the process default
(`set_default_weight_grad`, from `config.conv_weight_grad`), else 'auto': on CPU, 'cpu_fused'
for the stride-1 float32 layers where it was measured faster (`resolve_weight_grad`), 'gemm'
for other layers with at least AUTO_GEMM_MIN_ROWS output positions (batch x height x width),
and 'xla' below; 'xla' on GPU/TPU, whose convolution libraries compute weight gradients well
and where the patch matrix would cost memory for nothing.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ldm_jax.kernels import build as kernel_build
from ldm_jax.kernels import cpu_conv

WEIGHT_GRAD_IMPLS = ("auto", "xla", "gemm", "cpu_fused")
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
_default_weight_grad = "auto"
# 'auto' on CPU: the GEMM from this many output positions (N*Ho*Wo) on. Per layer it was 2.8x
# faster at 4x64x64 (16,384 rows), 1.4x at 4x32x32 (4,096) and 1.1x at 4x16x16 (1,024). Its
# larger HLO (pad, kh*kw slices, concatenation, transposes) costs compile time: a small
# autoencoder's step compiled 20-35 % slower with the GEMM from 2,048 rows on, and as fast as
# with XLA's from 16,384 on; the UNet step at batch 4 measured no loss (2.06-2.09 s against
# 2.12-2.16 s with 2,048).
# Paper-sized batches are above it at every resolution that matters (f4_celebahq, batch 48:
# 12,288-196,608 rows).
AUTO_GEMM_MIN_ROWS = 16384
# 'auto' on CPU, stride-1 float32 layers: which of the three parts of a convolution run in
# ldm_jax's C++ kernel (ldm_jax/kernels/cpu_conv.cc) rather than in XLA (`cpu_plan`). Measured
# per part on the 2-core AVX-512 CPU, 3x3 (ms, XLA / kernel; docs/performance.md), the kernel
# wins nearly everywhere: batch 4, 64x64, 64 -> 64: fwd 7.1 / 3.8, input gradient 6.4 / 3.7,
# weight gradient (XLA's or the GEMM one) 10.4 / 3.4; 32x32, 384 -> 128: 10.5 / 10.3,
# 10.9 / 9.8, 19.1 / 11.4; 8x8, 1024 -> 512: fwd 15.1 / 11.4, fwd + both gradients
# 35.9 / 29.1 (small maps run in blocks of whole images, split over threads by output
# channels). XLA keeps:
#   * layers with >= 256 input channels and at most 64 output positions over the whole batch
#     (1x8x8 or 4x4x4, 512 -> 512: fwd 2.0 / 2.1 and 2.2 / 2.3; 1x4x4, 1024 -> 512: fwd
#     2.0 / 2.6): too few pixels to reuse the weights;
#   * the forward pass of layers with < 16 output channels (64 -> 3: 0.9 / 1.3) and the input
#     gradient of layers with < 16 input channels (3 -> 64: 0.9 / 1.4): the kernel pads the
#     output channels to a whole vector of 16.
PLAN_XLA_MAX_ROWS = 64
PLAN_XLA_MIN_CIN = 256
PLAN_MIN_CHANNELS = 16


def check_weight_grad(impl: str, field: str, error_type=ValueError) -> str:
    if impl not in WEIGHT_GRAD_IMPLS:
        raise error_type(f"{field}={impl!r} is not one of {WEIGHT_GRAD_IMPLS} ('auto': per layer "
                         "on CPU, 'xla' elsewhere; see docs/performance.md)")
    return impl


def set_default_weight_grad(impl: str) -> None:
    """The process-wide weight-gradient choice for `Conv`s whose field is unset (what
    `config.conv_weight_grad` sets when a task is built). Read when a step is traced."""
    global _default_weight_grad
    _default_weight_grad = check_weight_grad(impl, "conv_weight_grad")


def _cpu_kernel_fits(layer) -> bool:
    """Whether ldm_jax's CPU convolution can run `layer` = (kernel shape, strides, padding)."""
    kernel_shape, strides, padding = layer
    return cpu_conv.supports(kernel_shape[:2], strides, padding)


def resolve_weight_grad(impl: Optional[str] = None, rows: Optional[int] = None,
                        layer=None, dtype=jnp.float32) -> str:
    """'xla', 'gemm', 'cpu_fused' or 'cpu_planned' for this backend and a layer whose weight
    gradient contracts over `rows` = N*Ho*Wo positions; `layer` = (kernel shape, strides,
    padding). Without `rows` and `layer` a layer is never planned.

    'auto' on CPU: 'cpu_planned' for stride-1 float32 layers where `cpu_plan` puts at least one
    part of the convolution in the kernel, on a single device (the kernel is a custom call,
    which XLA's partitioner would gather onto every device of a mesh), when the kernel builds;
    else the GEMM weight gradient from AUTO_GEMM_MIN_ROWS positions on; else 'xla'. An
    explicit 'cpu_fused' (every part in the kernel) falls back to 'auto' for a layer the
    kernel cannot run (a strided one)."""
    impl = check_weight_grad(impl or _default_weight_grad, "weight_grad")
    cpu = jax.default_backend() == "cpu"
    if impl == "cpu_fused":
        if not cpu:
            raise ValueError("conv weight_grad 'cpu_fused' runs on CPU only (backend is "
                             f"{jax.default_backend()!r}); use 'auto'")
        if layer is None or _cpu_kernel_fits(layer):
            return impl
        impl = "auto"
    if impl == "auto":
        # Planned also where every part stays in XLA but the weights are large: the input
        # gradient then takes its flipped, transposed kernel from the C++ copy.
        if (cpu and layer is not None and rows is not None and dtype == jnp.float32
                and _cpu_kernel_fits(layer)
                and (any(cpu_plan(layer[0], rows))
                     or cpu_conv.flips_in_kernel(layer[0]))
                and kernel_build.single_cpu_device() and cpu_conv.available()):
            return "cpu_planned"
        big = rows is None or rows >= AUTO_GEMM_MIN_ROWS
        return "gemm" if cpu and big else "xla"
    return impl


def cpu_plan(kernel_shape, rows: int) -> Tuple[bool, bool, bool]:
    """(forward, input gradient, weight gradient): which parts of a stride-1 float32 layer run
    in ldm_jax's C++ kernel under 'auto' on CPU, for `rows` = N*Ho*Wo output positions over
    the batch (the rules and their measurements are above PLAN_XLA_MAX_ROWS)."""
    cin, cout = kernel_shape[2], kernel_shape[3]
    if rows <= PLAN_XLA_MAX_ROWS and cin >= PLAN_XLA_MIN_CIN:
        return False, False, False
    return cout >= PLAN_MIN_CHANNELS, cin >= PLAN_MIN_CHANNELS, True


def _xla_conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DIMENSION_NUMBERS)


def _patches(x, kernel_hw, strides, padding, out_hw):
    """[N*Ho*Wo, kh*kw*C] im2col matrix, taps in (kh, kw) order then channels."""
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    (kh, kw), (sh, sw), (ho, wo) = kernel_hw, strides, out_hw
    taps = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
            for i in range(kh) for j in range(kw)]
    cols = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
    return cols.reshape(-1, cols.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_gemm_weight_grad(x, w, strides, padding):
    """XLA's convolution whose weight gradient is one GEMM (module docstring)."""
    return _xla_conv(x, w, strides, padding)


def _fwd(x, w, strides, padding):
    return _xla_conv(x, w, strides, padding), (x, w)


def _bwd(strides, padding, residuals, dy):
    x, w = residuals
    _, input_vjp = jax.vjp(lambda x_: _xla_conv(x_, w, strides, padding), x)
    (dx,) = input_vjp(dy)
    kh, kw, cin, cout = w.shape
    cols = _patches(x, (kh, kw), strides, padding, dy.shape[1:3])
    dw = jnp.dot(dy.reshape(-1, cout).T, cols, preferred_element_type=jnp.float32)
    dw = dw.reshape(cout, kh, kw, cin).transpose(1, 2, 3, 0)
    return dx, dw.astype(w.dtype)


conv_gemm_weight_grad.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_cpu_planned(x, w, padding, plan):
    """A stride-1 float32 convolution whose forward pass, input gradient and weight gradient
    each run in ldm_jax's C++ kernel or in XLA, as `plan` = (fwd, dx, dw) says."""
    return _planned_forward(x, w, padding, plan[0])


def _planned_forward(x, w, padding, kernel):
    return cpu_conv.forward(x, w, padding) if kernel else _xla_conv(x, w, (1, 1), padding)


def _planned_fwd(x, w, padding, plan):
    return _planned_forward(x, w, padding, plan[0]), (x, w)


def _planned_bwd(padding, plan, residuals, dy):
    x, w = residuals
    if plan[1]:
        dx = cpu_conv.input_grad(dy, w, padding)
    else:
        # XLA's convolution, but on flip_transpose's weights: XLA's own autodiff reverses and
        # transposes them in a fusion that took 10.0 ms for a 3x3x1024x512 kernel against the
        # C++ copy's 5.7 ms (docs/performance.md).
        dx = _xla_conv(dy, cpu_conv.flip_transpose(w), (1, 1),
                       cpu_conv.input_grad_padding(w.shape[:2], padding))
    if plan[2]:
        dw = cpu_conv.weight_grad(x, dy, w.shape, padding)
    elif x.shape[0] * dy.shape[1] * dy.shape[2] >= AUTO_GEMM_MIN_ROWS:
        dw = _bwd((1, 1), padding, (x, w), dy)[1]
    else:
        dw = jax.vjp(lambda w_: _xla_conv(x, w_, (1, 1), padding), w)[1](dy)[0]
    return dx, dw


conv_cpu_planned.defvjp(_planned_fwd, _planned_bwd)


def conv2d(x: jax.Array, w: jax.Array, strides: Tuple[int, int],
           padding: Tuple[Tuple[int, int], Tuple[int, int]],
           weight_grad: Optional[str] = None) -> jax.Array:
    """NHWC x HWIO convolution with explicit padding pairs; `weight_grad` as in the module
    docstring (None: the process default)."""
    (kh, kw), (sh, sw) = w.shape[:2], strides
    ho = (x.shape[1] + sum(padding[0]) - kh) // sh + 1
    wo = (x.shape[2] + sum(padding[1]) - kw) // sw + 1
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    rows = x.shape[0] * ho * wo
    impl = resolve_weight_grad(weight_grad, rows, (tuple(w.shape), tuple(strides), padding),
                               x.dtype)
    if impl == "cpu_fused":
        return cpu_conv.cpu_conv2d(x, w, padding)
    if impl == "cpu_planned":
        return conv_cpu_planned(x, w, cpu_conv.check(w.shape, padding),
                                cpu_plan(w.shape, rows))
    if impl == "gemm":
        return conv_gemm_weight_grad(x, w, tuple(strides), tuple(map(tuple, padding)))
    return _xla_conv(x, w, tuple(strides), tuple(map(tuple, padding)))


PaddingLike = Union[str, int, Sequence[Union[int, Tuple[int, int]]]]


class Conv(nn.Module):
    """`flax.linen.Conv` (2-D, NHWC, no dilation or groups) with a selectable weight gradient.
    Parameters `kernel` [kh, kw, Cin, Cout] and `bias` [Cout] as in flax."""

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    padding: PaddingLike = "SAME"
    use_bias: bool = True
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    weight_grad: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        strides = tuple(self.strides)
        padding = self.padding
        if isinstance(padding, str):
            padding = lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides, padding)
        elif isinstance(padding, int):
            padding = ((padding, padding), (padding, padding))
        else:
            padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
        y = conv2d(x, kernel, strides, padding, self.weight_grad)
        return y if bias is None else y + bias

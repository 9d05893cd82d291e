"""Convolution as GEMMs, for benchmarking against XLA's own convolutions (bench/conv_kernels.py,
bench_first_stage.py --conv_impl). Measured on the project's 2-core CPU, neither whole-GEMM form
beats XLA:CPU's forward convolution per layer or per train step (bench/README.md), so the models
keep XLA's forward and input-gradient convolutions and take only the weight gradient as a GEMM
(ldm_jax/models/conv.py); this module stays here as the tested record of what was tried.

A drop-in replacement for ``flax.linen.Conv`` (NHWC, HWIO) with selectable formulations.

``Conv`` has the fields of ``nn.Conv`` that this repository uses, creates exactly the same
parameters (``kernel`` [kh, kw, Cin, Cout] and ``bias`` [Cout], same initialisers, same rng
streams and names), and adds ``impl``:

* ``'xla'``: ``lax.conv_general_dilated``, called exactly as ``nn.Conv`` calls it (bitwise the
  same results).
* ``'im2col'``: 2-D convolution as one GEMM, patches [rows, kh*kw*Cin] @ kernel [kh*kw*Cin, Cout].
  For stride 1 with symmetric 'same' padding the patches are built on the *flattened padded*
  image: in the [N*(H+2p)*(W+2p), C] row view every kernel tap is a contiguous row offset, so the
  patch matrix is a concatenation of 9 contiguous row slices (cheaper on XLA:CPU than 4-D strided
  slices). A ``jax.custom_vjp`` gives the weight gradient as one GEMM patches^T @ grad_out and
  the input gradient as the same flat im2col convolution of grad_out with the spatially flipped,
  in/out-swapped kernel. Other strides / paddings use 4-D strided slices + GEMM (autodiff).
* ``'shifted'``: stride-1 'same' convolution as one GEMM x [rows, Cin] @ kernel [Cin, kh*kw*Cout]
  followed by a sum of kh*kw row-shifted column blocks of the result (no patch matrix). The
  custom_vjp input gradient is the same shifted formulation with the flipped kernel; the weight
  gradient is kh*kw GEMMs of row-shifted x slices with grad_out. Other strides fall back to
  'im2col'.
* ``'auto'``: resolved at trace time by ``resolve_conv_impl`` (``AUTO_IMPL`` per backend).

1x1 stride-1 unpadded convolutions are a plain matmul for every impl except 'xla'.

Results of the non-XLA impls agree with ``lax.conv_general_dilated`` to float32 rounding
(tests/test_conv_impl.py), not bitwise: the summation order differs.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
PaddingLike = Union[str, int, Sequence[Union[int, Tuple[int, int]]]]

CONV_IMPLS = ("auto", "xla", "im2col", "shifted")

# What 'auto' picks per backend (jax.default_backend()). Measured on the whole UNet and
# first-stage train steps (bench/conv_kernels.py, bench/bench_first_stage.py --conv_impl): the
# GEMM formulations did not beat XLA's own convolutions on the 2-core AVX-512 CPU, so 'auto'
# stays 'xla' everywhere. Change an entry only with a whole-train-step measurement behind it.
AUTO_IMPL = {"cpu": "xla"}


def resolve_conv_impl(impl: Optional[str]) -> str:
    """'auto' / None -> the impl for the current default backend; validates the name."""
    if impl is None:
        impl = "auto"
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl == "auto":
        return AUTO_IMPL.get(jax.default_backend(), "xla")
    return impl


# ------------------------------------------------------------------------------------------------
# formulations (x NHWC, w HWIO, same dtype; stride-1 'same' helpers take odd square-ish kernels)
# ------------------------------------------------------------------------------------------------

def _same_pads(w_shape) -> Tuple[int, int]:
    return (w_shape[0] - 1) // 2, (w_shape[1] - 1) // 2


def _flat_padded(x: jax.Array, ph: int, pw: int):
    """x [N,H,W,C] -> (rows [N*(H+2ph)*(W+2pw), C], padded width)."""
    n, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    return xp.reshape(n * (h + 2 * ph) * (w + 2 * pw), c), w + 2 * pw


def _flat_unpad(rows: jax.Array, shape, ph: int, pw: int) -> jax.Array:
    """Rows of the valid flat range (see _flat_offsets) -> [N,H,W,C] interior."""
    n, h, w = shape
    wp = w + 2 * pw
    lead = ph * wp + pw
    full = jnp.pad(rows, ((lead, lead), (0, 0)))
    return full.reshape(n, h + 2 * ph, wp, -1)[:, ph:ph + h, pw:pw + w, :]


def _flat_offsets(kh: int, kw: int, wp: int):
    return [i * wp + j for i in range(kh) for j in range(kw)]


def _flat_grad_rows(g: jax.Array, ph: int, pw: int, length: int) -> jax.Array:
    """grad_out [N,H,W,Co] laid on the padded grid, rows of the valid flat range."""
    rows, wp = _flat_padded(g, ph, pw)
    lead = ph * wp + pw
    return rows[lead:lead + length]


def _flat_taps(x: jax.Array, w: jax.Array):
    """x on the flattened padded grid for a stride-1 'same' conv with kernel `w`: (rows, valid
    row count, the kh*kw tap offsets, (ph, pw))."""
    kh, kw = w.shape[:2]
    ph, pw = _same_pads(w.shape)
    rows, wp = _flat_padded(x, ph, pw)
    return rows, rows.shape[0] - 2 * (ph * wp + pw), _flat_offsets(kh, kw, wp), (ph, pw)


def _im2col_same_fwd_impl(x: jax.Array, w: jax.Array) -> jax.Array:
    kh, kw, cin, cout = w.shape
    n, h, wd, _ = x.shape
    rows, length, offs, (ph, pw) = _flat_taps(x, w)
    patches = jnp.concatenate([rows[o:o + length] for o in offs], axis=-1)
    out = jnp.dot(patches, w.reshape(kh * kw * cin, cout))
    return _flat_unpad(out, (n, h, wd), ph, pw)


def _shifted_same_fwd_impl(x: jax.Array, w: jax.Array) -> jax.Array:
    kh, kw, cin, cout = w.shape
    n, h, wd, _ = x.shape
    rows, length, offs, (ph, pw) = _flat_taps(x, w)
    # [Cin, taps * Cout]: column block k is tap k's [Cin, Cout] matrix.
    wcat = jnp.transpose(w.reshape(kh * kw, cin, cout), (1, 0, 2)).reshape(cin, kh * kw * cout)
    y = jnp.dot(rows, wcat)
    out = y[offs[0]:offs[0] + length, 0:cout]
    for k, o in enumerate(offs[1:], start=1):
        out = out + y[o:o + length, k * cout:(k + 1) * cout]
    return _flat_unpad(out, (n, h, wd), ph, pw)


def _flip_kernel(w: jax.Array) -> jax.Array:
    """Kernel of the input gradient of a stride-1 'same' conv: flipped taps, Cin <-> Cout."""
    return jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))


def _weight_grad_im2col(x: jax.Array, w_shape, g: jax.Array) -> jax.Array:
    kh, kw, cin, cout = w_shape
    ph, pw = _same_pads(w_shape)
    rows, wp = _flat_padded(x, ph, pw)
    length = rows.shape[0] - 2 * (ph * wp + pw)
    patches = jnp.concatenate([rows[o:o + length] for o in _flat_offsets(kh, kw, wp)], axis=-1)
    grows = _flat_grad_rows(g, ph, pw, length)
    # [Cout, taps*Cin] then transpose the (small) result: XLA:CPU runs this orientation of the
    # long-contraction GEMM faster than patches^T @ grad.
    dw = lax.dot_general(grows, patches, (((0,), (0,)), ((), ())))
    return dw.T.reshape(kh, kw, cin, cout)


def _weight_grad_shifted(x: jax.Array, w_shape, g: jax.Array) -> jax.Array:
    kh, kw, cin, cout = w_shape
    ph, pw = _same_pads(w_shape)
    rows, wp = _flat_padded(x, ph, pw)
    length = rows.shape[0] - 2 * (ph * wp + pw)
    grows = _flat_grad_rows(g, ph, pw, length)
    taps = [lax.dot_general(grows, rows[o:o + length], (((0,), (0,)), ((), ()))).T
            for o in _flat_offsets(kh, kw, wp)]
    return jnp.stack(taps).reshape(kh, kw, cin, cout)


def _make_same_conv(fwd_impl: Callable, weight_grad: Callable) -> Callable:
    @jax.custom_vjp
    def conv(x, w):
        return fwd_impl(x, w)

    def fwd(x, w):
        return fwd_impl(x, w), (x, w)

    def bwd(res, g):
        x, w = res
        g = g.astype(x.dtype)
        dx = fwd_impl(g, _flip_kernel(w))
        dw = weight_grad(x, w.shape, g)
        return dx.astype(x.dtype), dw.astype(w.dtype)

    conv.defvjp(fwd, bwd)
    return conv


im2col_same_conv = _make_same_conv(_im2col_same_fwd_impl, _weight_grad_im2col)
shifted_same_conv = _make_same_conv(_shifted_same_fwd_impl, _weight_grad_shifted)


def im2col_conv(x: jax.Array, w: jax.Array, strides: Tuple[int, int],
                padding: Sequence[Tuple[int, int]]) -> jax.Array:
    """General im2col (any stride / explicit padding): 4-D strided slices + one GEMM; autodiff
    gives patches^T @ grad for the kernel and the slices' transpose (col2im) for the input."""
    kh, kw, cin, cout = w.shape
    sh, sw = strides
    (pt, pb), (pl, pr) = padding
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho = (xp.shape[1] - kh) // sh + 1
    wo = (xp.shape[2] - kw) // sw + 1
    cols = [xp[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, :]
            for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]
    return jnp.dot(patches, w.reshape(kh * kw * cin, cout))


def conv2d(x: jax.Array, w: jax.Array, strides: Tuple[int, int],
           padding: Sequence[Tuple[int, int]], impl: str) -> jax.Array:
    """NHWC x HWIO conv with explicit padding ((top, bottom), (left, right)); impl resolved."""
    impl = resolve_conv_impl(impl)
    kh, kw, cin, cout = w.shape
    strides = tuple(strides)
    padding = tuple(tuple(p) for p in padding)
    if impl == "xla":
        return lax.conv_general_dilated(x, w, strides, padding, lhs_dilation=(1, 1),
                                        rhs_dilation=(1, 1),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=1, precision=None)
    if (kh, kw) == (1, 1) and strides == (1, 1) and padding == ((0, 0), (0, 0)):
        n, h, wd, _ = x.shape
        return jnp.dot(x.reshape(n * h * wd, cin), w.reshape(cin, cout)).reshape(n, h, wd, cout)
    same = (strides == (1, 1) and kh % 2 == 1 and kw % 2 == 1
            and padding == (((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2))
    if same and impl == "im2col":
        return im2col_same_conv(x, w)
    if same and impl == "shifted":
        return shifted_same_conv(x, w)
    return im2col_conv(x, w, strides, padding)


# ------------------------------------------------------------------------------------------------
# the module
# ------------------------------------------------------------------------------------------------

def _canonical_padding(padding: PaddingLike, kernel_size: Sequence[int], strides, in_hw):
    """nn.Conv's padding forms -> explicit ((lo, hi), ...) pairs (2-D)."""
    if isinstance(padding, str):
        if padding == "VALID":
            return ((0, 0), (0, 0))
        if padding == "SAME":
            return tuple(lax.padtype_to_pads(in_hw, kernel_size, strides, "SAME"))
        raise ValueError(f"Conv: unsupported padding {padding!r} (use 'SAME', 'VALID' or pairs)")
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    pads = []
    for p in padding:
        pads.append((p, p) if isinstance(p, int) else tuple(p))
    if len(pads) != 2:
        raise ValueError(f"Conv: need 2 padding pairs for a 2-D conv, got {padding!r}")
    return tuple(pads)


class Conv(nn.Module):
    """``nn.Conv`` for 2-D NHWC inputs with a selectable ``impl`` (see module docstring).

    Same fields, parameter names, shapes, initialisers and dtype promotion as ``nn.Conv``
    (computation in ``dtype``; parameters in ``param_dtype``), so parameter trees and
    checkpoints are interchangeable with ``nn.Conv``.
    """

    features: int
    kernel_size: Sequence[int]
    strides: Union[int, Sequence[int]] = 1
    padding: PaddingLike = "SAME"
    use_bias: bool = True
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    impl: Optional[str] = "xla"

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel_size = tuple(self.kernel_size)
        if len(kernel_size) != 2 or inputs.ndim != 4:
            raise ValueError("ldm_jax Conv supports 2-D NHWC convolutions only "
                             f"(kernel {kernel_size}, input {inputs.shape})")
        strides = ((self.strides,) * 2 if isinstance(self.strides, int)
                   else tuple(self.strides))
        in_features = inputs.shape[-1]
        kernel = self.param("kernel", self.kernel_init,
                            kernel_size + (in_features, self.features), self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        padding = _canonical_padding(self.padding, kernel_size, strides, inputs.shape[1:3])
        y = conv2d(inputs, kernel, strides, padding, self.impl)
        if bias is not None:
            y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
        return y

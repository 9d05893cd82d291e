"""PatchGAN discriminator (pix2pix ``NLayerDiscriminator``) used by the first-stage GAN loss.

Layer layout (k = 4x4 kernels, explicit padding 1 on each side, NHWC):

    conv_0  (ndf, stride 2, bias)                               -> LeakyReLU(0.2)
    conv_n  (ndf * min(2^n, 8), stride 2, no bias), norm_n      -> LeakyReLU(0.2)   n = 1..L-1
    conv_L  (ndf * min(2^L, 8), stride 1, no bias), norm_L      -> LeakyReLU(0.2)
    conv_out (1, stride 1, bias)                                -> patch logits

With ``norm='none'`` the intermediate convolutions carry a bias instead of a norm.

Normalisation: the reference keeps its discriminator in PyTorch train mode for the whole run, so
BatchNorm only ever normalises with the *current batch's* statistics and its running averages are
never read. ``BatchStatNorm`` implements exactly that and keeps no running statistics, so the
discriminator has no mutable collections. Under ``jit`` with a data-sharded batch the mean over the
batch axis is a global (cross-device) mean, i.e. this behaves like SyncBatchNorm.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.conv import Conv

# pix2pix init: conv weights N(0, 0.02), norm scale N(1, 0.02), norm bias 0.
_CONV_INIT = nn.initializers.normal(stddev=0.02)


def _scale_init(key, shape, dtype=jnp.float32):
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class BatchStatNorm(nn.Module):
    """BatchNorm2d in train mode: per-channel normalisation with the batch mean/biased variance.

    Statistics are taken over (batch, H, W) in float32; learned ``scale`` and ``bias`` per channel.
    No running statistics are tracked (they are never used by the reference; see module doc).
    """

    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", _scale_init, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        axes = tuple(range(xf.ndim - 1))
        mean = jnp.mean(xf, axis=axes)
        # Two-pass (centred) variance: E[x^2]-E[x]^2 cancels badly for large activations.
        var = jnp.mean(jnp.square(xf - mean), axis=axes)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale + bias).astype(self.dtype)


class NLayerDiscriminator(nn.Module):
    """pix2pix PatchGAN discriminator.

    Attributes:
        ndf: channels of the first layer.
        n_layers: number of stride-2 (plus one stride-1) conv layers, 3 in the reference.
        norm: ``'batch'`` (BatchNorm in train mode, see ``BatchStatNorm``) or ``'none'``.
        dtype: computation dtype of the convolutions (parameters are always float32).

    Input [B, H, W, C] -> logits [B, h', w', 1] (float32). For n_layers=3 a 32x32 input gives 2x2
    patches and a 256x256 input 30x30.
    """

    ndf: int = 64
    n_layers: int = 3
    norm: str = "batch"
    dtype: Any = jnp.float32

    def _conv(self, features: int, stride: int, use_bias: bool, name: str) -> Conv:
        return Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                       use_bias=use_bias, kernel_init=_CONV_INIT,
                       bias_init=nn.initializers.zeros, dtype=self.dtype,
                       param_dtype=jnp.float32, name=name)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.norm not in ("batch", "none"):
            raise ValueError(
                f"NLayerDiscriminator.norm must be 'batch' or 'none', got {self.norm!r}")
        if self.n_layers < 1:
            raise ValueError(f"NLayerDiscriminator.n_layers must be >= 1, got {self.n_layers}")
        use_norm = self.norm == "batch"
        # A conv followed by BatchNorm gets no bias (the norm's mean subtraction cancels it).
        mid_bias = not use_norm

        h = x.astype(self.dtype)
        h = self._conv(self.ndf, 2, True, "conv_0")(h)
        h = nn.leaky_relu(h, 0.2)
        for n in range(1, self.n_layers + 1):
            stride = 2 if n < self.n_layers else 1
            h = self._conv(self.ndf * min(2 ** n, 8), stride, mid_bias, f"conv_{n}")(h)
            if use_norm:
                h = BatchStatNorm(dtype=self.dtype, name=f"norm_{n}")(h)
            h = nn.leaky_relu(h, 0.2)
        h = self._conv(1, 1, True, "conv_out")(h)
        return h.astype(jnp.float32)

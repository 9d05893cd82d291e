"""Attention layers of the LDM UNet (NHWC).

Two blocks, mirroring the reference implementation's structure:

* `SelfAttentionBlock`: the plain spatial self-attention block used by unconditional and
  class-conditional LDMs (openaimodel ``AttentionBlock``).
* `SpatialTransformer`: the transformer block used when a cross-attention context is configured
  (text-to-image, layout-to-image; ldm/modules/attention.py ``SpatialTransformer``).

All parameters are float32; ``dtype`` selects the compute dtype (e.g. bfloat16). Normalisation
layers and the attention softmax always run in float32, because both are numerically sensitive
(large reductions / exponentials) and cheap compared to the matmuls.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from ldm_jax.kernels import build as kernel_build
from ldm_jax.kernels import cpu_attention
from ldm_jax.models.chunked_attention import chunked_attention
from ldm_jax.models.conv import Conv
from ldm_jax.models.dense import Dense
from ldm_jax.models.group_norm import GroupNorm

Dtype = Any

# PyTorch's default Linear/Conv kernel init (kaiming_uniform with a=sqrt(5)) is exactly
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)); using it keeps freshly initialised models statistically
# comparable to the reference, whose training hyper-parameters were tuned with that init.
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros_init = nn.initializers.zeros

IMPLEMENTATIONS = (None, "cpu_fused", "chunked", "xla", "cudnn")


def default_implementation(dtype) -> str:
    """What `implementation=None` runs for inputs of `dtype` in this process."""
    backend = jax.default_backend()
    if backend == "gpu" and dtype in (jnp.bfloat16, jnp.float16):
        return "auto"
    if kernel_build.single_cpu_device() and cpu_attention.available():
        return "cpu_fused"
    return "chunked"


def _resolve(implementation: Optional[str], dtype) -> str:
    """The implementation to run (module docstring of `attention`), checked."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    if implementation == "cudnn" and dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError("attention implementation 'cudnn' requires bfloat16/float16 inputs "
                         f"(got {dtype}); set the model dtype to bfloat16 or use 'chunked'")
    if implementation == "cpu_fused" and jax.default_backend() != "cpu":
        raise ValueError("attention implementation 'cpu_fused' runs on CPU only (backend is "
                         f"{jax.default_backend()!r}); use 'chunked' or None")
    return implementation or default_implementation(dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
              implementation: Optional[str] = None) -> jax.Array:
    """Multi-head scaled dot-product attention, softmax(q k^T / sqrt(d)) v.

    Args:
      q: queries [B, Lq, heads, d].
      k, v: keys / values [B, Lk, heads, d] (same dtype as ``q``).
      implementation:
        'cpu_fused': a fused C++ kernel for XLA:CPU (ldm_jax/kernels/cpu_attention.cc, built
          with the system compiler on first use): the same recurrence as 'chunked' with each
          block of scores kept in cache; float32 inside. One CPU device: with several, XLA
          gathers its operands onto every device.
        'chunked': ldm_jax's own (models/chunked_attention.py): heads-major matmuls, the
          probabilities recomputed in the backward pass instead of stored, queries chunked when
          the score matrix is large. Fastest on CPU and the least memory on every backend.
        'xla': `jax.nn.dot_product_attention`'s portable implementation (stores the
          probabilities).
        'cudnn': cuDNN's fused flash attention on NVIDIA GPUs (float16/bfloat16 inputs).
        None (default): 'cpu_fused' on a single CPU device when the kernel builds; on a GPU
          with float16/bfloat16 inputs 'cudnn' where jax accepts the shapes and 'xla' where it
          does not; 'chunked' otherwise.

    Returns:
      [B, Lq, heads, d] in the dtype of ``q``. The softmax is computed in float32 whatever the
      input dtype.
    """
    return _attend(q, k, v, _resolve(implementation, q.dtype))


def _attend(q, k, v, resolved: str) -> jax.Array:
    """attention() for an implementation already resolved by _resolve ('auto' included: the
    value default_implementation gives a GPU, which is not a user-facing choice)."""
    if resolved == "cpu_fused":
        return cpu_attention.cpu_fused_attention(q, k, v)
    if resolved == "chunked":
        return chunked_attention(q, k, v)
    if resolved == "auto":
        return _cudnn_where_supported(q, k, v)
    return jax.nn.dot_product_attention(q, k, v, implementation=resolved)


def _cudnn_where_supported(q, k, v) -> jax.Array:
    """cuDNN's flash attention when jax's own checks accept these inputs (cuDNN present, a head
    dim that is a multiple of 8 up to 128, or 256 from Hopper on), XLA's otherwise.

    Not `implementation=None`: jax runs XLA's then, which stores the [B, heads, Lq, Lk] float32
    probabilities for the backward pass. On an H200 the f4_celebahq train step (batch 48,
    1024-token attention at 32x32) spent 36 of its 117 ms of kernels there, as much as all its
    convolutions' forward and input gradient together. jax raises its refusals while tracing,
    so the fallback costs nothing at run time."""
    try:
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    except (NotImplementedError, RuntimeError):
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def packed_self_attention(qkv: jax.Array, *, implementation: Optional[str] = None) -> jax.Array:
    """Self-attention of a packed projection qkv [B, L, heads, 3 * d] (q, k, v per head, the
    reference AttentionBlock's layout) -> [B, L, heads, d]; `implementation` as `attention`.
    'cpu_fused' reads the projection in place; the others take its q, k, v slices."""
    implementation = _resolve(implementation, qkv.dtype)
    if implementation == "cpu_fused":
        return cpu_attention.cpu_fused_self_attention(qkv)
    b, length, heads, width = qkv.shape
    qkv = qkv.reshape(b, length, heads, 3, width // 3)
    return _attend(qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :], implementation)


def resolve_heads(channels: int, num_heads: int = -1, num_head_channels: int = -1):
    """Return ``(heads, dim_head)`` for a block of ``channels`` channels.

    Exactly one of ``num_heads`` (fixed number of heads) or ``num_head_channels`` (fixed width
    per head) must be set (the other left at -1), as in the reference UNet.
    """
    if (num_heads == -1) == (num_head_channels == -1):
        raise ValueError("exactly one of num_heads / num_head_channels must be set (the other "
                         f"-1); got num_heads={num_heads}, num_head_channels={num_head_channels}")
    if num_head_channels != -1:
        if num_head_channels <= 0 or channels % num_head_channels:
            raise ValueError(f"channels ({channels}) must be a positive multiple of "
                             f"num_head_channels ({num_head_channels})")
        return channels // num_head_channels, num_head_channels
    if num_heads <= 0 or channels % num_heads:
        raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
    return num_heads, channels // num_heads


# The UNet's GroupNorm groups, whatever its width (the reference's GroupNorm32).
NORM_GROUPS = 32


def group_norm(x: jax.Array, name: str, epsilon: float = 1e-5,
               num_groups: int = NORM_GROUPS, activation: Optional[str] = None) -> jax.Array:
    """GroupNorm computed in float32 and cast back (reference ``GroupNorm32``), with the SiLU
    that follows it fused when ``activation='silu'`` (ldm_jax/models/group_norm.py).

    Must be called inside a compact method; the layer becomes a child named ``name``.
    """
    y = GroupNorm(num_groups=num_groups, epsilon=epsilon, activation=activation, name=name)(x)
    return y.astype(x.dtype)


def fourier_position_features(height: int, width: int, num_frequencies: int) -> jax.Array:
    """[height * width, 4 * num_frequencies]: sin and cos of 2^k * pi * (y, x), k < F, where
    (y, x) are the cell centres as fractions of the map's height and width (row-major order).

    Fractions rather than cell indices, so that a map sampled at twice the training size sees the
    same features at the same relative place (layout boxes are fractions of the canvas too).
    """
    ys = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
    xs = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
    yy, xx = jnp.meshgrid(ys, xs, indexing="ij")
    return fourier_features(jnp.stack([yy.reshape(-1), xx.reshape(-1)], axis=-1), num_frequencies)


def fourier_features(coords: jax.Array, num_frequencies: int) -> jax.Array:
    """[..., D] coordinates in [0, 1] -> [..., 2 * D * F]: sin and cos of 2^k * pi * coord."""
    freqs = jnp.pi * (2.0 ** jnp.arange(num_frequencies, dtype=jnp.float32))
    angles = (coords[..., :, None] * freqs).reshape(*coords.shape[:-1], -1)
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def layer_norm(x: jax.Array, name: str, epsilon: float = 1e-5) -> jax.Array:
    """LayerNorm computed in float32 and cast back (eps as torch.nn.LayerNorm)."""
    y = nn.LayerNorm(epsilon=epsilon, dtype=jnp.float32, param_dtype=jnp.float32,
                     name=name)(x.astype(jnp.float32))
    return y.astype(x.dtype)


class SelfAttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection (reference ``AttentionBlock``).

    GroupNorm(32) -> 1x1 qkv projection -> multi-head attention over the H*W positions ->
    zero-initialised 1x1 output projection -> + input. Because ``proj_out`` starts at zero the
    block is the identity at initialisation.

    The qkv channels are laid out per head as [q, k, v] (the reference's default "legacy"
    order), so the reference ``qkv`` conv weights map onto ``qkv`` by a plain transpose.
    """

    num_heads: int = 1
    num_head_channels: int = -1
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        # As in the reference block, num_head_channels (when set) overrides num_heads.
        if self.num_head_channels != -1:
            heads, dim_head = resolve_heads(c, num_head_channels=self.num_head_channels)
        else:
            heads, dim_head = resolve_heads(c, num_heads=self.num_heads)
        x = x.astype(self.dtype)
        h = group_norm(x, "norm")
        # ldm_jax's Dense: flax's, with the weight gradient in the CPU kernel (no transposes
        # of the [positions, channels] gradients; ldm_jax/models/dense.py).
        qkv = Dense(3 * c, dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=torch_default_init, name="qkv")(h)
        out = packed_self_attention(qkv.reshape(b, hgt * wid, heads, 3 * dim_head),
                                    implementation=self.attention_impl)
        out = out.reshape(b, hgt, wid, c)
        out = Dense(c, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=zeros_init,
                    name="proj_out")(out)
        return x + out


class CrossAttention(nn.Module):
    """Multi-head attention from ``x`` to ``context`` (self-attention when context is None).

    Submodules ``to_q``, ``to_k``, ``to_v`` (no bias) and ``to_out`` (with bias) carry the same
    names as in CompVis/diffusers so pretrained weights map one-to-one.
    """

    query_dim: int
    heads: int = 8
    dim_head: int = 64
    dropout: float = 0.0
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None,
                 train: bool = False) -> jax.Array:
        x = x.astype(self.dtype)
        ctx = x if context is None else context.astype(self.dtype)
        inner = self.heads * self.dim_head

        def proj(name, inp):
            return Dense(inner, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                         kernel_init=torch_default_init, name=name)(inp)

        q, k, v = proj("to_q", x), proj("to_k", ctx), proj("to_v", ctx)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head)
        out = attention(split(q), split(k), split(v), implementation=self.attention_impl)
        out = out.reshape(x.shape[0], x.shape[1], inner)
        out = Dense(self.query_dim, dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=torch_default_init, name="to_out")(out)
        return nn.Dropout(self.dropout)(out, deterministic=not train)


class FeedForward(nn.Module):
    """GEGLU feed-forward: Dense(dim -> 2*mult*dim) -> a * gelu(gate) -> Dense(-> dim).

    ``proj`` corresponds to the reference ``ff.net.0.proj`` and ``out`` to ``ff.net.2``.
    """

    dim: int
    mult: int = 4
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        inner = self.dim * self.mult
        h = Dense(2 * inner, dtype=self.dtype, param_dtype=jnp.float32,
                  kernel_init=torch_default_init, name="proj")(x)
        a, gate = jnp.split(h, 2, axis=-1)
        # Exact (erf) GELU, as torch.nn.functional.gelu, not the tanh approximation.
        h = a * nn.gelu(gate, approximate=False)
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        return Dense(self.dim, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=torch_default_init, name="out")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attn, cross-attn, GEGLU FF, each residual."""

    dim: int
    heads: int
    dim_head: int
    dropout: float = 0.0
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None,
                 train: bool = False) -> jax.Array:
        attn = lambda name: CrossAttention(self.dim, self.heads, self.dim_head, self.dropout,
                                           self.attention_impl, self.dtype, name=name)
        x = x + attn("attn1")(layer_norm(x, "norm1"), None, train)
        x = x + attn("attn2")(layer_norm(x, "norm2"), context, train)
        x = x + FeedForward(self.dim, 4, self.dropout, self.dtype, name="ff")(
            layer_norm(x, "norm3"), train)
        return x


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, conditioned on ``context``.

    GroupNorm(32, eps 1e-6) -> proj_in (1x1 conv, or Dense when ``use_linear`` as in SD 2.x)
    -> ``depth`` x `BasicTransformerBlock` -> zero-initialised proj_out -> + input.

    Args (call):
      x: [B, H, W, C].
      context: [B, Lc, context_dim] cross-attention context; None makes the second attention
        a self-attention (only shape-compatible if the module was initialised that way).
    """

    n_heads: int
    d_head: int
    depth: int = 1
    dropout: float = 0.0
    use_linear: bool = False
    attention_impl: Optional[str] = None
    position_frequencies: int = 0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None,
                 train: bool = False) -> jax.Array:
        b, hgt, wid, c = x.shape
        inner = self.n_heads * self.d_head
        x = x.astype(self.dtype)
        h = group_norm(x, "norm", epsilon=1e-6)
        # 1x1 conv and Dense are the same map in NHWC; the two variants exist only so that
        # both the LDM (conv) and SD 2.x (linear) checkpoints have a matching kernel shape.
        if self.use_linear:
            h = h.reshape(b, hgt * wid, c)
            h = Dense(inner, dtype=self.dtype, param_dtype=jnp.float32,
                      kernel_init=torch_default_init, name="proj_in")(h)
        else:
            h = Conv(inner, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=torch_default_init, name="proj_in")(h)
            h = h.reshape(b, hgt * wid, inner)
        if self.position_frequencies:
            # Where each position sits on the map, so that a query can match a context token
            # that names a place (a layout's box corners); convolutions alone carry position
            # only through their zero padding. Not in the reference models (their checkpoints
            # have no `pos_proj`; it is off by default).
            pos = fourier_position_features(hgt, wid, self.position_frequencies)
            h = h + Dense(inner, dtype=self.dtype, param_dtype=jnp.float32,
                          kernel_init=torch_default_init, name="pos_proj")(
                              pos.astype(self.dtype))[None]
        for i in range(self.depth):
            h = BasicTransformerBlock(inner, self.n_heads, self.d_head, self.dropout,
                                      self.attention_impl, self.dtype,
                                      name=f"transformer_blocks_{i}")(h, context, train)
        if self.use_linear:
            h = Dense(c, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=zeros_init,
                      name="proj_out")(h)
            h = h.reshape(b, hgt, wid, c)
        else:
            h = h.reshape(b, hgt, wid, inner)
            h = Conv(c, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=zeros_init, name="proj_out")(h)
        return x + h

"""The LDM denoising UNet (structure of openaimodel.UNetModel), NHWC.

Layout of the parameter tree (chosen so reference checkpoints map by name):

* ``time_embed_0`` / ``time_embed_2``: the two Dense layers of the timestep MLP.
* ``label_emb``: class embedding (only when ``num_classes`` is set).
* ``input_blocks_{i}_{j}``: layer ``j`` of input block ``i`` (block 0 is the stem conv).
* ``middle_block_{0,1,2}``: ResBlock, attention, ResBlock.
* ``output_blocks_{i}_{j}``: layer ``j`` of output block ``i``.
* ``out_norm`` / ``out_conv``: the output head.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from ldm_jax.models.attention import (SelfAttentionBlock, SpatialTransformer, group_norm,
                                      resolve_heads, torch_default_init, zeros_init)
from ldm_jax.models.conv import Conv
from ldm_jax.models.remat import check_remat, remat_block

Dtype = Any


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal timestep embedding [B] -> [B, dim] in float32.

    Frequencies exp(-log(max_period) * i / half) for i < half = dim // 2; the first half of the
    output is cos, the second half sin (the reference order); odd ``dim`` is zero-padded.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def _conv(features: int, name: str, dtype: Dtype, kernel: int = 3, stride: int = 1,
          zero: bool = False) -> Conv:
    # Explicit symmetric padding (not 'SAME'): for stride 2 'SAME' pads (0, 1) whereas the
    # reference pads (1, 1), which would shift every downsampled feature map by half a pixel.
    pad = kernel // 2
    return Conv(features, (kernel, kernel), strides=(stride, stride),
                padding=((pad, pad), (pad, pad)), dtype=dtype, param_dtype=jnp.float32,
                kernel_init=zeros_init if zero else torch_default_init, name=name)


def _upsample_nearest(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_pool(x: jax.Array) -> jax.Array:
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, optionally followed by a 3x3 conv (``conv``)."""

    use_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _upsample_nearest(x)
        if self.use_conv:
            x = _conv(x.shape[-1], "conv", self.dtype)(x)
        return x


class Downsample(nn.Module):
    """x2 downsampling: stride-2 3x3 conv (``op``) or 2x2 average pooling."""

    use_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_conv:
            return _conv(x.shape[-1], "op", self.dtype, stride=2)(x)
        return _avg_pool(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _concat_skip(h: jax.Array, skip: jax.Array, split: int) -> jax.Array:
    """[h, skip] along the channels. Its backward pass materialises the two gradient halves
    at once: otherwise XLA fuses the split into their consumers, and the skip half's consumer
    is the encoder block's backward pass, so the decoder block's full-width gradient buffers
    stay alive until then (2.1 GB of the f4_celebahq batch-48 remat peak, measured)."""
    return jnp.concatenate([h, skip], axis=-1)


def _concat_skip_fwd(h, skip, split):
    return _concat_skip(h, skip, split), None


def _concat_skip_bwd(split, _, g):
    return jax.lax.optimization_barrier((g[..., :split], g[..., split:]))


_concat_skip.defvjp(_concat_skip_fwd, _concat_skip_bwd)


class ResBlock(nn.Module):
    """Residual block conditioned on the (time [+ class]) embedding.

    GroupNorm -> SiLU -> [up/down] -> conv3x3; emb -> SiLU -> Dense added to the features
    (or, with ``use_scale_shift_norm``, applied FiLM-style as norm(h) * (1 + scale) + shift);
    GroupNorm -> SiLU -> dropout -> zero-initialised conv3x3; plus a skip path (1x1 conv when
    the channel count changes). The zero-initialised last conv makes the block start as the
    identity, which is what lets deep UNets train stably from scratch.
    """

    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    up: bool = False
    down: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False,
                 skip: Optional[jax.Array] = None) -> jax.Array:
        # The decoder's skip concatenation happens here, not in the caller: under remat the
        # block then stores its two inputs (the skip tensor is the encoder's stored output
        # anyway) instead of a third, concatenated copy of both.
        if skip is not None:
            x = _concat_skip(x, skip.astype(x.dtype), x.shape[-1])
        out_ch = self.out_channels
        h = group_norm(x, "in_norm", activation="silu")
        if self.up:
            h, x = _upsample_nearest(h), _upsample_nearest(x)
        elif self.down:
            h, x = _avg_pool(h), _avg_pool(x)
        h = _conv(out_ch, "in_conv", self.dtype)(h)

        e = nn.Dense(2 * out_ch if self.use_scale_shift_norm else out_ch, dtype=self.dtype,
                     param_dtype=jnp.float32, kernel_init=torch_default_init,
                     name="emb_layers")(nn.silu(emb))
        e = e.astype(h.dtype)[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = nn.silu(group_norm(h, "out_norm") * (1 + scale) + shift)
        else:
            h = group_norm(h + e, "out_norm", activation="silu")
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = _conv(out_ch, "out_conv", self.dtype, zero=True)(h)

        if x.shape[-1] != out_ch:
            x = _conv(out_ch, "skip_connection", self.dtype, kernel=1)(x)
        return x + h


class UNetModel(nn.Module):
    """LDM UNet: eps/x0/v prediction network on NHWC latents.

    Fields follow openaimodel.UNetModel. ``attention_resolutions`` are downsampling factors
    (1 = input resolution, 2 = after the first downsample, ...). Exactly one of ``num_heads``
    / ``num_head_channels`` must be set. With ``use_spatial_transformer`` every attention
    layer is a `SpatialTransformer` cross-attending to ``context`` (``context_dim`` required),
    otherwise a `SelfAttentionBlock`. Concat conditioning is handled by the caller
    (concatenate the conditioning channels onto ``x`` and count them in ``in_channels``).
    """

    in_channels: int
    out_channels: int
    model_channels: int
    num_res_blocks: int
    attention_resolutions: Sequence[int]
    dropout: float = 0.0
    channel_mult: Sequence[int] = (1, 2, 4, 8)
    conv_resample: bool = True
    num_heads: int = -1
    num_head_channels: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_spatial_transformer: bool = False
    transformer_depth: int = 1
    context_dim: Optional[int] = None
    num_classes: Optional[int] = None
    use_linear_in_transformer: bool = False
    attention_impl: Optional[str] = None
    transformer_position_frequencies: int = 0
    # Rematerialisation of every ResBlock and attention block: 'nothing' | 'dots' | 'full'
    # (ldm_jax/models/remat.py). Parameter names do not depend on it.
    remat: str = "nothing"
    dtype: Dtype = jnp.float32

    def _check_config(self, x, context, y):
        check_remat(self.remat, "UNetModel.remat")
        if (self.num_heads == -1) == (self.num_head_channels == -1):
            raise ValueError("UNetModel: set exactly one of num_heads / num_head_channels (the "
                             f"other -1); got num_heads={self.num_heads}, "
                             f"num_head_channels={self.num_head_channels}")
        if self.use_spatial_transformer and self.context_dim is None:
            raise ValueError("UNetModel: use_spatial_transformer=True requires context_dim")
        if context is not None and not self.use_spatial_transformer:
            raise ValueError("UNetModel: a context was given but use_spatial_transformer=False "
                             "(only SpatialTransformer layers consume a cross-attention context)")
        if context is None and self.use_spatial_transformer:
            raise ValueError("UNetModel: use_spatial_transformer=True requires a context "
                             "[B, L, context_dim] (use an 'empty' context for unconditional)")
        if context is not None and context.shape[-1] != self.context_dim:
            raise ValueError(f"UNetModel: context last dim {context.shape[-1]} != context_dim "
                             f"{self.context_dim}")
        if y is not None and self.num_classes is None:
            raise ValueError("UNetModel: class labels y were given but num_classes is None")
        if y is None and self.num_classes is not None:
            raise ValueError("UNetModel: num_classes is set, so class labels y [B] are required")
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"UNetModel: expected NHWC input with {self.in_channels} channels, "
                             f"got shape {x.shape}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"UNetModel: spatial size {x.shape[1:3]} must be divisible by "
                             f"{factor} (2 ** (len(channel_mult) - 1))")

    def _attention(self, ch: int, name: str):
        heads, dim_head = resolve_heads(ch, self.num_heads, self.num_head_channels)
        if self.use_spatial_transformer:
            # static_argnums count self as 0: `train` (3) is a Python flag.
            st = remat_block(SpatialTransformer, self.remat, (3,))(
                heads, dim_head, self.transformer_depth, 0.0, self.use_linear_in_transformer,
                self.attention_impl, self.transformer_position_frequencies, self.dtype, name=name)
            return lambda h, context, train: st(h, context, train)
        sa = remat_block(SelfAttentionBlock, self.remat)(heads, -1, self.attention_impl,
                                                         self.dtype, name=name)
        return lambda h, context, train: sa(h)

    def _resblock(self, out_ch: int, name: str, up: bool = False, down: bool = False):
        return remat_block(ResBlock, self.remat, (3,))(
            out_ch, self.dropout, self.use_scale_shift_norm, up, down, self.dtype, name=name)

    @nn.compact
    def __call__(self, x: jax.Array, timesteps: jax.Array, context: Optional[jax.Array] = None,
                 y: Optional[jax.Array] = None, train: bool = False) -> jax.Array:
        """Predict the model output for noisy input ``x`` [B, H, W, in_channels].

        Args:
          timesteps: [B] (or scalar) int or float diffusion times.
          context: [B, L, context_dim] cross-attention context (spatial transformer only).
          y: [B] int class labels (only when ``num_classes`` is set).
          train: enables dropout (needs a 'dropout' rng when dropout > 0).

        Returns:
          [B, H, W, out_channels] float32.
        """
        self._check_config(x, context, y)
        mc = self.model_channels
        attn_res = tuple(self.attention_resolutions)
        batch = x.shape[0]

        t = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        emb = timestep_embedding(t, mc)
        dense = lambda name: nn.Dense(4 * mc, dtype=self.dtype, param_dtype=jnp.float32,
                                      kernel_init=torch_default_init, name=name)
        emb = dense("time_embed_2")(nn.silu(dense("time_embed_0")(emb)))
        if self.num_classes is not None:
            emb = emb + nn.Embed(self.num_classes, 4 * mc, param_dtype=jnp.float32,
                                 embedding_init=nn.initializers.normal(1.0),
                                 name="label_emb")(y).astype(emb.dtype)

        h = _conv(mc, "input_blocks_0_0", self.dtype)(x.astype(self.dtype))
        skips = [h]
        ch, ds, block = mc, 1, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                ch = mult * mc
                h = self._resblock(ch, f"input_blocks_{block}_0")(h, emb, train)
                if ds in attn_res:
                    h = self._attention(ch, f"input_blocks_{block}_1")(h, context, train)
                skips.append(h)
                block += 1
            if level != len(self.channel_mult) - 1:
                name = f"input_blocks_{block}_0"
                if self.resblock_updown:
                    h = self._resblock(ch, name, down=True)(h, emb, train)
                else:
                    h = Downsample(self.conv_resample, self.dtype, name=name)(h)
                skips.append(h)
                block += 1
                ds *= 2

        h = self._resblock(ch, "middle_block_0")(h, emb, train)
        h = self._attention(ch, "middle_block_1")(h, context, train)
        h = self._resblock(ch, "middle_block_2")(h, emb, train)

        block = 0
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                ch = mult * mc
                h = self._resblock(ch, f"output_blocks_{block}_0")(h, emb, train, skips.pop())
                layer = 1
                if ds in attn_res:
                    h = self._attention(ch, f"output_blocks_{block}_{layer}")(h, context, train)
                    layer += 1
                if level and i == self.num_res_blocks:
                    name = f"output_blocks_{block}_{layer}"
                    if self.resblock_updown:
                        h = self._resblock(ch, name, up=True)(h, emb, train)
                    else:
                        h = Upsample(self.conv_resample, self.dtype, name=name)(h)
                    ds //= 2
                block += 1

        h = group_norm(h, "out_norm", activation="silu")
        h = _conv(self.out_channels, "out_conv", self.dtype, zero=True)(h)
        return h.astype(jnp.float32)

"""First-stage autoencoders of Latent Diffusion (KL- and VQ-regularised), NHWC, Flax linen.

Structure follows CompVis ``ldm/modules/diffusionmodules/model.py`` (Encoder / Decoder and their
ResnetBlock / AttnBlock / Down- and Upsample) and ``ldm/models/autoencoder.py`` (AutoencoderKL,
VQModelInterface). Submodules are created in the same order as the reference registers its
parameters, with names that map one-to-one onto the reference's:

    reference (PyTorch)                   here (Flax param path)
    encoder.down[i].block[j]              encoder/down_{i}_block_{j}
    encoder.down[i].attn[j]               encoder/down_{i}_attn_{j}
    encoder.down[i].downsample.conv       encoder/down_{i}_downsample/conv
    encoder.mid.block_1 / attn_1 / ...    encoder/mid_block_1, mid_attn_1, mid_block_2
    decoder.up[i].block[j] / upsample     decoder/up_{i}_block_{j}, up_{i}_upsample/conv

so that pretrained CompVis / diffusers weights can be converted by renaming + transposing kernels
(PyTorch OIHW -> Flax HWIO).

Mixed precision: ``dtype`` is the computation dtype (float32 or bfloat16); parameters are always
float32. GroupNorm statistics and the attention softmax are computed in float32 and everything
returned from a model's public methods is float32.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.config.loading import ConfigError
from ldm_jax.models.distributions import DiagonalGaussian
from ldm_jax.models.quantizer import VectorQuantizer
from ldm_jax.models.conv import Conv
from ldm_jax.models.group_norm import GroupNorm
from ldm_jax.models.remat import check_remat, remat_block

Dtype = Any

# PyTorch's default Conv2d weight init (kaiming_uniform with a=sqrt(5)) is U(+-1/sqrt(fan_in)),
# i.e. variance 1/(3 fan_in). Using the same scale keeps from-scratch training dynamics close to
# the reference (Flax's default lecun_normal has 3x the variance). Biases start at zero.
_TORCH_CONV_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

GROUPNORM_EPS = 1e-6


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def _conv(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1,
          padding: Union[str, Sequence[Tuple[int, int]], None] = None) -> Conv:
    """A conv with float32 params, torch-like init and symmetric 'same' padding by default."""
    if padding is None:
        p = (kernel - 1) // 2
        padding = ((p, p), (p, p))
    return Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                dtype=dtype, param_dtype=jnp.float32, kernel_init=_TORCH_CONV_INIT,
                bias_init=nn.initializers.zeros, name=name)


def _group_norm(x: jax.Array, num_groups: int, dtype: Dtype, name: str,
                activation: Optional[str] = None) -> jax.Array:
    """GroupNorm(num_groups, eps=1e-6, affine) computed in float32, result cast to ``dtype``;
    ``activation='silu'`` fuses the SiLU that follows it (ldm_jax/models/group_norm.py).

    Must be called from inside a compact method (it creates a submodule named ``name``).
    """
    y = GroupNorm(num_groups=num_groups, epsilon=GROUPNORM_EPS, use_fast_variance=False,
                  activation=activation, name=name)(x)
    return y.astype(dtype)


def _make_conv_out(out_ch: int, dtype: Dtype, name: Optional[str] = None) -> Conv:
    """The decoder's final 3x3 conv; shared by ``Decoder`` and ``apply_decoder_conv_out`` so both
    compute exactly the same function."""
    return _conv(out_ch, 3, dtype, name=name)


def apply_decoder_conv_out(conv_out_params: Any, h: jax.Array,
                           dtype: Dtype = jnp.float32) -> jax.Array:
    """Apply the decoder's ``conv_out`` with explicit params to features ``h``.

    Args:
        conv_out_params: the ``conv_out`` subtree of the decoder params, e.g.
            ``params['decoder']['conv_out']`` (keys ``kernel`` [3,3,C,out_ch], ``bias``).
        h: decoder features [B, H, W, C] (``decoder_features`` returned by the models).
        dtype: computation dtype; pass the model's dtype. In float32 this reproduces the model's
            ``recon`` exactly; in bfloat16 up to one bf16 rounding of the output (XLA may keep a
            fused conv's float32 accumulator), which is immaterial for gradient norms.
    Returns:
        float32 [B, H, W, out_ch]. Lets a loss take d(loss)/d(last-layer kernel) (the adaptive
        GAN weight of the reference) without differentiating through the decoder body.
    """
    out_ch = conv_out_params["kernel"].shape[-1]
    out = _make_conv_out(out_ch, dtype).apply({"params": conv_out_params}, h)
    return out.astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------------

class ResnetBlock(nn.Module):
    """norm1 -> swish -> conv1 -> norm2 -> swish -> dropout -> conv2, plus (1x1) shortcut.

    Attributes:
        out_channels: output channels; a 1x1 ``nin_shortcut`` is added when they differ from the
            input channels.
        dropout: dropout rate (uses the 'dropout' rng when ``train`` and rate > 0).
        num_groups: GroupNorm groups (32 in the reference).
        dtype: computation dtype.
    """

    out_channels: int
    dropout: float = 0.0
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.astype(self.dtype)
        h = _group_norm(x, self.num_groups, self.dtype, "norm1", "silu")
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
        h = _group_norm(h, self.num_groups, self.dtype, "norm2", "silu")
        h = nn.Dropout(rate=self.dropout, deterministic=not train)(h)
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all h*w positions with a residual connection.

    ``norm`` (GroupNorm) -> 1x1 convs ``q``, ``k``, ``v`` -> softmax(q k^T * C^-0.5) v ->
    1x1 ``proj_out``. Logits and softmax are computed in float32.
    """

    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        b, hh, ww, c = x.shape
        h = _group_norm(x, self.num_groups, self.dtype, "norm")
        q = _conv(c, 1, self.dtype, "q")(h).reshape(b, hh * ww, c)
        k = _conv(c, 1, self.dtype, "k")(h).reshape(b, hh * ww, c)
        v = _conv(c, 1, self.dtype, "v")(h).reshape(b, hh * ww, c)
        logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * (c ** -0.5), axis=-1)
        out = jnp.einsum("bij,bjc->bic", weights.astype(self.dtype), v)
        out = out.reshape(b, hh, ww, c)
        out = _conv(c, 1, self.dtype, "proj_out")(out)
        return x + out


class Downsample(nn.Module):
    """Halve H and W: zero-pad one row/column at the bottom/right, then 3x3 stride-2 VALID conv.

    The asymmetric pad (instead of symmetric padding 1) is what the reference does; it matters
    for weight compatibility because it shifts the sampling grid.
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x.astype(self.dtype), ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(x.shape[-1], 3, self.dtype, "conv", stride=2, padding="VALID")(x)


class Upsample(nn.Module):
    """Double H and W with nearest-neighbour repetition, then a 3x3 conv (``conv``)."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        # repeat == nearest-neighbour interpolation by an exact factor of 2.
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(x.shape[-1], 3, self.dtype, "conv")(x)


# ------------------------------------------------------------------------------------------------
# encoder / decoder
# ------------------------------------------------------------------------------------------------

class _RematBlocks:
    """ResnetBlock / AttnBlock constructors wrapped by the module's `remat` policy (a mixin of
    Encoder and Decoder, whose `remat` field it reads)."""

    def _resnet(self, *args, **kwargs):
        # static_argnums count self as 0: `train` (2) is a Python flag.
        return remat_block(ResnetBlock, self.remat, (2,))(*args, **kwargs)

    def _attn(self, *args, **kwargs):
        return remat_block(AttnBlock, self.remat)(*args, **kwargs)


class Encoder(_RematBlocks, nn.Module):
    """Convolutional encoder: image [B, H, W, C_in] -> features [B, H/f, W/f, (2*)z_channels].

    ``f = 2**(len(ch_mult)-1)``. Attention is inserted after each res block of a level whose
    nominal feature-map size (derived from ``resolution``, as in the reference, not from the
    actual input) is in ``attn_resolutions``.
    """

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    resolution: int
    z_channels: int
    double_z: bool = True
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    num_groups: int = 32
    attention: bool = True  # False: the reference's attn_type='none' (no attention blocks)
    remat: str = "nothing"  # per-block rematerialisation (ldm_jax/models/remat.py)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        n_levels = len(self.ch_mult)
        h = _conv(self.ch, 3, self.dtype, "conv_in")(x.astype(self.dtype))
        curr_res = self.resolution
        for i, mult in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                h = self._resnet(self.ch * mult, self.dropout, self.num_groups, self.dtype,
                                 name=f"down_{i}_block_{j}")(h, train)
                if self.attention and curr_res in self.attn_resolutions:
                    h = self._attn(self.num_groups, self.dtype, name=f"down_{i}_attn_{j}")(h)
            if i != n_levels - 1:
                h = Downsample(self.dtype, name=f"down_{i}_downsample")(h)
                curr_res //= 2
        block_in = h.shape[-1]
        h = self._resnet(block_in, self.dropout, self.num_groups, self.dtype,
                         name="mid_block_1")(h, train)
        if self.attention:
            h = self._attn(self.num_groups, self.dtype, name="mid_attn_1")(h)
        h = self._resnet(block_in, self.dropout, self.num_groups, self.dtype,
                         name="mid_block_2")(h, train)
        h = _group_norm(h, self.num_groups, self.dtype, "norm_out", "silu")
        out_ch = 2 * self.z_channels if self.double_z else self.z_channels
        return _conv(out_ch, 3, self.dtype, "conv_out")(h)


class Decoder(_RematBlocks, nn.Module):
    """Convolutional decoder: latent [B, h, w, z_channels] -> image [B, h*f, w*f, out_ch] (f32).

    Levels run from the deepest (``up_{L-1}``) to the shallowest (``up_0``), each with
    ``num_res_blocks + 1`` res blocks and a 2x upsample after every level except ``up_0``; level
    indices match the reference's ``self.up[i]``.
    """

    ch: int
    out_ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    resolution: int
    z_channels: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    num_groups: int = 32
    attention: bool = True  # False: the reference's attn_type='none' (no attention blocks)
    remat: str = "nothing"  # per-block rematerialisation (ldm_jax/models/remat.py)

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False, return_features: bool = False):
        """Decode ``z``. With ``return_features`` returns ``(out, h)`` where ``h`` (float32) is the
        input of ``conv_out`` (after ``norm_out`` and swish); see ``apply_decoder_conv_out``."""
        n_levels = len(self.ch_mult)
        block_in = self.ch * self.ch_mult[-1]
        curr_res = self.resolution // 2 ** (n_levels - 1)
        h = _conv(block_in, 3, self.dtype, "conv_in")(z.astype(self.dtype))
        h = self._resnet(block_in, self.dropout, self.num_groups, self.dtype,
                         name="mid_block_1")(h, train)
        if self.attention:
            h = self._attn(self.num_groups, self.dtype, name="mid_attn_1")(h)
        h = self._resnet(block_in, self.dropout, self.num_groups, self.dtype,
                         name="mid_block_2")(h, train)
        for i in reversed(range(n_levels)):
            block_out = self.ch * self.ch_mult[i]
            for j in range(self.num_res_blocks + 1):
                h = self._resnet(block_out, self.dropout, self.num_groups, self.dtype,
                                 name=f"up_{i}_block_{j}")(h, train)
                if self.attention and curr_res in self.attn_resolutions:
                    h = self._attn(self.num_groups, self.dtype, name=f"up_{i}_attn_{j}")(h)
            if i != 0:
                h = Upsample(self.dtype, name=f"up_{i}_upsample")(h)
                curr_res *= 2
        h = _group_norm(h, self.num_groups, self.dtype, "norm_out", "silu")
        out = _make_conv_out(self.out_ch, self.dtype, name="conv_out")(h).astype(jnp.float32)
        if return_features:
            # bf16 -> f32 is lossless, so apply_decoder_conv_out(.., dtype) sees the same inputs.
            return out, h.astype(jnp.float32)
        return out


# ------------------------------------------------------------------------------------------------
# first-stage models
# ------------------------------------------------------------------------------------------------

class _FirstStageBase(nn.Module):
    """Shared ddconfig fields of both first-stage models (see ``make_first_stage``)."""

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    resolution: int = 256
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    num_groups: int = 32
    attention: bool = True
    dtype: Dtype = jnp.float32
    remat: str = "nothing"

    def _make_encoder(self, double_z: bool) -> Encoder:
        return Encoder(self.ch, tuple(self.ch_mult), self.num_res_blocks,
                       tuple(self.attn_resolutions), self.resolution, self.z_channels,
                       double_z=double_z, dropout=self.dropout, dtype=self.dtype,
                       num_groups=self.num_groups, attention=self.attention, remat=self.remat)

    def _make_decoder(self) -> Decoder:
        return Decoder(self.ch, self.out_ch, tuple(self.ch_mult), self.num_res_blocks,
                       tuple(self.attn_resolutions), self.resolution, self.z_channels,
                       dropout=self.dropout, dtype=self.dtype, num_groups=self.num_groups,
                       attention=self.attention, remat=self.remat)

    def _check_input(self, x: jax.Array) -> None:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects NHWC input with {self.in_channels} "
                             f"channels, got shape {x.shape}")


class AutoencoderKL(_FirstStageBase):
    """KL-regularised autoencoder (LDM "KL-fN").

    Params (top level): ``encoder``, ``quant_conv``, ``post_quant_conv``, ``decoder``.
    rngs: 'sample' for the posterior sample in ``__call__`` (when ``sample_posterior``) and
    'dropout' when ``train`` with dropout > 0.
    """

    def setup(self):
        self.encoder = self._make_encoder(double_z=True)
        self.quant_conv = _conv(2 * self.embed_dim, 1, self.dtype, None)
        self.post_quant_conv = _conv(self.z_channels, 1, self.dtype, None)
        self.decoder = self._make_decoder()

    def encode(self, x: jax.Array, train: bool = False) -> DiagonalGaussian:
        """Image [B, H, W, C] -> posterior q(z|x) over latents [B, H/f, W/f, embed_dim]."""
        self._check_input(x)
        moments = self.quant_conv(self.encoder(x, train))
        return DiagonalGaussian(moments)

    def decode(self, z: jax.Array, train: bool = False, return_features: bool = False):
        """Latent [B, h, w, embed_dim] -> image (float32); ``(image, features)`` with
        ``return_features`` (features = input of the decoder's ``conv_out``)."""
        h = self.post_quant_conv(z.astype(self.dtype))
        return self.decoder(h, train, return_features)

    def __call__(self, x: jax.Array, *, sample_posterior: bool = True,
                 train: bool = False) -> Dict[str, jax.Array]:
        """Reconstruct ``x``.

        Returns a dict of float32 arrays: ``recon`` [B,H,W,out_ch], ``decoder_features``,
        ``posterior_mean``, ``posterior_logvar`` [B,h,w,embed_dim], ``kl`` [B] (KL to N(0, I)
        summed per example) and ``reg_loss`` = mean over the batch of ``kl``.
        """
        posterior = self.encode(x, train)
        z = posterior.sample(self.make_rng("sample")) if sample_posterior else posterior.mode()
        recon, feats = self.decode(z, train, return_features=True)
        kl = posterior.kl()
        return {
            "recon": recon,
            "decoder_features": feats,
            "posterior_mean": posterior.mean,
            "posterior_logvar": posterior.logvar,
            "kl": kl,
            "reg_loss": jnp.mean(kl),
        }


class VQModel(_FirstStageBase):
    """VQ-regularised autoencoder (LDM "VQ-fN") with the quantiser absorbed into the decoder.

    As in LDM's ``VQModelInterface``, ``encode`` returns the continuous pre-quantisation latent
    (the diffusion model is trained on it) and ``decode`` quantises before decoding.

    Params (top level): ``encoder``, ``quant_conv``, ``quantize`` (``embedding``),
    ``post_quant_conv``, ``decoder``.
    """

    n_embed: int = 16384
    beta: float = 0.25
    legacy: bool = False

    def setup(self):
        self.encoder = self._make_encoder(double_z=False)
        self.quant_conv = _conv(self.embed_dim, 1, self.dtype, None)
        self.quantize = VectorQuantizer(self.n_embed, self.embed_dim, self.beta, self.legacy)
        self.post_quant_conv = _conv(self.z_channels, 1, self.dtype, None)
        self.decoder = self._make_decoder()

    def encode(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Image -> pre-quantisation latent [B, H/f, W/f, embed_dim] (float32)."""
        self._check_input(x)
        return self.quant_conv(self.encoder(x, train)).astype(jnp.float32)

    def _decode_quantized(self, quant: jax.Array, train: bool, return_features: bool):
        h = self.post_quant_conv(quant.astype(self.dtype))
        return self.decoder(h, train, return_features)

    def decode(self, h: jax.Array, train: bool = False, force_not_quantize: bool = False,
               return_features: bool = False):
        """Pre-quantisation latent -> image (float32); quantises first unless
        ``force_not_quantize``. ``(image, features)`` with ``return_features``."""
        if force_not_quantize:
            quant = h
        else:
            quant, _, _ = self.quantize(h.astype(jnp.float32))
        return self._decode_quantized(quant, train, return_features)

    def decode_indices(self, indices: jax.Array, train: bool = False) -> jax.Array:
        """Code indices [B, h, w] -> image (float32)."""
        return self._decode_quantized(self.quantize.lookup(indices), train, False)

    def __call__(self, x: jax.Array, *, train: bool = False) -> Dict[str, jax.Array]:
        """Reconstruct ``x``.

        Returns a dict: ``recon`` [B,H,W,out_ch] and ``decoder_features`` (float32),
        ``reg_loss`` (scalar codebook + commitment loss), ``perplexity``, ``code_usage``
        (scalars) and ``indices`` [B, h, w] int32.
        """
        h = self.encode(x, train)
        quant, qloss, info = self.quantize(h)
        recon, feats = self._decode_quantized(quant, train, True)
        return {
            "recon": recon,
            "decoder_features": feats,
            "reg_loss": qloss.astype(jnp.float32),
            "perplexity": info["perplexity"],
            "code_usage": info["code_usage"],
            "indices": info["indices"],
        }


# ------------------------------------------------------------------------------------------------
# config-driven construction
# ------------------------------------------------------------------------------------------------

_REQUIRED = object()


def _default(key: str) -> Any:
    """The config default of an optional `model` field (ldm_jax/config/defaults.py is the one
    source of defaults; plain dicts given to make_first_stage may leave these out)."""
    from ldm_jax.config import defaults
    return defaults.autoencoder_config(kind="kl", ch_mult=(1,), z_channels=1,
                                       embed_dim=1).model[key]


def _get(cfg: Any, key: str, default: Any = _REQUIRED) -> Any:
    """Read ``cfg[key]`` (ConfigDict or dict); clear error when a required key is missing."""
    try:
        return cfg[key]
    except (KeyError, AttributeError, TypeError):
        if default is _REQUIRED:
            raise ConfigError(f"config.model.{key} is required for the first-stage "
                              "model") from None
        return default


def downsampling_factor(model_cfg: Any) -> int:
    """Spatial downsampling factor f = 2**(len(ch_mult) - 1) of the first stage."""
    return 2 ** (len(tuple(_get(model_cfg, "ch_mult"))) - 1)


def latent_channels(model_cfg: Any) -> int:
    """Number of channels of the latent the diffusion model sees (``embed_dim``)."""
    return int(_get(model_cfg, "embed_dim"))


def make_first_stage(model_cfg: Any, dtype: Dtype = jnp.float32) -> Union[AutoencoderKL, VQModel]:
    """Build an ``AutoencoderKL`` (``kind='kl'``) or ``VQModel`` (``kind='vq'``) from a config.

    Required keys: ``kind``, ``ch``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions``,
    ``resolution``, ``z_channels``, ``embed_dim``; optional: ``in_channels`` (3), ``out_ch`` (3),
    ``dropout`` (0.0), ``norm_groups`` (32); for 'vq' also ``n_embed`` (required), ``beta``
    (0.25), ``legacy_beta`` (False). ``attn_resolutions`` are feature-map sizes in pixels for an
    input of size ``resolution`` (as in the reference configs).

    Raises:
        ConfigError (a ValueError): naming the offending config.model field for an unknown
            ``kind``, an attention resolution that no level reaches, a ``resolution`` not
            divisible by the downsampling factor, or channel counts not divisible by the
            GroupNorm group count.
    """
    kind = _get(model_cfg, "kind")
    if kind not in ("kl", "vq"):
        raise ConfigError(f"config.model.kind must be 'kl' or 'vq', got {kind!r}")
    ch = int(_get(model_cfg, "ch"))
    ch_mult = tuple(int(m) for m in _get(model_cfg, "ch_mult"))
    if not ch_mult or min(ch_mult) < 1:
        raise ConfigError(f"config.model.ch_mult must be a non-empty tuple of positive ints, "
                          f"got {ch_mult}")
    num_res_blocks = int(_get(model_cfg, "num_res_blocks"))
    attn_resolutions = tuple(int(r) for r in _get(model_cfg, "attn_resolutions"))
    resolution = int(_get(model_cfg, "resolution"))
    num_groups = int(_get(model_cfg, "norm_groups", _default("norm_groups")))
    attn_type = _get(model_cfg, "attn_type", _default("attn_type"))
    if attn_type not in ("vanilla", "none"):
        raise ConfigError(f"config.model.attn_type must be 'vanilla' or 'none', got "
                          f"{attn_type!r}")

    # Configs written before the field: no remat.
    remat = check_remat(_get(model_cfg, "remat", "nothing"), "config.model.remat", ConfigError)

    f = 2 ** (len(ch_mult) - 1)
    if resolution % f:
        raise ConfigError(f"config.model.resolution={resolution} must be divisible by the "
                          f"downsampling factor {f} (from ch_mult={ch_mult})")
    reachable = [resolution // 2 ** i for i in range(len(ch_mult))]
    bad = [r for r in attn_resolutions if r not in reachable]
    if bad:
        raise ConfigError(f"config.model.attn_resolutions contains {bad}, which no level "
                          f"reaches; feature-map sizes for resolution={resolution} are "
                          f"{reachable}")
    bad_ch = sorted({ch * m for m in ch_mult if (ch * m) % num_groups})
    if bad_ch:
        raise ConfigError(f"config.model.ch={ch} with ch_mult={ch_mult} gives channel "
                          f"counts {bad_ch} not divisible by norm_groups={num_groups}")

    common = dict(
        ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
        attn_resolutions=attn_resolutions, resolution=resolution,
        z_channels=int(_get(model_cfg, "z_channels")),
        embed_dim=int(_get(model_cfg, "embed_dim")),
        in_channels=int(_get(model_cfg, "in_channels", _default("in_channels"))),
        out_ch=int(_get(model_cfg, "out_ch", _default("out_ch"))),
        dropout=float(_get(model_cfg, "dropout", _default("dropout"))),
        num_groups=num_groups,
        attention=attn_type == "vanilla",
        dtype=jnp.dtype(dtype),
        remat=remat,
    )
    if kind == "kl":
        return AutoencoderKL(**common)
    n_embed = int(_get(model_cfg, "n_embed"))
    if n_embed < 1:
        raise ConfigError(f"config.model.n_embed must be positive, got {n_embed}")
    return VQModel(**common, n_embed=n_embed, beta=float(_get(model_cfg, "beta", _default("beta"))),
                   legacy=bool(_get(model_cfg, "legacy_beta", _default("legacy_beta"))))

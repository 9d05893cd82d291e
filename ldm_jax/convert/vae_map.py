"""First-stage autoencoders: leaf map (ldm_jax <-> CompVis <-> diffusers) and config translation.

  ldm_jax                        CompVis                        diffusers
  encoder/down_{i}_block_{j}     encoder.down.{i}.block.{j}     encoder.down_blocks.{i}.resnets.{j}
  encoder/down_{i}_attn_{j}      encoder.down.{i}.attn.{j}      encoder.down_blocks.{i}.attentions.{j}
  encoder/down_{i}_downsample    encoder.down.{i}.downsample    encoder.down_blocks.{i}.downsamplers.0
  */mid_block_1, mid_attn_1, ..  *.mid.block_1, attn_1, ..     *.mid_block.resnets.0, attentions.0, ..
  decoder/up_{i}_block_{j}       decoder.up.{i}.block.{j}       decoder.up_blocks.{L-1-i}.resnets.{j}
  */norm_out                     *.norm_out                     *.conv_norm_out
  quant_conv, post_quant_conv    (same)                         (same)
  quantize (embedding)           quantize.embedding             quantize.embedding

Attention q/k/v/proj_out are 1x1 convs in ldm_jax and CompVis, Linears (to_q, ..., to_out.0) in
diffusers. diffusers' config options that ldm_jax's autoencoders cannot represent are errors.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

from ldm_jax.convert.common import ConversionError, Leaf, leaf

KL, VQ = "AutoencoderKL", "VQModel"


def _res(out: List[Leaf], p: str, cv: str, df: str, c_in: int, c_out: int) -> None:
    for n in ("norm1", "conv1", "norm2", "conv2"):
        out.append(leaf(f"{p}/{n}", "norm" if n.startswith("norm") else "conv", f"{cv}.{n}",
                        f"{df}.{n}"))
    if c_in != c_out:
        out.append(leaf(f"{p}/nin_shortcut", "conv", f"{cv}.nin_shortcut", f"{df}.conv_shortcut"))


def _attn(out: List[Leaf], p: str, cv: str, df: str) -> None:
    out.append(leaf(f"{p}/norm", "norm", f"{cv}.norm", f"{df}.group_norm"))
    for n, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        out.append(leaf(f"{p}/{n}", "conv1x1", f"{cv}.{n}", f"{df}.{d}", df_fmt="linear"))


def _mid(out: List[Leaf], side: str, ch: int, attention: bool = True) -> None:
    _res(out, f"{side}/mid_block_1", f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", ch, ch)
    if attention:
        _attn(out, f"{side}/mid_attn_1", f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0")
    _res(out, f"{side}/mid_block_2", f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", ch, ch)


def _attention(m: Mapping) -> bool:
    """False for attn_type='none' (model.attn_type; older configs lack it: 'vanilla')."""
    return (m["attn_type"] if "attn_type" in m else "vanilla") == "vanilla"


def ae_leaves(m: Mapping) -> List[Leaf]:
    """Every module of the first stage built from ``m`` (autoencoder config.model fields)."""
    ch, mult, nrb = int(m["ch"]), tuple(m["ch_mult"]), int(m["num_res_blocks"])
    res, attn_res = int(m["resolution"]), tuple(m["attn_resolutions"])
    attention = _attention(m)
    if not attention:  # attn_type='none': no attention block anywhere
        attn_res = ()
    n = len(mult)
    out: List[Leaf] = [leaf("encoder/conv_in", "conv", "encoder.conv_in", "encoder.conv_in")]
    c_in = ch
    for i in range(n):
        c_out = ch * mult[i]
        for j in range(nrb):
            _res(out, f"encoder/down_{i}_block_{j}", f"encoder.down.{i}.block.{j}",
                 f"encoder.down_blocks.{i}.resnets.{j}", c_in, c_out)
            c_in = c_out
            if res // 2 ** i in attn_res:
                _attn(out, f"encoder/down_{i}_attn_{j}", f"encoder.down.{i}.attn.{j}",
                      f"encoder.down_blocks.{i}.attentions.{j}")
        if i != n - 1:
            out.append(leaf(f"encoder/down_{i}_downsample/conv", "conv",
                            f"encoder.down.{i}.downsample.conv",
                            f"encoder.down_blocks.{i}.downsamplers.0.conv"))
    _mid(out, "encoder", c_in, attention)
    out.append(leaf("encoder/norm_out", "norm", "encoder.norm_out", "encoder.conv_norm_out"))
    out.append(leaf("encoder/conv_out", "conv", "encoder.conv_out", "encoder.conv_out"))
    out.append(leaf("quant_conv", "conv", "quant_conv", "quant_conv"))
    if m["kind"] == "vq":
        out.append(leaf("quantize", "embed", "quantize.embedding", "quantize.embedding"))
    out.append(leaf("post_quant_conv", "conv", "post_quant_conv", "post_quant_conv"))

    out.append(leaf("decoder/conv_in", "conv", "decoder.conv_in", "decoder.conv_in"))
    c_in = ch * mult[-1]
    _mid(out, "decoder", c_in, attention)
    for i in reversed(range(n)):
        k, c_out = n - 1 - i, ch * mult[i]
        for j in range(nrb + 1):
            _res(out, f"decoder/up_{i}_block_{j}", f"decoder.up.{i}.block.{j}",
                 f"decoder.up_blocks.{k}.resnets.{j}", c_in, c_out)
            c_in = c_out
            if res // 2 ** i in attn_res:
                _attn(out, f"decoder/up_{i}_attn_{j}", f"decoder.up.{i}.attn.{j}",
                      f"decoder.up_blocks.{k}.attentions.{j}")
        if i != 0:
            out.append(leaf(f"decoder/up_{i}_upsample/conv", "conv",
                            f"decoder.up.{i}.upsample.conv",
                            f"decoder.up_blocks.{k}.upsamplers.0.conv"))
    out.append(leaf("decoder/norm_out", "norm", "decoder.norm_out", "decoder.conv_norm_out"))
    out.append(leaf("decoder/conv_out", "conv", "decoder.conv_out", "decoder.conv_out"))
    return out


# ------------------------------------------------------------------------------------------------
# diffusers config <-> autoencoder config.model fields
# ------------------------------------------------------------------------------------------------

_FIXED = {"act_fn": "silu"}
_FIXED_KL = {"use_quant_conv": True, "use_post_quant_conv": True, "shift_factor": None,
             "latents_mean": None, "latents_std": None}
_FIXED_VQ = {"norm_type": "group", "lookup_from_codebook": False}


def ae_fields_from_diffusers(cfg: Mapping) -> Dict[str, Any]:
    """Autoencoder config.model fields for a diffusers AutoencoderKL / VQModel config."""
    cls = cfg.get("_class_name")
    if cls not in (KL, VQ):
        raise ConversionError(f"diffusers autoencoder class {cls!r} is not supported; ldm_jax "
                              f"converts {KL} and {VQ}.")
    for key, want in {**_FIXED, **(_FIXED_KL if cls == KL else _FIXED_VQ)}.items():
        if cfg.get(key, want) != want:
            raise ConversionError(f"diffusers {cls} config option {key}={cfg[key]!r} cannot be "
                                  f"represented by ldm_jax's first stage (it needs {key}={want!r}).")
    boc = [int(c) for c in cfg["block_out_channels"]]
    n, ch = len(boc), boc[0]
    if any(c % ch for c in boc):
        raise ConversionError(f"diffusers {cls} block_out_channels={boc}: every entry must be a "
                              f"multiple of the first (ldm_jax's ch x ch_mult).")
    size = cfg.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ConversionError(f"diffusers {cls} sample_size={size}: ldm_jax's `resolution` "
                                  f"is one number (square images).")
        size = size[0]
    f = 2 ** (n - 1)
    if not isinstance(size, int) or size % f:
        raise ConversionError(f"diffusers {cls} sample_size={size!r} must be an int divisible by "
                              f"the downsampling factor {f} (it sets ldm_jax's resolution).")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    attn = []
    for i, t in enumerate(down):
        if t not in ("DownEncoderBlock2D", "AttnDownEncoderBlock2D"):
            raise ConversionError(f"diffusers {cls} down_block_types[{i}]={t!r} is not supported.")
        attn.append(t == "AttnDownEncoderBlock2D")
    for k, t in enumerate(up):
        want = "AttnUpDecoderBlock2D" if attn[n - 1 - k] else "UpDecoderBlock2D"
        if t != want:
            raise ConversionError(f"diffusers {cls} up_block_types[{k}]={t!r}: ldm_jax's decoder "
                                  f"mirrors the encoder, so it must be {want!r}.")
    latent = int(cfg.get("latent_channels", 4))
    mid_attention = bool(cfg.get("mid_block_add_attention", True))
    if not mid_attention and any(attn):
        raise ConversionError(f"diffusers {cls} mid_block_add_attention=False with attention "
                              f"blocks in {down}: ldm_jax's first stage has attention in the "
                              f"middle blocks, or none anywhere (attn_type='none').")
    fields = dict(kind="kl" if cls == KL else "vq", ch=ch, ch_mult=tuple(c // ch for c in boc),
                  num_res_blocks=int(cfg.get("layers_per_block", 1)),
                  attn_resolutions=tuple(size // 2 ** i for i in range(n) if attn[i]),
                  resolution=size, in_channels=int(cfg.get("in_channels", 3)),
                  out_ch=int(cfg.get("out_channels", 3)), z_channels=latent, embed_dim=latent,
                  dropout=0.0, norm_groups=int(cfg.get("norm_num_groups", 32)), n_embed=0,
                  beta=0.25, legacy_beta=False,
                  attn_type="vanilla" if mid_attention else "none")
    if cls == VQ:
        # diffusers' (and taming's) VectorQuantizer defaults to the legacy beta placement.
        fields.update(n_embed=int(cfg.get("num_vq_embeddings", 256)),
                      embed_dim=int(cfg.get("vq_embed_dim") or latent), legacy_beta=True)
    return fields


def ae_diffusers_config_from_model(m: Mapping, scaling_factor: float) -> Dict[str, Any]:
    """A diffusers AutoencoderKL / VQModel config for autoencoder config.model fields ``m``."""
    ch, mult = int(m["ch"]), tuple(m["ch_mult"])
    if mult[0] != 1:
        raise ConversionError(f"autoencoder model.ch_mult={mult}: diffusers' conv_in width is "
                              f"block_out_channels[0], so ch_mult[0] must be 1.")
    n, res = len(mult), int(m["resolution"])
    attention = _attention(m)
    attn = [attention and res // 2 ** i in tuple(m["attn_resolutions"]) for i in range(n)]
    cfg: Dict[str, Any] = dict(
        in_channels=int(m["in_channels"]), out_channels=int(m["out_ch"]),
        down_block_types=["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        up_block_types=["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D"
                        for a in reversed(attn)],
        block_out_channels=[ch * x for x in mult], layers_per_block=int(m["num_res_blocks"]),
        act_fn="silu", latent_channels=int(m["z_channels"]),
        norm_num_groups=int(m.get("norm_groups", 32)), sample_size=res,
        scaling_factor=float(scaling_factor), mid_block_add_attention=attention)
    if m["kind"] == "kl":
        if int(m["embed_dim"]) != int(m["z_channels"]):
            raise ConversionError(f"autoencoder model.embed_dim={m['embed_dim']} != z_channels="
                                  f"{m['z_channels']}: diffusers' AutoencoderKL ties the two "
                                  f"(latent_channels).")
        cfg.update(_class_name=KL, use_quant_conv=True, use_post_quant_conv=True)
    else:
        cfg.update(_class_name=VQ, num_vq_embeddings=int(m["n_embed"]),
                   vq_embed_dim=int(m["embed_dim"]), norm_type="group")
    return cfg

"""The denoising UNet: leaf map (ldm_jax <-> CompVis <-> diffusers) and config translation.

`unet_leaves(model_cfg)` walks the UNet exactly as `ldm_jax.models.unet.UNetModel` builds it and
names every module in the three layouts:

  ldm_jax                      CompVis (openaimodel)          diffusers
  time_embed_0 / _2            time_embed.0 / .2              time_embedding.linear_1 / _2
  label_emb                    label_emb                      class_embedding
  input_blocks_0_0             input_blocks.0.0               conv_in
  input_blocks_{b}_0 (res)     input_blocks.{b}.0             down_blocks.{l}.resnets.{j}
  input_blocks_{b}_1 (attn)    input_blocks.{b}.1             down_blocks.{l}.attentions.{j}
  input_blocks_{b}_0 (down)    input_blocks.{b}.0(.op)        down_blocks.{l}.downsamplers.0
  middle_block_{0,1,2}         middle_block.{0,1,2}           mid_block.resnets.0/attentions.0/resnets.1
  output_blocks_{b}_{k}        output_blocks.{b}.{k}          up_blocks.{L-1-l}.{resnets,attentions,upsamplers}
  out_norm / out_conv          out.0 / out.2                  conv_norm_out / conv_out

`model_fields_from_diffusers` / `diffusers_config_from_model` translate a diffusers UNet2DModel
or UNet2DConditionModel config; options ldm_jax's UNet cannot represent are errors naming them.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

from ldm_jax.convert.common import ConversionError, Leaf, leaf
from ldm_jax.models.attention import resolve_heads

_RES_PARTS = (("in_norm", "norm", "in_layers.0", "norm1"), ("in_conv", "conv", "in_layers.2", "conv1"),
              ("emb_layers", "dense", "emb_layers.1", "time_emb_proj"),
              ("out_norm", "norm", "out_layers.0", "norm2"), ("out_conv", "conv", "out_layers.3", "conv2"))


def _resblock(out: List[Leaf], p: str, cv: str, df: str, c_in: int, c_out: int) -> None:
    for name, kind, cv_name, df_name in _RES_PARTS:
        out.append(leaf(f"{p}/{name}", kind, f"{cv}.{cv_name}", f"{df}.{df_name}"))
    if c_in != c_out:
        out.append(leaf(f"{p}/skip_connection", "conv", f"{cv}.skip_connection",
                        f"{df}.conv_shortcut"))


def _attention(out: List[Leaf], m: Mapping, p: str, cv: str, df: str, ch: int) -> None:
    heads, dim_head = resolve_heads(ch, m["num_heads"], m["num_head_channels"])
    if not m["use_spatial_transformer"]:
        out.append(leaf(f"{p}/norm", "norm", f"{cv}.norm", f"{df}.group_norm"))
        out.append(leaf(f"{p}/qkv", "dense", f"{cv}.qkv", df, cv_fmt="conv1d",
                        df_fmt="qkv_split", heads=heads))
        out.append(leaf(f"{p}/proj_out", "dense", f"{cv}.proj_out", f"{df}.to_out.0",
                        cv_fmt="conv1d"))
        return
    proj = "dense" if m.get("use_linear_in_transformer", False) else "conv"
    out.append(leaf(f"{p}/norm", "norm", f"{cv}.norm", f"{df}.norm"))
    out.append(leaf(f"{p}/proj_in", proj, f"{cv}.proj_in", f"{df}.proj_in"))
    for i in range(m["transformer_depth"]):
        tp, tc, td = f"{p}/transformer_blocks_{i}", f"{cv}.transformer_blocks.{i}", \
            f"{df}.transformer_blocks.{i}"
        for n in ("norm1", "norm2", "norm3"):
            out.append(leaf(f"{tp}/{n}", "norm", f"{tc}.{n}", f"{td}.{n}"))
        for a in ("attn1", "attn2"):
            for s in ("to_q", "to_k", "to_v"):
                out.append(leaf(f"{tp}/{a}/{s}", "dense", f"{tc}.{a}.{s}", f"{td}.{a}.{s}",
                                bias=False))
            out.append(leaf(f"{tp}/{a}/to_out", "dense", f"{tc}.{a}.to_out.0", f"{td}.{a}.to_out.0"))
        out.append(leaf(f"{tp}/ff/proj", "dense", f"{tc}.ff.net.0.proj", f"{td}.ff.net.0.proj"))
        out.append(leaf(f"{tp}/ff/out", "dense", f"{tc}.ff.net.2", f"{td}.ff.net.2"))
    out.append(leaf(f"{p}/proj_out", proj, f"{cv}.proj_out", f"{df}.proj_out"))


def unet_leaves(m: Mapping) -> List[Leaf]:
    """Every module of the UNet built from ``m`` (config.model fields), in build order."""
    if m.get("transformer_position_frequencies", 0):
        raise ConversionError(
            f"model.transformer_position_frequencies={m['transformer_position_frequencies']}: "
            "the SpatialTransformers' position features (`pos_proj`) have no counterpart in "
            "CompVis or diffusers UNets, so this model cannot be converted to or from them.")
    mc, mult, nrb = m["model_channels"], tuple(m["channel_mult"]), m["num_res_blocks"]
    attn_res = tuple(m["attention_resolutions"])
    updown = m["resblock_updown"]
    out: List[Leaf] = [leaf("time_embed_0", "dense", "time_embed.0", "time_embedding.linear_1"),
                       leaf("time_embed_2", "dense", "time_embed.2", "time_embedding.linear_2")]
    if m.get("num_classes"):
        out.append(leaf("label_emb", "embed", "label_emb", "class_embedding"))
    out.append(leaf("input_blocks_0_0", "conv", "input_blocks.0.0", "conv_in"))
    chans, ch, block, last = [mc], mc, 1, len(mult) - 1
    for level, mul in enumerate(mult):
        has_attn = 2 ** level in attn_res
        for j in range(nrb):
            _resblock(out, f"input_blocks_{block}_0", f"input_blocks.{block}.0",
                      f"down_blocks.{level}.resnets.{j}", ch, mul * mc)
            ch = mul * mc
            if has_attn:
                _attention(out, m, f"input_blocks_{block}_1", f"input_blocks.{block}.1",
                           f"down_blocks.{level}.attentions.{j}", ch)
            chans.append(ch)
            block += 1
        if level != last:
            df = f"down_blocks.{level}.downsamplers.0"
            if updown:
                _resblock(out, f"input_blocks_{block}_0", f"input_blocks.{block}.0", df, ch, ch)
            else:
                out.append(leaf(f"input_blocks_{block}_0/op", "conv", f"input_blocks.{block}.0.op",
                                f"{df}.conv"))
            chans.append(ch)
            block += 1
    _resblock(out, "middle_block_0", "middle_block.0", "mid_block.resnets.0", ch, ch)
    _attention(out, m, "middle_block_1", "middle_block.1", "mid_block.attentions.0", ch)
    _resblock(out, "middle_block_2", "middle_block.2", "mid_block.resnets.1", ch, ch)
    block = 0
    for level in reversed(range(len(mult))):
        k, has_attn = last - level, 2 ** level in attn_res
        for i in range(nrb + 1):
            c_in = ch + chans.pop()
            ch = mult[level] * mc
            _resblock(out, f"output_blocks_{block}_0", f"output_blocks.{block}.0",
                      f"up_blocks.{k}.resnets.{i}", c_in, ch)
            layer = 1
            if has_attn:
                _attention(out, m, f"output_blocks_{block}_1", f"output_blocks.{block}.1",
                           f"up_blocks.{k}.attentions.{i}", ch)
                layer = 2
            if level and i == nrb:
                p, cv, df = (f"output_blocks_{block}_{layer}", f"output_blocks.{block}.{layer}",
                             f"up_blocks.{k}.upsamplers.0")
                if updown:
                    _resblock(out, p, cv, df, ch, ch)
                else:
                    out.append(leaf(f"{p}/conv", "conv", f"{cv}.conv", f"{df}.conv"))
            block += 1
    out.append(leaf("out_norm", "norm", "out.0", "conv_norm_out"))
    out.append(leaf("out_conv", "conv", "out.2", "conv_out"))
    return out


# ------------------------------------------------------------------------------------------------
# diffusers config <-> ldm_jax config.model fields
# ------------------------------------------------------------------------------------------------

# option: value ldm_jax needs (the reference UNet's fixed behaviour).
_FIXED_COMMON = {"center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
                 "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
                 "downsample_padding": 1, "mid_block_scale_factor": 1,
                 "time_embedding_type": "positional", "class_embed_type": None}
_FIXED_UNCOND = {"add_attention": True}
_FIXED_COND = {"only_cross_attention": False, "dual_cross_attention": False,
               "encoder_hid_dim": None, "encoder_hid_dim_type": None, "addition_embed_type": None,
               "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
               "time_embedding_act_fn": None, "timestep_post_act": None,
               "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
               "projection_class_embeddings_input_dim": None, "attention_type": "default",
               "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
               "cross_attention_norm": None, "mid_block_type": "UNetMidBlock2DCrossAttn",
               "reverse_transformer_layers_per_block": None}

UNCOND, COND = "UNet2DModel", "UNet2DConditionModel"


def _check_fixed(cfg: Mapping, fixed: Mapping, cls: str) -> None:
    for key, want in fixed.items():
        have = cfg.get(key, want)
        if isinstance(want, float) or isinstance(have, float):
            same = have is not None and want is not None and abs(float(have) - float(want)) < 1e-12
            same = same or have is want
        else:
            same = have == want
        if not same:
            raise ConversionError(f"diffusers {cls} config option {key}={have!r} cannot be "
                                  f"represented by ldm_jax's UNet (it needs {key}={want!r}).")


def _per_level(value: Any, n: int, key: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConversionError(f"diffusers UNet config: {key} has {len(value)} entries for "
                                  f"{n} levels.")
        return list(value)
    return [value] * n


def model_fields_from_diffusers(cfg: Mapping) -> Dict[str, Any]:
    """config.model fields (see config_defaults.diffusion_config) for a diffusers UNet config.

    Raises ConversionError naming the first option ldm_jax's UNet cannot represent.
    """
    cls = cfg.get("_class_name", UNCOND)
    if cls not in (UNCOND, COND):
        raise ConversionError(f"diffusers UNet class {cls!r} is not supported; ldm_jax converts "
                              f"{UNCOND} and {COND}.")
    cond = cls == COND
    _check_fixed(cfg, _FIXED_COMMON, cls)
    _check_fixed(cfg, _FIXED_COND if cond else _FIXED_UNCOND, cls)
    if cfg.get("time_embedding_dim") not in (None, 4 * cfg["block_out_channels"][0]):
        raise ConversionError(f"diffusers {cls} config option time_embedding_dim="
                              f"{cfg['time_embedding_dim']} must be 4 x block_out_channels[0].")
    boc = [int(c) for c in cfg["block_out_channels"]]
    n = len(boc)
    mc = boc[0]
    if any(c % mc for c in boc):
        raise ConversionError(f"diffusers {cls} block_out_channels={boc}: every entry must be a "
                              f"multiple of the first (ldm_jax's channel_mult x model_channels).")
    nrb = _per_level(cfg.get("layers_per_block", 2), n, "layers_per_block")
    if len(set(nrb)) != 1:
        raise ConversionError(f"diffusers {cls} layers_per_block={nrb}: ldm_jax needs one value.")
    shift = cfg.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise ConversionError(f"diffusers {cls} resnet_time_scale_shift={shift!r}: ldm_jax "
                              f"supports 'default' and 'scale_shift'.")
    if not cond and shift == "scale_shift" and cfg.get("attn_norm_num_groups") != 32:
        # diffusers then builds the mid-block attention without GroupNorm; the reference has one.
        raise ConversionError(f"diffusers {cls} with resnet_time_scale_shift='scale_shift' needs "
                              f"attn_norm_num_groups=32 (got {cfg.get('attn_norm_num_groups')!r}).")
    if not cond and cfg.get("attn_norm_num_groups") not in (None, 32):
        raise ConversionError(f"diffusers {cls} attn_norm_num_groups="
                              f"{cfg['attn_norm_num_groups']!r}: ldm_jax uses 32.")
    if not cond and cfg.get("mid_block_type", "UNetMidBlock2D") != "UNetMidBlock2D":
        raise ConversionError(f"diffusers {cls} mid_block_type={cfg.get('mid_block_type')!r}: "
                              f"ldm_jax needs 'UNetMidBlock2D' (resnet, attention, resnet).")

    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    attn_types = ("CrossAttnDownBlock2D",) if cond else ("AttnDownBlock2D",)
    plain_types = ("DownBlock2D", "ResnetDownsampleBlock2D")
    has_attn, updown_flags = [], []
    for i, t in enumerate(down):
        if t not in attn_types + plain_types:
            raise ConversionError(f"diffusers {cls} down_block_types[{i}]={t!r} is not supported "
                                  f"(use {attn_types + plain_types}).")
        has_attn.append(t in attn_types)
        if i != n - 1:
            if t == "AttnDownBlock2D":
                updown_flags.append(cfg.get("downsample_type", "conv") == "resnet")
            else:
                updown_flags.append(t == "ResnetDownsampleBlock2D")
    up_attn = "CrossAttnUpBlock2D" if cond else "AttnUpBlock2D"
    plain_up = ("UpBlock2D", "ResnetUpsampleBlock2D")
    for k, t in enumerate(up):
        level = n - 1 - k
        if (t == up_attn) != has_attn[level] or (t != up_attn and t not in plain_up):
            raise ConversionError(f"diffusers {cls} up_block_types[{k}]={t!r} does not mirror "
                                  f"down_block_types[{level}]={down[level]!r} (ldm_jax needs "
                                  f"{up_attn!r} there iff that level has attention, else one of "
                                  f"{plain_up}).")
        if level and t == "AttnUpBlock2D":
            updown_flags.append(cfg.get("upsample_type", "conv") == "resnet")
        elif level:
            updown_flags.append(t == "ResnetUpsampleBlock2D")
    if len(set(updown_flags)) > 1:
        raise ConversionError(f"diffusers {cls}: resnet up/down-sampling (downsample_type / "
                              f"upsample_type 'resnet', Resnet*sampleBlock2D) must be used on every "
                              f"level or none (ldm_jax's resblock_updown).")
    attn_levels = [i for i in range(n) if has_attn[i]] + [n - 1]  # + the mid block
    heads_cfg = cfg.get("attention_head_dim", 8)
    num_heads, num_head_channels = _heads(cls, cond, heads_cfg, boc, attn_levels, n)

    fields = dict(in_channels=int(cfg["in_channels"]), out_channels=int(cfg["out_channels"]),
                  model_channels=mc, num_res_blocks=int(nrb[0]),
                  attention_resolutions=tuple(2 ** i for i in range(n) if has_attn[i]),
                  channel_mult=tuple(c // mc for c in boc), num_heads=num_heads,
                  num_head_channels=num_head_channels, use_scale_shift_norm=shift == "scale_shift",
                  resblock_updown=bool(updown_flags and updown_flags[0]),
                  use_spatial_transformer=cond, transformer_depth=1, context_dim=0,
                  num_classes=int(cfg.get("num_class_embeds") or 0),
                  use_linear_in_transformer=False)
    if cond:
        depth = _per_level(cfg.get("transformer_layers_per_block", 1), n,
                           "transformer_layers_per_block")
        if len(set(depth)) != 1 or not isinstance(depth[0], int):
            raise ConversionError(f"diffusers {cls} transformer_layers_per_block={depth}: ldm_jax "
                                  f"needs one integer depth for every level.")
        ctx = cfg.get("cross_attention_dim", 1280)
        if isinstance(ctx, (list, tuple)):
            if len(set(ctx)) != 1:
                raise ConversionError(f"diffusers {cls} cross_attention_dim={ctx}: ldm_jax needs "
                                      f"one context width.")
            ctx = ctx[0]
        fields.update(transformer_depth=int(depth[0]), context_dim=int(ctx),
                      use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)))
    return fields


def _heads(cls: str, cond: bool, heads_cfg: Any, boc: List[int], levels: List[int],
           n: int) -> Tuple[int, int]:
    """(num_heads, num_head_channels) from diffusers' attention_head_dim."""
    if not cond:
        # UNet2DModel: attention_head_dim is channels per head (None: one head per block).
        if heads_cfg is None:
            return 1, -1
        if isinstance(heads_cfg, (list, tuple)):
            raise ConversionError(f"diffusers {cls} attention_head_dim={heads_cfg}: expected one int.")
        bad = [boc[i] for i in levels if boc[i] % heads_cfg]
        if bad:
            raise ConversionError(f"diffusers {cls} attention_head_dim={heads_cfg} does not divide "
                                  f"the attention blocks' channels {bad}.")
        return -1, int(heads_cfg)
    # UNet2DConditionModel: attention_head_dim is (legacy naming) the NUMBER of heads per level.
    heads = _per_level(heads_cfg, n, "attention_head_dim")
    used = sorted({(boc[i], heads[i]) for i in levels})
    if len({h for _, h in used}) == 1:
        return int(used[0][1]), -1
    widths = {c // h for c, h in used if c % h == 0}
    if len(widths) == 1 and all(c % h == 0 for c, h in used):
        return -1, int(widths.pop())  # per-level head counts with a constant head width (SD 2.x)
    raise ConversionError(f"diffusers {cls} attention_head_dim={heads_cfg} (heads per level): "
                          f"ldm_jax needs either the same head count on every attention level or "
                          f"the same channels per head; got (channels, heads) {used}.")


def diffusers_config_from_model(m: Mapping, sample_size: int) -> Dict[str, Any]:
    """A diffusers UNet2DModel / UNet2DConditionModel config for config.model fields ``m``."""
    mc, mult = int(m["model_channels"]), tuple(m["channel_mult"])
    if mult[0] != 1:
        raise ConversionError(f"config.model.channel_mult={mult}: diffusers' conv_in width is "
                              f"block_out_channels[0], so channel_mult[0] must be 1.")
    n = len(mult)
    boc = [mc * x for x in mult]
    has_attn = [2 ** i in tuple(m["attention_resolutions"]) for i in range(n)]
    cond = bool(m["use_spatial_transformer"])
    updown = bool(m["resblock_updown"])
    levels = [i for i in range(n) if has_attn[i]] + [n - 1]
    heads = [resolve_heads(boc[i], m["num_heads"], m["num_head_channels"]) for i in range(n)]
    cfg: Dict[str, Any] = dict(
        sample_size=sample_size, in_channels=int(m["in_channels"]),
        out_channels=int(m["out_channels"]), block_out_channels=boc,
        layers_per_block=int(m["num_res_blocks"]), center_input_sample=False,
        flip_sin_to_cos=True, freq_shift=0, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
        downsample_padding=1, mid_block_scale_factor=1,
        resnet_time_scale_shift="scale_shift" if m["use_scale_shift_norm"] else "default",
        num_class_embeds=int(m.get("num_classes") or 0) or None)
    plain_down = "ResnetDownsampleBlock2D" if updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if updown else "UpBlock2D"
    if cond:
        if updown and any(has_attn[:-1]):
            raise ConversionError("config.model.resblock_updown with attention on a downsampling "
                                  "level has no diffusers UNet2DConditionModel equivalent.")
        cfg.update(_class_name=COND, cross_attention_dim=int(m["context_dim"]),
                   transformer_layers_per_block=int(m["transformer_depth"]),
                   use_linear_projection=bool(m.get("use_linear_in_transformer", False)),
                   attention_head_dim=[h for h, _ in heads] if m["num_heads"] == -1
                   else int(m["num_heads"]),
                   mid_block_type="UNetMidBlock2DCrossAttn",
                   down_block_types=["CrossAttnDownBlock2D" if a else plain_down for a in has_attn],
                   up_block_types=["CrossAttnUpBlock2D" if a else plain_up
                                   for a in reversed(has_attn)])
    else:
        dims = {heads[i][1] for i in levels}
        counts = {heads[i][0] for i in levels}
        if counts == {1}:
            head_dim = None
        elif len(dims) == 1:
            head_dim = dims.pop()
        else:
            raise ConversionError(f"config.model.num_heads={m['num_heads']} gives different "
                                  f"channels per head on the attention levels; diffusers' "
                                  f"UNet2DModel has one attention_head_dim (channels per head).")
        cfg.update(_class_name=UNCOND, attention_head_dim=head_dim, add_attention=True,
                   attn_norm_num_groups=32, mid_block_type="UNetMidBlock2D",
                   downsample_type="resnet" if updown else "conv",
                   upsample_type="resnet" if updown else "conv",
                   down_block_types=["AttnDownBlock2D" if a else plain_down for a in has_attn],
                   up_block_types=["AttnUpBlock2D" if a else plain_up for a in reversed(has_attn)])
    return cfg

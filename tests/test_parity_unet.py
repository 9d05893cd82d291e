"""Numerical parity of ldm_jax's UNet with diffusers' UNet2DModel / UNet2DConditionModel.

Each case random-initialises the diffusers module (every weight, including the zero-initialised
output convs and the norms' affine parameters), converts its state dict with ldm_jax.convert,
runs both on the same inputs in float32 and requires max|a-b| / max|b| <= 1e-5.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import require

torch = require("torch")
diffusers = require("diffusers")

from ldm_jax import convert  # noqa: E402
from ldm_jax.convert import ConversionError  # noqa: E402
from ldm_jax.tasks.diffusion import make_unet  # noqa: E402
from parity_utils import nchw_to_nhwc, nhwc_to_nchw, randomize, rel_err, state_dict_np  # noqa: E402

TOL = 1e-5

# (name, diffusers class, config) -- small widths, two levels, 16x16 inputs.
CASES = [
    # configs/f4_celebahq.py structure (attention from downsampling 2 on, heads by channels).
    ("uncond_celebahq_like", "UNet2DModel", dict(
        block_out_channels=(32, 64), layers_per_block=2, attention_head_dim=16,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"))),
    # scale-shift norm, resblock up/down, attention at both levels, one head, class embedding.
    ("uncond_scaleshift_updown_class", "UNet2DModel", dict(
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=None,
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"), resnet_time_scale_shift="scale_shift",
        attn_norm_num_groups=32, downsample_type="resnet", upsample_type="resnet",
        num_class_embeds=5)),
    # resblock up/down on attention-free levels (ResnetDown/UpsampleBlock2D).
    ("uncond_resnet_sample_blocks", "UNet2DModel", dict(
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=32,
        down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"), downsample_type="resnet",
        upsample_type="resnet")),
    # cross-attention, heads by count, conv proj_in.
    ("cond_heads_by_count", "UNet2DConditionModel", dict(
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2,
        cross_attention_dim=24, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))),
    # linear projection, transformer depth 2, per-level head counts with constant head width
    # (SD 2.x style), scale-shift norm and a class embedding.
    ("cond_linear_depth2_class", "UNet2DConditionModel", dict(
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
        cross_attention_dim=24, use_linear_projection=True, transformer_layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        resnet_time_scale_shift="scale_shift", num_class_embeds=3)),
]


def _model_config(fields: dict) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict(dict(fields, dropout=0.0, attention_impl=None))
    return m


@pytest.mark.parametrize("name,cls,kwargs", CASES, ids=[c[0] for c in CASES])
def test_unet_matches_diffusers(name, cls, kwargs):
    in_ch = 4
    torch_model = getattr(diffusers, cls)(sample_size=16, in_channels=in_ch, out_channels=in_ch,
                                          **kwargs)
    randomize(torch_model, seed=len(name))
    config = dict(torch_model.config, _class_name=cls)
    fields = convert.unet_fields_from_diffusers(config)
    params = convert.unet_params_from_diffusers(state_dict_np(torch_model), fields)
    model = make_unet(_model_config(fields))

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, in_ch, 16, 16)).astype(np.float32)
    t = np.array([7, 830], np.int64)
    kw, jkw = {}, {}
    if cls == "UNet2DConditionModel":
        ctx = rng.standard_normal((2, 5, 24)).astype(np.float32)
        kw["encoder_hidden_states"] = torch.from_numpy(ctx)
        jkw["context"] = jnp.asarray(ctx)
    if kwargs.get("num_class_embeds"):
        y = np.array([1, kwargs["num_class_embeds"] - 1])
        kw["class_labels"] = torch.from_numpy(y)
        jkw["y"] = jnp.asarray(y, jnp.int32)
    with torch.no_grad():
        args = (torch.from_numpy(x), torch.from_numpy(t))
        ref = torch_model(*args, **kw).sample.numpy()
    out = model.apply({"params": params}, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t), **jkw)
    err = rel_err(nhwc_to_nchw(out), ref)
    print(f"{name}: max rel err {err:.2e} (max|ref| {np.abs(ref).max():.3g})")
    assert err <= TOL, f"{name}: relative error {err:.3e} > {TOL}"

    # The converted tree has exactly the structure (and shapes) ldm_jax itself initialises.
    init = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.asarray(nchw_to_nhwc(x)),
                                             jnp.asarray(t), **jkw)["params"])
    assert jax.tree.structure(init) == jax.tree.structure(params)
    assert jax.tree.map(lambda a: a.shape, init) == jax.tree.map(lambda a: a.shape, params)

    # And back: ldm_jax -> diffusers reproduces the original state dict exactly.
    back = convert.unet_params_to_diffusers(params, fields)
    orig = state_dict_np(torch_model)
    assert sorted(back) == sorted(orig)
    for k in orig:
        np.testing.assert_array_equal(back[k], orig[k], err_msg=k)


@pytest.mark.parametrize("option,value", [
    ("norm_num_groups", 16), ("flip_sin_to_cos", False), ("act_fn", "gelu"), ("freq_shift", 1),
    ("attention_head_dim", (2, 3)), ("down_block_types", ("SimpleCrossAttnDownBlock2D", "DownBlock2D")),
])
def test_unrepresentable_diffusers_options_are_named(option, value):
    config = dict(_class_name="UNet2DConditionModel", in_channels=4, out_channels=4,
                  block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2,
                  cross_attention_dim=24, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    config[option] = value
    with pytest.raises(ConversionError, match=option):
        convert.unet_fields_from_diffusers(config)


def test_missing_and_unknown_keys_are_listed():
    model = diffusers.UNet2DModel(sample_size=16, in_channels=4, out_channels=4,
                                  block_out_channels=(32, 64), layers_per_block=1,
                                  attention_head_dim=16,
                                  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    fields = convert.unet_fields_from_diffusers(dict(model.config, _class_name="UNet2DModel"))
    sd = state_dict_np(model)
    del sd["mid_block.attentions.0.to_k.weight"]
    sd["mid_block.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as info:
        convert.unet_params_from_diffusers(sd, fields)
    msg = str(info.value)
    assert "mid_block.attentions.0.to_k.weight" in msg and "mid_block.extra.weight" in msg

"""Numerical parity of ldm_jax's first stages with diffusers' AutoencoderKL and VQModel.

The diffusers module is random-initialised (every weight, norms' affine parameters included),
converted with ldm_jax.convert and both run on the same images in float32: KL posterior moments,
VQ pre-quantisation latents and code indices, and decoded images must agree to
max|a-b| / max|b| <= 1e-5 (indices exactly).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require

torch = require("torch")
diffusers = require("diffusers")

from ldm_jax import convert  # noqa: E402
from ldm_jax.convert import ConversionError  # noqa: E402
from ldm_jax.models.autoencoder import make_first_stage  # noqa: E402
from parity_utils import nchw_to_nhwc, nhwc_to_nchw, randomize, rel_err, state_dict_np  # noqa: E402

TOL = 1e-5
COMMON = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
              sample_size=16, norm_num_groups=32)
CASES = [
    ("kl_no_level_attn", "AutoencoderKL", dict(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4)),
    ("kl_attn_level1", "AutoencoderKL", dict(
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=3,
        layers_per_block=2)),
    ("vq_no_attention", "VQModel", dict(  # CompVis attn_type='none' (inpainting_big's VQ-f4)
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        mid_block_add_attention=False, latent_channels=3, num_vq_embeddings=64,
        vq_embed_dim=3)),
    ("vq_attn_level0", "VQModel", dict(
        down_block_types=("AttnDownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "AttnUpDecoderBlock2D"), latent_channels=3,
        num_vq_embeddings=64, vq_embed_dim=3)),
]


def _build(cls, kwargs, seed):
    model = getattr(diffusers, cls)(**{**COMMON, **kwargs})
    randomize(model, seed)
    fields = convert.ae_fields_from_diffusers(dict(model.config, _class_name=cls))
    params = convert.ae_params_from_diffusers(state_dict_np(model), fields)
    return model, fields, params


@pytest.mark.parametrize("name,cls,kwargs", CASES, ids=[c[0] for c in CASES])
def test_autoencoder_matches_diffusers(name, cls, kwargs):
    model, fields, params = _build(cls, kwargs, seed=len(name))
    ours = make_first_stage(fields)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    xj = jnp.asarray(nchw_to_nhwc(x))
    errs = {}
    with torch.no_grad():
        xt = torch.from_numpy(x)
        if cls == "AutoencoderKL":
            dist = model.encode(xt).latent_dist
            post = ours.apply({"params": params}, xj, method=ours.encode)
            errs["mean"] = rel_err(nhwc_to_nchw(post.mean), dist.mean.numpy())
            errs["logvar"] = rel_err(nhwc_to_nchw(post.logvar), dist.logvar.numpy())
            z = dist.mean.numpy()
        else:
            h = model.encode(xt).latents
            ours_h = ours.apply({"params": params}, xj, method=ours.encode)
            errs["pre_quant"] = rel_err(nhwc_to_nchw(ours_h), h.numpy())
            _, _, (_, _, ref_idx) = model.quantize(h)
            idx = ours.apply({"params": params}, ours_h, method=lambda m, v: m.quantize.nearest(v))
            np.testing.assert_array_equal(np.asarray(idx).reshape(-1), ref_idx.numpy().reshape(-1))
            z = h.numpy()
        ref_img = model.decode(torch.from_numpy(z)).sample.numpy()
    img = ours.apply({"params": params}, jnp.asarray(nchw_to_nhwc(z)), method=ours.decode)
    errs["decoded"] = rel_err(nhwc_to_nchw(img), ref_img)
    print(name, {k: f"{v:.2e}" for k, v in errs.items()})
    for k, v in errs.items():
        assert v <= TOL, f"{name}: {k} relative error {v:.3e} > {TOL}"

    # Round trip to diffusers and to CompVis names is exact and complete.
    orig = state_dict_np(model)
    back = convert.ae_params_to_diffusers(params, fields)
    assert sorted(back) == sorted(orig)
    for k in orig:
        np.testing.assert_array_equal(back[k], orig[k], err_msg=k)
    cv = convert.ae_params_to_compvis(params, fields)
    assert any(k.startswith("encoder.down.0.block.0.") for k in cv)
    again = convert.ae_params_from_compvis(cv, fields)
    np.testing.assert_array_equal(again["decoder"]["conv_out"]["kernel"],
                                  params["decoder"]["conv_out"]["kernel"])


@pytest.mark.parametrize("option,value", [("act_fn", "gelu"), ("use_quant_conv", False),
                                          ("up_block_types", ("UpDecoderBlock2D",) * 2)])
def test_unrepresentable_autoencoder_options_are_named(option, value):
    config = dict(COMMON, _class_name="AutoencoderKL", latent_channels=4,
                  down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                  up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"))
    config[option] = value
    with pytest.raises(ConversionError, match=option):
        convert.ae_fields_from_diffusers(config)

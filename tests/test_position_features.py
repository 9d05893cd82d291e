"""Position features for layouts: Fourier features of the UNet's positions (queries) and of the
layout tokens' corner cells (keys), and their refusal by the reference-format converters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.conditioning.layout import LayoutTokenizer
from ldm_jax.conditioning.ldm_bert import LDMBert, ldm_bert_params_to_compvis
from ldm_jax.convert.common import ConversionError
from ldm_jax.models.attention import fourier_features, fourier_position_features
from ldm_jax.models.unet import UNetModel


def test_fourier_features_closed_form():
    coords = jnp.asarray([[0.25, 0.5], [1.0, 0.0]], jnp.float32)
    got = np.asarray(fourier_features(coords, 3))
    want = []
    for y, x in np.asarray(coords, np.float64):
        angles = [np.pi * 2.0 ** k * v for v in (y, x) for k in range(3)]
        want.append(np.concatenate([np.sin(angles), np.cos(angles)]))
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-6)


def test_position_features_are_fractions_of_the_map():
    small = np.asarray(fourier_position_features(4, 6, 4)).reshape(4, 6, -1)
    large = np.asarray(fourier_position_features(8, 12, 4)).reshape(8, 12, -1)
    assert small.shape == (4, 6, 16)
    # Cell (i, j) of the small map and the cell at the same place of the doubled map differ by
    # half a small cell; the lowest frequency stays close, and row-major order is kept.
    np.testing.assert_allclose(small[:, :, 0], np.sin(np.pi * (np.arange(4)[:, None] + 0.5) / 4)
                               * np.ones((1, 6)), atol=1e-6)
    np.testing.assert_allclose(large[:, :, 4], np.sin(np.pi * (np.arange(12)[None] + 0.5) / 12)
                               * np.ones((8, 1)), atol=1e-6)


def _unet(freqs):
    return UNetModel(in_channels=3, out_channels=3, model_channels=32, num_res_blocks=1,
                     attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=32,
                     use_spatial_transformer=True, context_dim=16,
                     transformer_position_frequencies=freqs)


def test_unet_position_features_make_queries_position_aware():
    x = jnp.zeros((1, 8, 8, 3))  # a constant input: only the position features vary over the map
    ctx = jax.random.normal(jax.random.key(1), (1, 4, 16))
    t = jnp.asarray([500])
    with_pos, without = _unet(4), _unet(0)
    p_pos = with_pos.init(jax.random.key(0), x, t, ctx)["params"]
    p_none = without.init(jax.random.key(0), x, t, ctx)["params"]
    assert "pos_proj" in p_pos["middle_block_1"] and "pos_proj" not in p_none["middle_block_1"]
    # Apart from pos_proj the trees are the same, so converted weights load unchanged.
    strip = lambda tree: {k: (strip(v) if isinstance(v, dict) else v.shape)
                          for k, v in tree.items() if k != "pos_proj"}
    assert strip(p_pos) == strip(p_none)
    # proj_out starts at zero (as in the reference); give it weights so the transformer's output
    # reaches the UNet's output, then the output varies over the constant input's positions.
    def unzero(tree):
        return {k: (unzero(v) if isinstance(v, dict) else
                    (jnp.ones_like(v) * 0.05 if k == "kernel" else v)) for k, v in tree.items()}
    p_pos = unzero(p_pos)
    out = np.asarray(with_pos.apply({"params": p_pos}, x, t, ctx))
    interior = out[0, 2:6, 2:6]
    assert np.std(interior.reshape(-1, 3), axis=0).max() > 1e-3


def test_unet_with_position_features_refuses_conversion():
    from ldm_jax.convert import unet_params_to_diffusers
    fields = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(2,), resblock_updown=False, num_classes=0,
                  use_spatial_transformer=True, transformer_position_frequencies=4)
    with pytest.raises(ConversionError, match="transformer_position_frequencies"):
        unet_params_to_diffusers({}, fields)


def _bert(freqs, tok):
    return LDMBert(vocab_size=tok.vocab_size, max_length=tok.max_length, width=32, depth=1,
                   heads=2, dim_head=16, coord_offset=tok.coord_offset, coord_grid=tok.grid,
                   coord_frequencies=freqs)


def test_layout_coordinate_features_touch_corner_tokens_only():
    tok = LayoutTokenizer(10, grid=16, max_length=8)
    layouts = [(np.asarray([3, 7]), np.asarray([[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.9]],
                                               np.float32))]
    tokens = jnp.asarray(tok(layouts))
    with_coord, plain = _bert(4, tok), _bert(0, tok)
    params = with_coord.init(jax.random.key(0), tokens)["params"]
    assert "coord_emb" in params
    base = {k: v for k, v in params.items() if k != "coord_emb"}
    # A sequence without corner tokens (the null layout) encodes exactly as without the features.
    null = jnp.asarray(tok.null())[None]
    np.testing.assert_array_equal(np.asarray(with_coord.apply({"params": params}, null)),
                                  np.asarray(plain.apply({"params": base}, null)))
    # With corners, the features enter: and nearby cells start out closer than distant ones.
    assert not np.allclose(np.asarray(with_coord.apply({"params": params}, tokens)),
                           np.asarray(plain.apply({"params": base}, tokens)))
    emb = lambda cell: np.asarray(fourier_features(
        jnp.asarray([[cell % 16, cell // 16]], jnp.float32) / 15.0, 4))[0]
    near = np.linalg.norm(emb(5 * 16 + 5) - emb(5 * 16 + 6))
    far = np.linalg.norm(emb(5 * 16 + 5) - emb(12 * 16 + 13))
    assert near < far
    with pytest.raises(ConversionError, match="layout_coord_frequencies"):
        ldm_bert_params_to_compvis(params, dict(vocab_size=tok.vocab_size,
                                                max_length=tok.max_length, width=32, depth=1,
                                                heads=2, dim_head=16, ff_mult=4))


def test_checkpoints_from_before_position_features_still_match():
    from ldm_jax.training.checkpointing import _defining
    saved = {"model_channels": 32, "num_res_blocks": 1}  # written before the key existed
    assert _defining("model", saved) == _defining(
        "model", dict(saved, transformer_position_frequencies=0, remat="full"))
    assert _defining("model", saved) != _defining(
        "model", dict(saved, transformer_position_frequencies=6))

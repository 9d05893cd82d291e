"""config.model.remat: per-block rematerialisation of the UNet changes memory, not the maths.

For each policy ('dots', 'full') the parameter tree equals the one of 'nothing' (same names,
shapes, dtypes: converted checkpoints load unchanged) and the gradients of a training loss
(dropout on, so the recomputed forward must replay the same dropout masks) equal those of
'nothing'. 'full' must shrink the compiled step's temporary buffers.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ldm_jax.config import defaults
from ldm_jax.config.loading import ConfigError
from ldm_jax.models.remat import REMAT_POLICIES, compiler_options
from ldm_jax.models.unet import UNetModel
from ldm_jax.tasks.diffusion import make_unet

# Tiny UNets: a cross-attention one (SpatialTransformer + context, class-free) and a plain one
# (SelfAttentionBlock, class labels). One level each: compiles dominate the test's time.
_TRANSFORMER = dict(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                    attention_resolutions=(1,), channel_mult=(1,), num_head_channels=16,
                    dropout=0.1, use_spatial_transformer=True, context_dim=8,
                    use_scale_shift_norm=True)
_PLAIN = dict(in_channels=3, out_channels=3, model_channels=32, num_res_blocks=1,
              attention_resolutions=(1,), channel_mult=(1,), num_heads=2, dropout=0.1,
              num_classes=5)


def _inputs(fields, batch=2, size=8):
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (batch, size, size, fields["in_channels"]))
    kwargs = {}
    if fields.get("use_spatial_transformer"):
        kwargs["context"] = jax.random.normal(keys[1], (batch, 5, fields["context_dim"]))
    if fields.get("num_classes"):
        kwargs["y"] = jnp.arange(batch) % fields["num_classes"]
    return x, jnp.arange(batch) * 97 + 3, kwargs


def _random_params(abstract_params, seed=2, scale=0.05):
    """Random values for a parameter tree of ShapeDtypeStructs, drawn by numpy (no compile);
    zero-initialised output layers get non-zero values, so every gradient is non-trivial."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype), abstract_params)


def _grads(fields, remat, params):
    model = UNetModel(**fields, remat=remat)
    x, t, kwargs = _inputs(fields)

    def loss(p):
        out = model.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.key(7)},
                          **kwargs)
        return jnp.mean((out - x[..., :fields["out_channels"]]) ** 2)

    # compiler_options: on CPU, keep the barriers that stop XLA from merging the recomputation
    # back into the forward pass; without them every policy compiles to the same program.
    return jax.jit(jax.grad(loss)).lower(params).compile(compiler_options())(params)


@pytest.mark.parametrize("fields", [_TRANSFORMER, _PLAIN], ids=["transformer", "plain"])
def test_gradients_and_params_identical_across_policies(fields):
    x, t, kwargs = _inputs(fields)
    init = lambda remat: jax.eval_shape(
        lambda: UNetModel(**fields, remat=remat).init(jax.random.key(1), x, t, **kwargs))
    reference_tree = init("nothing")
    for remat in ("dots", "full"):
        assert init(remat) == reference_tree, remat  # same names, shapes and dtypes

    params = _random_params(reference_tree["params"], scale=0.2)
    reference = _grads(fields, "nothing", params)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(reference))
    assert scale > 0
    for remat in ("dots", "full"):
        grads = _grads(fields, remat, params)
        diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                   zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(reference)))
        assert diff <= 1e-6 * max(scale, 1.0), (remat, diff, scale)


def test_bad_value_errors():
    cfg = defaults.diffusion_config(first_stage_kind="kl", model_channels=32, channel_mult=(1,),
                                    attention_resolutions=(), num_heads=1).model
    assert cfg.remat == "nothing" and make_unet(cfg).remat == "nothing"
    cfg.in_channels = cfg.out_channels = 4
    for remat in REMAT_POLICIES:
        cfg.remat = remat
        assert make_unet(cfg).remat == remat
    cfg.remat = "everything"
    with pytest.raises(ConfigError, match=r"config\.model\.remat='everything'.*'nothing'"):
        make_unet(cfg)
    # A model config written before the field (plain dict -> ConfigDict) means 'nothing'.
    old = ml_collections.ConfigDict({k: v for k, v in cfg.to_dict().items() if k != "remat"})
    assert make_unet(old).remat == "nothing"
    # The module itself rejects unknown values too.
    x, t, _ = _inputs(_PLAIN)
    with pytest.raises(ValueError, match="UNetModel.remat"):
        jax.eval_shape(lambda: UNetModel(**_PLAIN, remat="dot").init(
            jax.random.key(0), x, t, y=jnp.zeros((2,), jnp.int32)))


def test_full_remat_reduces_compiled_temp_memory():
    fields = dict(_TRANSFORMER, channel_mult=(1, 2), attention_resolutions=(1, 2), dropout=0.0)
    x, t, kwargs = _inputs(fields, batch=4, size=16)
    params = jax.eval_shape(lambda: UNetModel(**fields).init(jax.random.key(0), x, t,
                                                             **kwargs))["params"]

    def temp_bytes(remat):
        model = UNetModel(**fields, remat=remat)
        loss = lambda p: jnp.mean(model.apply({"params": p}, x, t, **kwargs) ** 2)
        compiled = jax.jit(jax.grad(loss)).lower(params).compile(compiler_options())
        return compiled.memory_analysis().temp_size_in_bytes

    nothing, full = temp_bytes("nothing"), temp_bytes("full")
    assert 0 < full < nothing, (full, nothing)


def test_full_remat_cuts_a_three_level_unet_step_threefold():
    """The decoder's skip concatenation lives inside the rematerialised ResBlock (its two
    inputs are stored, not a concatenated copy) and its backward pass materialises the two
    gradient halves at once, so the block's full-width gradient dies with the block: 3.09x
    here, 2.78x with the concatenation in the caller (measured, XLA:CPU)."""
    fields = dict(in_channels=3, out_channels=3, model_channels=32, num_res_blocks=2,
                  attention_resolutions=(2,), channel_mult=(1, 2, 2), num_head_channels=16)
    x = jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((16,), jnp.int32)
    params = jax.eval_shape(lambda x, t: UNetModel(**fields).init(jax.random.key(0), x, t),
                            x, t)["params"]

    def temp_bytes(remat):
        model = UNetModel(**fields, remat=remat)
        loss = lambda p, x, t: jnp.mean(model.apply({"params": p}, x, t) ** 2)
        compiled = jax.jit(jax.grad(loss)).lower(params, x, t).compile(compiler_options())
        return compiled.memory_analysis().temp_size_in_bytes

    nothing, full = temp_bytes("nothing"), temp_bytes("full")
    assert nothing / full >= 2.95, (nothing, full)


def test_first_stage_remat_same_params_and_gradients():
    from ldm_jax.models.autoencoder import make_first_stage
    from ldm_jax.storage.first_stage import model_config_hash
    cfg = defaults.autoencoder_config(kind="kl", ch_mult=(1,), z_channels=2, embed_dim=2).model
    cfg.ch_mult, cfg.ch, cfg.num_res_blocks, cfg.norm_groups, cfg.resolution = (1,), 8, 1, 4, 4
    cfg.attn_resolutions, cfg.dropout = (4,), 0.1
    assert cfg.remat == "nothing"
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
    rngs = {"params": jax.random.key(1), "sample": jax.random.key(2)}

    def build(remat):
        cfg.remat = remat
        return make_first_stage(cfg)

    tree = jax.eval_shape(lambda: build("nothing").init(rngs, x))
    params = _random_params(tree["params"], scale=0.3)
    hashes = set()
    grads = {}
    for remat in REMAT_POLICIES:
        model = build(remat)
        hashes.add(model_config_hash(cfg))  # not part of the first stage's identity
        assert jax.eval_shape(lambda: model.init(rngs, x)) == tree, remat
        if remat == "dots":  # covered by the UNet tests; each compile costs seconds here
            continue

        def loss(p):
            out = model.apply({"params": p}, x, train=True,
                              rngs={"sample": jax.random.key(3), "dropout": jax.random.key(4)})
            return jnp.mean(jnp.abs(out["recon"] - x)) + 1e-3 * out["reg_loss"]

        grads[remat] = jax.jit(jax.grad(loss)).lower(params).compile(compiler_options())(params)
    assert len(hashes) == 1
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree_util.tree_leaves(grads["full"]), jax.tree_util.tree_leaves(grads["nothing"])))
    assert diff <= 1e-6, diff
    cfg.remat = "yes"
    with pytest.raises(ConfigError, match=r"config\.model\.remat='yes'"):
        make_first_stage(cfg)


def test_resume_ignores_remat():
    """A run may resume with another policy, and a checkpoint written before the field existed
    (no model.remat in its saved config) still resumes."""
    from ldm_jax.training.checkpointing import _defining
    saved = {"model_channels": 32, "channel_mult": [1, 2]}
    assert _defining("model", saved) == _defining("model", dict(saved, remat="full"))
    assert _defining("model", dict(saved, remat="dots")) == _defining("model",
                                                                      dict(saved, remat="full"))
    assert _defining("model", saved) != _defining("model", dict(saved, model_channels=64))


def test_jointly_trained_text_transformer_follows_the_remat_policy():
    """LDMBert (trained with the UNet: its activations are stored in the same step) wraps each
    layer in the UNet's policy: same parameters, same gradients, less memory under 'full'.
    make_condition hands it config.model.remat."""
    from conftest import smoke_config
    from ldm_jax.conditioning import encoders
    from ldm_jax.conditioning.ldm_bert import LDMBert

    fields = dict(vocab_size=50, max_length=16, width=32, depth=3, heads=2, dim_head=16)
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, 50)
    params = LDMBert(**fields).init(jax.random.key(0), tokens)["params"]

    def grads_and_temp(remat):
        module = LDMBert(**fields, remat=remat)
        assert jax.tree_util.tree_structure(
            module.init(jax.random.key(0), tokens)["params"]) == \
            jax.tree_util.tree_structure(params)
        loss = lambda p: jnp.mean(module.apply({"params": p}, tokens) ** 2)
        compiled = jax.jit(jax.grad(loss)).lower(params).compile(compiler_options())
        return compiled(params), compiled.memory_analysis().temp_size_in_bytes

    grads_nothing, temp_nothing = grads_and_temp("nothing")
    grads_full, temp_full = grads_and_temp("full")
    for a, b in zip(jax.tree_util.tree_leaves(grads_full),
                    jax.tree_util.tree_leaves(grads_nothing)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert temp_full < temp_nothing, (temp_full, temp_nothing)
    with pytest.raises(ValueError, match="LDMBert.remat"):
        LDMBert(**fields, remat="some").init(jax.random.key(0), tokens)

    config = smoke_config("txt2img_1p4b.py", "model.remat=full")
    assert encoders.make_condition(config).module.remat == "full"
    assert encoders.make_condition(smoke_config("txt2img_1p4b.py")).module.remat == "nothing"

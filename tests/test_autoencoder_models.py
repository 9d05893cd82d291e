"""Tests for the first-stage models: distributions, vector quantiser, autoencoders, discriminator.

Architecture-level shape checks use ``jax.eval_shape`` (no compilation) so every paper config can
be covered cheaply; numerical checks run real forward passes on tiny models whose parameters are
filled from numpy (compiling Flax initialisers for a whole autoencoder costs seconds on CPU).
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ldm_jax.models.autoencoder import (AttnBlock, AutoencoderKL, Downsample, ResnetBlock,
                                        Upsample, VQModel, apply_decoder_conv_out,
                                        downsampling_factor, make_first_stage)
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.models.distributions import DiagonalGaussian
from ldm_jax.models.quantizer import VectorQuantizer, codebook_stats

# ------------------------------------------------------------------------------------------------
# configs: the paper's architectures at small width / resolution, attention scaled to the same levels
# ------------------------------------------------------------------------------------------------


def _cfg(kind, z, ch_mult, attn, resolution, n_embed=None, ch=32, num_res_blocks=1):
    d = dict(kind=kind, ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
             attn_resolutions=tuple(attn), resolution=resolution, in_channels=3, out_ch=3,
             z_channels=z, embed_dim=z, dropout=0.0)
    if kind == "vq":
        d.update(n_embed=n_embed, beta=0.25, legacy_beta=False)
    return ml_collections.ConfigDict(d)


# name: (config, expected factor). At 256 px the reference attends at 16 (KL-f16: deepest level),
# 16/8 (KL-f32: two deepest), 32 (VQ-f8: deepest), 16 (VQ-f16: deepest); scaled to 32/64 px here.
CONFIGS = {
    "kl-f4": (_cfg("kl", 3, (1, 2, 4), (), 32), 4),
    "kl-f8": (_cfg("kl", 4, (1, 2, 4, 4), (), 32), 8),
    "kl-f16": (_cfg("kl", 16, (1, 1, 2, 2, 4), (4,), 64), 16),
    "kl-f32": (_cfg("kl", 64, (1, 1, 2, 2, 4, 4), (4, 2), 64), 32),
    "vq-f4": (_cfg("vq", 3, (1, 2, 4), (), 32, n_embed=8192), 4),
    "vq-f8": (_cfg("vq", 4, (1, 2, 2, 4), (4,), 32, n_embed=16384), 8),
    "vq-f16": (_cfg("vq", 8, (1, 1, 2, 2, 4), (4,), 64, n_embed=16384), 16),
}

RNGS = {"params": jax.random.key(0), "sample": jax.random.key(1)}


def _fast_rng():
    """Scoped switch to the non-partitionable threefry: on XLA:CPU the partitionable variant (the
    jax 0.10 default) takes seconds to compile per initialiser, which dominates these tests.
    Only the random stream changes, not the distributions being tested."""
    return jax.threefry_partitionable(False)


def _fill_params(shapes, seed=0):
    """Concrete params for a shape tree: torch-like uniform kernels, GroupNorm scale ~1."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        shape = s.shape
        if name == "kernel":
            bound = 1.0 / math.sqrt(int(np.prod(shape[:-1])))
            return jnp.asarray(rng.uniform(-bound, bound, shape), jnp.float32)
        if name == "scale":
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(shape), jnp.float32)
        if name == "bias":
            return jnp.asarray(0.05 * rng.standard_normal(shape), jnp.float32)
        if name == "embedding":
            return jnp.asarray(rng.uniform(-0.5, 0.5, shape), jnp.float32)
        raise AssertionError(f"unexpected param {path}")

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _images(b, res, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (b, res, res, 3)), jnp.float32)


# ------------------------------------------------------------------------------------------------
# DiagonalGaussian
# ------------------------------------------------------------------------------------------------


def test_diagonal_gaussian_kl_and_nll_match_numpy():
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    logvar = rng.uniform(-2, 2, (2, 3, 4, 5)).astype(np.float32)
    dist = DiagonalGaussian(jnp.concatenate([mean, logvar], -1))
    var = np.exp(logvar)
    want_kl = 0.5 * np.sum(mean ** 2 + var - 1.0 - logvar, axis=(1, 2, 3))
    np.testing.assert_allclose(dist.kl(), want_kl, rtol=1e-5)
    assert dist.kl().shape == (2,)

    x = rng.standard_normal(mean.shape).astype(np.float32)
    want_nll = 0.5 * np.sum(np.log(2 * np.pi) + logvar + (x - mean) ** 2 / var, axis=(1, 2, 3))
    np.testing.assert_allclose(dist.nll(x), want_nll, rtol=1e-5)
    np.testing.assert_array_equal(dist.mode(), mean)

    # KL to itself is zero; KL between two Gaussians matches the closed form.
    np.testing.assert_allclose(dist.kl(dist), np.zeros(2), atol=1e-5)
    other = DiagonalGaussian.from_mean_logvar(np.zeros_like(mean), np.zeros_like(logvar))
    np.testing.assert_allclose(dist.kl(other), want_kl, rtol=1e-5)


def test_diagonal_gaussian_sample_statistics_clip_and_pytree():
    mean = jnp.full((4, 16, 16, 8), 1.5)
    logvar = jnp.full((4, 16, 16, 8), math.log(4.0))   # std 2
    dist = DiagonalGaussian(jnp.concatenate([mean, logvar], -1))
    s = dist.sample(jax.random.key(3))
    assert s.shape == mean.shape and s.dtype == jnp.float32
    assert abs(float(s.mean()) - 1.5) < 0.05
    assert abs(float(s.std()) - 2.0) < 0.05
    assert not np.allclose(s, dist.sample(jax.random.key(4)))

    clipped = DiagonalGaussian(jnp.concatenate([jnp.zeros((1, 2)), jnp.array([[50.0, -50.0]])],
                                               -1).reshape(1, 1, 1, 4))
    np.testing.assert_array_equal(clipped.logvar.ravel(), [20.0, -30.0])

    det = DiagonalGaussian(jnp.concatenate([mean, logvar], -1), deterministic=True)
    np.testing.assert_array_equal(det.sample(jax.random.key(0)), mean)
    np.testing.assert_array_equal(det.kl(), np.zeros(4))

    # pytree: usable as a jit output
    out = jax.jit(lambda m: DiagonalGaussian(m))(jnp.concatenate([mean, logvar], -1))
    assert isinstance(out, DiagonalGaussian)
    np.testing.assert_allclose(out.kl(), dist.kl(), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# VectorQuantizer
# ------------------------------------------------------------------------------------------------

CODEBOOK = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])


def _vq_apply(vq, codebook, z):
    return vq.apply({"params": {"embedding": codebook}}, z)


def _vq_loss_grads(vq, codebook, z):
    """Everything the hand-example tests need, in one compiled program (eager op-by-op dispatch
    is slower on CPU than compiling once)."""

    @jax.jit
    def run(cb, zz):
        out = _vq_apply(vq, cb, zz)
        g_z = jax.grad(lambda t: _vq_apply(vq, cb, t)[1])(zz)
        g_e = jax.grad(lambda c: _vq_apply(vq, c, zz)[1])(cb)
        return out, g_z, g_e

    return run(codebook, z)


@pytest.mark.parametrize("legacy", [False, True])
def test_vq_hand_example_loss_and_gradients(legacy):
    beta = 0.25
    vq = VectorQuantizer(4, 2, beta=beta, legacy=legacy)
    z = jnp.array([[[[0.2, 0.1], [0.9, 0.8]]]])      # [1, 1, 2, 2] -> codes 0 and 3
    (zq, loss, info), g_z, g_e = _vq_loss_grads(vq, CODEBOOK, z)
    np.testing.assert_array_equal(info["indices"], [[[0, 3]]])
    assert info["indices"].dtype == jnp.int32
    np.testing.assert_allclose(zq, [[[[0.0, 0.0], [1.0, 1.0]]]])
    e = np.array([[0.0, 0.0], [1.0, 1.0]])
    zn = np.asarray(z).reshape(2, 2)
    n = zn.size
    mse = np.mean((e - zn) ** 2)                        # = 0.025
    commit_w, code_w = (1.0, beta) if legacy else (beta, 1.0)
    np.testing.assert_allclose(loss, (commit_w + code_w) * mse, rtol=1e-6)

    # Commitment gradient on z: commit_w * 2 (z - e) / N; codebook gradient on the chosen codes:
    # code_w * 2 (e - z) / N, zero for unused codes.
    np.testing.assert_allclose(np.asarray(g_z).reshape(2, 2), commit_w * 2 * (zn - e) / n,
                               rtol=1e-5)
    want = np.zeros((4, 2))
    want[0] = code_w * 2 * (e[0] - zn[0]) / n
    want[3] = code_w * 2 * (e[1] - zn[1]) / n
    np.testing.assert_allclose(g_e, want, rtol=1e-5, atol=1e-8)


def test_vq_straight_through_gradient():
    vq = VectorQuantizer(4, 2)
    z = jnp.asarray(np.random.default_rng(0).uniform(-0.2, 1.2, (2, 3, 3, 2)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(z.shape), jnp.float32)

    def f_of_zq(zz):
        zq, _, _ = _vq_apply(vq, CODEBOOK, zz)
        return jnp.sum(w * zq ** 2)

    @jax.jit
    def run(cb, zz):
        zq = _vq_apply(vq, cb, zz)[0]
        return (jax.grad(f_of_zq)(zz), jax.grad(lambda q: jnp.sum(w * q ** 2))(zq),
                jax.grad(lambda c: jnp.sum(w * _vq_apply(vq, c, zz)[0]))(cb))

    g_z, g_zq, g_e = run(CODEBOOK, z)
    np.testing.assert_allclose(g_z, g_zq, rtol=1e-6)
    # straight-through output carries no gradient to the codebook
    np.testing.assert_array_equal(g_e, np.zeros((4, 2)))


def test_vq_perplexity_code_usage_lookup_and_init():
    vq = VectorQuantizer(4, 2)
    z = jnp.array([[[[0.1, 0.0], [0.0, 0.1]], [[-0.1, 0.05], [0.95, 1.1]]]])  # codes 0,0,0,3
    zq, _, info = jax.jit(lambda cb, zz: _vq_apply(vq, cb, zz))(CODEBOOK, z)
    np.testing.assert_array_equal(info["indices"], [[[0, 0], [0, 3]]])
    want = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    np.testing.assert_allclose(info["perplexity"], want, rtol=1e-5)
    np.testing.assert_allclose(info["code_usage"], 0.5)
    p, u = codebook_stats(jnp.zeros((10,), jnp.int32), 8)
    np.testing.assert_allclose([p, u], [1.0, 1 / 8], rtol=1e-5)
    p, u = codebook_stats(jnp.arange(8), 8)
    np.testing.assert_allclose([p, u], [8.0, 1.0], rtol=1e-5)

    looked = vq.apply({"params": {"embedding": CODEBOOK}}, info["indices"], method=vq.lookup)
    np.testing.assert_array_equal(looked, zq)

    with _fast_rng():
        params = jax.jit(VectorQuantizer(64, 3).init)(jax.random.key(0),
                                                      jnp.zeros((1, 2, 2, 3)))["params"]
    emb = params["embedding"]
    assert emb.shape == (64, 3) and emb.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(emb))) <= 1 / 64


# ------------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------------


def test_resnet_block_names_shortcut_and_dropout():
    x = _images(2, 8)
    x = jnp.concatenate([x] * 11, -1)[..., :32]
    block = ResnetBlock(64, dropout=0.5)
    with _fast_rng():
        params = jax.jit(block.init)(jax.random.key(0), x)["params"]
    assert set(params) == {"norm1", "conv1", "norm2", "conv2", "nin_shortcut"}
    # creation order = the reference's registration order (matters for weight conversion)
    order = []
    jax.eval_shape(lambda k: order.extend(block.init(k, x)["params"]) or 0, jax.random.key(0))
    assert order == ["norm1", "conv1", "norm2", "conv2", "nin_shortcut"]
    assert params["conv1"]["kernel"].shape == (3, 3, 32, 64)
    assert params["nin_shortcut"]["kernel"].shape == (1, 1, 32, 64)
    assert "nin_shortcut" not in jax.eval_shape(ResnetBlock(32).init, jax.random.key(0),
                                                x)["params"]

    @jax.jit
    def run(key):
        v = {"params": params}
        return (block.apply(v, x), block.apply(v, x, train=True, rngs={"dropout": key}),
                block.apply(v, x, train=True, rngs={"dropout": jax.random.fold_in(key, 1)}))

    y_eval, y_a, y_b = run(jax.random.key(1))
    assert not np.allclose(y_a, y_eval) and not np.allclose(y_a, y_b)


def test_attn_block_matches_numpy():
    x = _images(2, 4)
    x = jnp.concatenate([x] * 11, -1)[..., :32]
    attn = AttnBlock()
    params = _fill_params(jax.eval_shape(attn.init, jax.random.key(0), x)["params"], seed=3)
    assert set(params) == {"norm", "q", "k", "v", "proj_out"}
    y = attn.apply({"params": params}, x)

    xn = np.asarray(x, np.float64)
    b, h, w, c = xn.shape
    g = xn.reshape(b, h * w, 32, c // 32)
    mu = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    hn = ((g - mu) / np.sqrt(var + 1e-6)).reshape(b, h * w, c)
    hn = hn * np.asarray(params["norm"]["scale"]) + np.asarray(params["norm"]["bias"])

    def lin(name, t):
        return t @ np.asarray(params[name]["kernel"])[0, 0] + np.asarray(params[name]["bias"])

    q, k, v = lin("q", hn), lin("k", hn), lin("v", hn)
    logits = np.einsum("bic,bjc->bij", q, k) / math.sqrt(c)
    wts = np.exp(logits - logits.max(-1, keepdims=True))
    wts /= wts.sum(-1, keepdims=True)
    want = xn + lin("proj_out", np.einsum("bij,bjc->bic", wts, v)).reshape(b, h, w, c)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_downsample_asymmetric_padding_and_upsample_shape():
    x = _images(1, 8)
    down = Downsample()
    with _fast_rng():
        params = jax.jit(down.init)(jax.random.key(0), x)["params"]
    y = down.apply({"params": params}, x)
    assert y.shape == (1, 4, 4, 3)
    # Output row 0 sees input rows 0..2 (pad only at the bottom/right); symmetric padding would
    # make it see rows -1..1 instead.
    y2 = down.apply({"params": params}, x.at[:, 2].add(1.0))
    assert not np.allclose(y2[:, 0], y[:, 0])
    y3 = down.apply({"params": params}, x.at[:, 7].add(1.0))   # last row: only output row 3
    np.testing.assert_array_equal(y3[:, :3], y[:, :3])

    up = Upsample()
    with _fast_rng():
        uparams = jax.jit(up.init)(jax.random.key(0), y)["params"]
    assert set(uparams) == {"conv"}
    assert up.apply({"params": uparams}, y).shape == (1, 8, 8, 3)


# ------------------------------------------------------------------------------------------------
# first-stage models: shapes for every paper config (abstract evaluation, no compilation)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_first_stage_shapes(name):
    cfg, factor = CONFIGS[name]
    assert downsampling_factor(cfg) == factor
    model = make_first_stage(cfg)
    assert isinstance(model, AutoencoderKL if cfg.kind == "kl" else VQModel)
    res = cfg.resolution
    x = jax.ShapeDtypeStruct((2, res, res, 3), jnp.float32)
    variables = jax.eval_shape(model.init, RNGS, x)
    params = variables["params"]
    assert set(variables) == {"params"}
    top = {"encoder", "quant_conv", "post_quant_conv", "decoder"}
    assert set(params) == (top | {"quantize"} if cfg.kind == "vq" else top)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))

    out = jax.eval_shape(lambda v, xx: model.apply(v, xx, rngs={"sample": RNGS["sample"]}),
                         variables, x)
    h = res // factor
    assert out["recon"].shape == (2, res, res, 3) and out["recon"].dtype == jnp.float32
    assert out["decoder_features"].shape == (2, res, res, cfg.ch * cfg.ch_mult[0])
    assert out["reg_loss"].shape == ()

    enc = jax.eval_shape(lambda v, xx: model.apply(v, xx, method=model.encode), variables, x)
    if cfg.kind == "kl":
        assert enc.mean.shape == (2, h, h, cfg.embed_dim)
        assert out["kl"].shape == (2,)
        assert out["posterior_mean"].shape == out["posterior_logvar"].shape == (2, h, h,
                                                                               cfg.embed_dim)
        assert params["quant_conv"]["kernel"].shape == (1, 1, 2 * cfg.z_channels,
                                                        2 * cfg.embed_dim)
    else:
        assert enc.shape == (2, h, h, cfg.embed_dim)
        assert out["indices"].shape == (2, h, h)
        assert params["quantize"]["embedding"].shape == (cfg.n_embed, cfg.embed_dim)
        assert params["encoder"]["conv_out"]["kernel"].shape[-1] == cfg.z_channels

    # attention is placed exactly at the configured feature-map sizes (plus the mid block)
    n = len(cfg.ch_mult)
    for i in range(n):
        has_attn = res // 2 ** i in cfg.attn_resolutions
        assert ("down_%d_attn_0" % i in params["encoder"]) == has_attn
        assert ("up_%d_attn_0" % i in params["decoder"]) == has_attn
        assert ("up_%d_upsample" % i in params["decoder"]) == (i > 0)
        assert ("down_%d_downsample" % i in params["encoder"]) == (i < n - 1)
        assert "up_%d_block_%d" % (i, cfg.num_res_blocks) in params["decoder"]
    assert "mid_attn_1" in params["encoder"] and "mid_attn_1" in params["decoder"]

    dec = jax.eval_shape(lambda v, zz: model.apply(v, zz, method=model.decode), variables,
                         jax.ShapeDtypeStruct((1, h, h, cfg.embed_dim), jnp.float32))
    assert dec.shape == (1, res, res, 3)


def test_make_first_stage_errors():
    cfg = CONFIGS["kl-f8"][0]
    bad = ml_collections.ConfigDict(cfg.to_dict())
    bad.kind = "ae"
    with pytest.raises(ValueError, match="kind"):
        make_first_stage(bad)
    bad = ml_collections.ConfigDict(cfg.to_dict())
    bad.attn_resolutions = (3,)
    with pytest.raises(ValueError, match="attn_resolutions"):
        make_first_stage(bad)
    bad = ml_collections.ConfigDict(cfg.to_dict())
    bad.attn_resolutions = (2,)   # below the deepest level (4) for resolution 32, f8
    with pytest.raises(ValueError, match="attn_resolutions"):
        make_first_stage(bad)
    bad = dict(cfg.to_dict(), kind="vq")
    with pytest.raises(ValueError, match="n_embed"):
        make_first_stage(bad)
    bad = dict(cfg.to_dict(), ch=24)
    with pytest.raises(ValueError, match="norm_groups"):
        make_first_stage(bad)
    assert isinstance(make_first_stage(dict(cfg.to_dict())), AutoencoderKL)  # plain dicts work


# ------------------------------------------------------------------------------------------------
# first-stage models: real forward passes on tiny models
# ------------------------------------------------------------------------------------------------

TINY_KL = _cfg("kl", 4, (1, 2), (8,), 16)
TINY_VQ = _cfg("vq", 4, (1, 2), (8,), 16, n_embed=32)


@pytest.fixture(scope="module")
def kl_setup():
    model = make_first_stage(TINY_KL)
    x = _images(2, 16)
    params = _fill_params(jax.eval_shape(model.init, RNGS, x)["params"])

    @jax.jit
    def run_mode(p, xx):
        # deterministic path (posterior mode) and decode() of the mode, compiled once and shared
        mode = model.apply({"params": p}, xx, sample_posterior=False)
        return mode, model.apply({"params": p}, mode["posterior_mean"], method=model.decode)

    mode, dec = run_mode(params, x)
    return model, params, x, mode, dec


def test_kl_forward_features_and_kl(kl_setup):
    model, params, x, mode, dec = kl_setup

    @jax.jit
    def run(p, xx, key):
        return model.apply({"params": p}, xx, rngs={"sample": key})

    out = run(params, x, jax.random.key(0))
    assert all(np.all(np.isfinite(v)) for v in out.values())
    # decoder_features + apply_decoder_conv_out reproduce recon
    rec = apply_decoder_conv_out(params["decoder"]["conv_out"], out["decoder_features"])
    np.testing.assert_allclose(rec, out["recon"], rtol=1e-6, atol=1e-6)
    # kl from returned moments
    m, lv = np.asarray(out["posterior_mean"]), np.asarray(out["posterior_logvar"])
    np.testing.assert_allclose(out["kl"], 0.5 * np.sum(m ** 2 + np.exp(lv) - 1 - lv, (1, 2, 3)),
                               rtol=1e-4)
    np.testing.assert_allclose(out["reg_loss"], np.mean(out["kl"]), rtol=1e-6)
    # posterior sampling depends on the 'sample' rng; the mode path does not need it
    out2 = run(params, x, jax.random.key(1))
    assert not np.allclose(out["recon"], out2["recon"])
    np.testing.assert_allclose(dec, mode["recon"], rtol=1e-5, atol=1e-5)
    # d(loss)/d(conv_out kernel) through the pure helper only
    g = jax.jit(jax.grad(lambda k: jnp.mean(apply_decoder_conv_out(
        dict(params["decoder"]["conv_out"], kernel=k), out["decoder_features"]) ** 2)))(
        params["decoder"]["conv_out"]["kernel"])
    assert g.shape == params["decoder"]["conv_out"]["kernel"].shape and np.any(g != 0)


def test_kl_bfloat16_matches_float32(kl_setup):
    _, params, x, out32, _ = kl_setup
    model16 = make_first_stage(TINY_KL, dtype=jnp.bfloat16)
    out16 = jax.jit(lambda p, xx: model16.apply({"params": p}, xx, sample_posterior=False))(
        params, x)
    for key in ("recon", "decoder_features", "posterior_mean", "kl"):
        assert out16[key].dtype == jnp.float32
    # bf16 carries ~3 significant digits through ~20 layers: expect errors of a few percent.
    err = np.abs(np.asarray(out16["recon"]) - np.asarray(out32["recon"]))
    ref = np.abs(np.asarray(out32["recon"]))
    assert err.mean() < 0.1 * ref.mean() and err.max() < 0.1 * ref.max()
    np.testing.assert_allclose(out16["kl"], out32["kl"], rtol=0.05)
    # In bf16 the helper reproduces recon up to one bf16 rounding of the conv output (XLA may
    # keep the fused conv's f32 accumulator instead of rounding it).
    rec = jax.jit(apply_decoder_conv_out, static_argnums=2)(
        params["decoder"]["conv_out"], out16["decoder_features"], jnp.bfloat16)
    np.testing.assert_allclose(rec, out16["recon"], rtol=1e-2, atol=1e-2 * ref.max())


def test_vq_model_forward():
    model = make_first_stage(TINY_VQ)
    x = _images(2, 16, seed=1)
    params = _fill_params(jax.eval_shape(model.init, RNGS, x)["params"], seed=1)

    @jax.jit
    def run(p, xx):
        v = {"params": p}
        out = model.apply(v, xx)
        h = model.apply(v, xx, method=model.encode)
        dec = model.apply(v, h, method=model.decode)
        from_idx = model.apply(v, out["indices"], method=model.decode_indices)
        raw = model.apply(v, h, force_not_quantize=True, method=model.decode)
        rec = apply_decoder_conv_out(p["decoder"]["conv_out"], out["decoder_features"])
        return out, dec, from_idx, raw, rec

    out, dec, from_idx, raw, rec = run(params, x)
    assert out["recon"].shape == x.shape and out["indices"].shape == (2, 8, 8)
    assert out["indices"].dtype == jnp.int32
    assert np.isfinite(float(out["reg_loss"])) and float(out["reg_loss"]) > 0
    assert 1.0 <= float(out["perplexity"]) <= 32.0
    assert 0.0 < float(out["code_usage"]) <= 1.0
    np.testing.assert_allclose(rec, out["recon"], rtol=1e-6, atol=1e-6)
    # "quantiser absorbed in the decoder": decode(encode(x)) == recon; indices decode the same.
    np.testing.assert_allclose(dec, out["recon"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(from_idx, out["recon"], rtol=1e-5, atol=1e-5)
    assert raw.shape == x.shape and not np.allclose(raw, out["recon"])


# ------------------------------------------------------------------------------------------------
# discriminator
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("res,out_hw", [(32, 2), (64, 6)])
def test_discriminator_shapes(res, out_hw):
    disc = NLayerDiscriminator(ndf=8, n_layers=3)
    x = jax.ShapeDtypeStruct((2, res, res, 3), jnp.float32)
    variables = jax.eval_shape(disc.init, jax.random.key(0), x)
    assert set(variables) == {"params"}   # no running statistics
    out = jax.eval_shape(disc.apply, variables, x)
    assert out.shape == (2, out_hw, out_hw, 1) and out.dtype == jnp.float32


def test_discriminator_batchnorm_and_init():
    disc = NLayerDiscriminator(ndf=8, n_layers=3, norm="batch")
    x = _images(4, 32, seed=2)
    with _fast_rng():
        variables = jax.jit(disc.init)(jax.random.key(0), x)
    params = variables["params"]
    assert set(params) == {"conv_0", "conv_1", "norm_1", "conv_2", "norm_2", "conv_3", "norm_3",
                           "conv_out"}
    assert "bias" in params["conv_0"] and "bias" in params["conv_out"]
    assert "bias" not in params["conv_1"] and "bias" not in params["conv_3"]
    assert params["conv_3"]["kernel"].shape == (4, 4, 32, 64)
    k = np.asarray(params["conv_3"]["kernel"])
    assert abs(k.std() - 0.02) < 0.002 and abs(k.mean()) < 0.002
    s = np.asarray(params["norm_3"]["scale"])
    assert abs(s.mean() - 1.0) < 0.01 and 0.005 < s.std() < 0.04
    np.testing.assert_array_equal(params["norm_3"]["bias"], np.zeros(64))

    # Scale the input so that pre-norm activations have variance >> eps; then the normalised
    # (pre-scale) activations must have per-channel batch mean 0 and variance 1.
    _, state = jax.jit(lambda v, xx: disc.apply(v, xx, capture_intermediates=True,
                                                mutable=["intermediates"]))(variables, 50.0 * x)
    inter = state["intermediates"]
    for n in (1, 2, 3):
        y = np.asarray(inter[f"norm_{n}"]["__call__"][0], np.float64)
        pre = np.asarray(inter[f"conv_{n}"]["__call__"][0], np.float64)
        p = params[f"norm_{n}"]
        normed = (y - np.asarray(p["bias"])) / np.asarray(p["scale"])
        np.testing.assert_allclose(normed.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
        np.testing.assert_allclose(normed.var(axis=(0, 1, 2)), 1.0, atol=2e-3)
        # exactly BatchNorm2d(train): batch mean / biased variance, eps 1e-5
        want = (pre - pre.mean((0, 1, 2))) / np.sqrt(pre.var((0, 1, 2)) + 1e-5)
        np.testing.assert_allclose(normed, want, rtol=1e-3, atol=1e-3)

    plain = NLayerDiscriminator(ndf=8, n_layers=2, norm="none")
    pv = jax.eval_shape(plain.init, jax.random.key(0), x)
    assert set(pv["params"]) == {"conv_0", "conv_1", "conv_2", "conv_out"}
    assert "bias" in pv["params"]["conv_1"]
    assert jax.eval_shape(plain.apply, pv, x).shape == (4, 6, 6, 1)

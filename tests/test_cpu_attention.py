"""ldm_jax/kernels/cpu_attention.cc (the fused XLA:CPU attention kernel): values and gradients
against a float64 recomputation over shapes that exercise every code path (partial query
blocks, key lengths that are not whole tiles, widths that are not whole vectors, cross
attention with dv != d, more threads than groups), bfloat16 inputs, vmap, a mesh, the UNet's
gradients against 'chunked', the default selection, and the build cache."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.kernels import build, cpu_attention
from ldm_jax.models import attention as attention_mod


def _reference64(q, k, v, cotangent, scale):
    q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, cotangent))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhe->bqhe", p, v)
    dp = np.einsum("bqhe,bkhe->bhqk", g, v)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = np.einsum("bhqk,bkhd->bqhd", ds, k) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    dv = np.einsum("bhqk,bqhe->bkhe", p, g)
    return out, (dq, dk, dv)


def _inputs(batch, lq, lk, heads, d, dv, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, lq, heads, d)) * 2.0   # peaked softmax rows too
    k = jax.random.normal(keys[1], (batch, lk, heads, d))
    v = jax.random.normal(keys[2], (batch, lk, heads, dv))
    g = jax.random.normal(keys[3], (batch, lq, heads, dv))
    return q, k, v, g


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    cpu_attention.ensure_registered()   # fails the module (with the compiler's message) if not


@pytest.mark.parametrize("batch,lq,lk,heads,d,dv", [
    (2, 5, 7, 3, 8, 8),          # everything smaller than one vector / tile
    (1, 130, 33, 2, 40, 24),     # partial query block, keys not a whole tile, dv != d
    (2, 64, 77, 4, 32, 32),      # cross-attention to a 77-token context
    (1, 1, 1, 1, 1, 1),          # one query, one key
    (1, 70, 3000, 1, 16, 48),    # long keys: a smaller query block; one group, split in parts
])
def test_matches_float64(batch, lq, lk, heads, d, dv):
    q, k, v, g = _inputs(batch, lq, lk, heads, d, dv)
    out, vjp = jax.vjp(cpu_attention.cpu_fused_attention, q, k, v)
    ref_out, ref_grads = _reference64(q, k, v, g, d ** -0.5)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=2e-6, rtol=1e-5)
    for got, want in zip(vjp(g), ref_grads):
        scale = np.abs(want).max() + 1e-30
        assert np.abs(np.asarray(got, np.float64) - want).max() / scale < 2e-6


def test_explicit_scale_and_extreme_scores():
    # Scores of +-200 after scaling: the row max and log-sum-exp must keep exp in range.
    q, k, v, g = _inputs(2, 33, 40, 2, 16, 16, seed=3)
    out, vjp = jax.vjp(lambda q, k, v: cpu_attention.cpu_fused_attention(q, k, v, scale=25.0),
                       q, k, v)
    ref_out, ref_grads = _reference64(q, k, v, g, 25.0)
    assert np.isfinite(np.asarray(out)).all()
    # float32 scores of magnitude 200 carry ~1e-5 absolute error into the exponent: the same
    # bound holds for 'chunked' (checked below), so the kernel adds nothing to it.
    chunked = attention_mod.chunked_attention(q * 25.0 * 4.0, k, v)   # 1/sqrt(16) = 1/4
    for got in (out, chunked):
        np.testing.assert_allclose(np.asarray(got), ref_out, atol=3e-4)
    for got, want in zip(vjp(g), ref_grads):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-3 * np.abs(want).max())


def test_bfloat16_inputs_and_vmap():
    q, k, v, g = _inputs(2, 48, 48, 2, 16, 16, seed=1)
    bf = lambda t: t.astype(jnp.bfloat16)
    out = cpu_attention.cpu_fused_attention(bf(q), bf(k), bf(v))
    assert out.dtype == jnp.bfloat16
    ref_out, _ = _reference64(bf(q), bf(k), bf(v), g, 16 ** -0.5)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=3e-2)
    # vmap over an extra leading axis: the kernel flattens leading dimensions into groups.
    stacked = [jnp.stack([t, 0.5 * t]) for t in (q, k, v)]
    batched = jax.vmap(cpu_attention.cpu_fused_attention)(*stacked)
    for i in range(2):
        want, _ = _reference64(stacked[0][i], stacked[1][i], stacked[2][i], g, 16 ** -0.5)
        np.testing.assert_allclose(np.asarray(batched[i]), want, atol=2e-6, rtol=1e-5)


def test_under_jit_on_a_mesh_gives_the_same_gradients():
    # tests run with 8 CPU devices: a batch-sharded input is gathered for the custom call, the
    # results must still be exact.
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()), ("data",))
    q, k, v, g = _inputs(len(jax.devices()), 20, 20, 2, 8, 8, seed=2)
    sharded = [jax.device_put(t, NamedSharding(mesh, P("data"))) for t in (q, k, v)]
    loss = lambda q, k, v: jnp.sum(cpu_attention.cpu_fused_attention(q, k, v) * g)
    grads = jax.jit(jax.grad(loss, (0, 1, 2)))(*sharded)
    _, ref_grads = _reference64(q, k, v, g, 8 ** -0.5)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("transformer", [False, True])   # SelfAttentionBlock / cross-attention
def test_unet_gradients_match_chunked(transformer):
    from ldm_jax.models.unet import UNetModel
    kw = dict(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2),
              num_res_blocks=1, attention_resolutions=(1, 2), num_head_channels=16,
              use_spatial_transformer=transformer, context_dim=12 if transformer else None)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    t = jnp.array([3, 500])
    ctx = jax.random.normal(jax.random.key(3), (2, 7, 12)) if transformer else None
    models = {impl: UNetModel(attention_impl=impl, **kw) for impl in ("cpu_fused", "chunked")}
    params = models["chunked"].init(jax.random.key(1), x, t, ctx)
    # proj_out starts at zero (the attention would not matter): randomise every parameter.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(tree, [0.2 * jax.random.normal(kk, p.shape)
                                       for kk, p in zip(keys, leaves)])
    grads = {impl: jax.grad(lambda p: jnp.mean(m.apply(p, x, t, ctx) ** 2))(params)
             for impl, m in models.items()}
    # Some leaves are zero in exact arithmetic (biases before a GroupNorm): the tolerance is
    # relative to the largest gradient of the tree.
    top = max(float(np.abs(np.asarray(b)).max()) for b in jax.tree.leaves(grads["chunked"]))
    for a, b in zip(jax.tree.leaves(grads["cpu_fused"]), jax.tree.leaves(grads["chunked"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * top)


def test_default_selection(monkeypatch):
    assert attention_mod.default_implementation(jnp.float32) == "chunked"   # 8 devices here
    monkeypatch.setattr(jax, "device_count", lambda *a, **k: 1)
    assert attention_mod.default_implementation(jnp.float32) == "cpu_fused"
    assert attention_mod.default_implementation(jnp.bfloat16) == "cpu_fused"
    with pytest.raises(ValueError, match="attention implementation must be one of"):
        attention_mod.attention(*_inputs(1, 4, 4, 1, 4, 4)[:3], implementation="fused")


def test_build_cache_is_keyed_and_reports_a_missing_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_JAX_KERNEL_CACHE", str(tmp_path))
    src = tmp_path / "k.cc"
    src.write_text('extern "C" int answer() { return 42; }\n')
    lib = build.load(str(src))
    assert lib.answer() == 42
    path = build.library_path(str(src))
    assert os.path.dirname(path) == str(tmp_path) and os.path.exists(path)
    src.write_text('extern "C" int answer() { return 43; }\n')
    assert build.library_path(str(src)) != path          # new source, new library
    src.write_text("this is not C++\n")
    with pytest.raises(build.KernelBuildError, match="compiling .* failed"):
        build.build(str(src))
    monkeypatch.setenv("CXX", "no-such-compiler-ldm")
    with pytest.raises(build.KernelBuildError, match="no C\\+\\+ compiler 'no-such-compiler-ldm'"):
        build.build(str(src))


@pytest.mark.parametrize("batch,length,heads,d", [(2, 50, 3, 8), (1, 130, 2, 40)])
def test_packed_self_attention_matches_float64(batch, length, heads, d):
    # qkv [B, L, heads, 3 d] read in place: values and the packed gradient.
    qkv = jax.random.normal(jax.random.key(4), (batch, length, heads, 3 * d)) * 1.5
    g = jax.random.normal(jax.random.key(5), (batch, length, heads, d))
    out, vjp = jax.vjp(cpu_attention.cpu_fused_self_attention, qkv)
    split = qkv.reshape(batch, length, heads, 3, d)
    q, k, v = split[..., 0, :], split[..., 1, :], split[..., 2, :]
    ref_out, (dq, dk, dv) = _reference64(q, k, v, g, d ** -0.5)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=2e-6, rtol=1e-5)
    (dqkv,) = vjp(g)
    want = np.stack([dq, dk, dv], axis=3).reshape(qkv.shape)
    assert np.abs(np.asarray(dqkv, np.float64) - want).max() / np.abs(want).max() < 2e-6
    # the model-level entry point picks it for 'cpu_fused' and splits for the others
    for impl in ("cpu_fused", "chunked"):
        got = attention_mod.packed_self_attention(qkv, implementation=impl)
        np.testing.assert_allclose(np.asarray(got), ref_out, atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="3 \\* width"):
        cpu_attention.cpu_fused_self_attention(qkv[..., :-1])


_ONE_DEVICE_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from ldm_jax.models import conv
from ldm_jax.models.unet import UNetModel
assert jax.device_count() == 1
kw = dict(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2),
          num_res_blocks=1, attention_resolutions=(1, 2), num_head_channels=16)
x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
t = jnp.array([3, 500])
model = UNetModel(**kw)
params = model.init(jax.random.key(1), x, t)
leaves, tree = jax.tree.flatten(params)
keys = jax.random.split(jax.random.key(2), len(leaves))
params = jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])
loss = lambda m: jax.jit(jax.grad(lambda p: jnp.mean(m.apply(p, x, t) ** 2)))
hlo = loss(model).lower(params).as_text()
default = loss(model)(params)
conv.set_default_weight_grad("gemm")
reference = loss(UNetModel(attention_impl="chunked", **kw))(params)
top = max(float(jnp.abs(b).max()) for b in jax.tree.leaves(reference))
err = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(reference)))
print("KERNELS", "ldm_jax_conv_forward" in hlo, "ldm_jax_conv_weight_grad" in hlo,
      "ldm_jax_attention_forward_packed" in hlo, "ldm_jax_attention_backward_packed" in hlo)
print("RELERR", err / top)
"""


def test_one_device_default_uses_the_kernels_and_matches_xla(tmp_path):
    # pytest runs with 8 CPU devices, where the defaults keep XLA's paths: check the default
    # of a one-device process (the README's digits pipeline, a laptop) in a subprocess.
    import subprocess
    import sys
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    done = subprocess.run([sys.executable, "-c", _ONE_DEVICE_SCRIPT], capture_output=True,
                          text=True, env=env, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert lines["KERNELS"] == "True True True True", done.stdout
    assert float(lines["RELERR"]) < 1e-5, done.stdout


def test_unavailable_kernel_falls_back_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LDM_JAX_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-ldm")
    src = tmp_path / "k2.cc"
    src.write_text('extern "C" int answer() { return 42; }\n')
    with caplog.at_level("WARNING", logger="ldm_jax.kernels.build"):
        assert not build.available(str(src), {"ldm_jax_test_answer": "answer"})
        assert not build.available(str(src), {"ldm_jax_test_answer": "answer"})
    warnings = [r for r in caplog.records if "k2.cc unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "no-such-compiler-ldm" in warnings[0].getMessage()

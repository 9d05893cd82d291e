"""ldm_jax/kernels/cpu_conv.cc (the stride-1 XLA:CPU convolution kernel): forward pass, input and
weight gradients against XLA's convolution over shapes that exercise every code path (channel
counts that are not whole vectors or microkernel blocks, widths that are not whole pixel
groups, row blocks that do not divide the height, blocks of several small images, work split
by pixels or by output channels, 1x1 and asymmetric padding), bfloat16, and
how `Conv`/`conv2d` choose it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ldm_jax.kernels import cpu_conv
from ldm_jax.models import conv as conv_mod


def _xla(x, w, padding):
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    cpu_conv.ensure_registered()   # fails the module (with the compiler's message) if not


@pytest.mark.parametrize("n,h,w,cin,cout,k,padding", [
    (2, 9, 7, 5, 3, 3, ((1, 1), (1, 1))),          # everything below one block
    (1, 8, 12, 16, 32, 3, ((0, 2), (2, 0))),       # asymmetric padding
    (2, 6, 6, 8, 20, 1, ((0, 0), (0, 0))),         # 1x1, Cout 20 = 16 + a partial tile
    (1, 5, 11, 3, 17, 3, ((0, 0), (0, 0))),        # VALID
    (2, 40, 9, 24, 48, 3, ((1, 1), (1, 1))),       # 28 rows per block: 40 = 28 + 12
    (1, 4, 70, 9, 64, 3, ((1, 1), (1, 1))),        # wider than 256 pixels per block
    # Small maps: blocks of several whole images (the last one short), split over threads by
    # pixel blocks (few output channels) or by output-channel tiles (many).
    (5, 4, 4, 6, 40, 3, ((1, 1), (1, 1))),
    (3, 8, 8, 40, 130, 3, ((1, 1), (1, 1))),
    (2, 3, 5, 20, 200, 3, ((0, 2), (2, 0))),
])
def test_matches_xla(n, h, w, cin, cout, k, padding):
    keys = jax.random.split(jax.random.key(h * w + cin), 3)
    x = jax.random.normal(keys[0], (n, h, w, cin))
    kernel = jax.random.normal(keys[1], (k, k, cin, cout)) / np.sqrt(k * k * cin)
    y, vjp = jax.vjp(lambda x, kernel: cpu_conv.cpu_conv2d(x, kernel, padding), x, kernel)
    y_ref, vjp_ref = jax.vjp(lambda x, kernel: _xla(x, kernel, padding), x, kernel)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=2e-5, rtol=1e-5)
    g = jax.random.normal(keys[2], y.shape)
    for got, want in zip(vjp(g), vjp_ref(g)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                                   atol=2e-5 * float(jnp.abs(want).max()), rtol=1e-5)


def test_bfloat16_and_bad_padding():
    x = jax.random.normal(jax.random.key(0), (1, 6, 6, 8)).astype(jnp.bfloat16)
    w = (jax.random.normal(jax.random.key(1), (3, 3, 8, 16)) * 0.1).astype(jnp.bfloat16)
    y = cpu_conv.cpu_conv2d(x, w, ((1, 1), (1, 1)))
    assert y.dtype == jnp.bfloat16
    ref = _xla(x.astype(jnp.float32), w.astype(jnp.float32), ((1, 1), (1, 1)))
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), atol=3e-2)
    with pytest.raises(ValueError, match="padding .* must lie in \\[0, kernel size\\)"):
        cpu_conv.cpu_conv2d(x, w, ((3, 0), (1, 1)))


def test_conv_module_with_the_kernel_equals_flax(monkeypatch):
    import flax.linen as nn
    x = jax.random.normal(jax.random.key(2), (2, 12, 12, 16))
    ours = conv_mod.Conv(24, (3, 3), weight_grad="cpu_fused")
    ref = nn.Conv(24, (3, 3))
    params = ref.init(jax.random.key(3), x)
    assert jax.tree.structure(ours.init(jax.random.key(3), x)) == jax.tree.structure(params)
    loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply(p, x)))
    txt = jax.jit(jax.grad(loss(ours))).lower(params).as_text()
    assert "ldm_jax_conv_forward" in txt and "ldm_jax_conv_weight_grad" in txt
    for a, b in zip(jax.tree.leaves(jax.grad(loss(ours))(params)),
                    jax.tree.leaves(jax.grad(loss(ref))(params))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_selection_rules(monkeypatch):
    layer = lambda k, cin, cout, s=(1, 1), p=((1, 1), (1, 1)): ((k, k, cin, cout), s, p)
    resolve = conv_mod.resolve_weight_grad
    # Tests run with 8 CPU devices: 'auto' keeps XLA-based paths (the custom call would be
    # gathered onto every device of a mesh).
    assert resolve("auto", 16384, layer(3, 64, 64)) == "gemm"
    monkeypatch.setattr(jax, "device_count", lambda *a, **k: 1)
    assert resolve("auto", 16384, layer(3, 64, 64)) == "cpu_planned"
    assert resolve("auto", 4096, layer(3, 384, 128)) == "cpu_planned"
    # 1x8x8, 256 -> 256: every part in XLA, but planned for the input gradient's flipped kernel
    assert resolve("auto", 64, layer(3, 256, 256)) == "cpu_planned"
    assert conv_mod.cpu_plan((3, 3, 256, 256), 64) == (False, False, False)
    assert resolve("auto", 16, layer(3, 16, 16)) == "cpu_planned"   # narrow: kernel
    assert resolve("auto", 64, layer(1, 256, 128)) == "xla"   # 1x1, 32768 weights
    assert conv_mod.cpu_plan((1, 1, 256, 128), 16) == (False, False, False)
    assert resolve("auto", 1024, layer(3, 64, 64, s=(2, 2))) == "xla"  # strided
    assert resolve("auto", 16384, layer(3, 64, 64), dtype=jnp.bfloat16) == "gemm"
    # explicit: every part in the kernel; strided layers fall back to 'auto'
    assert resolve("cpu_fused", 16384, layer(3, 256, 256)) == "cpu_fused"
    assert resolve("cpu_fused", 16384, layer(3, 64, 64, s=(2, 2))) == "gemm"
    with pytest.raises(ValueError, match="is not one of"):
        resolve("fused", 10, layer(3, 8, 8))
    # the per-part plan (fwd, dx, dw) the measurements chose
    plan = conv_mod.cpu_plan
    assert plan((3, 3, 64, 64), 4096) == (True, True, True)
    assert plan((3, 3, 384, 128), 1024) == (True, True, True)
    assert plan((3, 3, 256, 256), 64) == (False, False, False)     # 1x8x8, wide: XLA
    assert plan((3, 3, 1024, 512), 256) == (True, True, True)     # 4x8x8, wide: the kernel
    assert plan((3, 3, 64, 64), 64) == (True, True, True)         # 1x8x8, narrow: the kernel
    assert plan((3, 3, 64, 3), 4096) == (False, True, True)        # 3 output channels
    assert plan((3, 3, 3, 64), 4096) == (True, False, True)        # 3 input channels


@pytest.mark.parametrize("plan", [(True, False, True), (False, True, False), (False, False, True)])
def test_planned_convolution_matches_xla(plan):
    # each part from the kernel or from XLA, in every mix: same values and gradients
    x = jax.random.normal(jax.random.key(7), (2, 10, 12, 16))
    w = jax.random.normal(jax.random.key(8), (3, 3, 16, 24)) / 12.0
    pad = ((1, 1), (1, 1))
    y, vjp = jax.vjp(lambda x, w: conv_mod.conv_cpu_planned(x, w, pad, plan), x, w)
    y_ref, vjp_ref = jax.vjp(lambda x, w: _xla(x, w, pad), x, w)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=2e-5, rtol=1e-5)
    g = jax.random.normal(jax.random.key(9), y.shape)
    for got, want in zip(vjp(g), vjp_ref(g)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                                   atol=2e-5 * float(jnp.abs(want).max()), rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 3, 5, 7), (1, 1, 33, 17), (3, 3, 130, 70), (3, 1, 64, 80),
                                   (3, 3, 256, 128)])
def test_flip_transpose_equals_xla_reverse_and_transpose(shape, monkeypatch):
    # the C++ copy for every size (the small-kernel shortcut off), tiles of 64 with remainders
    monkeypatch.setattr(cpu_conv, "FLIP_MIN_WEIGHTS", 0)
    w = jax.random.normal(jax.random.key(sum(shape)), shape)
    got = jax.jit(cpu_conv.flip_transpose)(w)
    np.testing.assert_array_equal(np.asarray(got),
                                  np.asarray(jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)))


@pytest.mark.parametrize("pad", [((1, 1), (1, 1)), ((0, 2), (2, 0)), ((0, 0), (1, 0))])
@pytest.mark.parametrize("plan", [(True, True, True), (False, False, True)])
def test_input_gradient_through_the_flipped_kernel_matches_xla(plan, pad, monkeypatch):
    # dX from the kernel or from XLA's convolution, both on flip_transpose's weights, for
    # asymmetric paddings (the input gradient pads k - 1 - p on each side)
    monkeypatch.setattr(cpu_conv, "FLIP_MIN_WEIGHTS", 0)
    x = jax.random.normal(jax.random.key(3), (2, 9, 11, 16))
    w = jax.random.normal(jax.random.key(4), (3, 3, 16, 24)) / 12.0
    y, vjp = jax.vjp(lambda x, w: conv_mod.conv_cpu_planned(x, w, pad, plan), x, w)
    y_ref, vjp_ref = jax.vjp(lambda x, w: _xla(x, w, pad), x, w)
    g = jax.random.normal(jax.random.key(5), y.shape)
    np.testing.assert_allclose(np.asarray(vjp(g)[0]), np.asarray(vjp_ref(g)[0]),
                               atol=2e-5 * float(jnp.abs(vjp_ref(g)[0]).max()), rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 3, 40, 70), (3, 1, 17, 33), (2, 3, 64, 20)])
def test_forward_with_the_layer_kernel_flipped_in_packing(shape):
    # the input gradient's convolution packs flip_transpose(w) from w itself: bitwise the same
    # as running the forward pass on the materialised flipped kernel
    kh, kw, cin, cout = shape
    dy = jax.random.normal(jax.random.key(1), (2, 9, 11, cout))
    w = jax.random.normal(jax.random.key(2), shape)
    pad = ((kh - 1, kh - 1), (kw - 1, 0))
    got = jax.jit(lambda d, w: cpu_conv.forward(d, w, pad, flipped=True))(dy, w)
    want = jax.jit(lambda d, w: cpu_conv.forward(
        d, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2), pad))(dy, w)
    assert got.shape == (2, 9 + kh - 1, 11, cin)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

"""Tests for the super-resolution degradations (ldm_jax/data/degradations.py)."""

import numpy as np
import pytest
from PIL import Image

from ldm_jax.data import degradations as deg

SIZES = [(32, 32, 4), (64, 64, 4), (256, 256, 4), (48, 64, 4), (64, 32, 8), (32, 48, 2)]


def textured(h, w, seed=0):
    """A smooth gradient plus texture and edges, so blur / noise / JPEG all leave a trace."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([xx, yy, 0.5 * (xx + yy)], -1) * 160 + 40
    checker = ((np.mgrid[0:h, 0:w].sum(0) // 3) % 2)[..., None] * 40
    return np.clip(base + checker + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("h,w,f", SIZES)
@pytest.mark.parametrize("name", deg.DEGRADATIONS)
def test_shapes_and_dtypes(name, h, w, f):
    fn = deg.make_degradation(name, f)
    out = fn(textured(h, w), np.random.default_rng(0))
    assert out.shape == (h // f, w // f, 3)
    assert out.dtype == np.uint8


def test_bicubic_float_keeps_dtype_and_does_not_clip():
    x = np.full((16, 24, 2), 2.5, np.float32)
    y = deg.bicubic_downsample(x, 4)
    assert y.dtype == np.float32 and y.shape == (4, 6, 2)
    np.testing.assert_allclose(y, 2.5, rtol=1e-6)
    up = deg.bicubic_upsample(y, 4)
    assert up.shape == (16, 24, 2) and up.dtype == np.float32


@pytest.mark.parametrize("value", [0, 77, 255])
def test_bicubic_downsample_of_a_constant_is_that_constant(value):
    x = np.full((32, 48, 3), value, np.uint8)
    np.testing.assert_array_equal(deg.bicubic_downsample(x, 4), value)


def test_bicubic_matches_pil_rgb_resize():
    x = textured(64, 48)
    expected = np.asarray(Image.fromarray(x).resize((12, 16), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(deg.bicubic_downsample(x, 4), expected)
    np.testing.assert_array_equal(deg.bicubic_resize(x, (16, 12)), expected)


def test_bicubic_on_a_ramp_matches_a_float64_reference():
    # For a linear ramp, a symmetric normalised filter returns the ramp at each output pixel's
    # centre, which is also the mean of its factor x factor block. PIL renormalises the kernel
    # where it leaves the image, so only interior pixels are compared.
    h, w, f = 64, 96, 4
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    ramp = 0.01 * xx - 0.02 * yy + 0.3
    reference = ramp.reshape(h // f, f, w // f, f).mean(axis=(1, 3))
    out = deg.bicubic_downsample(ramp[..., None].astype(np.float32), f)[..., 0]
    np.testing.assert_allclose(out[2:-2, 2:-2], reference[2:-2, 2:-2], atol=1e-5)


def test_divisibility_error_names_the_sizes():
    with pytest.raises(ValueError, match=r"30x32 .*not divisible by the factor 4"):
        deg.bicubic_downsample(np.zeros((30, 32, 3), np.uint8), 4)
    with pytest.raises(ValueError, match=r"32x30 .*factor 4"):
        deg.degrade_bsr(np.zeros((32, 30, 3), np.uint8), 4, np.random.default_rng(0))


def test_bsr_is_deterministic_per_seed():
    x = textured(64, 64)
    a = deg.degrade_bsr(x, 4, np.random.default_rng(123))
    b = deg.degrade_bsr(x, 4, np.random.default_rng(123))
    assert a.tobytes() == b.tobytes()
    outs = {deg.degrade_bsr(x, 4, np.random.default_rng(s)).tobytes() for s in range(8)}
    assert len(outs) == 8


def test_bsr_uses_only_the_given_generator():
    state = np.random.get_state()
    deg.degrade_bsr(textured(32, 32), 4, np.random.default_rng(0))
    after = np.random.get_state()
    assert state[0] == after[0] and np.array_equal(state[1], after[1]) and state[2:] == after[2:]


def test_bsr_differs_from_bicubic_but_stays_close():
    x = textured(64, 64)
    clean = deg.bicubic_downsample(x, 4).astype(np.float64)
    diffs = []
    for seed in range(40):
        out = deg.degrade_bsr(x, 4, np.random.default_rng(seed))
        assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
        diffs.append(np.abs(out.astype(np.float64) - clean).mean())
    diffs = np.array(diffs)
    assert np.mean(diffs > 0.5) >= 0.9  # different for (nearly) every seed
    assert diffs.max() < 40  # a degraded version of the same picture, not noise
    # The colours survive: the mean intensity shifts by a few levels at most.
    assert abs(np.mean([deg.degrade_bsr(x, 4, np.random.default_rng(s)).mean()
                        for s in range(10)]) - clean.mean()) < 6


@pytest.mark.parametrize("h,w,f", [(32, 32, 4), (16, 16, 2), (64, 32, 8), (8, 8, 4)])
def test_bsr_survives_many_seeds_on_small_images(h, w, f):
    # Many seeds reach every branch (x2 pre-step, kernel path, correlated noise...).
    x = textured(h, w, seed=1)
    for seed in range(150):
        out = deg.degrade_bsr(x, f, np.random.default_rng(seed))
        assert out.shape == (h // f, w // f, 3) and out.dtype == np.uint8


def test_make_degradation_errors():
    unknown = r"config\.conditioning\.degradation='gaussian'.*bicubic.*bsr"
    with pytest.raises(ValueError, match=unknown):
        deg.make_degradation("gaussian", 4)
    with pytest.raises(ValueError, match=r"config\.conditioning\.degradation='given'.*low_res"):
        deg.make_degradation("given", 4)
    with pytest.raises(ValueError, match="positive integer"):
        deg.make_degradation("bicubic", 0)

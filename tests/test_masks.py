"""Tests for the inpainting masks (ldm_jax/data/masks.py)."""

import numpy as np
import pytest

from ldm_jax.data import masks

SIZES = [(8, 8), (32, 32), (64, 48), (256, 256), (33, 17)]
TOL = 0.02  # pixel rounding of box sides / stroke growth, at 64x64


def default_fn(kinds=masks.MASK_KINDS, **kw):
    args = dict(min_coverage=0.1, max_coverage=0.5, max_strokes=4, stroke_width=(0.05, 0.15))
    args.update(kw)
    return masks.make_mask_fn(kinds, **args)


@pytest.mark.parametrize("h,w", SIZES)
def test_shapes_dtypes_and_never_trivial(h, w):
    fn = default_fn()
    for seed in range(60):
        m = fn(h, w, np.random.default_rng(seed))
        assert m.shape == (h, w) and m.dtype == np.uint8
        assert set(np.unique(m)) <= {0, 1}
        assert m.any() and not m.all()


def test_deterministic_per_seed():
    fn = default_fn()
    a = fn(64, 64, np.random.default_rng(5))
    b = fn(64, 64, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    # Half masks have only four outcomes; boxes and strokes differ for every seed.
    fn = default_fn(("box", "stroke"))
    distinct = {fn(64, 64, np.random.default_rng(s)).tobytes() for s in range(20)}
    assert len(distinct) == 20


@pytest.mark.parametrize("bounds", [(0.1, 0.5), (0.3, 0.35), (0.02, 0.9)])
def test_box_coverage_within_bounds(bounds):
    lo, hi = bounds
    cov = np.array([masks.mask_coverage(masks.box_mask(64, 64, np.random.default_rng(s), lo, hi))
                    for s in range(200)])
    assert cov.min() >= lo - TOL and cov.max() <= hi + TOL
    assert cov.max() - cov.min() > 0.5 * (hi - lo)  # spread over the range, not one value


@pytest.mark.parametrize("bounds", [(0.1, 0.5), (0.3, 0.35)])
def test_stroke_coverage_within_bounds(bounds):
    lo, hi = bounds
    cov = np.array([
        masks.mask_coverage(masks.stroke_mask(64, 64, np.random.default_rng(s), 4, (0.05, 0.15),
                                              max_coverage=hi, min_coverage=lo))
        for s in range(200)
    ])
    assert cov.max() <= hi  # the cap is exact: a segment that would exceed it is not drawn
    assert cov.min() >= lo - TOL


def test_stroke_without_min_coverage_has_at_least_one_stroke():
    for seed in range(50):
        m = masks.stroke_mask(32, 32, np.random.default_rng(seed), 1, (0.05, 0.1), max_coverage=0.4)
        assert 0 < masks.mask_coverage(m) <= 0.4


@pytest.mark.parametrize("h,w", [(32, 32), (64, 48), (16, 40)])
def test_half_masks_are_exactly_half(h, w):
    left, right = masks.half_mask(h, w, "left"), masks.half_mask(h, w, "right")
    top, bottom = masks.half_mask(h, w, "top"), masks.half_mask(h, w, "bottom")
    for m in (left, right, top, bottom):
        assert masks.mask_coverage(m) == 0.5
    assert left[:, : w // 2].all() and not left[:, w // 2 :].any()
    np.testing.assert_array_equal(left + right, 1)
    np.testing.assert_array_equal(top + bottom, 1)
    assert top[: h // 2].all() and not top[h // 2 :].any()


def test_each_kind_and_side_is_drawn(monkeypatch):
    counts = {"box": 0, "stroke": 0, "half": 0}
    for name, kind in (("box_mask", "box"), ("stroke_mask", "stroke"), ("half_mask", "half")):
        original = getattr(masks, name)

        def counted(*args, _original=original, _kind=kind, **kwargs):
            counts[_kind] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(masks, name, counted)
    fn = default_fn()
    halves = {side: masks.half_mask(32, 32, side).tobytes() for side in masks.HALF_SIDES}
    seen_sides = set()
    for seed in range(300):
        m = fn(32, 32, np.random.default_rng(seed)).tobytes()
        seen_sides |= {side for side, b in halves.items() if b == m}
    assert counts["half"] - 4 == 300 - counts["box"] - counts["stroke"]  # 4 calls for `halves`
    assert min(counts["box"], counts["stroke"], counts["half"] - 4) > 60  # ~100 each
    assert seen_sides == set(masks.HALF_SIDES)


def test_single_kind_only_draws_that_kind():
    fn = default_fn(("half",))
    halves = {masks.half_mask(16, 16, s).tobytes() for s in masks.HALF_SIDES}
    assert all(fn(16, 16, np.random.default_rng(s)).tobytes() in halves for s in range(20))


def test_mask_coverage():
    m = np.zeros((4, 5), np.uint8)
    m[0, :2] = 1
    assert masks.mask_coverage(m) == pytest.approx(0.1)


def test_errors():
    kinds_error = r"config\.conditioning\.mask_kinds.*'circle'.*box.*stroke.*half"
    with pytest.raises(ValueError, match=kinds_error):
        default_fn(("box", "circle"))
    with pytest.raises(ValueError, match=r"config\.conditioning\.mask_kinds"):
        default_fn(())
    for lo, hi in [(0.5, 0.2), (0.0, 0.5), (0.1, 1.0), (-0.1, 0.3)]:
        with pytest.raises(ValueError, match=r"mask_min_coverage.*mask_max_coverage"):
            default_fn(min_coverage=lo, max_coverage=hi)
    with pytest.raises(ValueError, match=r"config\.conditioning\.mask_max_strokes"):
        default_fn(max_strokes=0)
    with pytest.raises(ValueError, match=r"config\.conditioning\.mask_stroke_width"):
        default_fn(stroke_width=(0.2, 0.1))
    with pytest.raises(ValueError, match="side"):
        masks.half_mask(8, 8, "middle")
    with pytest.raises(ValueError, match="0 < min_coverage <= max_coverage < 1"):
        masks.box_mask(8, 8, np.random.default_rng(0), 0.6, 0.5)


def test_mask_kind_weights_set_the_mix_and_are_checked():
    fn = masks.make_mask_fn(("box", "half"), min_coverage=0.1, max_coverage=0.4, max_strokes=2,
                      weights=(1, 3))
    rng = np.random.default_rng(0)
    halves = [m for m in (fn(16, 16, rng) for _ in range(400)) if masks.mask_coverage(m) == 0.5]
    assert 0.68 < len(halves) / 400 < 0.82  # 3/4, the box masks are rarely exactly a half
    with pytest.raises(ValueError, match="mask_kind_weights"):
        masks.make_mask_fn(("box", "half"), min_coverage=0.1, max_coverage=0.4, max_strokes=2,
                     weights=(1,))
    with pytest.raises(ValueError, match="names a kind twice"):
        masks.make_mask_fn(("box", "box"), min_coverage=0.1, max_coverage=0.4, max_strokes=2)

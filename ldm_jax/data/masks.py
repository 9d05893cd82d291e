"""Training masks for inpainting: uint8 [H, W], 1 = the region to fill, 0 = pixels kept.

Kinds (`config.conditioning.mask_kinds`, one drawn uniformly per example by `make_mask_fn`):

* 'box': one to three axis-aligned rectangles (the paper's large-mask setting draws boxes).
* 'stroke': free-form brush strokes, random polylines with round joints and a thickness that
  is a fraction of the image side, as LaMa's / DeepFill v2's "free-form" masks; they teach
  the model to fill thin, irregular holes that boxes never produce.
* 'half': the left, right, top or bottom half, for out-painting style completion.

Box and stroke masks aim at a fill fraction ("coverage") inside [min_coverage, max_coverage]
(`config.conditioning.mask_min_coverage` / `mask_max_coverage`) so the task is neither
trivial nor hopeless. No mask is ever all zeros (nothing to learn) or all ones (no context).
All randomness comes from the `numpy.random.Generator` passed in, so a mask is a function of
the pipeline's per-example seed.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

MASK_KINDS = ("box", "stroke", "half")
HALF_SIDES = ("left", "right", "top", "bottom")

MaskFn = Callable[[int, int, np.random.Generator], np.ndarray]


def mask_coverage(mask: np.ndarray) -> float:
    """The fraction of pixels to fill (nonzero)."""
    mask = np.asarray(mask)
    return float(np.count_nonzero(mask)) / max(1, mask.size)


def _check_size(h: int, w: int) -> None:
    if int(h) < 1 or int(w) < 1 or int(h) * int(w) < 2:
        raise ValueError(f"a mask needs at least 2 pixels, got {h}x{w}")


def _check_coverage(min_coverage, max_coverage, names=("min_coverage", "max_coverage")) -> None:
    if not 0.0 < min_coverage <= max_coverage < 1.0:
        raise ValueError(
            f"mask coverage bounds must satisfy 0 < {names[0]} <= {names[1]} < 1, "
            f"got {names[0]}={min_coverage!r}, {names[1]}={max_coverage!r}"
        )


def _nontrivial(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Last-resort guard (tiny images, rounding): flip one random pixel of an empty/full mask."""
    if not mask.any() or mask.all():
        flat = mask.reshape(-1)
        flat[rng.integers(flat.size)] = 0 if mask.all() else 1
    return mask


# --------------------------------------------------------------------------- box


def box_mask(h: int, w: int, rng: np.random.Generator, min_coverage: float = 0.1,
             max_coverage: float = 0.5) -> np.ndarray:
    """One or more rectangles whose union covers about a target drawn from U[min, max].

    How the bound holds: 1-3 boxes share the target area (random Dirichlet split); each box gets
    a random aspect ratio in [1/2, 2] and position. While the union is short of the target
    (boxes overlap), one more box sized to the remaining deficit is added (at most 16), so the
    union never exceeds the target by more than one box's pixel rounding, and falls short only
    if 16 deficit boxes all overlapped. Pixel granularity makes the bounds approximate on tiny
    images (an 8x8 mask moves in steps of 1/64).
    """
    _check_size(h, w)
    _check_coverage(min_coverage, max_coverage)
    target = rng.uniform(min_coverage, max_coverage) * h * w  # in pixels
    mask = np.zeros((h, w), np.uint8)

    def add_box(area: float) -> None:
        aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))  # height / width
        bh = int(np.clip(round(np.sqrt(area * aspect)), 1, h))
        bw = int(np.clip(round(area / bh), 1, w))
        bh = int(np.clip(round(area / bw), 1, h))  # re-fit after clipping the width
        y = int(rng.integers(0, h - bh + 1))
        x = int(rng.integers(0, w - bw + 1))
        mask[y : y + bh, x : x + bw] = 1

    n = int(rng.integers(1, 4))
    for share in rng.dirichlet(np.ones(n)):
        deficit = target - np.count_nonzero(mask)
        if deficit < 0.5:
            break
        add_box(min(share * target, deficit))
    for _ in range(16):
        deficit = target - np.count_nonzero(mask)
        if deficit < 0.5:
            break
        add_box(deficit)
    return _nontrivial(mask, rng)


# --------------------------------------------------------------------------- stroke


def stroke_mask(h: int, w: int, rng: np.random.Generator, max_strokes: int = 4,
                width_range=(0.05, 0.15), max_coverage: float = 0.5,
                min_coverage: float = 0.0) -> np.ndarray:
    """1..max_strokes brush strokes; coverage kept <= max_coverage, and grown to min_coverage.

    A stroke is a polyline of 1-4 segments from a uniform start point, each segment turning
    by a random angle, with a thickness drawn from `width_range` times the shorter side. Each
    segment is drawn on a copy and kept only if the coverage stays <= max_coverage (so the cap
    is exact); when the strokes end below min_coverage the last stroke is extended by more
    segments (shorter ones when a segment would overshoot), so the stroke count stays within
    max_strokes. That growth gives up after 256 tries, so min_coverage is approximate.
    """
    _check_size(h, w)
    if int(max_strokes) < 1:
        raise ValueError(f"max_strokes must be >= 1, got {max_strokes!r}")
    lo, hi = float(width_range[0]), float(width_range[1])
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"width_range must satisfy 0 < low <= high <= 1, got {width_range!r}")
    if not 0.0 <= min_coverage <= max_coverage < 1.0:
        raise ValueError(
            f"stroke coverage needs 0 <= min <= max < 1, got {min_coverage}, {max_coverage}"
        )
    side = min(h, w)
    img = Image.new("L", (w, h), 0)
    covered = 0
    limit = max_coverage * h * w

    def segment(p0, angle, length, width):
        """Draws one round-capped segment on a copy; returns (image, pixels, end point)."""
        x1 = float(np.clip(p0[0] + length * np.cos(angle), 0, w - 1))
        y1 = float(np.clip(p0[1] + length * np.sin(angle), 0, h - 1))
        cand = img.copy()
        draw = ImageDraw.Draw(cand)
        draw.line([p0, (x1, y1)], fill=1, width=width)
        r = (width - 1) / 2.0  # round caps and joints: a disk of the stroke width at each end
        for cx, cy in (p0, (x1, y1)):
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        return cand, int(np.count_nonzero(np.asarray(cand))), (x1, y1)

    def try_segment(p0, angle, width) -> tuple | None:
        nonlocal img, covered
        length = rng.uniform(0.1, 0.4) * max(h, w)
        for _ in range(4):  # halve the segment until it fits under the cap
            cand, pixels, p1 = segment(p0, angle, length, width)
            if pixels <= limit:
                img, covered = cand, pixels
                return p1
            length /= 2.0
        return None

    p, angle, width = None, 0.0, 1
    for _ in range(int(rng.integers(1, int(max_strokes) + 1))):
        width = max(1, int(round(rng.uniform(lo, hi) * side)))
        p = (float(rng.uniform(0, w - 1)), float(rng.uniform(0, h - 1)))
        angle = rng.uniform(0.0, 2.0 * np.pi)
        for _ in range(int(rng.integers(1, 5))):
            nxt = try_segment(p, angle, width)
            if nxt is None:
                break
            p = nxt
            angle += rng.normal(0.0, np.pi / 3.0)  # a brush wanders rather than zig-zags
    for _ in range(256):
        if covered >= min_coverage * h * w:
            break
        nxt = try_segment(p, angle, width)
        if nxt is not None:
            p = nxt
        angle += rng.normal(0.0, np.pi / 3.0)
    return _nontrivial((np.asarray(img) > 0).astype(np.uint8), rng)


# --------------------------------------------------------------------------- half


def half_mask(h: int, w: int, side: str) -> np.ndarray:
    """That half is 1 (the floor of an odd side: the left half of 5 columns is 2 columns)."""
    if side not in HALF_SIDES:
        raise ValueError(f"half_mask side must be one of {HALF_SIDES}, got {side!r}")
    split = w if side in ("left", "right") else h
    if split < 2:
        raise ValueError(f"cannot mask the {side} half of a {h}x{w} image (that side is < 2)")
    mask = np.zeros((h, w), np.uint8)
    k = split // 2
    if side == "left":
        mask[:, :k] = 1
    elif side == "right":
        mask[:, split - k :] = 1
    elif side == "top":
        mask[:k] = 1
    else:
        mask[split - k :] = 1
    return mask


# --------------------------------------------------------------------------- config


def make_mask_fn(kinds: Sequence[str], *, min_coverage: float, max_coverage: float,
                 max_strokes: int, stroke_width=(0.05, 0.15), weights=()) -> MaskFn:
    """`fn(h, w, rng) -> uint8 [h, w]`, one kind drawn per call from `kinds`, uniformly or
    with probabilities proportional to `weights` (one per kind).

    Arguments mirror config.conditioning.mask_{kinds,min_coverage,max_coverage,max_strokes,
    stroke_width,kind_weights} and are checked here, once, with errors naming those fields.
    """
    if isinstance(kinds, str):
        kinds = (kinds,)
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"config.conditioning.mask_kinds={tuple(kinds)!r} names a kind twice; "
                         "weight kinds with config.conditioning.mask_kind_weights instead.")
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in MASK_KINDS]
    if bad or not kinds:
        raise ValueError(
            f"config.conditioning.mask_kinds={kinds!r}: unknown or empty {bad!r}; "
            f"choose one or more of {MASK_KINDS}"
        )
    weights = tuple(float(v) for v in (weights or ()))
    if weights and (len(weights) != len(kinds) or min(weights) < 0 or sum(weights) <= 0):
        raise ValueError(
            f"config.conditioning.mask_kind_weights={weights!r} must give one weight >= 0 per "
            f"kind of mask_kinds={kinds!r} (not all 0), or be () for uniform.")
    probs = np.asarray(weights, np.float64) / sum(weights) if weights else None
    _check_coverage(
        min_coverage, max_coverage,
        ("config.conditioning.mask_min_coverage", "config.conditioning.mask_max_coverage"),
    )
    if int(max_strokes) < 1:
        raise ValueError(f"config.conditioning.mask_max_strokes must be >= 1, got {max_strokes!r}")
    width = tuple(float(v) for v in stroke_width)
    if len(width) != 2 or not 0.0 < width[0] <= width[1] <= 1.0:
        raise ValueError(
            "config.conditioning.mask_stroke_width must be (low, high) fractions of the image "
            f"side with 0 < low <= high <= 1, got {stroke_width!r}"
        )

    def mask_fn(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        if probs is None:
            kind = kinds[int(rng.integers(len(kinds)))]
        else:
            kind = kinds[int(rng.choice(len(kinds), p=probs))]
        if kind == "box":
            return box_mask(h, w, rng, min_coverage, max_coverage)
        if kind == "stroke":
            return stroke_mask(h, w, rng, max_strokes, width, max_coverage, min_coverage)
        return half_mask(h, w, HALF_SIDES[int(rng.integers(len(HALF_SIDES)))])

    return mask_fn

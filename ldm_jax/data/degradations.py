"""Low-resolution inputs for super-resolution training, made from the high-resolution target.

Two degradations, chosen by `config.conditioning.degradation` (see `make_degradation`):

* 'bicubic': PIL's antialiased bicubic down-sampling by the factor. Deterministic, clean; the
  model learns to invert exactly this operator, which is what the paper's "bicubic" SR
  models (e.g. OpenImages x4) are trained on.
* 'bsr': the Latent Diffusion paper's "bsr" pipeline, i.e. BSRGAN's
  `degradation_bsrgan_variant` from latent-diffusion's `bsrgan_light.py`. A random sequence
  of Gaussian blur (isotropic or anisotropic kernel), a random intermediate resize, the final
  resize, light Gaussian noise and JPEG compression, so the model learns to up-sample
  real-world, unknown degradations instead of one fixed kernel. Rewritten on numpy, scipy and
  PIL (no OpenCV): cv2's INTER_LINEAR / INTER_CUBIC / INTER_AREA become PIL's BILINEAR /
  BICUBIC / BOX in float 'F' mode. PIL antialiases its down-sampling where cv2 does not, so
  aliasing here comes only from the kernel + nearest-subsampling path.

All randomness is drawn from the `numpy.random.Generator` passed in (never the global numpy or
`random` state), so the input pipeline can seed it per example and reproduce the exact bytes.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

DEGRADATIONS = ("bicubic", "bsr")

# bsrgan_light.degradation_bsrgan_variant constants.
_SCALE2_PROB = 0.25  # factor 4 only: first halve the image, then run the x2 pipeline
_RESIZE_PROB = 0.8  # intermediate down-sampling: random-interpolation resize, else kernel path
_JPEG_PROB = 0.9  # the in-sequence JPEG step (a final JPEG step always runs)
_NOISE_LEVELS = (1, 2)  # Gaussian noise sigma in 8-bit steps (the "light" variant's levels)
# JPEG quality range, inclusive: bsrgan_light.py's 80..95 (the paper's bsr model; the heavier
# bsrgan.py draws 30..95).
JPEG_QUALITY = (80, 95)
# cv2 interpolations 1, 2, 3 (linear, cubic, area) as PIL filters, drawn uniformly.
_INTERPOLATIONS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.BOX)


# --------------------------------------------------------------------------- bicubic


def _check_factor(factor) -> None:
    if not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"the scale factor must be a positive integer, got {factor!r}")


def _check_divisible(h: int, w: int, factor: int) -> None:
    _check_factor(factor)
    if h % factor or w % factor:
        raise ValueError(
            f"image size {h}x{w} (HxW) is not divisible by the factor {factor}: "
            f"crop or resize it to a multiple of {factor} first"
        )


def _resize(image: np.ndarray, size_hw, resample) -> np.ndarray:
    """Per-channel PIL resize; uint8 via 'L' mode, floats via 'F' mode (no clipping).

    fromarray infers the mode from the dtype: 2-D uint8 -> 'L', 2-D float32 -> 'F'.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected an [H, W, C] image, got shape {image.shape}")
    oh, ow = (int(s) for s in size_hw)
    if oh < 1 or ow < 1:
        raise ValueError(f"resize target must be at least 1x1, got {oh}x{ow}")
    if image.dtype == np.uint8:
        planes = [
            Image.fromarray(np.ascontiguousarray(image[..., c])) for c in range(image.shape[-1])
        ]
    elif np.issubdtype(image.dtype, np.floating):
        planes = [
            Image.fromarray(np.ascontiguousarray(image[..., c], np.float32))
            for c in range(image.shape[-1])
        ]
    else:
        raise ValueError(f"expected a uint8 or float image, got dtype {image.dtype}")
    # PIL takes (width, height); each channel separately so any channel count works.
    out = [np.asarray(p.resize((ow, oh), resample=resample)) for p in planes]
    return np.stack(out, axis=-1).astype(image.dtype, copy=False)


def bicubic_resize(image: np.ndarray, size_hw) -> np.ndarray:
    """[H, W, C] uint8 / float -> [h, w, C] same dtype, PIL antialiased bicubic."""
    return _resize(image, size_hw, Image.Resampling.BICUBIC)


def bicubic_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """[H, W, C] -> [H / factor, W / factor, C]; ValueError unless both sides divide."""
    h, w = np.shape(image)[:2]
    _check_divisible(h, w, factor)
    return bicubic_resize(image, (h // factor, w // factor))


def bicubic_upsample(image: np.ndarray, factor: int) -> np.ndarray:
    """[h, w, C] -> [h * factor, w * factor, C] (e.g. to show a low-res input next to a sample)."""
    h, w = np.shape(image)[:2]
    _check_factor(factor)
    return bicubic_resize(image, (h * factor, w * factor))


# --------------------------------------------------------------------------- bsr pieces
# Images below are float32 HxWx3 in [0, 1], as in the reference (uint2single).


def _fit(size: int, x: np.ndarray) -> int:
    """Clips a kernel size to the image so 'mirror' padding never has to wrap twice."""
    return max(1, min(int(size), x.shape[0], x.shape[1]))


def _gaussian_kernel(size: int, cov: np.ndarray, shift: float = 0.0) -> np.ndarray:
    """size x size Gaussian with covariance `cov`, its peak `shift` pixels down-right of centre.

    Computed in log space and normalised by the maximum first, so a tiny covariance (the
    reference draws variances down to 0) gives a delta kernel instead of 0 / 0.
    """
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2.0 - shift
    yy, xx = np.meshgrid(r, r, indexing="ij")
    d = np.stack([xx, yy], axis=-1)
    inv = np.linalg.inv(cov)
    logk = -0.5 * np.einsum("...i,ij,...j->...", d, inv, d)
    k = np.exp(logk - logk.max())
    return k / k.sum()


def _correlate(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    # 'mirror' as in the reference's ndimage.filters.convolve(..., mode='mirror').
    return ndimage.correlate(x, k[:, :, None].astype(np.float32), mode="mirror")


def _random_resize(x: np.ndarray, size_hw, rng: np.random.Generator) -> np.ndarray:
    resample = _INTERPOLATIONS[rng.integers(len(_INTERPOLATIONS))]
    return np.clip(_resize(x, size_hw, resample), 0.0, 1.0)


def _add_blur(x: np.ndarray, sf: int, rng: np.random.Generator) -> np.ndarray:
    """add_blur: anisotropic (50%) or isotropic Gaussian; the light variant's /4 widths."""
    wd2 = (4.0 + sf) / 4.0  # anisotropic eigenvalue (variance) bound
    wd = (2.0 + 0.2 * sf) / 4.0  # isotropic sigma bound
    if rng.random() < 0.5:
        size = int(rng.integers(2, 12)) + 3  # randint(2, 11) + 3 -> 5..14
        theta = rng.random() * np.pi
        l1, l2 = wd2 * rng.random(), wd2 * rng.random()
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        cov = rot @ np.diag([max(l1, 1e-6), max(l2, 1e-6)]) @ rot.T
    else:
        size = int(rng.integers(2, 5)) + 3  # randint(2, 4) + 3 -> 5..7
        sigma = wd * rng.random()
        cov = np.eye(2) * max(sigma, 1e-3) ** 2
    return _correlate(x, _gaussian_kernel(_fit(size, x), cov))


def _kernel_downsample(x: np.ndarray, sf: int, rng: np.random.Generator) -> np.ndarray:
    """Blur with a Gaussian shifted by (sf - 1) / 2, then keep every sf-th pixel.

    The shift (the reference's shift_pixel) centres each kept sample on its sf x sf block, so
    this path does not translate the image relative to the resize path.
    """
    sigma = rng.uniform(0.1, 0.6 * sf)
    k = _gaussian_kernel(_fit(25, x), np.eye(2) * sigma**2, shift=(sf - 1) / 2.0)
    return _correlate(x, k)[::sf, ::sf]


def _add_gaussian_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour (40%), grey (40%) or channel-correlated (20%) Gaussian noise, as the reference."""
    level = int(rng.integers(_NOISE_LEVELS[0], _NOISE_LEVELS[1] + 1)) / 255.0
    r = rng.random()
    h, w = x.shape[:2]
    if r > 0.6:
        noise = rng.normal(0.0, level, (h, w, 3))
    elif r < 0.4:
        noise = rng.normal(0.0, level, (h, w, 1))
    else:
        # Covariance U^T D U L^2 with a random rotation U and random eigenvalues D: noise that
        # is correlated across channels, like a camera's demosaicing leaves. Sampled as A z with
        # A A^T = covariance (the reference's abs() on the covariance is dropped: it can make
        # the matrix indefinite).
        big = _NOISE_LEVELS[1] / 255.0
        d = rng.random(3)
        u, _ = np.linalg.qr(rng.random((3, 3)))
        a = u.T * np.sqrt(d)[None, :] * big
        noise = rng.standard_normal((h, w, 3)) @ a.T
    return np.clip(x + noise.astype(np.float32), 0.0, 1.0)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _add_jpeg(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    buf = io.BytesIO()
    Image.fromarray(_to_uint8(x)).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


# --------------------------------------------------------------------------- bsr


def degrade_bsr(image: np.ndarray, factor: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [H / factor, W / factor, 3] through the bsr_light pipeline."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"degrade_bsr expects uint8 [H, W, 3], got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    _check_divisible(h, w, factor)
    target = (h // factor, w // factor)
    x = image.astype(np.float32) / 255.0
    sf = int(factor)

    if sf == 4 and rng.random() < _SCALE2_PROB:
        # downsample1: halve now (random interpolation or clean bicubic), then degrade by 2.
        half = (h // 2, w // 2)
        if rng.random() < 0.5:
            x = _random_resize(x, half, rng)
        else:
            x = np.clip(bicubic_resize(x, half), 0.0, 1.0)
        sf = 2

    # Steps 0 blur, 2 intermediate resize, 3 final resize, 4 noise, 5 JPEG in random order;
    # 1 and 6 (second blur, camera ISP) are disabled in the light variant but kept in the
    # permutation so the order distribution matches. Step 2 must precede step 3.
    order = [int(i) for i in rng.permutation(7)]
    i2, i3 = order.index(2), order.index(3)
    if i2 > i3:
        order[i2], order[i3] = 3, 2

    for step in order:
        if step == 0:
            x = _add_blur(x, sf, rng)
        elif step == 2:
            if rng.random() < _RESIZE_PROB:
                s = rng.uniform(1.0, 2.0 * sf)
                size = (max(1, int(x.shape[0] / s)), max(1, int(x.shape[1] / s)))
                x = _random_resize(x, size, rng)
            else:
                x = np.clip(_kernel_downsample(x, sf, rng), 0.0, 1.0)
        elif step == 3:
            # Straight to the output size: the reference's int(a / sf) equals it whenever H
            # and W divide by the factor, which _check_divisible guarantees.
            x = _random_resize(x, target, rng)
        elif step == 4:
            x = _add_gaussian_noise(x, rng)
        elif step == 5 and rng.random() < _JPEG_PROB:
            x = _add_jpeg(x, rng)

    x = _add_jpeg(x, rng)  # the final JPEG step always runs
    out = _to_uint8(x)
    assert out.shape[:2] == target, (out.shape, target)
    return out


DegradationFn = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def make_degradation(name: str, factor: int) -> DegradationFn:
    """`fn(image_uint8 [H, W, 3], rng) -> uint8 [H / factor, W / factor, 3]` for `name`.

    'given' (the data's own `low_res` field) needs no function, so it is rejected here too.
    """
    if name not in DEGRADATIONS:
        raise ValueError(
            f"config.conditioning.degradation={name!r} has no degradation function; "
            f"choose one of {DEGRADATIONS}"
            + (" ('given' reads the data's low_res field instead)" if name == "given" else "")
        )
    _check_factor(factor)

    if name == "bicubic":

        def bicubic(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            del rng  # deterministic; the argument keeps one signature for both degradations
            image = np.asarray(image)
            if image.dtype != np.uint8:
                raise ValueError(f"expected a uint8 image, got {image.dtype}")
            return bicubic_downsample(image, factor)

        return bicubic

    def bsr(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return degrade_bsr(image, factor, rng)

    return bsr

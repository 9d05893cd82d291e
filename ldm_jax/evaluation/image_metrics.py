"""Image reconstruction metrics in JAX: PSNR and SSIM (per image, jittable).

Images are NHWC in [-1, 1]; both metrics are computed on [0, 1] (data range 1).
SSIM follows Wang et al. 2004 as scikit-image computes it with `gaussian_weights=True`:
11x11 Gaussian window (sigma 1.5, truncate 3.5), K1 0.01, K2 0.03, population (not sample)
covariance, mean over channels and the valid (unpadded) interior.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """Peak signal-to-noise ratio in dB per image, images in [-1, 1]."""
    x01 = (x.astype(jnp.float32) + 1.0) / 2.0
    y01 = (y.astype(jnp.float32) + 1.0) / 2.0
    mse = jnp.mean((x01 - y01) ** 2, axis=tuple(range(1, x.ndim)))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-12))


def _gaussian_kernel_1d(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    xs = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (xs / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _filter_valid(img: jax.Array, kernel: jax.Array) -> jax.Array:
    """Separable Gaussian filter over H and W of [N, H, W, C], 'valid' borders."""
    n, h, w, c = img.shape
    x = jnp.transpose(img, (0, 3, 1, 2)).reshape(n * c, 1, h, w)
    k = kernel.shape[0]
    x = jax.lax.conv_general_dilated(x, kernel.reshape(1, 1, k, 1), (1, 1), "VALID",
                                     precision=jax.lax.Precision.HIGHEST)
    x = jax.lax.conv_general_dilated(x, kernel.reshape(1, 1, 1, k), (1, 1), "VALID",
                                     precision=jax.lax.Precision.HIGHEST)
    return x.reshape(n, c, h - k + 1, w - k + 1)


def ssim(x: jax.Array, y: jax.Array) -> jax.Array:
    """Structural similarity per image (mean over channels and valid pixels), images in [-1, 1]."""
    kernel = jnp.asarray(_gaussian_kernel_1d())
    if x.shape[1] < kernel.shape[0] or x.shape[2] < kernel.shape[0]:
        raise ValueError(f"ssim needs images of at least {kernel.shape[0]}x{kernel.shape[0]} pixels,"
                         f" got {x.shape[1]}x{x.shape[2]}.")
    x = (x.astype(jnp.float32) + 1.0) / 2.0
    y = (y.astype(jnp.float32) + 1.0) / 2.0
    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = _filter_valid(x, kernel), _filter_valid(y, kernel)
    sxx = _filter_valid(x * x, kernel) - mu_x**2
    syy = _filter_valid(y * y, kernel) - mu_y**2
    sxy = _filter_valid(x * y, kernel) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    # scikit-image crops (win_size - 1) // 2 from each border of the filtered map; a 'valid'
    # filter already drops exactly that, so the mean over this map is its mssim.
    return jnp.mean(s, axis=(1, 2, 3))

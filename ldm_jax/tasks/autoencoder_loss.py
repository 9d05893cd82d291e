"""First-stage losses (the paper's first stage; docs/architecture.md): reconstruction NLL, KL / codebook terms, PatchGAN terms,
and the adaptive discriminator weight. Pure functions of arrays; the task wires them together.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean softplus(-D(x)) + mean softplus(D(x_hat))) (non-saturating GAN)."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_adversarial_loss(logits_fake: jax.Array) -> jax.Array:
    """g_loss = -mean(D(x_hat))."""
    return -jnp.mean(logits_fake)


def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array, *, disc_weight: float,
                    max_weight: float = 1e4) -> jax.Array:
    """d_weight = clip(||grad nll|| / (||grad g|| + 1e-4), 0, max) * disc_weight, no gradient.

    Both gradients are taken w.r.t. the decoder's last layer, so the adversarial term is scaled
    to the same gradient magnitude as the reconstruction term there.
    """
    ratio = jnp.linalg.norm(nll_grad.ravel()) / (jnp.linalg.norm(g_grad.ravel()) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight) * disc_weight)


def reconstruction_loss(x: jax.Array, recon: jax.Array, *, pixel_weight: float,
                        perceptual: jax.Array | None, perceptual_weight: float) -> jax.Array:
    """Per-pixel |x - x_hat| (+ w_p * LPIPS per image, broadcast over pixels): [B, H, W, C]."""
    rec = pixel_weight * jnp.abs(x - recon)
    if perceptual is not None and perceptual_weight > 0:
        rec = rec + perceptual_weight * perceptual.reshape(-1, 1, 1, 1)
    return rec


def kl_nll(rec: jax.Array, logvar: jax.Array) -> jax.Array:
    """Gaussian NLL with a learned scalar log-variance, summed per image, mean over the batch."""
    nll = rec / jnp.exp(logvar) + logvar
    return jnp.sum(nll) / rec.shape[0]


def vq_nll(rec: jax.Array) -> jax.Array:
    """The VQ loss's reconstruction term is the plain mean (taming VQLPIPSWithDiscriminator)."""
    return jnp.mean(rec)

"""First-stage loss pieces against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.tasks import autoencoder_loss as L


def test_hinge_and_vanilla_d_loss_hand_values():
    real = jnp.array([2.0, 0.5, -1.0])  # relu(1 - r) = 0, 0.5, 2   -> mean 2.5/3
    fake = jnp.array([-2.0, 0.0, 1.0])  # relu(1 + f) = 0, 1, 2     -> mean 1
    np.testing.assert_allclose(L.hinge_d_loss(real, fake), 0.5 * (2.5 / 3 + 1.0), rtol=1e-6)
    sp = lambda v: np.log1p(np.exp(v))
    expect = 0.5 * (np.mean(sp(-np.array([2.0, 0.5, -1.0]))) + np.mean(sp(np.array([-2.0, 0.0, 1.0]))))
    np.testing.assert_allclose(L.vanilla_d_loss(real, fake), expect, rtol=1e-6)
    np.testing.assert_allclose(L.generator_adversarial_loss(fake), 1.0 / 3, rtol=1e-6)


def test_adaptive_weight_hand_values_and_clipping():
    g_nll = jnp.array([3.0, 4.0])  # norm 5
    g_adv = jnp.array([0.0, 2.0])  # norm 2
    np.testing.assert_allclose(L.adaptive_weight(g_nll, g_adv, disc_weight=0.5), 0.5 * 5 / (2 + 1e-4), rtol=1e-6)
    # Tiny adversarial gradient: ratio clipped at max_weight before the disc_weight factor.
    np.testing.assert_allclose(L.adaptive_weight(g_nll, jnp.zeros(2), disc_weight=0.75, max_weight=1e4),
                               0.75 * 1e4, rtol=1e-6)
    # No gradient flows through the weight.
    grad = jax.grad(lambda a: L.adaptive_weight(a, g_adv, disc_weight=1.0))(g_nll)
    np.testing.assert_array_equal(grad, 0.0)


def test_kl_nll_with_learned_logvar_matches_formula():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 4, 4, 3))
    p = np.array([0.3, 0.7])
    rec = L.reconstruction_loss(jnp.asarray(x), jnp.asarray(y), pixel_weight=1.0,
                                perceptual=jnp.asarray(p), perceptual_weight=0.5)
    expect_rec = np.abs(x - y) + 0.5 * p[:, None, None, None]
    np.testing.assert_allclose(rec, expect_rec, rtol=1e-6)
    logvar = 0.4
    np.testing.assert_allclose(L.kl_nll(rec, jnp.asarray(logvar)),
                               np.sum(expect_rec / np.exp(logvar) + logvar) / 2, rtol=1e-5)
    # d nll / d logvar = N_pixels - sum(rec) exp(-logvar) per image (mean over batch).
    g = jax.grad(lambda lv: L.kl_nll(rec, lv))(jnp.asarray(logvar))
    np.testing.assert_allclose(g, (expect_rec.size - np.sum(expect_rec) * np.exp(-logvar)) / 2, rtol=1e-4)
    np.testing.assert_allclose(L.vq_nll(rec), np.mean(expect_rec), rtol=1e-6)

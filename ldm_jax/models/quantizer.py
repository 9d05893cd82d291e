"""Vector quantiser (VQ-VAE bottleneck) for the VQ-regularised first stage.

Follows the behaviour of taming-transformers' ``VectorQuantizer2``: nearest-neighbour lookup in a
learned codebook with the squared-distance expansion ||z||^2 - 2 z.e + ||e||^2, a straight-through
estimator for the encoder gradient, and the codebook + commitment loss

    standard (legacy=False): beta * mean((sg(z_q) - z)^2) + mean((z_q - sg(z))^2)
    legacy   (legacy=True):         mean((sg(z_q) - z)^2) + beta * mean((z_q - sg(z))^2)

(the reference's default puts beta on the codebook term by mistake; ``legacy=True`` reproduces
that for checkpoints trained with it). Everything in here runs in float32 so the arg-min over the
codebook does not flip under reduced precision.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp


def _uniform_init(limit: float):
    """Initialiser U(-limit, limit), matching the reference codebook init with limit = 1/n."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, minval=-limit, maxval=limit)

    return init


def codebook_stats(indices: jax.Array, num_embeddings: int) -> Tuple[jax.Array, jax.Array]:
    """Perplexity and codebook usage of a batch of code indices.

    Args:
        indices: integer array of any shape with values in [0, num_embeddings).
        num_embeddings: codebook size.
    Returns:
        ``(perplexity, code_usage)``: exp of the entropy of the batch code histogram (1 when a
        single code is used, ``num_embeddings`` at uniform use) and the fraction of codebook
        entries used at least once in the batch.
    """
    flat = indices.reshape(-1)
    # bincount with a static length is jit-friendly and avoids a [N, num_embeddings] one-hot.
    counts = jnp.bincount(flat, length=num_embeddings).astype(jnp.float32)
    probs = counts / jnp.maximum(flat.shape[0], 1)
    entropy = -jnp.sum(probs * jnp.log(probs + 1e-10))
    perplexity = jnp.exp(entropy)
    code_usage = jnp.mean((counts > 0).astype(jnp.float32))
    return perplexity, code_usage


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantiser with a learned codebook.

    Attributes:
        num_embeddings: codebook size (``n_embed``).
        embedding_dim: dimensionality of each code (= channels of the latent).
        beta: commitment weight.
        legacy: put ``beta`` on the codebook term instead of the commitment term (see module doc).

    Parameters: ``embedding`` [num_embeddings, embedding_dim] float32, init U(-1/n, 1/n).
    """

    num_embeddings: int
    embedding_dim: int
    beta: float = 0.25
    legacy: bool = False

    def setup(self):
        self.embedding = self.param(
            "embedding", _uniform_init(1.0 / self.num_embeddings),
            (self.num_embeddings, self.embedding_dim), jnp.float32)

    def nearest(self, z: jax.Array) -> jax.Array:
        """Indices [...] of the nearest codebook entry for every vector z[..., :]."""
        if z.shape[-1] != self.embedding_dim:
            raise ValueError(
                f"VectorQuantizer expects last axis {self.embedding_dim}, got shape {z.shape}")
        flat = z.reshape(-1, self.embedding_dim).astype(jnp.float32)
        emb = jnp.asarray(self.embedding, jnp.float32)
        # HIGHEST precision: accelerators may otherwise run f32 matmuls with bf16/tf32 inputs,
        # which perturbs distances enough to change the arg-min between near-equidistant codes.
        cross = jnp.matmul(flat, emb.T, precision=jax.lax.Precision.HIGHEST)
        dist = (jnp.sum(jnp.square(flat), axis=1, keepdims=True) - 2.0 * cross
                + jnp.sum(jnp.square(emb), axis=1)[None, :])
        idx = jnp.argmin(dist, axis=1).astype(jnp.int32)
        return idx.reshape(z.shape[:-1])

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Embed integer ``indices`` [...] -> codes [..., embedding_dim] (float32)."""
        return jnp.take(jnp.asarray(self.embedding, jnp.float32), indices, axis=0)

    def __call__(self, z: jax.Array) -> Tuple[jax.Array, jax.Array, Dict[str, Any]]:
        """Quantise ``z`` [B, h, w, D] (NHWC; any leading shape works).

        Returns:
            ``(z_q, loss, info)``: ``z_q`` is the straight-through quantised latent in ``z.dtype``
            (forward value = codes, gradient w.r.t. ``z`` = identity); ``loss`` is the scalar
            codebook + commitment loss; ``info`` holds ``indices`` (int32, shape ``z.shape[:-1]``),
            ``perplexity``, ``code_usage``, ``commitment_loss`` and ``codebook_loss`` (the
            unweighted terms, for logging).
        """
        zf = z.astype(jnp.float32)
        idx = self.nearest(zf)
        zq = self.lookup(idx)

        # Commitment pulls the encoder output towards its (frozen) code; codebook pulls the code
        # towards the (frozen) encoder output. Means are over all elements, as in the reference.
        commitment = jnp.mean(jnp.square(jax.lax.stop_gradient(zq) - zf))
        codebook = jnp.mean(jnp.square(zq - jax.lax.stop_gradient(zf)))
        if self.legacy:
            loss = commitment + self.beta * codebook
        else:
            loss = self.beta * commitment + codebook

        # Straight-through: value of zq, gradient flows to z unchanged.
        zq_st = zf + jax.lax.stop_gradient(zq - zf)

        perplexity, code_usage = codebook_stats(idx, self.num_embeddings)
        info = {
            "indices": idx,
            "perplexity": perplexity,
            "code_usage": code_usage,
            "commitment_loss": commitment,
            "codebook_loss": codebook,
        }
        return zq_st.astype(z.dtype), loss, info

"""Diagonal Gaussian posterior used by the KL-regularised autoencoder.

The encoder of an ``AutoencoderKL`` predicts ``moments``: the per-element mean and log-variance of
q(z|x), concatenated on the channel (last, NHWC) axis. ``DiagonalGaussian`` wraps those two arrays
and provides sampling (reparameterised), the mode, the KL divergence to the standard normal prior
and the negative log-likelihood of a sample, all reduced over every non-batch axis.

All statistics are computed in float32 regardless of the dtype of ``moments`` because ``exp`` of a
log-variance and sums over a whole latent are poorly conditioned in bfloat16.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Same clamp range as the reference: keeps exp(logvar) finite (exp(20) ~ 5e8) and exp(0.5*-30)
# well above float32 underflow.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


def _sum_non_batch(x: jax.Array) -> jax.Array:
    """Sum over all axes except the first (batch) axis -> shape [B]."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


@jax.tree_util.register_pytree_node_class
class DiagonalGaussian:
    """Factorised Gaussian N(mean, exp(logvar)) over a latent feature map.

    Args:
        moments: array [B, h, w, 2C]; the first C channels are the mean and the last C the
            log-variance (the layout produced by ``quant_conv`` of the KL autoencoder).
        deterministic: if True the distribution is a point mass at ``mean`` (variance 0), so
            ``sample`` returns the mean and ``kl``/``nll`` are 0, as in the reference.

    The object is a JAX pytree (children: ``mean``, ``logvar``), so it can be returned from
    ``jax.jit``-ed functions and from ``Module.apply``.
    """

    def __init__(self, moments: jax.Array, deterministic: bool = False):
        moments = jnp.asarray(moments, jnp.float32)
        if moments.shape[-1] % 2:
            raise ValueError(
                f"moments must have an even number of channels (mean and logvar), got shape "
                f"{moments.shape}")
        mean, logvar = jnp.split(moments, 2, axis=-1)
        self.mean = mean
        self.logvar = jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.deterministic = bool(deterministic)

    @classmethod
    def from_mean_logvar(cls, mean: jax.Array, logvar: jax.Array,
                         deterministic: bool = False) -> "DiagonalGaussian":
        """Build from separate mean / log-variance arrays (log-variance is clipped as usual)."""
        return cls(jnp.concatenate([jnp.asarray(mean, jnp.float32),
                                    jnp.asarray(logvar, jnp.float32)], axis=-1),
                   deterministic=deterministic)

    # -- pytree protocol -------------------------------------------------------------------------
    def tree_flatten(self):
        return (self.mean, self.logvar), self.deterministic

    @classmethod
    def tree_unflatten(cls, deterministic, children):
        # Bypass __init__: children are already split and clipped (and may be tracers or other
        # placeholder leaves during tree transformations).
        obj = object.__new__(cls)
        obj.mean, obj.logvar = children
        obj.deterministic = deterministic
        return obj

    # -- derived quantities ----------------------------------------------------------------------
    @property
    def var(self) -> jax.Array:
        """Variance exp(logvar) (zeros when deterministic)."""
        if self.deterministic:
            return jnp.zeros_like(self.mean)
        return jnp.exp(self.logvar)

    @property
    def std(self) -> jax.Array:
        """Standard deviation exp(0.5 * logvar) (zeros when deterministic)."""
        if self.deterministic:
            return jnp.zeros_like(self.mean)
        return jnp.exp(0.5 * self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """Reparameterised sample mean + std * eps, eps ~ N(0, I); float32, shape of ``mean``."""
        eps = jax.random.normal(rng, self.mean.shape, jnp.float32)
        return self.mean + self.std * eps

    def mode(self) -> jax.Array:
        """The mode (= mean) of the distribution."""
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> jax.Array:
        """KL(self || other), summed over all non-batch axes -> [B].

        With ``other=None`` the target is the standard normal prior N(0, I):
        0.5 * sum(mean^2 + var - 1 - logvar).
        """
        if self.deterministic:
            return jnp.zeros(self.mean.shape[:1], jnp.float32)
        if other is None:
            return 0.5 * _sum_non_batch(
                jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar)
        return 0.5 * _sum_non_batch(
            jnp.square(self.mean - other.mean) * jnp.exp(-other.logvar)
            + jnp.exp(self.logvar - other.logvar) - 1.0 - self.logvar + other.logvar)

    def nll(self, x: jax.Array) -> jax.Array:
        """Negative log-density of ``x`` under this Gaussian, summed over non-batch axes -> [B]."""
        if self.deterministic:
            return jnp.zeros(self.mean.shape[:1], jnp.float32)
        x = jnp.asarray(x, jnp.float32)
        return 0.5 * _sum_non_batch(
            math.log(2.0 * math.pi) + self.logvar
            + jnp.square(x - self.mean) * jnp.exp(-self.logvar))

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return (f"DiagonalGaussian(shape={tuple(self.mean.shape)}, "
                f"deterministic={self.deterministic})")

"""Sample-quality statistics: streaming feature moments, FID, Inception Score, precision/recall.

* :class:`FeatureMoments` accumulates the mean and covariance of feature vectors batch by batch
  in float64 on the host. It keeps ``(count, mean, M2)`` with ``M2 = sum (x - mean)(x - mean)^T``
  and merges batches with the pairwise update of Chan, Golub & LeVeque (1979), so memory is
  ``O(D^2)`` whatever the number of samples, and the result equals a one-pass ``np.cov`` to
  float64 rounding (no ``E[x x^T] - mu mu^T`` cancellation).
* :func:`frechet_distance` is pytorch-fid's ``calculate_frechet_distance`` (float64,
  ``scipy.linalg.sqrtm`` of ``sigma1 @ sigma2``, eps-regularised retry, imaginary-part check).
* :func:`inception_score` follows Salimans et al. (2016) / the TF reference: ``splits``
  contiguous chunks, ``exp(E_x KL(p(y|x) || p(y)))`` per chunk, mean and std over chunks.
* :func:`precision_recall` is the k-NN manifold estimate of Kynkaanniemi et al. (2019): a sample
  lies on a manifold if it is within the k-th-nearest-neighbour radius of at least one sample
  of the other set. Pairwise squared distances are computed in JAX, block by block, so device
  memory is ``O(batch_size^2)``.
* :func:`cached_reference_moments` computes reference statistics once per data set and reuses
  the ``.npz`` while its metadata (feature network, data set, split, N, ...) matches.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from ldm_jax.storage import files

__all__ = ["FeatureMoments", "frechet_distance", "inception_score", "precision_recall",
           "cached_reference_moments"]

_log = logging.getLogger(__name__)


def _as_host_2d(features: Any, what: str) -> np.ndarray:
    """``features`` (jax or numpy) as a float64 ``[B, D]`` host array; rejects NaN/inf."""
    arr = np.asarray(jax.device_get(features), dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a [batch, dim] array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        # One NaN would silently turn every statistic into NaN; fail where it entered.
        raise ValueError(f"{what} contains NaN or inf values")
    return arr


class FeatureMoments:
    """Streaming mean / covariance of ``dim``-dimensional features (float64, memory flat in N).

    ``update`` takes ``[B, D]`` batches (jax or numpy arrays, any float dtype). ``merge`` combines
    two accumulators (e.g. one per host or per worker). ``covariance`` is unbiased (``ddof=1``),
    as ``np.cov(features, rowvar=False)`` and pytorch-fid compute it.
    """

    def __init__(self, dim: int):
        if int(dim) != dim or dim < 1:
            raise ValueError(f"FeatureMoments: dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self.count = 0
        self._mean = np.zeros(self.dim, np.float64)
        self._m2 = np.zeros((self.dim, self.dim), np.float64)
        self.meta: Dict[str, Any] = {}

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self._mean
        # Chan et al.: exact for any split of the data, no large-number cancellation.
        self._m2 += m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self._mean += delta * (n_b / n)
        self.count = n

    def update(self, features: Any) -> None:
        """Add a ``[B, D]`` batch of features (accumulated in float64 on the host)."""
        x = _as_host_2d(features, "FeatureMoments.update(features)")
        if x.shape[1] != self.dim:
            raise ValueError(f"FeatureMoments.update: features have dim {x.shape[1]}, this "
                             f"accumulator was built for dim {self.dim}")
        if x.shape[0] == 0:
            return
        mean_b = x.mean(axis=0)
        xc = x - mean_b
        self._combine(x.shape[0], mean_b, xc.T @ xc)

    def merge(self, other: "FeatureMoments") -> "FeatureMoments":
        """Return a new accumulator holding the samples of ``self`` and ``other``."""
        if not isinstance(other, FeatureMoments):
            raise TypeError(f"FeatureMoments.merge expects a FeatureMoments, got {type(other)}")
        if other.dim != self.dim:
            raise ValueError(f"FeatureMoments.merge: dims differ ({self.dim} vs {other.dim})")
        out = FeatureMoments(self.dim)
        out.count, out._mean, out._m2 = self.count, self._mean.copy(), self._m2.copy()
        out.meta = dict(self.meta)
        if other.count:
            out._combine(other.count, other._mean, other._m2)
        return out

    @property
    def mean(self) -> np.ndarray:
        """Sample mean ``[D]`` (float64)."""
        if self.count == 0:
            raise ValueError("FeatureMoments.mean: no samples were added (call update first)")
        return self._mean.copy()

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased sample covariance ``[D, D]`` (float64, ``ddof=1``)."""
        if self.count < 2:
            raise ValueError(f"FeatureMoments.covariance needs at least 2 samples, has "
                             f"{self.count}")
        return self._m2 / (self.count - 1)

    def save(self, path: Union[str, os.PathLike], meta: Optional[Mapping[str, Any]] = None
             ) -> None:
        """Write ``mu``, ``sigma``, ``count`` and ``meta`` (a JSON string) to a ``.npz``.

        The file is written to a temporary name next to ``path`` and renamed, so a reader
        never sees a half-written file. ``meta`` defaults to ``self.meta``.
        """
        meta = dict(self.meta if meta is None else meta)
        path = os.fspath(path)
        with files.atomic_write(path, "wb") as f:  # a file object: np.savez would append '.npz'
            np.savez(f, mu=self.mean, sigma=self.covariance,
                     count=np.asarray(self.count, np.int64),
                     meta=np.asarray(json.dumps(meta, sort_keys=True)))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "FeatureMoments":
        """Read a file written by :meth:`save` (``meta`` is restored into ``.meta``)."""
        with np.load(os.fspath(path), allow_pickle=False) as z:
            missing = [k for k in ("mu", "sigma", "count") if k not in z.files]
            if missing:
                raise ValueError(f"{path}: not a FeatureMoments file, missing arrays {missing} "
                                 f"(has {sorted(z.files)}); delete it to recompute")
            mu, sigma, count = z["mu"], z["sigma"], int(z["count"])
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or count < 2:
            raise ValueError(f"{path}: inconsistent statistics (mu {mu.shape}, sigma "
                             f"{sigma.shape}, count {count})")
        out = cls(mu.shape[0])
        out.count = count
        out._mean = mu.astype(np.float64)
        out._m2 = sigma.astype(np.float64) * (count - 1)
        out.meta = meta
        return out


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as pytorch-fid computes it.

    ``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))`` in float64. If the
    matrix square root is not finite, ``eps * I`` is added to both covariances (with a warning);
    a non-negligible imaginary part (> 1e-3 on the diagonal) raises ``ValueError``.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2,
                                                                                    np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: mean vectors differ in shape ({mu1.shape} vs "
                         f"{mu2.shape}); were they computed with the same feature network?")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"frechet_distance: covariance shapes {sigma1.shape}, {sigma2.shape} "
                         f"do not match the mean dimension {mu1.shape[0]}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))  # product may be almost singular
    if not np.isfinite(covmean).all():
        _log.warning("frechet_distance: singular product; adding %s to the diagonal of the "
                     "covariance estimates", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):  # numerical error can leave a small imaginary component
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: imaginary component "
                             f"{np.max(np.abs(covmean.imag))} in sqrtm(sigma1 @ sigma2)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _log_probs(batch: np.ndarray, from_logits: Optional[bool]) -> np.ndarray:
    if from_logits is None:
        # Probabilities are non-negative rows summing to 1; logits essentially never are.
        from_logits = not (batch.min() >= 0 and np.allclose(batch.sum(axis=1), 1.0, atol=1e-4))
    if from_logits:
        shifted = batch - batch.max(axis=1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    with np.errstate(divide="ignore"):
        return np.log(batch)  # log 0 = -inf; p log p is then taken as 0 below


def inception_score(logits_or_probs_batches: Any, splits: int = 10, *,
                    from_logits: Optional[bool] = None) -> Tuple[float, float]:
    """Inception Score ``(mean, std)`` over ``splits`` contiguous chunks of the samples.

    ``logits_or_probs_batches`` is one ``[N, K]`` array or an iterable of ``[B, K]`` batches of
    classifier logits or probabilities (``from_logits=None`` decides per batch: rows that are
    non-negative and sum to 1 are probabilities). For FID-Inception pass the 1008 logits of
    :class:`~ldm_jax.evaluation.inception.FeatureExtractor` -- the softmax over all 1008 classes
    is what the original TF implementation scores. Per chunk ``s``:
    ``IS_s = exp(mean_x sum_y p(y|x) (log p(y|x) - log p_s(y)))`` with ``p_s`` the chunk's
    marginal; chunk ``i`` is samples ``[i N // splits, (i + 1) N // splits)``.

    Unlike the other statistics this keeps all ``N x K`` log-probabilities (float64) because
    the chunk boundaries depend on N; 50k samples x 1008 classes is about 400 MB.
    """
    if isinstance(logits_or_probs_batches, (np.ndarray, jax.Array)):
        logits_or_probs_batches = [logits_or_probs_batches]
    logp = [_log_probs(_as_host_2d(b, "inception_score batch"), from_logits)
            for b in logits_or_probs_batches]
    if not logp:
        raise ValueError("inception_score: no batches were given")
    if len({a.shape[1] for a in logp}) != 1:
        raise ValueError(f"inception_score: batches have different class counts "
                         f"{sorted({a.shape[1] for a in logp})}")
    logp = np.concatenate(logp)
    n = logp.shape[0]
    if int(splits) != splits or not 1 <= splits <= n:
        raise ValueError(f"inception_score: splits must be an integer in [1, N={n}], got "
                         f"{splits!r}")
    scores = []
    for i in range(splits):
        part = logp[i * n // splits:(i + 1) * n // splits]
        p = np.exp(part)
        with np.errstate(divide="ignore", invalid="ignore"):  # classes with p = 0: 0 log 0 = 0
            log_py = np.log(p.mean(axis=0))
            kl = np.where(p > 0, p * (part - log_py), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


@functools.partial(jax.jit, static_argnames=("kk",))
def _knn_block(rows, cols, cols_valid, best, *, kk):
    """Merge the ``kk`` smallest squared distances from ``rows`` to this block of ``cols``."""
    d = _sq_dists(rows, cols)
    d = jnp.where(cols_valid[None, :], d, jnp.inf)
    neg, _ = jax.lax.top_k(-jnp.concatenate([best, d], axis=1), kk)
    return -neg  # ascending


@jax.jit
def _inside_block(rows, cols, cols_radii, cols_valid, inside):
    """``inside | (row within the radius of any valid col of this block)``."""
    d = _sq_dists(rows, cols)
    return inside | jnp.any((d <= cols_radii[None, :]) & cols_valid[None, :], axis=1)


def _sq_dists(a, b):
    # HIGHEST: accelerators otherwise run float32 matmuls in bf16/tf32, moving points across
    # the radius threshold.
    ab = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    d = jnp.sum(a * a, axis=1)[:, None] - 2.0 * ab + jnp.sum(b * b, axis=1)[None, :]
    return jnp.maximum(d, 0.0)


def _blocks(x: np.ndarray, batch_size: int):
    """Yield ``(block, valid)`` with every block padded to ``batch_size`` rows (one compile)."""
    for start in range(0, x.shape[0], batch_size):
        blk = x[start:start + batch_size]
        valid = np.ones(batch_size, bool)
        if blk.shape[0] < batch_size:
            valid[blk.shape[0]:] = False
            blk = np.concatenate([blk, np.zeros((batch_size - blk.shape[0], x.shape[1]),
                                                blk.dtype)])
        yield jnp.asarray(blk), jnp.asarray(valid)


def _kth_radii(x: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Squared distance of every point of ``x`` to its k-th nearest neighbour in ``x``."""
    kk = k + 1  # the point itself is at distance 0 and comes first
    radii = []
    for rows, rows_valid in _blocks(x, batch_size):
        best = jnp.full((batch_size, kk), jnp.inf, jnp.float32)
        for cols, cols_valid in _blocks(x, batch_size):
            best = _knn_block(rows, cols, cols_valid, best, kk=kk)
        radii.append(np.asarray(best[:, k])[np.asarray(rows_valid)])
    return np.concatenate(radii)


def _fraction_inside(points: np.ndarray, centers: np.ndarray, radii: np.ndarray,
                     batch_size: int) -> float:
    """Fraction of ``points`` within ``radii`` (squared) of at least one of ``centers``."""
    radii_pad = np.concatenate([radii, np.zeros(-len(radii) % batch_size, radii.dtype)])
    hits = 0
    for rows, rows_valid in _blocks(points, batch_size):
        inside = jnp.zeros(batch_size, bool)
        for j, (cols, cols_valid) in enumerate(_blocks(centers, batch_size)):
            r = jnp.asarray(radii_pad[j * batch_size:(j + 1) * batch_size])
            inside = _inside_block(rows, cols, r, cols_valid, inside)
        hits += int(np.sum(np.asarray(inside) & np.asarray(rows_valid)))
    return hits / points.shape[0]


def precision_recall(real_features: Any, fake_features: Any, k: int = 3,
                     batch_size: int = 1024) -> Dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019) with k-NN manifolds.

    precision = fraction of fake samples within the k-NN radius of some real sample;
    recall = fraction of real samples within the k-NN radius of some fake sample. A sample's
    radius is the distance to its k-th nearest neighbour in its own set (itself excluded); a
    point exactly on a radius counts as inside (``<=``), as in the reference implementation.

    Distances are computed in float32 in JAX on ``batch_size x batch_size`` blocks (device
    memory flat in N; features are centred on the real mean first, which keeps the
    ``|a|^2 - 2ab + |b|^2`` expansion accurate).
    """
    real = _as_host_2d(real_features, "precision_recall(real_features)")
    fake = _as_host_2d(fake_features, "precision_recall(fake_features)")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall: real dim {real.shape[1]} != fake dim "
                         f"{fake.shape[1]}")
    if int(k) != k or k < 1:
        raise ValueError(f"precision_recall: k must be a positive integer, got {k!r}")
    for name, x in (("real_features", real), ("fake_features", fake)):
        if x.shape[0] <= k:
            raise ValueError(f"precision_recall: {name} has {x.shape[0]} samples; the k-NN "
                             f"radius needs more than k={k}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"precision_recall: batch_size must be a positive integer, got "
                         f"{batch_size!r}")
    center = real.mean(axis=0)
    real = (real - center).astype(np.float32)
    fake = (fake - center).astype(np.float32)
    real_r = _kth_radii(real, int(k), int(batch_size))
    fake_r = _kth_radii(fake, int(k), int(batch_size))
    return {"precision": _fraction_inside(fake, real, real_r, int(batch_size)),
            "recall": _fraction_inside(real, fake, fake_r, int(batch_size))}


def cached_reference_moments(path: Union[str, os.PathLike], meta: Mapping[str, Any],
                             compute: Callable[[], FeatureMoments]) -> FeatureMoments:
    """Reference statistics from ``path`` if its stored ``meta`` equals ``meta``, else computed.

    ``meta`` identifies the statistics (feature network name, data set, split, N, ...). On a
    miss (no file, or different metadata) ``compute()`` is called and its result saved
    atomically to ``path`` with ``meta``; the returned object carries ``meta`` in ``.meta``.
    """
    # Compare through a JSON round trip so tuples/lists and int/float keys compare as stored.
    want = json.loads(json.dumps(dict(meta), sort_keys=True))
    path = os.fspath(path)
    if os.path.exists(path):
        try:
            cached = FeatureMoments.load(path)
        except ValueError as e:
            _log.warning("ignoring unreadable reference statistics %s (%s); recomputing",
                         path, e)
        else:
            if cached.meta == want:
                _log.info("reference statistics loaded from %s", path)
                return cached
            _log.info("reference statistics %s were computed for %s, need %s; recomputing",
                      path, cached.meta, want)
    moments = compute()
    if not isinstance(moments, FeatureMoments):
        raise TypeError(f"cached_reference_moments: compute() must return FeatureMoments, "
                        f"got {type(moments)}")
    moments.meta = want
    moments.save(path, want)
    _log.info("reference statistics (N=%d) saved to %s", moments.count, path)
    return moments

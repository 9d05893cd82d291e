"""Streaming feature moments, FID, Inception Score and precision/recall vs closed forms / numpy."""

import json
import os

import numpy as np
import pytest
import scipy.special
import scipy.stats

import jax.numpy as jnp

from conftest import require
from ldm_jax.evaluation import statistics as S


def _features(n=600, d=48, seed=0, offset=50.0):
    """Correlated features with a large common offset (stresses E[xx^T] - mu mu^T cancellation)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    return offset + rng.standard_normal((n, d)) @ mix + rng.uniform(-1, 1, d)


def _moments(x, batch_sizes):
    m, start = S.FeatureMoments(x.shape[1]), 0
    for b in batch_sizes:
        m.update(x[start:start + b])
        start += b
    assert start == len(x)
    return m


# ------------------------------------------------------------------------------------------
# FeatureMoments
# ------------------------------------------------------------------------------------------

def test_streaming_moments_equal_one_pass():
    x = _features()
    ref_mu, ref_cov = x.mean(0), np.cov(x, rowvar=False)
    sizes = [1, 7, 0, 250, 2, 340]  # uneven, with an empty and a single-row batch
    m = _moments(x, sizes)
    assert m.count == 600
    cov_err = np.abs(m.covariance - ref_cov).max() / np.abs(ref_cov).max()
    mu_err = np.abs(m.mean - ref_mu).max() / np.abs(ref_mu).max()
    print(f"moments: mean rel err {mu_err:.1e}, covariance rel err {cov_err:.1e}")
    assert cov_err <= 1e-10 and mu_err <= 1e-12
    # float32 jax batches (what the extractor returns) accumulate in float64 the same way.
    x32 = x.astype(np.float32)
    m32 = S.FeatureMoments(48)
    for i in range(0, 600, 128):
        m32.update(jnp.asarray(x32[i:i + 128]))
    x32d = x32.astype(np.float64)
    assert np.abs(m32.covariance - np.cov(x32d, rowvar=False)).max() <= 1e-10 * np.abs(
        ref_cov).max()
    # merge (e.g. across hosts) == one pass, in either order; inputs are left unchanged.
    a, b = _moments(x[:123], [123]), _moments(x[123:], [200, 277])
    for ab in (a.merge(b), b.merge(a)):
        assert ab.count == 600
        np.testing.assert_allclose(ab.covariance, ref_cov, rtol=0, atol=1e-10 * np.abs(
            ref_cov).max())
        np.testing.assert_allclose(ab.mean, ref_mu, rtol=1e-13)
    assert a.count == 123 and b.count == 477
    assert S.FeatureMoments(48).merge(a).count == 123


def test_moments_validation():
    m = S.FeatureMoments(4)
    with pytest.raises(ValueError, match="no samples"):
        m.mean
    m.update(np.ones((1, 4)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        m.covariance
    with pytest.raises(ValueError, match="dim 3"):
        m.update(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"\[batch, dim\]"):
        m.update(np.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        m.update(np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match="dims differ"):
        m.merge(S.FeatureMoments(5))
    with pytest.raises(ValueError, match="positive integer"):
        S.FeatureMoments(0)


def test_save_load_round_trip(tmp_path):
    x = _features(n=50, d=6)
    m = _moments(x, [20, 30])
    m.save(tmp_path / "stats.npz", meta={"feature": "f", "n": 50})
    assert os.listdir(tmp_path) == ["stats.npz"]  # no temporary left behind
    with np.load(tmp_path / "stats.npz") as z:
        assert set(z.files) == {"mu", "sigma", "count", "meta"}
        np.testing.assert_array_equal(z["mu"], m.mean)
        np.testing.assert_array_equal(z["sigma"], m.covariance)
        assert int(z["count"]) == 50 and json.loads(str(z["meta"])) == {"feature": "f", "n": 50}
    back = S.FeatureMoments.load(tmp_path / "stats.npz")
    assert back.count == 50 and back.meta == {"feature": "f", "n": 50}
    np.testing.assert_allclose(back.covariance, m.covariance, rtol=1e-15)
    # A loaded accumulator keeps streaming correctly.
    back.update(x[:10])
    np.testing.assert_allclose(back.covariance, np.cov(np.concatenate([x, x[:10]]), rowvar=False),
                               rtol=0, atol=1e-12)
    np.savez(tmp_path / "fid_stats.npz", mu=m.mean, sigma=m.covariance)  # pytorch-fid style
    with pytest.raises(ValueError, match=r"missing arrays \['count'\]"):
        S.FeatureMoments.load(tmp_path / "fid_stats.npz")


# ------------------------------------------------------------------------------------------
# Frechet distance
# ------------------------------------------------------------------------------------------

def test_fid_closed_forms_and_pytorch_fid():
    rng = np.random.default_rng(1)
    d = 10
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
    # Diagonal covariances: |dmu|^2 + sum (sqrt s1 - sqrt s2)^2.
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = S.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert abs(got - want) <= 1e-12 * want
    # Commuting full covariances sigma2 = c sigma1: (1 + c - 2 sqrt c) tr(sigma1).
    a = rng.standard_normal((d, d))
    sigma = a @ a.T + 0.1 * np.eye(d)
    got = S.frechet_distance(mu1, sigma, mu1, 2.5 * sigma)
    assert abs(got - (3.5 - 2 * np.sqrt(2.5)) * np.trace(sigma)) <= 1e-10 * np.trace(sigma)
    with pytest.raises(ValueError, match="same feature network"):
        S.frechet_distance(mu1, sigma, mu1[:3], sigma[:3, :3])
    fid_score = require("pytorch_fid.fid_score")
    x, y = _features(200, 16, seed=2, offset=0), _features(300, 16, seed=3, offset=0.3)
    args = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    ours, ref = S.frechet_distance(*args), float(fid_score.calculate_frechet_distance(*args))
    print(f"FID ours {ours!r} pytorch-fid {ref!r}")
    assert abs(ours - ref) <= 1e-12 * abs(ref)


def test_fid_self_is_zero_and_grows_with_noise():
    x = _features(n=800, d=32, seed=4, offset=1.0)
    noise = np.random.default_rng(5).standard_normal(x.shape)
    ref = _moments(x, [300, 500])
    scale = np.trace(ref.covariance)
    fids = []
    for level in (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0):
        m = _moments(x + level * noise, [100] * 8)  # streamed differently from the reference
        fids.append(S.frechet_distance(ref.mean, ref.covariance, m.mean, m.covariance))
    print("FID vs noise level:", ["%.3g" % f for f in fids], f"(tr sigma {scale:.3g})")
    assert abs(fids[0]) <= 1e-6 * scale
    assert all(b > a for a, b in zip(fids, fids[1:])), fids
    # Streaming gives the same FID as one pass with np.cov.
    y = x + 0.3 * noise
    one_pass = S.frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0),
                                  np.cov(y, rowvar=False))
    m = _moments(y, [1, 399, 400])
    streamed = S.frechet_distance(ref.mean, ref.covariance, m.mean, m.covariance)
    assert abs(streamed - one_pass) <= 1e-9 * one_pass


# ------------------------------------------------------------------------------------------
# Inception Score
# ------------------------------------------------------------------------------------------

def _is_reference(probs, splits):
    """The original formula, written with scipy.stats.entropy (KL(p(y|x) || p(y)))."""
    n, scores = len(probs), []
    for i in range(splits):
        part = probs[i * n // splits:(i + 1) * n // splits]
        py = part.mean(0)
        scores.append(np.exp(np.mean([scipy.stats.entropy(p, py) for p in part])))
    return np.mean(scores), np.std(scores)


def test_inception_score():
    rng = np.random.default_rng(6)
    logits = (3 * rng.standard_normal((103, 1008))).astype(np.float32)
    probs = scipy.special.softmax(logits.astype(np.float64), axis=1)
    want = _is_reference(probs, 10)
    one = S.inception_score(logits, splits=10)
    batches = S.inception_score([logits[i:i + 16] for i in range(0, 103, 16)], splits=10)
    from_probs = S.inception_score([probs[:50], probs[50:]], splits=10)
    print(f"IS {one} reference {want}")
    for got in (one, batches, from_probs):
        np.testing.assert_allclose(got, want, rtol=1e-10)
    # jax batches work too (float32 probabilities: float32-level agreement).
    np.testing.assert_allclose(S.inception_score(jnp.asarray(probs), splits=10), want, rtol=1e-6)
    # Closed forms: one-hot predictions spread evenly over K classes -> IS = K (0 log 0 = 0);
    # identical predictions -> IS = 1.
    onehot = np.eye(4)[np.arange(40) % 4]
    np.testing.assert_allclose(S.inception_score(onehot, splits=2), (4.0, 0.0), atol=1e-12)
    same = np.tile(probs[:1], (30, 1))
    np.testing.assert_allclose(S.inception_score(same, splits=3), (1.0, 0.0), atol=1e-12)
    with pytest.raises(ValueError, match="splits"):
        S.inception_score(logits[:5], splits=10)


# ------------------------------------------------------------------------------------------
# precision / recall
# ------------------------------------------------------------------------------------------

def _pr_bruteforce(real, fake, k):
    """Kynkaanniemi et al. 2019 in float64 numpy with full distance matrices."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    r_real = np.sort(dist(real, real), axis=1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    d = dist(fake, real)
    return {"precision": np.mean((d <= r_real[None, :]).any(1)),
            "recall": np.mean((d.T <= r_fake[None, :]).any(1))}


def test_precision_recall_hand_checked():
    square = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], float)  # k=1 radii 1, k=3 radii sqrt 2
    fake = np.array([[0.5, 0.5], [0.6, 0.5], [10, 10], [10, 11]], float)  # k=1 radii .1 .1 1 1
    assert S.precision_recall(square, fake, k=1) == {"precision": 0.5, "recall": 0.0}
    # Swapping the sets swaps the roles.
    assert S.precision_recall(fake, square, k=1) == {"precision": 0.0, "recall": 0.5}
    # k=3: (2.2, 1) is 1.2 from (1, 1), (-1.3, 0.5) is 1.393 from (0, 0) -- both inside sqrt 2;
    # (5, 5)'s own radius (7.7, to (-1.3, 0.5)) covers every real point.
    fake3 = np.array([[2.2, 1], [-1.3, 0.5], [0.5, 0.5], [5, 5]], float)
    assert S.precision_recall(square, fake3, k=3) == {"precision": 0.75, "recall": 1.0}
    assert _pr_bruteforce(square, fake3, 3) == {"precision": 0.75, "recall": 1.0}


def test_precision_recall_matches_bruteforce_blocked():
    rng = np.random.default_rng(7)
    real = rng.standard_normal((300, 8)) + 20.0  # offset: tests the centring
    fake = 1.1 * rng.standard_normal((250, 8)) + 20.8
    want = _pr_bruteforce(real, fake, 3)
    assert 0.1 < want["precision"] < 0.95 and 0.1 < want["recall"] < 0.95  # non-trivial
    for bs in (64, 1024):  # 300 and 250 are not multiples of 64: padded blocks
        got = S.precision_recall(real, fake, k=3, batch_size=bs)
        print(f"precision/recall batch {bs}: {got} brute force {want}")
        assert got == pytest.approx(want, abs=1e-12)
    same = S.precision_recall(real, jnp.asarray(real, jnp.float32), k=3, batch_size=128)
    assert same == {"precision": 1.0, "recall": 1.0}
    with pytest.raises(ValueError, match="more than k=3"):
        S.precision_recall(real[:3], fake, k=3)
    with pytest.raises(ValueError, match="real dim 8 != fake dim 7"):
        S.precision_recall(real, fake[:, :7])


# ------------------------------------------------------------------------------------------
# cached reference statistics
# ------------------------------------------------------------------------------------------

def test_cached_reference_moments(tmp_path):
    x = _features(n=40, d=5)
    calls = []

    def compute():
        calls.append(1)
        return _moments(x, [40])

    path = str(tmp_path / "ref" / "digits_train.npz")
    meta = {"feature": "digits_cnn_v1", "dataset": "digits", "split": "train", "n": 40}
    first = S.cached_reference_moments(path, meta, compute)
    again = S.cached_reference_moments(path, dict(meta), compute)
    assert len(calls) == 1 and again.meta == meta and first.meta == meta
    np.testing.assert_allclose(again.covariance, first.covariance, rtol=1e-15)
    # Any metadata change (here N) recomputes and overwrites.
    S.cached_reference_moments(path, {**meta, "n": 41}, compute)
    assert len(calls) == 2 and S.FeatureMoments.load(path).meta["n"] == 41
    assert sorted(os.listdir(tmp_path / "ref")) == ["digits_train.npz"]
    # A corrupt cache is recomputed rather than trusted.
    np.savez(path.replace(".npz", ""), junk=np.zeros(1))
    S.cached_reference_moments(path, meta, compute)
    assert len(calls) == 3
    with pytest.raises(TypeError, match="FeatureMoments"):
        S.cached_reference_moments(str(tmp_path / "x.npz"), meta, lambda: (x.mean(0), None))

"""A small CNN digit classifier as the feature network of CPU-only evaluations ("digits_cnn_v1").

FID, precision/recall and IS need a feature network. The standard one (Inception-v3, FID
weights) is a 100 MB download; for the embedded digits data set this module trains its own
instead (about 25 s on 2 CPU cores, once; 99.7% accuracy on the 299 held-out digits), so the whole evaluation path runs on a machine without network access.

The network (input 32x32 RGB in [-1, 1]; other sizes are resized to 32x32, 1-channel images
are repeated to RGB): 2x2 average pool (the digits are 8x8 upsampled: 16x16 keeps their detail)
-> conv3x3(32) -> ReLU -> conv3x3(32) -> ReLU -> maxpool2 -> conv3x3(64) -> ReLU -> maxpool2
-> flatten -> dense(64) = "pool" (the 64-d feature, taken before its ReLU) -> ReLU -> dense(10)
= "logits".

Training is deterministic: fixed seed, fixed batch order and a fixed number of Adam steps on the
`ldm_digits` train split (1498 images; random +-2 px shifts), on the host CPU whatever the
default backend, so every machine computes the same weights (up to CPU floating-point
differences, which the params hash in the cache metadata would reveal). The trained parameters
are cached as `<cache_dir>/digits_cnn_v1.npz` (written atomically), so only the first call
trains; the cache dir is `$LDM_JAX_CACHE` or `~/.cache/ldm_jax` unless given.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax.storage import files
from ldm_jax.storage.weights_io import flatten_state_dict, unflatten_state_dict

VERSION = "digits_cnn_v1"
FEATURE_DIM = 64
NUM_CLASSES = 10
INPUT_SIZE = 32
# Training recipe: changing any of these changes the network, so bump VERSION with them.
SEED = 0
TRAIN_STEPS = 600
BATCH_SIZE = 64
LEARNING_RATE = 2e-3
MAX_SHIFT = 2


def default_cache_dir() -> str:
    """`$LDM_JAX_CACHE`, else `~/.cache/ldm_jax`."""
    return os.path.expanduser(os.environ.get("LDM_JAX_CACHE") or "~/.cache/ldm_jax")


class DigitsCNN(nn.Module):
    """The classifier; returns {"pool": [B, 64], "logits": [B, 10]} (float32)."""

    @nn.compact
    def __call__(self, images: jax.Array) -> dict:
        x = prepare_images(images)
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(32, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(32, (3, 3), name="conv2")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(64, (3, 3), name="conv3")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        # The feature is fc's pre-activation: after the ReLU about half the units are zero on
        # every digit, which makes the feature covariance singular (FID's sqrtm then degrades).
        pool = nn.Dense(FEATURE_DIM, name="fc")(x)
        logits = nn.Dense(NUM_CLASSES, name="head")(nn.relu(pool))
        return {"pool": pool.astype(jnp.float32), "logits": logits.astype(jnp.float32)}


def prepare_images(images: jax.Array) -> jax.Array:
    """NHWC images in [-1, 1] of any size and 1 or 3 channels -> float32 [B, 32, 32, 3]."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"digits features expect NHWC images with 1 or 3 channels, got shape "
                         f"{tuple(images.shape)}.")
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "linear", antialias=True)
    return x


# ------------------------------------------------------------------------------- data


def load_digits_split(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [N, 32, 32, 3] in [-1, 1], labels int32 [N]) of an `ldm_digits` split,
    read through the project's eval pipeline (built into `data_dir` on first use)."""
    from ldm_jax.config import defaults as config_defaults
    from ldm_jax.data import pipeline

    cfg = config_defaults.data_config(source="digits", image_size=INPUT_SIZE, eval_split=split,
                                      num_threads=0)
    if data_dir is not None:
        cfg.data_dir = data_dir
    it = pipeline.make_eval_iterator(cfg, global_batch_size=512, process_index=0, process_count=1)
    images, labels = [], []
    for batch in it:
        images.append(batch["image"][batch["mask"]])
        labels.append(batch["label"][batch["mask"]])
    return np.concatenate(images), np.concatenate(labels).astype(np.int32)


def _shift_batch(rng: np.random.Generator, images: np.ndarray) -> np.ndarray:
    """Random integer shifts of up to MAX_SHIFT pixels (background -1 fills), so the features
    do not hinge on the exact centring of the data set's digits."""
    out = np.full_like(images, -1.0)
    n, h, w, _ = images.shape
    shifts = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=(n, 2))
    for i, (dy, dx) in enumerate(shifts):
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        out[i, yd, xd] = images[i, ys, xs]
    return out


def train_digits_classifier(images: np.ndarray, labels: np.ndarray, *, steps: int = TRAIN_STEPS,
                            seed: int = SEED) -> Any:
    """Trains DigitsCNN with Adam (cross-entropy) on the host CPU; returns its params.

    Deterministic: the batches and shifts come from numpy's default_rng(seed), the init from
    jax.random.key(seed).
    """
    model = DigitsCNN()
    tx = optax.adam(optax.cosine_decay_schedule(LEARNING_RATE, steps))
    try:
        device = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS excludes the CPU backend: train where we can
        device = jax.devices()[0]
    with jax.default_device(device):
        example = jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))
        params = model.init(jax.random.key(seed), example)["params"]
        opt_state = tx.init(params)

        @jax.jit
        def step(params, opt_state, x, y):
            def loss_fn(p):
                logits = model.apply({"params": p}, x)["logits"]
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            grads = jax.grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        rng = np.random.default_rng(seed)
        order = np.zeros(0, np.int64)
        for _ in range(steps):
            if len(order) < BATCH_SIZE:  # a fresh permutation per epoch
                order = np.concatenate([order, rng.permutation(len(images))])
            idx, order = order[:BATCH_SIZE], order[BATCH_SIZE:]
            x = _shift_batch(rng, images[idx])
            params, opt_state = step(params, opt_state, jnp.asarray(x), jnp.asarray(labels[idx]))
    return jax.tree_util.tree_map(np.asarray, params)


def classifier_accuracy(params, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the classifier on the given images."""
    apply = jax.jit(lambda p, x: DigitsCNN().apply({"params": p}, x)["logits"])
    logits = np.concatenate([np.asarray(apply(params, jnp.asarray(images[i:i + 512])))
                             for i in range(0, len(images), 512)])
    return float(np.mean(np.argmax(logits, -1) == labels))


# ------------------------------------------------------------------------------- cache


def params_digest(params) -> str:
    """Short sha256 of the parameters (their identity in the cache metadata)."""
    from ldm_jax.storage.first_stage import params_hash
    return params_hash(params)


def save_params(path: str, params, meta: dict) -> None:
    """Writes params + meta (JSON) to `path` atomically (a unique temp file, then rename)."""
    flat = flatten_state_dict(jax.tree_util.tree_map(np.asarray, params), sep="/")
    files.write_npz(path, __meta__=np.asarray(json.dumps(meta, sort_keys=True)), **flat)


def load_params(path: str) -> tuple[dict, dict]:
    """(params, meta) from a file written by save_params; ValueError if it is not one of ours or
    its structure differs from DigitsCNN's."""
    with np.load(path, allow_pickle=False) as data:
        if "__meta__" not in data.files:
            raise ValueError(f"{path} is not a {VERSION} parameter file (no __meta__).")
        meta = json.loads(str(data["__meta__"]))
        params = unflatten_state_dict(
            {k: np.asarray(data[k]) for k in data.files if k != "__meta__"}, sep="/")
    expected = jax.eval_shape(lambda: DigitsCNN().init(
        jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))["params"])
    got = jax.tree_util.tree_map(lambda a: (a.shape, str(a.dtype)), params)
    want = jax.tree_util.tree_map(lambda a: (a.shape, str(a.dtype)), expected)
    if meta.get("version") != VERSION or got != want:
        raise ValueError(f"{path} holds {meta.get('version')!r} parameters of another structure "
                         f"than {VERSION}; delete it to retrain.")
    return params, meta


def trained_params(cache_dir: str | None = None, data_dir: str | None = None,
                   verbose: bool = True) -> tuple[dict, dict]:
    """(params, meta) of digits_cnn_v1: from the cache, else trained now and cached.

    meta holds version, seed, steps, test_accuracy (on the 299 held-out digits), train_seconds
    and params_hash. An unreadable cache file is retrained over (with a note).
    """
    path = os.path.join(cache_dir or default_cache_dir(), f"{VERSION}.npz")
    if os.path.isfile(path):
        try:
            return load_params(path)
        except (ValueError, OSError, KeyError) as e:  # a damaged/foreign file: train anew
            print(f"Ignoring the cached digits classifier ({e}); retraining.", flush=True)
    if verbose:
        print(f"Training the digits feature network {VERSION} (once; cached in {path}).",
              flush=True)
    start = time.time()
    train_x, train_y = load_digits_split("train", data_dir)
    params = train_digits_classifier(train_x, train_y, steps=TRAIN_STEPS, seed=SEED)
    seconds = time.time() - start
    test_x, test_y = load_digits_split("test", data_dir)
    meta = {"version": VERSION, "seed": SEED, "steps": TRAIN_STEPS, "batch_size": BATCH_SIZE,
            "feature_dim": FEATURE_DIM, "train_seconds": round(seconds, 2),
            "test_accuracy": classifier_accuracy(params, test_x, test_y),
            "num_train": int(len(train_x)), "num_test": int(len(test_x)),
            "params_hash": params_digest(params)}
    if jax.process_index() == 0:
        save_params(path, params, meta)
    if verbose:
        print(f"{VERSION}: held-out accuracy {meta['test_accuracy']:.4f} "
              f"({seconds:.1f} s training).", flush=True)
    return params, meta


def _apply(params, images):
    return DigitsCNN().apply({"params": params}, images)


def load_digits_extractor(cache_dir: str | None = None, data_dir: str | None = None
                          ) -> "FeatureExtractor":
    """The digits_cnn_v1 feature network (trained and cached on first use; see the module doc).

    Args:
      cache_dir: where the trained parameters live; default `$LDM_JAX_CACHE` or ~/.cache/ldm_jax.
      data_dir: TFDS data dir of `ldm_digits` for the first training (default `<cwd>/data/tfds`).

    Returns:
      FeatureExtractor named "digits_cnn_v1" with dim 64: {"pool": [B, 64], "logits": [B, 10]}.
      Its `.meta` holds the training record (held-out accuracy, params hash).
    """
    from ldm_jax.evaluation.inception import FeatureExtractor

    params, meta = trained_params(cache_dir, data_dir)
    extractor = FeatureExtractor(VERSION, FEATURE_DIM, jax.tree_util.tree_map(jnp.asarray, params),
                                 _apply)
    extractor.meta = meta
    return extractor

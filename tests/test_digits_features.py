"""The digits feature network (digits_cnn_v1): held-out accuracy, the cache, determinism, the
forward pass against a PyTorch module with the same weights, resizing and sharding."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require
from ldm_jax.parallel import sharding
from ldm_jax.evaluation import digits_features as df


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def extractor(cache_dir, digits_dir):
    return df.load_digits_extractor(cache_dir, digits_dir)  # trains (empty cache)


@pytest.fixture(scope="module")
def test_split(digits_dir):
    return df.load_digits_split("test", digits_dir)


def test_held_out_accuracy_and_interface(extractor, test_split):
    x, y = test_split
    assert x.shape == (299, 32, 32, 3) and x.min() >= -1.0 and x.max() <= 1.0
    out = jax.jit(extractor)(extractor.params, jnp.asarray(x))
    assert out["pool"].shape == (299, 64) and out["logits"].shape == (299, 10)
    assert out["pool"].dtype == jnp.float32 and out["logits"].dtype == jnp.float32
    accuracy = float(np.mean(np.argmax(np.asarray(out["logits"]), -1) == y))
    print(f"digits_cnn_v1 held-out accuracy {accuracy:.4f}, trained in "
          f"{extractor.meta['train_seconds']} s")
    assert accuracy > 0.95
    assert extractor.name == "digits_cnn_v1" and extractor.dim == 64
    assert extractor.meta["test_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    # Every feature dimension varies over the held-out digits (a full-rank covariance for FID).
    cov = np.cov(np.asarray(out["pool"], np.float64), rowvar=False)
    assert np.linalg.eigvalsh(cov).min() > 1e-6


def test_second_load_reads_the_cache(extractor, cache_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("retrained although the cache holds the parameters")
    monkeypatch.setattr(df, "train_digits_classifier", fail)
    again = df.load_digits_extractor(cache_dir)
    for a, b in zip(jax.tree_util.tree_leaves(extractor.params),
                    jax.tree_util.tree_leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert again.meta == extractor.meta
    assert os.listdir(cache_dir) == ["digits_cnn_v1.npz"]  # no temp files left behind


def test_foreign_or_damaged_cache_file_is_retrained_over(tmp_path, digits_dir, monkeypatch):
    monkeypatch.setattr(df, "TRAIN_STEPS", 3)  # the retraining path, not the full recipe
    path = tmp_path / "digits_cnn_v1.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(ValueError):
        df.load_params(str(path))
    params, meta = df.trained_params(str(tmp_path), digits_dir, verbose=False)
    assert meta["steps"] == 3
    loaded, _ = df.load_params(str(path))
    assert df.params_digest(loaded) == meta["params_hash"] == df.params_digest(params)
    np.savez(str(path), fc=np.zeros(3))
    with pytest.raises(ValueError, match="__meta__"):
        df.load_params(str(path))


def test_training_is_deterministic(digits_dir):
    x, y = df.load_digits_split("train", digits_dir)
    x, y = x[:256], y[:256]
    a = df.train_digits_classifier(x, y, steps=5, seed=0)
    b = df.train_digits_classifier(x, y, steps=5, seed=0)
    c = df.train_digits_classifier(x, y, steps=5, seed=1)
    assert df.params_digest(a) == df.params_digest(b) != df.params_digest(c)


def _torch_model(params):
    """The same network in PyTorch (NCHW), weights copied from the Flax parameters."""
    torch = require("torch")
    conv = lambda p: torch.nn.Conv2d(p["kernel"].shape[2], p["kernel"].shape[3], 3, padding=1)
    layers = {name: conv(params[name]) for name in ("conv1", "conv2", "conv3")}
    fc, head = torch.nn.Linear(1024, 64), torch.nn.Linear(64, 10)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.weight.copy_(torch.from_numpy(np.transpose(np.asarray(params[name]["kernel"]),
                                                             (3, 2, 0, 1)).copy()))
            layer.bias.copy_(torch.from_numpy(np.array(params[name]["bias"])))
        for name, layer in (("fc", fc), ("head", head)):
            layer.weight.copy_(torch.from_numpy(np.asarray(params[name]["kernel"]).T.copy()))
            layer.bias.copy_(torch.from_numpy(np.array(params[name]["bias"])))

    def forward(x_nhwc):
        x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
        if x.shape[-1] != 32:
            x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear",
                                                align_corners=False, antialias=True)
        x = torch.nn.functional.avg_pool2d(x, 2)
        x = torch.relu(layers["conv2"](torch.relu(layers["conv1"](x))))
        x = torch.nn.functional.max_pool2d(x, 2)
        x = torch.nn.functional.max_pool2d(torch.relu(layers["conv3"](x)), 2)
        pool = fc(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1))  # flax flattens NHWC
        return pool.numpy(), head(torch.relu(pool)).numpy()
    return forward


@pytest.mark.parametrize("size", [32, 64])
def test_forward_matches_pytorch(extractor, test_split, size):
    torch = require("torch")
    x = test_split[0][:16]
    if size != 32:
        x = np.asarray(jax.image.resize(x, (16, size, size, 3), "nearest"))
    with torch.no_grad():
        pool_ref, logits_ref = _torch_model(extractor.params)(x.astype(np.float32))
    out = extractor(extractor.params, jnp.asarray(x))
    scale = np.abs(pool_ref).max()
    err = np.abs(np.asarray(out["pool"]) - pool_ref).max() / scale
    print(f"{size}px: max error / max |pool| = {err:.2e}")
    assert err < 1e-5
    np.testing.assert_allclose(out["logits"], logits_ref, atol=1e-5 * np.abs(logits_ref).max())


def test_other_sizes_and_grey_images(extractor, test_split):
    x, y = test_split
    small = jax.image.resize(jnp.asarray(x), (len(x), 16, 16, 3), "linear", antialias=True)
    logits = extractor(extractor.params, small)["logits"]
    assert np.mean(np.argmax(np.asarray(logits), -1) == y) > 0.9  # upsampled back to 32
    grey = extractor(extractor.params, jnp.asarray(x[:8, :, :, :1]))["pool"]
    rgb = extractor(extractor.params, jnp.asarray(x[:8]))["pool"]
    np.testing.assert_allclose(grey, rgb, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        extractor(extractor.params, jnp.zeros((2, 32, 32, 4)))


def test_sharded_over_8_devices_equals_one_device(extractor, test_split):
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    x = test_split[0][:64]
    fn = jax.jit(extractor, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)))
    sharded = fn(extractor.params, jax.device_put(x, sharding.batch_sharding(mesh)))["pool"]
    single = extractor(extractor.params, jnp.asarray(x))["pool"]
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-5)

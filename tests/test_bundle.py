"""Inference bundles: write, read back exactly, sample from, refuse damaged or clashing folders."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import smoke_config
from ldm_jax.storage import bundle as bundle_lib
from ldm_jax import sample
from ldm_jax.inference import sampling
from ldm_jax.storage import first_stage
from ldm_jax.models import autoencoder as ae_models
from ldm_jax.tasks.diffusion import make_unet


def _configs():
    ae = smoke_config("autoencoder_kl_f4_digits.py")
    ldm = smoke_config("ldm_digits.py", "sampling.num_steps=3")
    ae.model.resolution = ae.data.image_size  # what training resolves (tasks/autoencoder.py)
    size = ae.model.resolution // ae_models.downsampling_factor(ae.model)
    channels = ae_models.latent_channels(ae.model)
    # What stage-2 training derives from the latents (tasks/diffusion.py:resolve_config).
    ldm.data.latent_shape = (size, size, channels)
    ldm.model.in_channels = ldm.model.out_channels = channels
    return ae, ldm


def _random_params(module, *args, **kwargs):
    params = module.init(jax.random.key(0), *args, **kwargs)["params"]
    # Non-zero everywhere (the zero-initialised output convs would hide a lost array).
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [np.asarray(0.05 * jax.random.normal(k, x.shape)) for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def parts():
    ae, ldm = _configs()
    ae_model = ae_models.make_first_stage(ae.model)
    res = ae.model.resolution
    ae_params = _random_params(ae_model, jnp.zeros((1, res, res, 3)))
    unet = make_unet(ldm.model)
    unet_params = _random_params(unet, jnp.zeros((1,) + tuple(ldm.data.latent_shape)),
                                 jnp.zeros((1,), jnp.int32), y=jnp.zeros((1,), jnp.int32))
    return ae, ldm, ae_params, unet_params


def _equal_trees(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_and_sampling(tmp_path, parts):
    ae, ldm, ae_params, unet_params = parts
    out = str(tmp_path / "bundle")
    bundle_lib.save_bundle(out, config=ldm, unet_params=unet_params, first_stage_config=ae,
                           first_stage_params=ae_params, scale_factor=0.25,
                           source={"test": True, "step": 7})
    assert bundle_lib.is_bundle(out) and not os.path.exists(out + ".partial")
    loaded = bundle_lib.load_bundle(out)
    _equal_trees(loaded.unet_params, unet_params)
    _equal_trees(loaded.first_stage.params, ae_params)
    assert loaded.scale_factor == 0.25 and loaded.source == {"test": True, "step": 7}
    assert loaded.config.model.channel_mult == tuple(ldm.model.channel_mult)
    assert loaded.first_stage.identity["params_hash"] == first_stage.params_hash(ae_params)

    # Decoding in the task goes through the bundled first stage, divided by the scale factor.
    _, task, _ = sampling.load_bundle_task(out)
    z = jax.random.normal(jax.random.key(3), (2,) + tuple(ldm.data.latent_shape))
    expected = jnp.clip(ae_models.make_first_stage(ae.model).apply(
        {"params": ae_params}, z / 0.25, method="decode"), -1, 1)
    np.testing.assert_allclose(task.decode(task.constants(), z), expected, rtol=1e-6, atol=1e-6)

    samples = str(tmp_path / "samples")
    assert sample.main([f"--workdir={out}", f"--out={samples}", "--num=4", "--labels=1,2"]) == 0
    data = np.load(os.path.join(samples, "samples.npz"))
    assert data["images"].shape == (4, ae.model.resolution, ae.model.resolution, 3)
    np.testing.assert_array_equal(data["labels"], [1, 2, 1, 2])
    with pytest.raises(ValueError, match="--no_ema"):
        sampling.load_params(out, use_ema=False)


def test_bundle_without_first_stage(tmp_path, parts):
    _, ldm, _, unet_params = parts
    out = str(tmp_path / "b")
    bundle_lib.save_bundle(out, config=ldm, unet_params=unet_params)
    loaded = bundle_lib.load_bundle(out)
    assert loaded.first_stage is None and loaded.scale_factor == 1.0
    _equal_trees(loaded.unet_params, unet_params)


def test_errors(tmp_path, parts):
    ae, ldm, ae_params, unet_params = parts
    out = str(tmp_path / "b")
    bundle_lib.save_bundle(out, config=ldm, unet_params=unet_params)
    with pytest.raises(bundle_lib.BundleError, match="already exists"):
        bundle_lib.save_bundle(out, config=ldm, unet_params=unet_params)
    bundle_lib.save_bundle(out, config=ldm, unet_params=unet_params, first_stage_config=ae,
                           first_stage_params=ae_params, overwrite=True)
    assert bundle_lib.load_bundle(out).first_stage is not None
    with pytest.raises(bundle_lib.BundleError, match="both"):
        bundle_lib.save_bundle(str(tmp_path / "c"), config=ldm, unet_params=unet_params,
                               first_stage_config=ae)
    with pytest.raises(bundle_lib.BundleError, match="stage-2"):
        bundle_lib.save_bundle(str(tmp_path / "c"), config=ae, unet_params=unet_params)
    with pytest.raises(bundle_lib.BundleError, match="scale_factor"):
        bundle_lib.save_bundle(str(tmp_path / "c"), config=ldm, unet_params=unet_params,
                               scale_factor=0.0)
    # A crashed export leaves only BUNDLE.partial: reading says so.
    os.makedirs(str(tmp_path / "d.partial"))
    with pytest.raises(bundle_lib.BundleError, match="did not finish"):
        bundle_lib.load_bundle(str(tmp_path / "d"))
    # Damaged parameters are a clear error, not a crash deep inside orbax.
    import shutil
    shutil.rmtree(os.path.join(out, "params"))
    with pytest.raises(bundle_lib.BundleError, match="unreadable"):
        bundle_lib.load_bundle(out)
    with open(os.path.join(out, "bundle.json")) as f:
        record = json.load(f)
    record["version"] = 99
    with open(os.path.join(out, "bundle.json"), "w") as f:
        json.dump(record, f)
    with pytest.raises(bundle_lib.BundleError, match="newer"):
        bundle_lib.load_bundle(out)


def test_save_first_stage_run_is_loadable(tmp_path, parts):
    ae, _, ae_params, _ = parts
    workdir = str(tmp_path / "ae")
    first_stage.save_first_stage_run(workdir, ae, ae_params)
    loaded = first_stage.load_first_stage(workdir)
    _equal_trees(loaded.params, ae_params)
    with pytest.raises(first_stage.FirstStageError, match="already holds"):
        first_stage.save_first_stage_run(workdir, ae, ae_params)

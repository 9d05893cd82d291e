"""Export: a tiny class-conditional stage-2 run trained on 8 fake CPU devices becomes a bundle;
`python -m ldm_jax.sample --workdir=BUNDLE` gives the same samples on 1 and on 8 devices, and
the same as sampling the run itself."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import QUIET_RUN, ROOT, TINY_FIRST_STAGE, smoke_config
from ldm_jax import export
from ldm_jax.storage import bundle
from ldm_jax.storage import run_dir
from ldm_jax.config import loading as config_lib
from ldm_jax.training.trainer import train_and_evaluate


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    assert jax.device_count() == 8
    workdir = str(tmp_path_factory.mktemp("export") / "run")
    c = smoke_config("ldm_digits.py", "total_steps=4", "checkpoint_every_steps=2", *QUIET_RUN,
                     "sampling.num_steps=4", "mesh.data=2", "mesh.fsdp=4",
                     "sharding.fsdp_min_size=256")
    train_and_evaluate(c, workdir)
    return workdir


def run_sample(workdir, out, devices, *extra):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "ldm_jax.sample", f"--workdir={workdir}", f"--out={out}",
           "--num=4", "--seed=0", "--steps=4", "--batch_size=8", *extra]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return np.load(os.path.join(out, "samples.npz"))


def test_export_then_sample_on_1_and_8_devices_gives_identical_samples(tmp_path, trained_run):
    out = str(tmp_path / "bundle")
    assert export.main([f"--workdir={trained_run}", f"--output={out}"]) == 0
    assert bundle.is_bundle(out) and not os.path.exists(out + ".partial")

    # The bundle holds the run's EMA weights bit for bit, its configs and scale factor.
    loaded = bundle.load_bundle(out)
    state, step = run_dir.restore_raw_state(trained_run)
    assert step == 4 and loaded.source["step"] == 4 and loaded.source["weights"] == "ema"
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state["ema_params"]),
                            jax.tree_util.tree_leaves(loaded.unet_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    with open(os.path.join(trained_run, "config.json")) as f:
        run_config = json.load(f)
    assert json.loads(json.dumps(config_lib.to_json_dict(loaded.config)))["model"] == run_config["model"]
    assert loaded.config.conditioning.kind == "class" and loaded.first_stage is None
    assert loaded.scale_factor == 1.0

    one = run_sample(out, str(tmp_path / "s1"), 1)
    eight = run_sample(out, str(tmp_path / "s8"), 8)
    from_run = run_sample(trained_run, str(tmp_path / "run8"), 8)
    assert one["images"].shape == (4, 8, 8, 3) and one["images"].dtype == np.uint8
    diff = np.abs(one["images"].astype(int) - eight["images"].astype(int)).max()
    print(f"bundle samples, 1 vs 8 devices: max |uint8 diff| = {diff}")
    np.testing.assert_array_equal(one["images"], eight["images"])
    np.testing.assert_array_equal(one["labels"], eight["labels"])
    np.testing.assert_array_equal(eight["images"], from_run["images"])
    assert one["images"].std() > 0  # not a constant image


def test_export_raw_weights_and_a_chosen_step(tmp_path, trained_run):
    out = str(tmp_path / "raw")
    assert export.main([f"--workdir={trained_run}", f"--output={out}", "--step=2", "--no_ema"]) == 0
    loaded = bundle.load_bundle(out)
    state, _ = run_dir.restore_raw_state(trained_run, 2)
    assert loaded.source["step"] == 2 and loaded.source["weights"] == "raw"
    for a, b in zip(jax.tree_util.tree_leaves(state["params"]["model"]),
                    jax.tree_util.tree_leaves(loaded.unet_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # An existing bundle is not overwritten unless asked.
    assert export.main([f"--workdir={trained_run}", f"--output={out}"]) == 2
    assert export.main([f"--workdir={trained_run}", f"--output={out}", "--overwrite"]) == 0
    assert bundle.load_bundle(out).source["weights"] == "ema"


def test_bad_inputs_are_clear_errors(tmp_path, trained_run, capsys):
    assert export.main([f"--workdir={tmp_path / 'nope'}", f"--output={tmp_path / 'b'}"]) == 2
    assert "no config.json" in capsys.readouterr().err
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    (stage1 / "config.json").write_text(json.dumps({"stage": "autoencoder"}))
    assert export.main([f"--workdir={stage1}", f"--output={tmp_path / 'b'}"]) == 2
    assert "export needs a diffusion (stage 2) run" in capsys.readouterr().err
    assert export.main([f"--workdir={trained_run}", f"--output={tmp_path / 'b'}", "--step=3"]) == 2
    assert "--step=3" in capsys.readouterr().err  # and it names the steps there are
    assert not os.path.exists(tmp_path / "b")


@pytest.mark.slow
def test_export_of_a_run_on_real_latents_carries_the_first_stage(tmp_path, digits_dir):
    """Autoencoder run -> precomputed KL latents -> stage-2 run -> bundle: the bundle holds the
    first stage bit for bit and the scale factor, and samples decode through it identically on
    1 and 8 devices."""
    from ldm_jax.data.precompute import precompute
    from ldm_jax.storage.first_stage import load_first_stage
    data_dir = digits_dir
    fs_dir, latents_dir, run = (str(tmp_path / n) for n in ("fs", "latents", "ldm"))
    ae = smoke_config("autoencoder_kl_f4_digits.py", *TINY_FIRST_STAGE, f"data.data_dir={data_dir}",
                      "batch_size=8", "total_steps=2", "checkpoint_every_steps=2", *QUIET_RUN,
                      "loss.disc_start=100")
    train_and_evaluate(ae, fs_dir)
    c = smoke_config(
        "ldm_digits.py",
        "source_data.image_size=16", f"source_data.data_dir={data_dir}", "source_data.num_threads=0",
        f"data.latents_dir={latents_dir}", "data.eval_split=train", "data.latent_shape=8,8,3",
        "batch_size=8", "total_steps=2", "checkpoint_every_steps=2", *QUIET_RUN,
        "sampling.num_steps=4", "model.num_res_blocks=1", variant=None)
    meta = precompute(c, fs_dir, latents_dir, splits=["train"])
    train_and_evaluate(c, run)

    out = str(tmp_path / "bundle")
    assert export.main([f"--workdir={run}", f"--output={out}"]) == 0
    loaded = bundle.load_bundle(out)
    first_stage = load_first_stage(fs_dir)
    assert loaded.first_stage is not None and loaded.first_stage.kind == "kl"
    assert loaded.scale_factor == pytest.approx(meta["scale_factor"], rel=1e-7)
    assert loaded.source["first_stage"]["params_hash"] == first_stage.identity["params_hash"]
    for a, b in zip(jax.tree_util.tree_leaves(first_stage.params),
                    jax.tree_util.tree_leaves(loaded.first_stage.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    one = run_sample(out, str(tmp_path / "s1"), 1)
    eight = run_sample(out, str(tmp_path / "s8"), 8)
    from_run = run_sample(run, str(tmp_path / "r8"), 8)
    assert one["images"].shape == (4, 16, 16, 3)  # decoded to image size, not latents
    np.testing.assert_array_equal(one["images"], eight["images"])
    np.testing.assert_array_equal(eight["images"], from_run["images"])

"""End-to-end first-stage training on 8 fake CPU devices: loss falls, resume is exact, errors
are clear."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, TINY_FIRST_STAGE, config_path, read_metrics, smoke_config
from ldm_jax.parallel import sharding
from ldm_jax.training.checkpointing import CheckpointError
from ldm_jax.training.trainer import train_and_evaluate


def tiny_config(kind="kl", **overrides):
    """A smoke config shrunk further so each test compiles in seconds."""
    name = "autoencoder_kl_f4.py" if kind == "kl" else "autoencoder_vq_f4.py"
    return smoke_config(
        name, *TINY_FIRST_STAGE, "batch_size=8",
        "total_steps=12", "log_every_steps=2", "checkpoint_every_steps=6", "eval_every_steps=12",
        "image_every_steps=12", "eval_num_examples=16", "async_checkpointing=false",
        "optimizer.base_learning_rate=0.0002", "loss.disc_start=8", "loss.disc_ndf=8",
        "loss.disc_num_layers=2", **overrides)


def restore_params(workdir, step):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "meta")) as m:
        return m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_smoke_training_on_8_devices_loss_falls_and_writes_outputs(tmp_path, kind):
    assert jax.device_count() == 8
    workdir = str(tmp_path / kind)
    result = train_and_evaluate(tiny_config(kind, total_steps=16, checkpoint_every_steps=8,
                                            eval_every_steps=16, image_every_steps=16), workdir)
    rows = [r for r in read_metrics(workdir) if "rec_loss" in r]
    assert rows[-1]["rec_loss"] < 0.8 * rows[0]["rec_loss"], rows
    assert any("d_loss" in r for r in rows), "discriminator phase never ran"
    assert result["eval_psnr"] > 5.0 and 0.0 < result["eval_ssim"] <= 1.0
    if kind == "vq":
        assert 0.0 < result["eval_code_usage"] <= 1.0
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["16", "8"]
    assert any(name.endswith(".png") for name in os.listdir(os.path.join(workdir, "images")))
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    train_and_evaluate(tiny_config(), full)
    # Stop at step 6 (before the discriminator starts at 8), then resume to 12 in the same dir.
    train_and_evaluate(tiny_config(total_steps=6), split)
    assert os.listdir(os.path.join(split, "checkpoints")) == ["6"]
    train_and_evaluate(tiny_config(), split)
    a, b = restore_params(full, 12), restore_params(split, 12)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    # The logged losses after the resume point match too.
    la = {r["step"]: r["loss"] for r in read_metrics(full) if "loss" in r}
    lb = {r["step"]: r["loss"] for r in read_metrics(split) if "loss" in r}
    for step in (8, 10, 12):
        np.testing.assert_allclose(la[step], lb[step], rtol=1e-6)


def test_rerun_of_a_finished_run_resumes_instead_of_starting_over(tmp_path):
    workdir = str(tmp_path / "w")
    train_and_evaluate(tiny_config(total_steps=4, checkpoint_every_steps=4), workdir)
    n = len(read_metrics(workdir))
    result = train_and_evaluate(tiny_config(total_steps=4, checkpoint_every_steps=4), workdir)
    assert result["step"] == 4 and len(read_metrics(workdir)) == n  # nothing retrained


def test_resume_with_a_different_model_is_a_clear_error(tmp_path):
    workdir = str(tmp_path / "w")
    train_and_evaluate(tiny_config(total_steps=2, checkpoint_every_steps=2), workdir)
    with pytest.raises(CheckpointError, match=r"different config.model") as error:
        train_and_evaluate(tiny_config(total_steps=4, **{"model.ch": 64}), workdir)
    # The message names the field that changed, not two whole config dumps.
    assert f"config.model.ch: saved {tiny_config().model.ch}, now 64" in str(error.value)
    assert "num_res_blocks" not in str(error.value)
    with open(os.path.join(workdir, "config.json")) as f:  # the run's config is left intact
        assert json.load(f)["model"]["ch"] == tiny_config().model.ch


def test_corrupt_checkpoint_is_a_clear_error_not_a_fresh_start(tmp_path):
    workdir = str(tmp_path / "w")
    train_and_evaluate(tiny_config(total_steps=2, checkpoint_every_steps=2), workdir)
    state_dir = os.path.join(workdir, "checkpoints", "2", "state")
    for root, _, files in os.walk(state_dir):
        for name in files:
            if not name.startswith("_"):
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")
    with pytest.raises(CheckpointError, match=r"checkpoints/2"):
        train_and_evaluate(tiny_config(total_steps=4), workdir)


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(sharding.MeshError, match=r"batch_size=12 does not divide over the 8 devices"):
        train_and_evaluate(tiny_config(batch_size=12), str(tmp_path / "a"))
    with pytest.raises(Exception, match=r"data.folder"):
        train_and_evaluate(tiny_config(**{"data.source": "folder", "data.folder": str(tmp_path / "nope")}),
                           str(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"loss.lpips_weights.*vgg16-397923af.pth"):
        train_and_evaluate(tiny_config(**{"loss.perceptual_weight": 1.0}), str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"model.resolution=16 differs from config.data.image_size=32"):
        train_and_evaluate(tiny_config(**{"data.image_size": 32}), str(tmp_path / "d"))


def test_training_with_lpips_weights_the_test_makes(tmp_path):
    """Perceptual loss in the step and LPIPS in the evaluation, from a combined weight file."""
    from ldm_jax.models import lpips
    params = lpips.LPIPS().init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32),
                                np.zeros((1, 16, 16, 3), np.float32))["params"]
    # Shipped lin heads are non-negative; keep that property for a meaningful distance.
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: np.abs(v) if "lin" in str(p) else v, params)
    weights = str(tmp_path / "lpips.npz")
    lpips.save_lpips_params_npz(params, weights)
    workdir = str(tmp_path / "w")
    result = train_and_evaluate(tiny_config(total_steps=4, checkpoint_every_steps=4, eval_every_steps=4,
                                            **{"loss.perceptual_weight": 1.0, "loss.lpips_weights": weights,
                                               "loss.disc_start": 2}), workdir)
    assert np.isfinite(result["loss"]) and result["eval_lpips"] > 0.0


def test_nan_stops_with_a_clear_error_naming_the_last_good_checkpoint(tmp_path):
    from ldm_jax.training.trainer import NonFiniteError
    workdir = str(tmp_path / "w")
    train_and_evaluate(tiny_config(total_steps=2, checkpoint_every_steps=2), workdir)
    # An absurd learning rate from step 2 on blows the parameters up to Inf/NaN.
    with pytest.raises(NonFiniteError, match=r"NaN/Inf by step \d+.*last good checkpoint is .*checkpoints/2"):
        train_and_evaluate(tiny_config(total_steps=12, **{"optimizer.base_learning_rate": 1e30}), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]


TINY_ARGS = ["--config.model.ch_mult=1,2", "--config.model.resolution=16", "--config.data.image_size=16",
             "--config.batch_size=8", "--config.log_every_steps=1", "--config.eval_every_steps=0",
             "--config.image_every_steps=0", "--config.async_checkpointing=false",
             "--config.loss.disc_start=1000", "--config.loss.disc_ndf=8", "--config.loss.disc_num_layers=2",
             "--config.optimizer.base_learning_rate=0.0002"]


def _run_cli(workdir, devices, extra, **popen):
    import subprocess
    import sys
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "ldm_jax.train",
           f"--config={config_path('autoencoder_kl_f4.py', 'smoke')}",
           f"--workdir={workdir}"] + TINY_ARGS + extra
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


@pytest.mark.slow
def test_sigterm_saves_and_a_run_resumes_on_a_different_device_count(tmp_path):
    """Train on 4 devices, SIGTERM mid-run (a checkpoint at the current step), resume on 8."""
    import signal
    import time
    workdir = str(tmp_path / "w")
    proc = _run_cli(workdir, 4, ["--config.total_steps=400", "--config.checkpoint_every_steps=1000"])
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(metrics) and len(read_metrics(workdir)) >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM: saved checkpoint at step" in out
    saved_steps = os.listdir(os.path.join(workdir, "checkpoints"))
    assert len(saved_steps) == 1, (saved_steps, out)
    saved = int(saved_steps[0])
    assert 3 <= saved < 400
    # Resume in this process (8 devices) and go on to a few more steps.
    result = train_and_evaluate(tiny_config(total_steps=saved + 2, checkpoint_every_steps=1000,
                                            eval_every_steps=0, image_every_steps=0,
                                            **{"loss.disc_start": 1000, "log_every_steps": 1}), workdir)
    assert result["step"] == saved + 2
    steps = [r["step"] for r in read_metrics(workdir)]
    assert steps == sorted(steps) and steps[-1] == saved + 2

"""`python -m ldm_jax.evaluate` on 8 fake CPU devices, with the digits feature network: a tiny
stage-1 run (KL, 16 px, f2), its latents, a tiny class-conditional stage-2 run on them, and the
reports of both; the sharded feature path against a direct single-device call; the errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import QUIET_RUN, ROOT, smoke_config
from ldm_jax import evaluate
from ldm_jax.data.precompute import precompute
from ldm_jax.evaluation import runner as eval_runner
from ldm_jax.config import defaults as config_defaults
from ldm_jax.parallel import sharding
from ldm_jax.data import pipeline
from ldm_jax.evaluation import digits_features, statistics
from ldm_jax.training.trainer import train_and_evaluate

SIZE = 16


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, digits_dir):
    """A fresh cache holding the trained digits network (trained once for the module)."""
    path = str(tmp_path_factory.mktemp("cache"))
    digits_features.load_digits_extractor(path, digits_dir)
    return path


@pytest.fixture(scope="module")
def extractor(cache_dir):
    return digits_features.load_digits_extractor(cache_dir)


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory, digits_dir):
    """A KL autoencoder (ch_mult 1,2 at 16 px: 8x8x3 latents) trained just enough for PSNR > 10."""
    workdir = str(tmp_path_factory.mktemp("ae") / "run")
    c = smoke_config(
        "autoencoder_kl_f4_digits.py",
        "model.ch_mult=1,2", f"model.resolution={SIZE}", f"data.image_size={SIZE}",
        f"data.data_dir={digits_dir}", "batch_size=16", "total_steps=40", "log_every_steps=40",
        "checkpoint_every_steps=40", *QUIET_RUN, "loss.disc_start=1000",
        "optimizer.base_learning_rate=0.0002", "optimizer.warmup_steps=0")
    train_and_evaluate(c, workdir)
    return workdir


@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory, digits_dir, ae_run):
    """A class-conditional stage-2 run on the autoencoder's precomputed latents (4 steps)."""
    base = tmp_path_factory.mktemp("ldm")
    latents_dir = str(base / "latents")
    c = smoke_config(
        "ldm_digits.py",
        "data.source=latents", f"data.latents_dir={latents_dir}", "data.latent_shape=8,8,3",
        f"source_data.image_size={SIZE}", f"source_data.data_dir={digits_dir}",
        "source_data.num_threads=0", "latents.scale_num_examples=256", "batch_size=16",
        "total_steps=4", "checkpoint_every_steps=4", *QUIET_RUN)
    precompute(c, ae_run, latents_dir)
    workdir = str(base / "run")
    train_and_evaluate(c, workdir)
    return workdir


def read_report(workdir, step):
    with open(os.path.join(workdir, "eval", f"{step}.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def ae_report(ae_run, cache_dir):
    """The command's report on 100 held-out images (2 global batches of 64, the last padded)."""
    assert evaluate.main([f"--workdir={ae_run}", "--features=digits", f"--cache_dir={cache_dir}",
                          "--num_samples=100"]) == 0
    return read_report(ae_run, 40)


def test_autoencoder_report(ae_report):
    report = ae_report
    assert report["stage"] == "autoencoder" and report["step"] == 40
    assert report["features"] == "digits_cnn_v1" and report["num_samples"] == 100
    m = report["metrics"]
    assert set(m) == {"psnr", "ssim", "rfid"}, m  # no LPIPS: the run's lpips_weights is unset
    assert np.isfinite(m["psnr"]) and m["psnr"] > 10.0, m
    assert 0.0 < m["ssim"] <= 1.0 and m["rfid"] >= 0.0, m
    assert report["time_s"] > 0


def direct_reconstructions(workdir, num):
    """(originals, reconstructions) of the first `num` held-out images on one device, through
    the training task's own reconstruct (posterior mode)."""
    from ldm_jax.storage.first_stage import load_first_stage
    from ldm_jax.tasks.autoencoder import AutoencoderTask
    fs = load_first_stage(workdir)
    task = AutoencoderTask(fs.config)
    data_cfg = ml_collections.ConfigDict(fs.config.data.to_dict())
    it = pipeline.make_eval_iterator(data_cfg, global_batch_size=num, num_examples=num,
                                     process_index=0, process_count=1)
    x = next(iter(it))["image"]
    recon = np.clip(np.asarray(task.reconstruct({"generator": {"model": fs.params}},
                                                jnp.asarray(x))["recon"]), -1, 1)
    return x, recon


def test_autoencoder_metrics_match_a_direct_computation(ae_run, ae_report, extractor):
    """PSNR / rFID of the sharded command equal a direct single-device recomputation with
    numpy metrics."""
    report = ae_report
    x, recon = direct_reconstructions(ae_run, 100)
    mse = np.mean(((x.astype(np.float64) - recon) / 2) ** 2, axis=(1, 2, 3))
    psnr = np.mean(-10 * np.log10(mse))
    np.testing.assert_allclose(report["metrics"]["psnr"], psnr, rtol=1e-4)
    f_real = np.asarray(extractor(extractor.params, jnp.asarray(x))["pool"], np.float64)
    f_rec = np.asarray(extractor(extractor.params, jnp.asarray(recon))["pool"], np.float64)
    fid = statistics.frechet_distance(f_real.mean(0), np.cov(f_real, rowvar=False),
                                      f_rec.mean(0), np.cov(f_rec, rowvar=False))
    np.testing.assert_allclose(report["metrics"]["rfid"], fid, rtol=1e-3, atol=1e-4)


def test_lpips_when_the_run_names_lpips_weights(ae_run, cache_dir, tmp_path):
    """A copy of the run whose config names (randomly initialised) LPIPS weights reports LPIPS,
    equal to a direct LPIPS call on the same reconstructions."""
    from ldm_jax.models import lpips
    params = lpips.LPIPS().init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)),
                                jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    weights = str(tmp_path / "lpips.npz")
    lpips.save_lpips_params_npz(params, weights)
    run = str(tmp_path / "run")
    shutil.copytree(ae_run, run, ignore=shutil.ignore_patterns("eval"))
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    config["loss"]["lpips_weights"] = weights
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(config, f)
    assert evaluate.main([f"--workdir={run}", "--features=digits", f"--cache_dir={cache_dir}",
                          "--num_samples=24"]) == 0
    m = read_report(run, 40)["metrics"]
    x, recon = direct_reconstructions(run, 24)
    direct = np.asarray(jax.jit(lpips.make_lpips_fn(lpips.load_lpips_params(weights)))(x, recon))
    assert direct.min() > 0
    np.testing.assert_allclose(m["lpips"], direct.mean(), rtol=1e-4)
    config["loss"]["lpips_weights"] = str(tmp_path / "missing.npz")
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(config, f)
    assert evaluate.main([f"--workdir={run}", "--features=digits",
                          f"--cache_dir={cache_dir}"]) == 2


def test_diffusion_report_and_reference_cache(ldm_run, cache_dir):
    args = [f"--workdir={ldm_run}", "--features=digits", f"--cache_dir={cache_dir}",
            "--num_samples=40", "--sampler=ddim", "--steps=3", "--guidance_scale=1.5"]
    assert evaluate.main(args) == 0
    report = read_report(ldm_run, 4)
    assert report["stage"] == "diffusion" and report["num_samples"] == 40
    m = report["metrics"]
    assert m["fid"] >= 0.0 and np.isfinite(m["fid"])
    assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0
    assert 1.0 <= m["inception_score"] <= 10.0 + 1e-6
    assert 0.0 <= m["class_accuracy"] <= 1.0
    assert m["num_reference"] == 299 and report["reference"]["num_precision_recall"] == 40
    assert report["sampler"] == {"name": "ddim", "steps": 3, "eta": 0.0, "guidance_scale": 1.5,
                                 "ema": True, "seed": 0, "batch_size": 40}
    eval_dir = os.path.join(ldm_run, "eval")
    cached = sorted(f for f in os.listdir(eval_dir) if f.startswith("reference_"))
    assert cached == ["reference_digits_cnn_v1_test.npz",
                      "reference_digits_cnn_v1_test_features.npz"]
    mtimes = [os.stat(os.path.join(eval_dir, f)).st_mtime_ns for f in cached]
    # A second evaluation reuses the cached reference and, same seed, gives the same numbers.
    assert evaluate.main(args) == 0
    assert [os.stat(os.path.join(eval_dir, f)).st_mtime_ns for f in cached] == mtimes
    again = read_report(ldm_run, 4)["metrics"]
    for key in ("fid", "precision", "recall", "inception_score", "class_accuracy"):
        np.testing.assert_allclose(again[key], m[key], rtol=1e-6, err_msg=key)


def test_sharded_reference_features_equal_a_direct_call(extractor, digits_dir):
    """Held-out moments through the 8-device path equal np.mean / np.cov of features computed
    on one device; FID of the held-out split against itself is ~0."""
    data_cfg = config_defaults.data_config(source="digits", data_dir=digits_dir, image_size=SIZE,
                                           num_threads=0)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    moments, kept = eval_runner.reference_statistics(extractor, data_cfg, mesh=mesh, batch_size=64,
                                                  keep=50, cache_prefix=None)
    it = pipeline.make_eval_iterator(data_cfg, global_batch_size=512, process_index=0,
                                     process_count=1)
    x = next(iter(it))
    x = x["image"][x["mask"]]
    direct = np.asarray(extractor(extractor.params, jnp.asarray(x))["pool"], np.float64)
    assert moments.count == len(direct) == 299
    np.testing.assert_allclose(moments.mean, direct.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(moments.covariance, np.cov(direct, rowvar=False), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(kept, direct[:50], rtol=1e-5, atol=1e-6)
    assert abs(statistics.frechet_distance(moments.mean, moments.covariance, direct.mean(0),
                                           np.cov(direct, rowvar=False))) < 1e-3
    # The two halves of the held-out split are close but not identical.
    a, b = direct[::2], direct[1::2]
    half = statistics.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0),
                                       np.cov(b, rowvar=False))
    assert half > 1e-3


def test_missing_inception_weights_is_a_one_line_error(ae_run, tmp_path, capsys):
    assert evaluate.main([f"--workdir={ae_run}", f"--cache_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "pt_inception-2015-12-05-6726825d.pth" in err and "--features=digits" in err
    missing = str(tmp_path / "nope.pth")
    assert evaluate.main([f"--workdir={ae_run}", f"--inception_weights={missing}"]) == 2
    err = capsys.readouterr().err
    assert missing in err and "--features=digits" in err


def test_not_a_run_is_a_clear_error(tmp_path, capsys):
    assert evaluate.main([f"--workdir={tmp_path}", "--features=digits"]) == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_give_the_same_report_as_one(ldm_run, cache_dir, tmp_path):
    """2 processes x 2 devices (launch/local_cluster.py, gloo) on a copy of the run without
    cached reference statistics == this process's 8 devices; only process 0 prints/writes."""
    import subprocess
    import sys
    flags = ["--features=digits", f"--cache_dir={cache_dir}", "--num_samples=24",
             "--batch_size=8", "--steps=2", "--seed=5"]
    assert evaluate.main([f"--workdir={ldm_run}", *flags]) == 0
    one = read_report(ldm_run, 4)
    copy = str(tmp_path / "run")
    shutil.copytree(ldm_run, copy, ignore=shutil.ignore_patterns("eval"))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "local_cluster.py"), "--num_processes",
         "2", "--devices_per_process", "2", "--", sys.executable, "-m", "ldm_jax.evaluate",
         f"--workdir={copy}", *flags], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "[p0] Wrote" in proc.stdout and "[p1] Wrote" not in proc.stdout
    two = read_report(copy, 4)
    assert two["num_samples"] == one["num_samples"] == 24
    for key, value in one["metrics"].items():
        # Other partitionings may move the decoded pixels by float rounding (and so, rarely,
        # a uint8 level); the statistics stay within a fraction of a percent.
        np.testing.assert_allclose(two["metrics"][key], value, rtol=5e-3, atol=1e-6,
                                   err_msg=key)
    assert sorted(os.listdir(os.path.join(copy, "eval"))) == [
        "4.json", "reference_digits_cnn_v1_test.npz", "reference_digits_cnn_v1_test_features.npz"]

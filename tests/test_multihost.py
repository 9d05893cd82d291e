"""Two processes x two CPU devices through launch/local_cluster.py == one process x four devices.

A stage-2 smoke run (configs/ldm_digits.py:smoke, synthetic latents) is trained for 8 steps as
2 processes x 2 devices (gloo collectives between the processes) and as 1 process x 4 devices
with the same flags. Checked: the logged losses agree to 1e-5; only process 0 wrote files outside
the (collective) checkpoints; the 2-process checkpoint resumes in a 1-process run and continues
with the same losses; `ldm_jax.sample` as 2 processes writes the same samples.npz as 1 process.
Each process runs under an audit hook (sys.addaudithook) that logs every file it opens for
writing or renames, which is how "only process 0 wrote" is observed.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT

STEPS = 8
TRAIN_FLAGS = ["--config=configs/ldm_digits.py:smoke", f"--config.total_steps={STEPS}",
               "--config.log_every_steps=1", "--config.checkpoint_every_steps=3",
               f"--config.image_every_steps={STEPS}", f"--config.eval_every_steps={STEPS}",
               "--config.keep_checkpoints=5"]
SAMPLE_FLAGS = ["--num=6", "--steps=3", "--seed=3"]
# Timings differ between runs by nature; every other logged scalar must match.
TIMING_KEYS = {"step", "steps_per_sec", "images_per_sec"}

AUDIT = """
import os, runpy, sys
_log = os.open(os.path.join(os.environ["AUDIT_DIR"],
                            "p" + os.environ.get("LDM_JAX_PROCESS_ID", "0") + ".log"),
               os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (any(c in mode for c in "wax+") if isinstance(mode, str)
                   else isinstance(flags, int) and bool(flags & _WRITE))
        if writing and isinstance(path, (str, bytes)):
            os.write(_log, ("write " + os.path.abspath(os.fsdecode(path)) + "\\n").encode())
    elif event == "os.rename" and isinstance(args[1], (str, bytes)):
        os.write(_log, ("write " + os.path.abspath(os.fsdecode(args[1])) + "\\n").encode())

sys.addaudithook(_hook)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _run(args, *, processes, devices, audit_dir, timeout=600):
    """Runs `python AUDIT MODULE ARGS` as `processes` x `devices`; returns the output."""
    os.makedirs(audit_dir, exist_ok=True)
    wrapper = os.path.join(audit_dir, "audit_run.py")
    with open(wrapper, "w") as f:
        f.write(AUDIT)
    env = dict(os.environ, AUDIT_DIR=audit_dir, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, wrapper, *args]
    if processes > 1:
        command = [sys.executable, os.path.join(ROOT, "launch", "local_cluster.py"),
                   "--num_processes", str(processes), "--devices_per_process", str(devices),
                   "--", *command]
    else:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        for k in ("LDM_JAX_COORDINATOR", "LDM_JAX_NUM_PROCESSES", "LDM_JAX_PROCESS_ID"):
            env.pop(k, None)
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{command} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def _written(audit_dir, process, under):
    path = os.path.join(audit_dir, f"p{process}.log")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        paths = [line.split(" ", 1)[1].strip() for line in f]
    return sorted({p for p in paths if p.startswith(os.path.abspath(under) + os.sep)})


def _losses(workdir):
    """{step: {key: value}} of the train records (eval records kept apart under 'eval')."""
    records = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            kind = "eval" if any(k.startswith("eval_") for k in r) else "train"
            records.setdefault(kind, {})[r["step"]] = {k: v for k, v in r.items()
                                                       if k not in TIMING_KEYS}
    return records


def _assert_close(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=f"{what}: {k}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    one, two = str(base / "run_1x4"), str(base / "run_2x2")
    out_two = _run(["ldm_jax.train", f"--workdir={two}", *TRAIN_FLAGS], processes=2, devices=2,
                   audit_dir=str(base / "audit_train2"))
    _run(["ldm_jax.train", f"--workdir={one}", *TRAIN_FLAGS], processes=1, devices=4,
         audit_dir=str(base / "audit_train1"))
    return base, one, two, out_two


@pytest.mark.slow
def test_two_processes_match_one_process(runs):
    base, one, two, out_two = runs
    assert "4 devices, 2 process(es)" in out_two
    ref, got = _losses(one), _losses(two)
    assert sorted(ref["train"]) == list(range(1, STEPS + 1))
    assert ref["train"].keys() == got["train"].keys()
    for step in ref["train"]:
        _assert_close(ref["train"][step], got["train"][step], f"train step {step}")
    _assert_close(ref["eval"][STEPS], got["eval"][STEPS], "eval")
    diffs = [abs(ref["train"][s]["loss"] - got["train"][s]["loss"]) / abs(ref["train"][s]["loss"])
             for s in ref["train"]]
    print(f"max relative loss difference 2x2 vs 1x4 over {STEPS} steps: {max(diffs):.2e}")


@pytest.mark.slow
def test_only_process_zero_writes_outside_checkpoints(runs):
    base, one, two, _ = runs
    audit = str(base / "audit_train2")
    checkpoints = os.path.join(two, "checkpoints") + os.sep
    p0 = [p for p in _written(audit, 0, two) if not p.startswith(checkpoints)]
    p1 = [p for p in _written(audit, 1, two) if not p.startswith(checkpoints)]
    assert p1 == [], f"process 1 wrote {p1}"
    names = {os.path.relpath(p, two).split(os.sep)[0] for p in p0}
    assert {"metrics.jsonl", "config.json", "images", "tensorboard"} <= names, p0
    assert any(p.endswith(f"_{STEPS:08d}.png") for p in p0)
    # Checkpoints are collective: both processes took part in writing them.
    assert os.path.isdir(os.path.join(two, "checkpoints", str(STEPS)))
    with open(os.path.join(two, "metrics.jsonl")) as f:
        assert len(f.readlines()) == STEPS + 1  # one writer: no duplicated records.


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process(runs):
    base, one, two, _ = runs
    resumed = str(base / "run_2x2_resumed")
    shutil.copytree(two, resumed)
    # Drop the final checkpoint: the 1-process run resumes at step 6 and redoes steps 7 and 8.
    shutil.rmtree(os.path.join(resumed, "checkpoints", str(STEPS)))
    os.remove(os.path.join(resumed, "metrics.jsonl"))
    out = _run(["ldm_jax.train", f"--workdir={resumed}", *TRAIN_FLAGS], processes=1, devices=4,
               audit_dir=str(base / "audit_resume"))
    assert "Resuming from" in out and "(step 6)" in out
    ref, got = _losses(one), _losses(resumed)
    assert sorted(got["train"]) == [7, 8]
    for step in (7, 8):
        _assert_close(ref["train"][step], got["train"][step], f"resumed step {step}")


@pytest.mark.slow
def test_two_process_sampling_matches_one_process(runs):
    base, one, two, _ = runs
    out2, out1 = str(base / "samples_2x2"), str(base / "samples_1x4")
    _run(["ldm_jax.sample", f"--workdir={two}", f"--out={out2}", *SAMPLE_FLAGS], processes=2,
         devices=2, audit_dir=str(base / "audit_sample2"))
    _run(["ldm_jax.sample", f"--workdir={two}", f"--out={out1}", *SAMPLE_FLAGS], processes=1,
         devices=4, audit_dir=str(base / "audit_sample1"))
    a, b = np.load(os.path.join(out1, "samples.npz")), np.load(os.path.join(out2, "samples.npz"))
    assert a["images"].shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert _written(str(base / "audit_sample2"), 1, out2) == []
    assert os.path.join(out2, "samples.npz") in _written(str(base / "audit_sample2"), 0, out2)


def test_audit_hook_sees_writes(tmp_path):
    """The write audit itself can fail: a module that writes a file is reported."""
    (tmp_path / "writer_mod.py").write_text(textwrap.dedent("""
        import sys
        open(sys.argv[1], "w").write("x")
    """))
    audit = str(tmp_path / "audit")
    os.makedirs(audit)
    with open(os.path.join(audit, "audit_run.py"), "w") as f:
        f.write(AUDIT)
    target = str(tmp_path / "out" / "f.txt")
    os.makedirs(os.path.dirname(target))
    subprocess.run([sys.executable, os.path.join(audit, "audit_run.py"), "writer_mod", target],
                   cwd=tmp_path, env=dict(os.environ, AUDIT_DIR=audit, PYTHONPATH=str(tmp_path)),
                   check=True)
    assert _written(audit, 0, str(tmp_path / "out")) == [target]


def _tree_hashes(root):
    """{relative path: sha256} of the files of a latents data set (progress markers aside)."""
    import hashlib
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if not rel.startswith("progress"):
                with open(path, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.mark.slow
def test_two_process_precompute_latents_is_byte_identical(tmp_path, digits_dir):
    """precompute_latents as 2 processes x 2 devices writes the same files as 1 x 4."""
    import test_precompute_latents as tp  # its tiny first stage and stage-2 config file
    data_dir = digits_dir
    fs = tp._train_first_stage("kl", str(tmp_path / "fs_kl"), data_dir)
    config = tmp_path / "stage2.py"
    config.write_text(tp.CONFIG_FILE.format(data_dir=data_dir))
    args = ["ldm_jax.precompute_latents", f"--config={config}", f"--first_stage={fs}",
            "--batch_size=64", "--examples_per_shard=256"]
    out2, out1 = str(tmp_path / "latents_2x2"), str(tmp_path / "latents_1x4")
    _run(args + [f"--output={out2}"], processes=2, devices=2, audit_dir=str(tmp_path / "a2"))
    _run(args + [f"--output={out1}"], processes=1, devices=4, audit_dir=str(tmp_path / "a1"))
    h1, h2 = _tree_hashes(out1), _tree_hashes(out2)
    assert len([p for p in h1 if ".array_record-" in p]) == 8  # 6 train + 2 test shards
    assert h1 == h2

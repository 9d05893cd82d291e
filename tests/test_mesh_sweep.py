"""launch/mesh_sweep.py on fake CPU devices: one fresh process per mesh writes a CSV row each
(timings, efficiency vs the 1-device row) and a PNG; a failing mesh is a row, not a crash."""

import csv
import os
import subprocess
import sys

from conftest import ROOT, config_path

SWEEP = os.path.join(ROOT, "launch", "mesh_sweep.py")
CONFIG = config_path("ldm_digits.py", "smoke")


def load_sweep_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("mesh_sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sweep(out, meshes, *extra):
    cmd = [sys.executable, SWEEP, f"--config={CONFIG}", f"--meshes={meshes}", "--steps=3",
           "--warmup=1", "--per_device_batch=2", f"--out={out}", "--timeout=300", *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    with open(os.path.join(out, "mesh_sweep.csv")) as f:
        rows = list(csv.DictReader(f))
    return done, rows


def test_sweep_writes_csv_and_png(tmp_path):
    out = str(tmp_path / "sweep")
    done, rows = sweep(out, "1x1,2x2", "--", "--config.sampling.num_steps=4")
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(rows[0].keys()) == list(load_sweep_module().COLUMNS)
    assert [r["mesh"] for r in rows] == ["1x1", "2x2"]
    for r, n in zip(rows, (1, 4)):
        assert r["status"] == "ok" and r["error"] == "", r
        assert r["platform"] == "cpu" and int(r["devices"]) == n
        assert int(r["global_batch"]) == 2 * n and int(r["per_device_batch"]) == 2  # weak scaling
        assert float(r["compile_s"]) > 0 and float(r["step_time_median_s"]) > 0
        assert abs(float(r["images_per_s"]) - 2 * n / float(r["step_time_median_s"])) < 1e-6 * float(r["images_per_s"])
        assert abs(float(r["images_per_s_per_device"]) * n - float(r["images_per_s"])) < 1e-6 * float(r["images_per_s"])
        assert r["peak_memory_per_device_bytes"] == ""  # CPU reports no memory stats
    assert float(rows[0]["scaling_efficiency"]) == 1.0
    eff = float(rows[1]["images_per_s_per_device"]) / float(rows[0]["images_per_s_per_device"])
    assert abs(float(rows[1]["scaling_efficiency"]) - eff) < 1e-9
    png = os.path.join(out, "mesh_sweep.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 10_000
    assert "| 2x2 | 4 |" in done.stdout  # the Markdown table


def test_a_failing_mesh_is_a_row_with_its_error(tmp_path):
    out = str(tmp_path / "bad")
    done, rows = sweep(out, "1x1,2x1", "--", "--config.model.num_classes=1")
    assert done.returncode == 1  # no mesh succeeded
    assert [r["status"] for r in rows] == ["error", "error"]
    assert all("config.model.num_classes" in r["error"] for r in rows), rows
    assert rows[0]["scaling_efficiency"] == ""
    assert os.path.exists(os.path.join(out, "mesh_sweep.png"))
    assert os.path.exists(os.path.join(out, "runs", "1x1", "log.txt"))


def test_bad_arguments_are_clear_errors(tmp_path):
    cmd = [sys.executable, SWEEP, f"--config={CONFIG}", "--meshes=1x1,4by2", f"--out={tmp_path}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "write DATAxFSDP" in done.stderr
    cmd = [sys.executable, SWEEP, f"--config={CONFIG}", f"--out={tmp_path}", "--", "--steps=3"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "--config.key=value" in done.stderr

#!/usr/bin/env python
"""Mesh-size sweep: a short timed training per mesh shape, each in a fresh process.

  python launch/mesh_sweep.py --config=configs/ldm_digits.py:smoke \
      --meshes 1x1,2x1,4x1,8x1,4x2 --steps 20 --warmup 5 --out sweeps/ldm_smoke \
      [--per_device_batch 4] [--timeout 600] [-- --config.model.model_channels=64 ...]

Each mesh DATAxFSDP runs `python -m ldm_jax.training.step_timing` (the real train loop, see that module)
with DATA*FSDP devices and a global batch of per_device_batch x devices (weak scaling). Devices:
on CPU the process gets that many host devices (XLA_FLAGS=--xla_force_host_platform_device_count);
on CUDA GPUs the first DATA*FSDP GPUs (CUDA_VISIBLE_DEVICES). Arguments after `--` go to every
run (config overrides).

Writes OUT/mesh_sweep.csv (one row per mesh; a mesh that fails is a row with its error) and
OUT/mesh_sweep.png (images/s per device and scaling efficiency against the device count).
Scaling efficiency = images/s per device / that of the 1-device row (1.0 = perfect weak
scaling); empty without a successful 1x1 row. Peak memory per device is empty where the backend
does not report it (CPU). Fake CPU devices share the host's cores, so a CPU sweep shows the
mechanics, not accelerator scaling.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ldm_jax.training.step_timing import parse_mesh  # noqa: E402  (no jax import: stays cheap)

COLUMNS = ("mesh", "data", "fsdp", "devices", "platform", "global_batch", "per_device_batch",
           "steps", "warmup", "compile_s", "step_time_median_s", "step_time_p90_s",
           "images_per_s", "images_per_s_per_device", "scaling_efficiency",
           "peak_memory_per_device_bytes", "wall_s", "status", "error")


def probe_platform(env: dict) -> tuple[str, int]:
    """(platform, device count) the child processes would see, from a throwaway process."""
    code = "import jax; print(jax.default_backend(), jax.device_count())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"cannot start JAX to find the devices: {out.stderr.strip()[-500:]}")
    platform, count = out.stdout.split()[-2:]
    return platform, int(count)


def child_env(base: dict, platform: str, n: int) -> dict:
    """The environment that makes a child process see exactly `n` devices."""
    env = dict(base, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, base.get("PYTHONPATH", "")) if p))
    if platform == "cpu":
        flags = [f for f in base.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
        env["JAX_PLATFORMS"] = "cpu"
    elif platform in ("gpu", "cuda"):
        visible = base.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(n)]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:n])
    return env


def run_mesh(args, mesh: str, env: dict, extra: list[str]) -> dict:
    """One timed run in a fresh process; a failure becomes a row with status 'error'."""
    data, fsdp = parse_mesh(mesh)
    row = {"mesh": mesh, "data": data, "fsdp": fsdp, "devices": data * fsdp}
    run_dir = os.path.join(args.out, "runs", mesh)
    os.makedirs(run_dir, exist_ok=True)
    result_path = os.path.join(run_dir, "result.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    cmd = [sys.executable, "-m", "ldm_jax.training.step_timing", f"--config={args.config}",
           f"--mesh={mesh}", f"--steps={args.steps}", f"--warmup={args.warmup}",
           f"--per_device_batch={args.per_device_batch}", f"--result={result_path}"] + extra
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=args.timeout)
        log = done.stdout + done.stderr
        failed = done.returncode != 0 or not os.path.exists(result_path)
        reason = f"exit code {done.returncode}"
    except subprocess.TimeoutExpired as e:
        text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        log = text(e.stdout) + text(e.stderr)
        failed, reason = True, f"timed out after {args.timeout}s"
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    with open(os.path.join(run_dir, "log.txt"), "w") as f:
        f.write(log)
    if failed:
        lines = [l for l in log.strip().splitlines() if l.strip()]
        last = lines[-1] if lines else ""
        row.update(status="error", error=f"{reason}: {last}"[:500])
        return row
    with open(result_path) as f:
        row.update(json.load(f))
    row.update(status="ok", error="")
    return row


def add_efficiency(rows: list[dict]) -> None:
    base = next((r for r in rows if r["status"] == "ok" and r["devices"] == 1), None)
    for r in rows:
        r["scaling_efficiency"] = (
            r["images_per_s_per_device"] / base["images_per_s_per_device"]
            if base and r["status"] == "ok" else "")


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k, "")) for k in COLUMNS})


def write_plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: (r["devices"], r["fsdp"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    devices = sorted({r["devices"] for r in ok})
    for ax, key, label in ((ax1, "images_per_s_per_device", "images/s per device"),
                           (ax2, "scaling_efficiency", "scaling efficiency (vs 1 device)")):
        # One line per fsdp size: 8x1 and 4x2 share a device count but not a layout.
        for fsdp in sorted({r["fsdp"] for r in ok}):
            points = [(r["devices"], r[key], r["mesh"]) for r in ok
                      if r["fsdp"] == fsdp and r[key] != ""]
            if not points:
                continue
            xs, ys, _ = zip(*points)
            ax.plot(xs, ys, "o-", label=f"fsdp={fsdp}")
            for x, y, name in points:
                ax.annotate(name, (x, y), textcoords="offset points",
                            xytext=(4, 4 if fsdp == 1 else -12), fontsize=8)
        if key == "scaling_efficiency":
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        if devices:
            ax.set_xscale("log", base=2)
            ax.set_xticks(devices, [str(d) for d in devices])
        ax.set_xlabel("devices (data x fsdp)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ok:
            ax.legend(fontsize=8)
    failed = [r["mesh"] for r in rows if r["status"] != "ok"]
    fig.suptitle(title + (f"  (failed: {', '.join(failed)})" if failed else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the main columns (for reports)."""
    cols = ("mesh", "devices", "global_batch", "compile_s", "step_time_median_s", "images_per_s",
            "images_per_s_per_device", "scaling_efficiency", "peak_memory_per_device_bytes",
            "status")
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file[:variant]")
    parser.add_argument("--meshes", default="1x1,2x1,4x1,8x1,4x2", help="DATAxFSDP,...")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mesh")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps after compiling")
    parser.add_argument("--per_device_batch", type=int, default=4)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per mesh")
    args = parser.parse_args(argv)
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        parser.error(f"arguments after '--' must be --config.key=value overrides, got {bad}")
    meshes = [m.strip() for m in args.meshes.split(",") if m.strip()]
    try:
        for m in meshes:
            parse_mesh(m)
    except ValueError as e:
        parser.error(f"--meshes: {e}")
    os.makedirs(args.out, exist_ok=True)

    platform, available = probe_platform(dict(os.environ))
    print(f"Platform {platform}: {available} device(s) visible to one process.", flush=True)
    rows = []
    for mesh in meshes:
        data, fsdp = parse_mesh(mesh)
        n = data * fsdp
        if platform not in ("cpu", "gpu", "cuda") and n != available:
            row = {"mesh": mesh, "data": data, "fsdp": fsdp, "devices": n, "status": "error",
                   "error": f"on {platform} this sweep can only use all {available} devices"}
        elif platform != "cpu" and n > available:
            row = {"mesh": mesh, "data": data, "fsdp": fsdp, "devices": n, "status": "error",
                   "error": f"needs {n} devices; {available} available"}
        else:
            print(f"mesh {mesh}: {n} device(s) ...", flush=True)
            row = run_mesh(args, mesh, child_env(os.environ, platform, n), extra)
        rows.append(row)
        print(f"  {mesh}: " + (f"{row['images_per_s_per_device']:.1f} img/s/device, compile "
                                f"{row['compile_s']:.1f}s" if row["status"] == "ok"
                                else f"FAILED ({row['error']})"), flush=True)
    add_efficiency(rows)
    csv_path, png_path = (os.path.join(args.out, f"mesh_sweep.{ext}") for ext in ("csv", "png"))
    write_csv(rows, csv_path)
    write_plot(rows, png_path, f"{args.config} on {platform}, per-device batch "
                               f"{args.per_device_batch}, {args.steps} timed steps")
    print(format_table(rows))
    print(f"Wrote {csv_path} and {png_path}.", flush=True)
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

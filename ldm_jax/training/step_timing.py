"""Timed short training on one mesh: the measuring end of `launch/mesh_sweep.py`.

  python -m ldm_jax.training.step_timing --config=configs/ldm_digits.py:smoke --mesh=4x2 --steps=20 \
      --warmup=5 --per_device_batch=4 --workdir=/tmp/t --result=/tmp/t/result.json \
      [--config.key=value ...]

Runs the real train loop (`ldm_jax.training.trainer.train_and_evaluate`: same step, shardings, input
pipeline) for warmup + steps steps on a mesh of data x fsdp devices (all the devices this
process sees; the sweep starts one process per mesh with that many), with the global batch =
per_device_batch x devices (weak scaling), logging every step and no eval or image steps.
Writes a JSON result:

  compile_s             tracing + lowering + XLA compilation of the train step (the persistent
                        compilation cache is off, so this is a cold compile);
  step_time_median_s    median wall time of the steps after the warm-up (each step includes the
                        host fetch of its metrics, as in training with log_every_steps=1);
  images_per_s, images_per_s_per_device;
  peak_memory_per_device_bytes   max over local devices of `memory_stats()['peak_bytes_in_use']`,
                        null where the backend reports none (CPU).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile

import numpy as np

from ldm_jax.config import loading as config_lib

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


def parse_mesh(text: str) -> tuple[int, int]:
    """'4x2' -> (data=4, fsdp=2), with a clear error."""
    try:
        data, fsdp = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise config_lib.ConfigError(f"--mesh={text!r}: write DATAxFSDP, e.g. 4x2 (data=4, fsdp=2).") from None
    if data < 1 or fsdp < 1:
        raise config_lib.ConfigError(f"--mesh={text!r}: both sizes must be >= 1.")
    return data, fsdp


def timing_config(config, *, data: int, fsdp: int, steps: int, warmup: int, per_device_batch: int):
    """The run's config set up for timing on a data x fsdp mesh (weak scaling)."""
    if steps < 1 or warmup < 0 or per_device_batch < 1:
        raise config_lib.ConfigError(f"--steps={steps} must be >= 1, --warmup={warmup} >= 0 and "
                         f"--per_device_batch={per_device_batch} >= 1.")
    n = data * fsdp
    return config_lib.apply_overrides(config, [
        f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"batch_size={per_device_batch * n}",
        f"total_steps={warmup + steps}", "log_every_steps=1", "eval_every_steps=0",
        "image_every_steps=0", f"checkpoint_every_steps={warmup + steps}", "keep_checkpoints=1",
        "async_checkpointing=false", "compilation_cache_dir="])


def _peak_memory() -> int | None:
    import jax
    peaks = []
    for device in jax.local_devices():
        stats = device.memory_stats()  # None on CPU.
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def time_training(config, workdir: str, *, steps: int, warmup: int) -> dict:
    """Trains `config` (already set up by `timing_config`) in `workdir`; returns the timings."""
    import jax
    # Honest compile times: no persistent cache (the env var would re-enable it).
    jax.config.update("jax_compilation_cache_dir", None)
    compile_s = collections.defaultdict(float)

    def listener(event, duration, **kwargs):
        if event in _COMPILE_EVENTS:
            compile_s[kwargs.get("fun_name", "?")] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    from ldm_jax.training.trainer import train_and_evaluate
    train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    step_times = [1.0 / r["steps_per_sec"] for r in rows
                  if "steps_per_sec" in r and warmup < r["step"] <= warmup + steps]
    if len(step_times) != steps:
        raise RuntimeError(f"expected {steps} timed steps in {workdir}/metrics.jsonl, found "
                           f"{len(step_times)}.")
    median = float(np.median(step_times))
    n = jax.device_count()
    return {
        "platform": jax.devices()[0].platform, "devices": n,
        "data": int(config.mesh.data), "fsdp": int(config.mesh.fsdp),
        "global_batch": int(config.batch_size), "per_device_batch": int(config.batch_size) // n,
        "steps": steps, "warmup": warmup,
        # fun_name is 'train_step' for tracing and 'jit(train_step)' for lowering/compiling.
        "compile_s": float(sum(v for k, v in compile_s.items() if "train_step" in k)),
        "step_time_median_s": median,
        "step_time_p90_s": float(np.percentile(step_times, 90)),
        "images_per_s": config.batch_size / median,
        "images_per_s_per_device": config.batch_size / median / n,
        "peak_memory_per_device_bytes": _peak_memory(),
    }


def build_parser():
    from ldm_jax.cli import runner
    parser = runner.ArgumentParser("python -m ldm_jax.training.step_timing", __doc__)
    parser.add_argument("--config", required=True, help="config file[:variant]")
    parser.add_argument("--mesh", required=True, help="DATAxFSDP, e.g. 4x2")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps after compiling")
    parser.add_argument("--per_device_batch", type=int, default=4)
    parser.add_argument("--workdir", default="", help="run directory (default: a temporary one)")
    parser.add_argument("--result", required=True, help="JSON file to write the timings to")
    return parser


def command(args, overrides) -> None:
    from ldm_jax.cli import runner
    data, fsdp = parse_mesh(args.mesh)
    config = timing_config(runner.load_config(args.config, overrides), data=data, fsdp=fsdp,
                           steps=args.steps, warmup=args.warmup,
                           per_device_batch=args.per_device_batch)
    with tempfile.TemporaryDirectory() as tmp:
        result = time_training(config, args.workdir or tmp, steps=args.steps, warmup=args.warmup)
    result["mesh"] = args.mesh
    with open(args.result, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result), flush=True)


def main(argv=None) -> int:
    from ldm_jax.cli import runner
    return runner.main_for(build_parser, command, argv, config_overrides=True)


if __name__ == "__main__":
    sys.exit(main())

"""Input pipeline throughput vs the train step's consumption, per config, in one run.

For each --configs entry (a config spec, `path.py[:variant]`) this builds the task and the
train iterator exactly as ldm_jax/training/trainer.py does:
    task = make_task(config); config = task.config
    pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size,
                                 seed=config.seed, start_step=0, condition_fn=task.condition_fn)
and measures
  first batch s    time from opening the iterator to the first batch (source open, threads)
  pipeline ex/s    examples/s over --batches further batches, the pipeline alone
  step ms          the task's train step (phase of step 0; jitted with the state donated,
                   AOT compiled, fed the pipeline's own first batch), median of --steps
  consume ex/s     batch / step time: what training consumes
  headroom         pipeline ex/s / consume ex/s (> 1: the pipeline keeps up; < 1: input bound)
  loop ex/s        --steps steps of the real loop body (next(iterator) + step), i.e. with the
                   pipeline threads and the step sharing the CPU
Default configs: stage-2 digits latents under data/ (skipped when the directory is missing),
the smoke config's synthetic latents ('synthetic_latents' source) and the digits image
pipeline of stage 1. Data-dependent paths (data.latents_dir) are resolved against the repo.

Usage: python bench/input_pipeline.py [--configs a.py,b.py:smoke] [--batches 50] [--steps 3]
  [--batch N (override every config's batch_size)] [--json out.json]
"""

from __future__ import annotations

import functools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

DEFAULT_CONFIGS = ("configs/ldm_digits.py,configs/ldm_digits_sr.py,configs/ldm_digits_layout.py,"
                   "configs/f4_celebahq.py:smoke,configs/autoencoder_kl_f4_digits.py")
COLUMNS = [("config", "config"), ("source", "source"), ("batch", "batch"),
           ("first_batch_s", "first batch s", ".2f"), ("pipeline_ex_s", "pipeline ex/s", ".1f"),
           ("step_ms", "step ms", ".1f"), ("consume_ex_s", "consume ex/s", ".1f"),
           ("headroom", "headroom", ".1f"), ("loop_ex_s", "loop ex/s", ".1f"), ("note", "note")]


def parse_args(argv=None):
    p = common.arg_parser(__doc__)
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma list of config specs")
    p.add_argument("--batches", type=int, default=50, help="pipeline batches timed")
    p.add_argument("--batch", type=int, default=0, help="override batch_size (0 = config's)")
    p.add_argument("--skip_step", action="store_true", help="pipeline only, no train step")
    common.add_common_args(p, steps=3, warmup=1, torch=False)
    return p.parse_args(argv)


def bench_config(a, spec):
    import jax
    from ldm_jax.config import loading as config_lib
    from ldm_jax.data import pipeline
    from ldm_jax.tasks import make_task
    path, _, variant = spec.partition(":")
    config = config_lib.load_config(os.path.join(common.REPO, path) + (f":{variant}" if variant
                                                                        else ""))
    row = {"config": spec, "source": config.data.source}
    if config.data.source == "latents":
        d = config.data.latents_dir
        if d and not os.path.isabs(d):
            config.data.latents_dir = os.path.join(common.REPO, d)
        if not os.path.isdir(config.data.latents_dir):
            row["note"] = f"skipped: no latents at {d} (python -m ldm_jax.precompute_latents)"
            return row
        row["source"] = f"latents ({os.path.basename(d.rstrip('/'))})"
    if a.batch:
        config.batch_size = a.batch
    config.compilation_cache_dir = ""
    row["conv_impl"] = common.apply_conv_impl(config, a.conv_impl)
    task = make_task(config)
    config = task.config
    row["batch"] = B = int(config.batch_size)
    cond_fn = getattr(task, "condition_fn", None)
    t0 = time.perf_counter()
    it = pipeline.make_train_iterator(config.data, global_batch_size=B, seed=config.seed,
                                      start_step=0, condition_fn=cond_fn)
    try:
        first = next(it)
        row["first_batch_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(a.batches):
            next(it)
        row["pipeline_ex_s"] = a.batches * B / (time.perf_counter() - t0)
    finally:
        it.close()
    row["batch_keys"] = {k: list(np.shape(v)) for k, v in first.items()}
    if a.skip_step:
        return row
    # The train step as the trainer compiles it (single device: no shardings needed).
    init_fn = functools.partial(task.init_state, input_shape=first[task.input_key].shape)
    state = jax.jit(init_fn)(jax.random.key(config.seed))
    consts = task.constants()
    phase = task.phase_for_step(0)
    compiled, lo, co = common.aot_compile(functools.partial(task.train_step, phase=phase),
                                          (state, first, consts), donate_argnums=0)
    row["compile_s"] = lo + co
    box = {"s": state}
    run = common.jax_runner(compiled, box, (first, consts))
    _, times = common.timed_steps(run, a.warmup, a.steps)
    step_s = common.summarize(times, B)["ms"] / 1e3
    row["step_ms"] = step_s * 1e3
    row["consume_ex_s"] = B / step_s
    row["headroom"] = row["pipeline_ex_s"] / row["consume_ex_s"]
    row["note"] = f"phase '{phase}'"
    # The loop body of trainer._loop: next batch, then the step (metrics not fetched).
    it = pipeline.make_train_iterator(config.data, global_batch_size=B, seed=config.seed,
                                      start_step=0, condition_fn=cond_fn)
    try:
        next(it)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            out = compiled(box["s"], next(it), consts)
            box["s"] = out[0]
        jax.block_until_ready(out)
        row["loop_ex_s"] = a.steps * B / (time.perf_counter() - t0)
    finally:
        it.close()
    return row


def main(argv=None):
    a = parse_args(argv)
    load0 = os.getloadavg()
    rows = []
    for spec in common.comma_list(a.configs):
        common.log(f"config {spec}")
        try:
            rows.append(bench_config(a, spec))
        except Exception as e:  # noqa: BLE001 - one broken config does not stop the others
            rows.append({"config": spec, "note": f"n/a: {common.short_reason(e)}"})
    print(f"\ninput pipeline vs train step consumption ({a.batches} pipeline batches, "
          f"{a.steps} train steps after {a.warmup} warm-up, dtype {a.dtype})")
    common.print_table(COLUMNS, rows)
    info = common.machine_info(load0)
    common.print_machine(info)
    print("headroom = pipeline ex/s / (batch / step time); loop ex/s = next(iterator) + step, "
          "as trainer._loop does (pipeline threads and step share the CPU)")
    common.write_json(a.json, {"args": vars(a), "rows": rows, "machine": info})


if __name__ == "__main__":
    main()

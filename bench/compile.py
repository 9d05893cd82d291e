"""Compile time of the train and sample steps, cold and from the persistent compilation cache.

For each case (a config + overrides) two fresh worker processes run one after the other with
the SAME new temporary cache directory (jax_compilation_cache_dir, what
config.compilation_cache_dir sets in a run):
  cold   first process: empty cache; compiles and writes the cache entries
  warm   second process: same directory, so the executables come from the persistent cache
         (a fresh process has empty in-memory caches; the worker counts JAX's
         '/jax/compilation_cache/cache_hits' monitoring events to prove the hit)
Each worker times
  train   the train step exactly as ldm_jax/training/trainer.py compiles it: trainer._set_up
          (task, mesh, example batch, state shardings) then trainer._compile (jax.jit with
          shardings, state donated, .lower(...).compile()) -- lower + compile seconds
  sample  stage 2 only: the computation of ldm_jax/inference/sampling.py:sample_batches
          (task.sample_latents with the config's sampler + decode) lowered and compiled
          ahead of time; lower and compile seconds separately
'hits' = persistent-cache hits during that compile (0 cold; >= 1 warm proves the hit).
The cache only saves XLA compilation: tracing/lowering is paid every time.
Note: the trainer caches only executables that took >= 1 s to compile
(jax_persistent_cache_min_compile_time_secs=1.0); this bench uses --min_compile_secs 0 so
small steps are cached too; pass --min_compile_secs 1 to see exactly what a run caches.

Usage: python bench/compile.py [--cases smoke_ldm,smoke_digits,smoke_ae,mid_ldm]
  [--min_compile_secs 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

T_START = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

# name -> (config spec, {dotted key: value}, description)
CASES = {
    "smoke_ldm": ("configs/f4_celebahq.py:smoke", {}, "f4_celebahq smoke: UNet 32, 8x8x3"),
    "smoke_digits": ("configs/ldm_digits.py:smoke", {},
                     "ldm_digits smoke: class-conditional UNet 32, 8x8x3"),
    "smoke_ae": ("configs/autoencoder_kl_f4.py:smoke", {}, "KL-f4 smoke: ch 16, 32px digits"),
    "mid_ldm": ("configs/f4_celebahq.py", {"model.model_channels": 64,
                                           "data.source": "synthetic_latents",
                                           "data.latent_shape": (32, 32, 3),
                                           "batch_size": 4},
                "f4_celebahq at width 64, 32x32x3 synthetic latents, batch 4"),
}
COLUMNS = [("case", "case"), ("what", "step"), ("cold_lower_s", "lower s (cold)", ".2f"),
           ("cold_compile_s", "compile s cold", ".2f"), ("warm_compile_s", "compile s warm", ".2f"),
           ("speedup", "cold/warm", ".1f"), ("cold_hits", "hits cold"), ("warm_hits", "hits warm"),
           ("note", "note")]


def parse_args(argv=None):
    p = common.arg_parser(__doc__)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {sorted(CASES)}")
    p.add_argument("--min_compile_secs", type=float, default=0.0,
                   help="jax_persistent_cache_min_compile_time_secs (the trainer uses 1.0)")
    p.add_argument("--keep_cache", default="", help="use/keep this cache dir instead of a temp one "
                   "(must be empty for a cold number)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per worker process")
    p.add_argument("--json", default="")
    p.add_argument("--conv_impl", default="")
    p.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--_cache_dir", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ worker
def worker(a):
    import jax
    jax.config.update("jax_compilation_cache_dir", a._cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", a.min_compile_secs)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    events: dict[str, int] = {}

    def listener(name, **kw):
        if "compilation_cache" in name:
            events[name] = events.get(name, 0) + 1
    jax.monitoring.register_event_listener(listener)
    hits = lambda: events.get("/jax/compilation_cache/cache_hits", 0)  # noqa: E731

    from ldm_jax.config import loading as config_lib
    from ldm_jax.training import trainer
    spec, overrides, _ = CASES[a._worker]
    path, _, variant = spec.partition(":")
    config = config_lib.load_config(os.path.join(common.REPO, path) + (f":{variant}" if variant
                                                                        else ""))
    for k, v in overrides.items():
        common.set_field(config, k, v)
    config.compilation_cache_dir = a._cache_dir
    conv = common.apply_conv_impl(config, a.conv_impl)
    out = {"import_s": time.perf_counter() - T_START, "conv_impl": conv}
    t0 = time.perf_counter()
    setup = trainer._set_up(config)
    out["setup_s"] = time.perf_counter() - t0
    h0 = hits()
    t0 = time.perf_counter()
    trainer._compile(setup, 0)
    out["train"] = {"lower_compile_s": time.perf_counter() - t0, "hits": hits() - h0}
    task = setup.task
    if hasattr(task, "sample_latents"):
        import jax.numpy as jnp
        import numpy as np
        from ldm_jax.tasks.diffusion import make_sampler
        sampler = make_sampler(task.config, task.schedule)
        B = min(int(task.config.num_grid_images), 8)
        params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                        setup.abstract_state.ema_params)
        constants = task.constants()
        null = task.condition.null(B) if task.condition.keys else None

        def sample_index(params, constants, i, cond):  # as sampling.sample_batches
            index = i * B + jnp.arange(B, dtype=jnp.uint32)
            keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.key(0), j))(index)
            z = task.sample_latents(params, keys, B, cond=cond, constants=constants,
                                    sampler=sampler,
                                    guidance_scale=task.config.sampling.guidance_scale)
            return task.decode(constants, z)
        h0 = hits()
        t0 = time.perf_counter()
        lowered = jax.jit(sample_index).lower(params, constants, np.uint32(0), null)
        t1 = time.perf_counter()
        lowered.compile()
        out["sample"] = {"lower_s": t1 - t0, "compile_s": time.perf_counter() - t1,
                         "hits": hits() - h0, "batch": B, "sampler": task.config.sampling.sampler,
                         "num_steps": int(task.config.sampling.num_steps)}
    out["events"] = events
    print("RESULT " + json.dumps(out), flush=True)


def run_worker(a, case, cache_dir):
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", case, "--_cache_dir", cache_dir,
           "--min_compile_secs", str(a.min_compile_secs)]
    if a.conv_impl:
        cmd += ["--conv_impl", a.conv_impl]
    common.log(f"worker {case} ({'warm' if _entries(cache_dir) else 'cold'})")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, cwd=common.REPO)
    wall = time.perf_counter() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"worker {case} failed (rc {p.returncode}): " + " | ".join(tail))
    res = json.loads(lines[-1][len("RESULT "):])
    res["process_wall_s"] = wall
    return res


def _entries(d):
    return sum(len(files) for _, _, files in os.walk(d))


def main(argv=None):
    a = parse_args(argv)
    if a._worker:
        return worker(a)
    load0 = os.getloadavg()
    rows, results = [], {}
    for case in common.comma_list(a.cases):
        if case not in CASES:
            raise SystemExit(f"unknown case {case!r}; choose from {sorted(CASES)}")
        cache = a.keep_cache or tempfile.mkdtemp(prefix=f"ldm_jax_xla_cache_{case}_")
        os.makedirs(cache, exist_ok=True)
        try:
            if _entries(cache):
                print(f"warning: {cache} is not empty: the 'cold' number is not cold")
            try:
                cold = run_worker(a, case, cache)
                n_entries = _entries(cache)
                warm = run_worker(a, case, cache)
            except Exception as e:  # noqa: BLE001
                rows.append({"case": case, "note": f"n/a: {common.short_reason(e, 300)}"})
                continue
        finally:
            if not a.keep_cache:
                shutil.rmtree(cache, ignore_errors=True)
        results[case] = {"description": CASES[case][2], "cold": cold, "warm": warm,
                         "cache_entries": n_entries}
        tr_c, tr_w = cold["train"], warm["train"]
        rows.append({"case": case, "what": "train", "cold_lower_s": float("nan"),
                     "cold_compile_s": tr_c["lower_compile_s"],
                     "warm_compile_s": tr_w["lower_compile_s"],
                     "speedup": tr_c["lower_compile_s"] / tr_w["lower_compile_s"],
                     "cold_hits": tr_c["hits"], "warm_hits": tr_w["hits"],
                     "note": "trainer._compile (lower+compile)"
                             + ("" if tr_w["hits"] else "; WARM DID NOT HIT THE CACHE")})
        if "sample" in cold:
            sc, sw = cold["sample"], warm["sample"]
            rows.append({"case": case, "what": "sample", "cold_lower_s": sc["lower_s"],
                         "cold_compile_s": sc["compile_s"], "warm_compile_s": sw["compile_s"],
                         "speedup": sc["compile_s"] / sw["compile_s"],
                         "cold_hits": sc["hits"], "warm_hits": sw["hits"],
                         "note": f"{sc['sampler']} {sc['num_steps']} steps, batch {sc['batch']}"
                                 + ("" if sw["hits"] else "; WARM DID NOT HIT THE CACHE")})
    print(f"\ncompile time, cold vs persistent cache (fresh process each; "
          f"min_compile_secs {a.min_compile_secs:g})")
    for case in results:
        r = results[case]
        print(f"- {case}: {r['description']}; cache entries written {r['cache_entries']}; "
              f"process import {r['cold']['import_s']:.1f}s, trainer._set_up "
              f"{r['cold']['setup_s']:.1f}s cold / {r['warm']['setup_s']:.1f}s warm, "
              f"worker wall {r['cold']['process_wall_s']:.1f}s / {r['warm']['process_wall_s']:.1f}s")
    common.print_table(COLUMNS, rows)
    import jax  # noqa: F401
    info = common.machine_info(load0)
    common.print_machine(info)
    print("cold: empty cache dir, first process; warm: second process, same dir. compile s for "
          "train = lower + compile (trainer._compile); sample = compile only (lower in its own "
          "column). hits = /jax/compilation_cache/cache_hits events during that compile")
    common.write_json(a.json, {"args": {k: v for k, v in vars(a).items() if not k.startswith("_")},
                               "rows": rows, "cases": results, "machine": info})


if __name__ == "__main__":
    main()

"""Compiled memory of the stage-2 (latent UNet) train step per remat policy and dtype.

For each config (paper models), remat policy (`config.model.remat`: nothing, dots, full) and
compute dtype (`config.dtype`: float32, bfloat16) this builds the project's real train step
(`DiffusionTask.train_step`: condition dropout, diffusion loss, AdamW, EMA; jitted as
ldm_jax/training/trainer.py jits it, state donated) for a per-device batch, lowers and compiles
it ahead of time from `jax.ShapeDtypeStruct`s only (nothing model-sized is allocated), and
reports XLA's `compiled.memory_analysis()`:

  argument  bytes of the inputs (train state + batch)
  output    bytes of the outputs (new state + metrics)
  alias     output bytes that reuse donated input buffers (the state)
  temp      scratch buffers live during the step: activations saved for the backward pass,
            gradients, optimiser temporaries. This is what rematerialisation shrinks.
  code      generated code
  total     argument + output - alias + temp + code: the step's peak buffer footprint

and, with --search, the largest per-device batch whose total fits --budget_gb (doubling from
the paper batch, then bisection guided by the near-affine memory-vs-batch line; capped by
--max_batch). Every compile is cached by (config, remat, dtype, batch).

Caveat: it compiles for the backend JAX runs on. On a CPU-only machine this is XLA:CPU's
buffer assignment, which is indicative of the buffer sizes (activations, state) but not of a
GPU/TPU allocator (fragmentation, cuDNN/cuBLAS workspaces, fusion differences). On CPU the
compile passes `ldm_jax.models.remat.compiler_options()`, which keeps the optimization barriers
that stop XLA:CPU from merging the recomputation back into the forward pass (its GPU/TPU
pipelines keep them anyway); without it every policy would compile to the 'nothing' program.
XLA:CPU also widens most bfloat16 buffers to float32 in its optimisation passes, so its
bfloat16 rows overstate what a GPU/TPU needs.

Usage:
  JAX_PLATFORMS=cpu python bench/memory.py                                 # both paper rows
  JAX_PLATFORMS=cpu python bench/memory.py --configs f4_celebahq --dtypes float32 \\
      --search --max_batch 512 --json /tmp/memory.json
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ldm_jax.models.remat import REMAT_POLICIES, compiler_options  # noqa: E402
from ldm_jax.models import conv  # noqa: E402
from ldm_jax.tasks.diffusion import DiffusionTask, LatentContext  # noqa: E402

# Paper rows: the config file, its latents (shape, first-stage kind) and the batch per device
# it was trained with. The latent shape comes from the first stage (precomputed latents'
# metadata in a real run), so it is given here.
MODELS = {
    "f4_celebahq": dict(latent_shape=(64, 64, 3), kind="vq", batch=48),
    "txt2img_1p4b": dict(latent_shape=(32, 32, 4), kind="kl", batch=8),
    "f8_lsun_churches": dict(latent_shape=(32, 32, 4), kind="kl", batch=96),
    "cin256_v2": dict(latent_shape=(64, 64, 3), kind="vq", batch=64),
    "text2img256": dict(latent_shape=(64, 64, 3), kind="vq", batch=64),
}
FIELDS = ("argument", "output", "alias", "temp", "code")
# --conv_weight_grad; 'xla' by default: what GPU/TPU run under 'auto'. On CPU 'auto' is 'gemm',
# whose im2col matrices (kh*kw x each conv input) XLA:CPU may keep alive together in the
# backward pass.
DEFAULT_CONV_WEIGHT_GRAD = "xla"
GB = 1e9


def load_config(name: str):
    path = os.path.join(ROOT, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@functools.lru_cache(maxsize=None)
def _task(name: str, remat: str, dtype: str, conv_weight_grad: str):
    """The diffusion task of a config (synthetic latent context: no data, no first stage) and
    its abstract train state."""
    config = load_config(name)
    config.conv_weight_grad = conv_weight_grad
    conv.set_default_weight_grad(conv_weight_grad)
    config.model.remat = remat
    config.dtype = dtype
    # XLA's buffer assignment cannot see inside a custom call: with the CPU attention kernel
    # (the one-device default on CPU) the scores would not be counted. 'chunked' is what an
    # accelerator runs in float32, and its buffers are all visible.
    if config.model.get("attention_impl") is None:
        config.model.attention_impl = "chunked"
    row = MODELS[name]
    latents = LatentContext(latent_shape=row["latent_shape"], kind=row["kind"],
                            scale_factor=1.0, first_stage=None)
    task = DiffusionTask(config, latents=latents)
    state = jax.eval_shape(task.init_state, jax.random.key(0))
    return task, state


def _abstract_batch(task, batch: int) -> dict:
    shape = task.latents.latent_shape
    if task.input_key == "moments":  # KL posterior mean and log-variance
        shape = shape[:-1] + (2 * shape[-1],)
    out = {task.input_key: jax.ShapeDtypeStruct((batch,) + tuple(shape), jnp.float32)}
    null = task.condition.null(batch) if task.condition.keys else {}
    for key in task.condition.keys:
        value = jnp.asarray(null[key])
        out[key] = jax.ShapeDtypeStruct(value.shape, value.dtype)
    return out


_CACHE: dict = {}


def measure(name: str, remat: str, dtype: str, batch: int,
            conv_weight_grad: str = DEFAULT_CONV_WEIGHT_GRAD) -> dict:
    """Compiled memory of one train step (cached by its arguments)."""
    key = (name, remat, dtype, batch, conv_weight_grad)
    if key in _CACHE:
        return _CACHE[key]
    task, state = _task(name, remat, dtype, conv_weight_grad)
    constants = jax.eval_shape(task.constants)
    step = jax.jit(functools.partial(task.train_step, phase="main"), donate_argnums=0)
    start = time.perf_counter()
    lowered = step.lower(state, _abstract_batch(task, batch), constants)
    compiled = lowered.compile(compiler_options())
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    row = {"config": name, "remat": remat, "dtype": dtype, "batch": batch,
           "conv_weight_grad": conv_weight_grad,
           "argument": stats.argument_size_in_bytes, "output": stats.output_size_in_bytes,
           "alias": stats.alias_size_in_bytes, "temp": stats.temp_size_in_bytes,
           "code": stats.generated_code_size_in_bytes, "compile_s": round(seconds, 1)}
    row["total"] = row["argument"] + row["output"] - row["alias"] + row["temp"] + row["code"]
    row["params"] = int(sum(x.size for x in jax.tree_util.tree_leaves(state.params)))
    _CACHE[key] = row
    print(f"  compiled {name} remat={remat} {dtype} batch={batch}: temp {row['temp'] / GB:.2f} "
          f"GB, total {row['total'] / GB:.2f} GB ({seconds:.0f} s)", file=sys.stderr, flush=True)
    return row


def largest_batch(name: str, remat: str, dtype: str, start: int, budget: float,
                  max_batch: int,
                  conv_weight_grad: str = DEFAULT_CONV_WEIGHT_GRAD) -> tuple[int, bool]:
    """Largest batch <= max_batch whose total fits `budget` bytes (doubling from `start`, then
    bisection); (0, False) if even batch 1 does not fit. The flag says the cap was reached."""
    fits = lambda b: measure(name, remat, dtype, b, conv_weight_grad)["total"] <= budget
    start = max(1, min(start, max_batch))
    if not fits(start):
        low, high = 0, start  # fits(low) (0 trivially), not fits(high)
    else:
        low = start
        while True:
            high = min(2 * low, max_batch)
            if high == low:
                return low, True
            if not fits(high):
                break
            low = high
    if low == 0 and not fits(1):
        return 0, False
    low = max(low, 1)
    while high - low > 1:
        # Memory is close to affine in the batch: try the batch where the line through the two
        # bracketing measurements meets the budget (regula falsi), kept strictly inside the
        # bracket; then its neighbour on the other side closes the bracket in ~2 compiles.
        total = lambda b: measure(name, remat, dtype, b, conv_weight_grad)["total"]
        slope = (total(high) - total(low)) / (high - low)
        guess = low + int((budget - total(low)) // slope) if slope > 0 else (low + high) // 2
        mid = min(max(guess, low + 1), high - 1)
        if fits(mid):
            low = mid
            if mid + 1 < high and not fits(mid + 1):
                high = mid + 1
        else:
            high = mid
            if mid - 1 > low and fits(mid - 1):
                low = mid - 1
    return low, False


def _gb(n: float) -> str:
    return f"{n / GB:.2f}"


def table(rows: list[dict]) -> str:
    lines = ["| config | params | dtype | remat | batch/device | argument GB | output GB | "
             "alias GB | temp GB | code MB | total GB | temp vs nothing | compile s | "
             "largest batch in budget |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = {(r["config"], r["dtype"], r["batch"]): r["temp"] for r in rows
            if r["remat"] == "nothing"}
    for r in rows:
        ref = base.get((r["config"], r["dtype"], r["batch"]))
        ratio = f"{ref / r['temp']:.2f}x smaller" if ref and r["temp"] else "-"
        if r["remat"] == "nothing":
            ratio = "1x"
        largest = r.get("largest_batch")
        largest = "-" if largest is None else f"{largest}{'+' if r.get('capped') else ''}"
        lines.append(
            f"| {r['config']} | {r['params'] / 1e6:.0f}M | {r['dtype']} | {r['remat']} | "
            f"{r['batch']} | {_gb(r['argument'])} | {_gb(r['output'])} | {_gb(r['alias'])} | "
            f"{_gb(r['temp'])} | {r['code'] / 1e6:.1f} | {_gb(r['total'])} | {ratio} | "
            f"{r['compile_s']} | {largest} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="f4_celebahq,txt2img_1p4b",
                        help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--batches", default="",
                        help="per-device batch overrides, e.g. f4_celebahq=48,txt2img_1p4b=8 "
                             "(default: the paper batch of each config)")
    parser.add_argument("--remats", default=",".join(REMAT_POLICIES))
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--budget_gb", type=float, default=80.0,
                        help="device memory budget for --search (GB = 1e9 bytes)")
    parser.add_argument("--search", action="store_true",
                        help="also find the largest per-device batch within --budget_gb")
    parser.add_argument("--max_batch", type=int, default=1024,
                        help="cap of the --search (a '+' marks a result that reached it)")
    parser.add_argument("--json", default="", help="write the rows here")
    parser.add_argument("--conv_weight_grad", choices=("xla", "gemm"),
                        default=DEFAULT_CONV_WEIGHT_GRAD,
                        help="config.conv_weight_grad of the measured step (default xla: the "
                             "accelerators' formulation; gemm: CPU's 'auto')")
    args = parser.parse_args(argv)
    wgrad = args.conv_weight_grad

    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}: use {sorted(MODELS)}")
    batches = {n: MODELS[n]["batch"] for n in names}
    for item in filter(None, args.batches.split(",")):
        n, b = item.split("=")
        batches[n] = int(b)
    remats = [r for r in args.remats.split(",") if r]
    dtypes = [d for d in args.dtypes.split(",") if d]

    backend = jax.default_backend()
    header = (f"Compiled memory of the stage-2 train step (XLA memory_analysis on backend "
              f"'{backend}', {jax.devices()[0].device_kind}; jax {jax.__version__}, "
              f"{platform.machine()}).")
    if backend == "cpu":
        header += (" XLA:CPU buffer assignment: indicative of buffer sizes, not of GPU/TPU "
                   "allocator behaviour.")
    print(header, file=sys.stderr, flush=True)
    rows = []
    for name in names:
        for dtype in dtypes:
            for remat in remats:
                row = dict(measure(name, remat, dtype, batches[name], wgrad))
                if args.search:
                    row["largest_batch"], row["capped"] = largest_batch(
                        name, remat, dtype, batches[name], args.budget_gb * GB, args.max_batch,
                        wgrad)
                    row["budget_gb"] = args.budget_gb
                rows.append(row)
    text = table(rows)
    print(header)
    if args.search:
        print(f"Largest batch: per device, total <= {args.budget_gb:g} GB, searched up to "
              f"{args.max_batch} ('+': the cap fits).")
    print()
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows,
                       "searched": sorted(f"{k[0]} {k[1]} {k[2]} {k[3]}" for k in _CACHE)},
                      f, indent=1)
    return {"header": header, "rows": rows}


if __name__ == "__main__":
    main()

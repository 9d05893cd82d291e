"""Shared helpers of the bench/ scripts (not a test; pytest only collects tests/).

What lives here, so that every script times, reports and records the same way:
  add_common_args      --steps/--warmup/--peak_gflops/--torch_threads/--omp_wait_policy/
                       --torch_ftz/--json/--skip_torch/--conv_impl
  timed_steps          warm-up then timed calls of a step (per-call seconds)
  summarize            median/min ms and items/s of a list of step times
  flops_of             FLOPs of a compiled XLA executable (cost_analysis)
  xla_flops            model FLOPs of a function (XLA convolutions and 'xla' attention)
  aot_compile          jax.jit(...).lower(...).compile() with the time it took
  count_params         parameters in a pytree / a torch module
  machine_info         CPU model, nproc, load average, versions, XLA_FLAGS (printed + JSON)
  print_table          a markdown table from rows of dicts
  write_json           JSON (NaN/inf become null) under --json PATH
  import_torch         torch with OMP_WAIT_POLICY set before import, FTZ, threads
  apply_conv_impl      --conv_impl: patch bench/conv_formulations.Conv in for flax.linen.Conv

Timing: JAX calls are waited on with jax.block_until_ready on the whole output; torch on CPU is
synchronous. Step time = median of --steps timed calls after --warmup untimed calls.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


# ------------------------------------------------------------------------------ arguments
def arg_parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser: the docstring's first line as description, the rest as epilog.

    Called first thing by every script, so it also re-executes the script with the malloc
    settings the ldm_jax commands use on CPU (ldm_jax/cli/host_memory.py): the benchmarks
    measure what a run gets, and torch, in the same process, gets the same allocator."""
    from ldm_jax.cli import host_memory
    host_memory.maybe_reexec()
    return argparse.ArgumentParser(description=doc.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=doc.split("\n", 1)[1])


def comma_list(text) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c'] (the scripts' comma-separated flags)."""
    return [item.strip() for item in str(text).split(",") if item.strip()]


def usage_error(message: str):
    """Exits 2 with one line on stderr: a bad flag value, before any work is done."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def checked_list(flag: str, text, allowed) -> list[str]:
    """comma_list(text), each item one of `allowed`; otherwise exits 2 naming the flag and the
    choices (a misspelt part would otherwise run nothing and exit 0)."""
    items = comma_list(text)
    bad = [item for item in items if item not in allowed]
    if bad or not items:
        usage_error(f"{flag} {text!r}: " + (f"unknown {', '.join(map(repr, bad))}; " if bad
                                             else "empty; ")
                    + f"use some of: {', '.join(allowed)}")
    return items


TORCH_MODES = ("eager", "eager_cl", "compile")


def add_common_args(p, *, steps: int = 5, warmup: int = 2, torch: bool = True) -> None:
    p.add_argument("--steps", type=int, default=steps, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed steps after compile")
    p.add_argument("--peak_gflops", type=float, default=0.0,
                   help="machine peak GFLOP/s for the MFU columns; 0 (default): measured in "
                        "this run as the best float32 GFLOP/s of a 4096^3 matmul, jax or torch "
                        "(matmul_peak_gflops)")
    p.add_argument("--json", type=str, default="", help="write the results as JSON to PATH")
    p.add_argument("--conv_impl", type=str, default="",
                   help="convolution formulation: xla (default, what the models use), im2col "
                        "or shifted (bench/conv_formulations.py, patched in for this process)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="ldm_jax compute dtype (params stay float32); torch float32 on CPU, "
                        "autocast to this dtype on a GPU")
    if torch:
        p.add_argument("--skip_torch", action="store_true")
        p.add_argument("--torch_threads", type=str,
                       default=",".join(sorted({"1", str(os.cpu_count())}, key=int)),
                       help="comma list of torch intra-op thread counts, one row each")
        p.add_argument("--omp_wait_policy", choices=("default", "passive", "active"),
                       default="default",
                       help="OMP_WAIT_POLICY for torch's OpenMP pool (set before torch is "
                            "imported); 'passive' avoids spin-wait stalls on a loaded machine")
        p.add_argument("--torch_ftz", choices=("on", "off"), default="on",
                       help="torch.set_flush_denormal; XLA:CPU flushes denormals, torch does not")
        p.add_argument("--torch_device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="where the torch rows run; auto: cuda when jax runs on a GPU and "
                            "torch sees one, else cpu. On cuda with --dtype bfloat16 the torch "
                            "rows use torch.autocast(bfloat16) over float32 weights (ldm_jax's "
                            "mixed precision), with TF32 and cudnn.benchmark on")


def thread_list(a) -> list[int]:
    return [int(t) for t in comma_list(a.torch_threads)]


def torch_variants(a):
    """(threads, mode, row name) for every --torch_threads x --torch_modes row, in that order;
    on a GPU (--torch_device cuda) one row per mode, named 'torch <mode> cuda' (threads None:
    the host thread count does not set the device's speed)."""
    modes = checked_list("--torch_modes", a.torch_modes, TORCH_MODES)
    if getattr(a, "torch_device", "cpu") != "cpu":
        for mode in modes:
            yield None, mode, f"torch {mode} {a.torch_device}"
        return
    for threads in thread_list(a):
        for mode in modes:
            yield threads, mode, f"torch {mode} {threads}T"


# ------------------------------------------------------------------------------ timing
def timed_steps(step: Callable[[], Any], n_warm: int, n_timed: int):
    """Runs step() n_warm + n_timed times; returns (warm-up seconds, per-step seconds)."""
    t0 = time.perf_counter()
    for _ in range(n_warm):
        step()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(n_timed):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return warm, times


def min_ms(fn: Callable[[], Any], reps: int) -> float:
    """Milliseconds of the fastest of `reps` calls of fn() after one untimed call (the robust
    figure for a single kernel on a shared machine)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def summarize(times: Sequence[float], items_per_call: float) -> dict:
    """{'ms': median ms, 'min_ms', 'max_ms', 'items_s': items per second at the median}."""
    if not times:
        return {"ms": float("nan"), "min_ms": float("nan"), "max_ms": float("nan"),
                "items_s": float("nan")}
    med = statistics.median(times)
    return {"ms": med * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3,
            "items_s": items_per_call / med if med > 0 else float("nan")}


def jax_runner(compiled, state_box: dict, args: tuple, *, donate_state: bool = True):
    """A zero-argument step for timed_steps: calls compiled(state, *args), waits, keeps the
    new state (outputs (state, metrics)) when the state is donated."""
    import jax

    def run():
        out = compiled(state_box["s"], *args)
        jax.block_until_ready(out)
        if donate_state:
            state_box["s"] = out[0]
        return out
    return run


def flops_of(compiled) -> float:
    """FLOPs per call from XLA's cost analysis (nan when the backend gives none)."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # pragma: no cover - backend without cost analysis
        return float("nan")
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))


def xla_flops(fn, args: tuple, *, static_argnums=(), host: bool | None = None) -> float:
    """The model FLOPs per call of jax.jit(fn): XLA's cost analysis of fn traced with every
    convolution as XLA's own and attention as 'xla' (scores, softmax and their gradients,
    nothing recomputed), whatever this machine would run.

    Why one formulation for the count: MFU compares the model's arithmetic with the time taken,
    so every row of a table (ldm_jax on CPU or GPU, torch) shares this numerator. The
    formulations ldm_jax picks per backend would each count differently: ldm_jax's C++ CPU
    kernels are custom calls XLA does not count (nor cuDNN's fused attention); the GEMM weight
    gradient multiplies the zero padding that XLA's convolution count leaves out (+3 % for a
    width-64 UNet step); and 'chunked' attention recomputes the probabilities in the backward
    pass, walking (batch, head) groups in a loop whose body the analysis counts once (at the
    paper's batch 48 that undercounts the width-224 step by 5 %)."""
    import jax
    from unittest import mock

    from ldm_jax.models import attention, conv
    # jit caches traces per function: without clearing, this compile could reuse a trace made
    # with the kernels (or leave its kernel-less trace for the timed compile that follows).
    jax.clear_caches()
    try:
        with mock.patch.object(conv, "resolve_weight_grad", lambda *a, **k: "xla"), \
                mock.patch.object(attention, "_resolve", lambda *a, **k: "xla"):
            fresh = lambda *a: fn(*a)
            # host=None: the host count on an accelerator, the compiled count on CPU.
            if on_accelerator() if host is None else host:
                return host_lowered_flops(fresh, args, static_argnums)
            return flops_of(jax.jit(fresh, static_argnums=static_argnums).lower(*args)
                            .compile())
    finally:
        jax.clear_caches()


def host_lowered_flops(fn, args: tuple, static_argnums=()) -> float:
    """FLOPs of fn's program (traced as for the current backend) counted by the host CPU
    backend's cost analysis of the lowered, unoptimised module: no device compile, whose
    autotuning costs minutes for a large UNet, and a GPU backend's Lowered.cost_analysis()
    gives no FLOPs (seen with jax 0.11.2 on an H200). On CPU this count is within 1% of the
    compiled one (1.392 vs 1.408 GFLOP for a width-32 UNet step)."""
    import jax
    static = {i % len(args) for i in ((static_argnums,) if isinstance(static_argnums, int)
                                      else static_argnums)}
    abstract = lambda x: (jax.ShapeDtypeStruct(np.shape(x), x.dtype) if hasattr(x, "dtype")
                          else x)
    args = tuple(a if i in static else jax.tree_util.tree_map(abstract, a)
                 for i, a in enumerate(args))
    with jax.default_device(jax.devices("cpu")[0]):
        ca = jax.jit(fn, static_argnums=static_argnums).lower(*args).cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float((ca or {}).get("flops", float("nan")))


def aot_compile(fn, args: tuple, *, donate_argnums=(), static_argnums=()):
    """(compiled, lower seconds, compile seconds) of jax.jit(fn) on example args."""
    import jax
    t0 = time.perf_counter()
    lowered = jax.jit(fn, donate_argnums=donate_argnums,
                      static_argnums=static_argnums).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, t1 - t0, time.perf_counter() - t1


def count_params(tree) -> int:
    """Parameters of a JAX pytree or a torch.nn.Module."""
    if hasattr(tree, "parameters") and callable(tree.parameters):
        return int(sum(p.numel() for p in tree.parameters()))
    import jax
    return int(sum(int(np.prod(np.shape(p))) for p in jax.tree_util.tree_leaves(tree)))


def on_accelerator() -> bool:
    """True when jax's default backend is a GPU or TPU (the benches then time device work)."""
    import jax
    return jax.default_backend() != "cpu"


def matmul_peak_gflops(torch=None, n: int = 0, reps: int = 0, dtype: str = "float32",
                       torch_device: str = "cpu") -> dict:
    """The MFU denominator measured in this run: the best GFLOP/s of an n^3 matmul of `dtype`
    on random data, jax and (when given) torch on `torch_device`. n defaults to 4096 on CPU
    and 8192 on an accelerator (large enough to fill it). Returns {'jax', 'torch', 'peak',
    'dtype', 'n'}."""
    import jax
    import jax.numpy as jnp
    accel = on_accelerator()
    n = n or (8192 if accel else 4096)
    # Best of 10 on CPU too: best of 3 read 339-407 GFLOP/s on one machine across runs.
    reps = reps or 10
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n ** 3

    def best(fn):
        fn()
        return flops / min(_timed(fn) for _ in range(reps)) / 1e9

    ja, jb = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    dot = jax.jit(jnp.dot)
    out = {"jax": best(lambda: jax.block_until_ready(dot(ja, jb)))}
    if torch is not None:
        tdt = getattr(torch, dtype)
        ta = torch.from_numpy(a).to(device=torch_device, dtype=tdt)
        tb = torch.from_numpy(b).to(device=torch_device, dtype=tdt)
        sync = torch_sync(torch, torch_device)
        out["torch"] = best(lambda: (ta @ tb, sync()))
    out["peak"] = max(v for v in out.values())
    out.update(dtype=dtype, n=n)
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def resolve_peak(a, torch=None) -> None:
    """Fills a.peak_gflops from matmul_peak_gflops when it is 0 (keeps the measurement in
    a.peak_detail for the JSON)."""
    a.peak_detail = {"given": a.peak_gflops}
    if not a.peak_gflops:
        # On an accelerator the peak is that of the compute dtype (bf16 matrix units); on CPU
        # float32 (the CPU has no faster bf16 path, and the torch rows run float32 there).
        dtype = a.dtype if on_accelerator() else "float32"
        a.peak_detail = matmul_peak_gflops(torch, dtype=dtype,
                                           torch_device=getattr(a, "torch_device", "cpu"))
        a.peak_gflops = a.peak_detail["peak"]
        log(f"MFU peak: {a.peak_gflops:.0f} GFLOP/s ({a.peak_detail['n']}^3 {dtype} matmul: "
            + ", ".join(f"{k} {a.peak_detail[k]:.0f}" for k in ("jax", "torch")
                        if k in a.peak_detail) + ")")


def mfu(flops: float, seconds: float, peak_gflops: float) -> float:
    if not (seconds and seconds > 0 and flops == flops and peak_gflops > 0):
        return float("nan")
    return flops / seconds / 1e9 / peak_gflops


# ------------------------------------------------------------------------------ machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(load_before=None, *, with_torch: bool = False) -> dict:
    """Machine/version facts for the header and the JSON (load average before/after)."""
    import jax
    info = {"cpu": _cpu_model(), "machine": platform.machine(), "nproc": os.cpu_count(),
            "load_before": list(load_before) if load_before else None,
            "load_after": list(os.getloadavg()), "python": platform.python_version(),
            "jax": jax.__version__, "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()],
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if with_torch and "torch" in sys.modules:
        import torch
        info["torch"] = torch.__version__
        info["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "unset")
        try:
            import diffusers
            info["diffusers"] = diffusers.__version__
        except Exception:  # pragma: no cover
            pass
    return info


def print_machine(info: dict) -> None:
    lb = info.get("load_before")
    print(f"machine: {info['cpu']} ({info['machine']}), nproc {info['nproc']}, load avg before "
          + (" ".join(f"{v:.2f}" for v in lb) if lb else "?") + ", after "
          + " ".join(f"{v:.2f}" for v in info["load_after"]))
    vers = f"jax {info['jax']} ({info['jax_backend']})"
    if "torch" in info:
        vers += (f", torch {info['torch']} (OMP_WAIT_POLICY={info['OMP_WAIT_POLICY']}), "
                 f"diffusers {info.get('diffusers', '?')}")
    print(f"versions: {vers}, XLA_FLAGS={info['XLA_FLAGS']!r}, "
          f"GLIBC_TUNABLES={info['GLIBC_TUNABLES']!r}")


# ------------------------------------------------------------------------------ output
def _fmt(v, spec: str = "") -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return format(v, spec or ".3g")
    if isinstance(v, int) and not isinstance(v, bool):
        return format(v, spec or ",")
    return str(v)


def print_table(columns: Sequence[tuple], rows: Iterable[dict]) -> None:
    """columns: (key, header[, format spec]); numbers right-aligned, text left-aligned."""
    rows = list(rows)
    cells = [[_fmt(r.get(c[0]), c[2] if len(c) > 2 else "") for c in columns] for r in rows]
    heads = [c[1] for c in columns]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(heads)]
    numeric = [all(isinstance(r.get(c[0]), (int, float)) or r.get(c[0]) is None for r in rows)
               for c in columns]
    line = lambda vals: "| " + " | ".join(
        v.rjust(w) if n else v.ljust(w) for v, w, n in zip(vals, widths, numeric)) + " |"
    print(line(heads))
    print("|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2))
                         for w, n in zip(widths, numeric)) + "|")
    for row in cells:
        print(line(row))


def _clean(obj):
    if isinstance(obj, float):
        return None if (math.isnan(obj) or math.isinf(obj)) else obj
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _clean(obj.item())
    return obj


def write_json(path: str, payload: dict) -> None:
    """Writes payload (NaN/inf -> null) to path when path is non-empty; validates by reloading."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_clean(payload), f, indent=2, allow_nan=False)
    with open(path, encoding="utf-8") as f:
        json.load(f)
    print(f"wrote {path}")


# ------------------------------------------------- one-layer kernel microbenchmarks
def forward_and_grads(fn):
    """jit of (*args, cotangent) -> (fn(*args), *d<args>): the forward output and every
    argument's gradient for that output cotangent, as torch's `y = f(x); y.backward(g)` leaves
    them. (A `jax.grad` of sum(fn(*args) * g) would let XLA drop the forward pass where the
    gradients do not need its output, as for a convolution.)"""
    import jax

    def run(*args_and_cotangent):
        *args, g = args_and_cotangent
        y, vjp = jax.vjp(fn, *args)
        return (y,) + tuple(vjp(g))
    return jax.jit(run)


def kernel_bench_start(no_torch: bool):
    """The start of conv_kernels.py, attention_kernels.py and norm_kernels.py: torch (None with
    --no_torch) with denormals flushed, as XLA:CPU does, and their header line (versions,
    OMP_WAIT_POLICY, load average). Returns (torch, the load average before)."""
    import jax
    torch = None
    if not no_torch:
        import torch
        torch.set_flush_denormal(True)
    load0 = os.getloadavg()
    print(f"# jax {jax.__version__} backend {jax.default_backend()}; torch "
          f"{torch.__version__ if torch else '-'}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}"
          f"; load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    return torch, load0


def kernel_bench_finish(load0, rows: list, json_path: str) -> None:
    """Their end: the load-average line, and the rows as JSON when --json names a file."""
    load1 = os.getloadavg()
    print(f"# load average after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(dict(load_before=load0, load_after=load1, rows=rows), fh, indent=1)


# ------------------------------------------------------------------------------ torch
def import_torch(a):
    """torch, with OMP_WAIT_POLICY set before the first import (it is read once) and denormal
    flushing per --torch_ftz. Threads are set per row with torch.set_num_threads."""
    if getattr(a, "omp_wait_policy", "default") != "default":
        if "torch" in sys.modules and os.environ.get("OMP_WAIT_POLICY") != a.omp_wait_policy.upper():
            print("warning: torch was imported before OMP_WAIT_POLICY could be set")
        os.environ["OMP_WAIT_POLICY"] = a.omp_wait_policy.upper()
    import torch
    torch.set_flush_denormal(getattr(a, "torch_ftz", "on") == "on")
    device = getattr(a, "torch_device", "cpu")
    if device == "auto":
        import jax
        device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--torch_device=cuda: torch sees no CUDA device; use cpu")
        # The settings a tuned PyTorch run uses (XLA's GPU convolutions autotune and use TF32
        # for float32 by default too).
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    a.torch_device = device
    return torch


def torch_sync(torch, device: str):
    """A no-argument function that waits for `device`'s queued work (no-op on CPU)."""
    if device == "cpu":
        return lambda: None
    return torch.cuda.synchronize


def torch_autocast(torch, a):
    """The mixed-precision context of the torch rows: autocast to --dtype on a GPU, none on CPU
    (torch's CPU bfloat16 path is not what a CPU user would run)."""
    if getattr(a, "torch_device", "cpu") != "cpu" and a.dtype != "float32":
        return torch.autocast(device_type="cuda", dtype=getattr(torch, a.dtype))
    return contextlib.nullcontext()


def torch_compile(module, torch):
    """(compiled module, None) or (None, one-line reason) when torch.compile is unavailable.
    The compile itself happens lazily on the first call: callers must catch failures there too
    (use first_call_or_reason)."""
    try:
        return torch.compile(module), None
    except Exception as e:  # noqa: BLE001
        return None, short_reason(e)


def short_reason(e: BaseException, limit: int = 160) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ").strip()
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


# ------------------------------------------------------------------------------ config
def apply_conv_impl(config, conv_impl: str) -> str:
    """Benchmark convolution formulation. '' / 'default': the models as configured
    (`config.conv_weight_grad`, 'auto' = XLA's convolution with the GEMM weight gradient on
    CPU, ldm_jax/models/conv.py); 'xla' / 'gemm': that weight gradient for every model conv
    (sets `config.conv_weight_grad` and the process default); 'im2col' / 'shifted': the
    models' Conv replaced in this process by bench.conv_formulations.Conv(impl=...), same
    parameter tree (whole-GEMM formulations, slower here, see bench/README.md). Returns what
    was applied."""
    import jax

    from ldm_jax.models import conv
    if not conv_impl or conv_impl == "default":
        impl = config.get("conv_weight_grad", "auto") if config is not None else "auto"
        conv.set_default_weight_grad(impl)
        if impl == "auto":
            # per layer: the C++ kernel, the GEMM weight gradient or XLA's (ldm_jax/models/conv.py)
            return "auto (" + ("cpu_planned/gemm/xla per layer" if jax.default_backend() == "cpu"
                               else conv.resolve_weight_grad(impl)) + ")"
        return f"weight_grad {conv.resolve_weight_grad(impl)}"
    if conv_impl in ("xla", "gemm"):
        if config is not None:
            set_field(config, "conv_weight_grad", conv_impl)
        conv.set_default_weight_grad(conv_impl)
        return f"weight_grad {conv_impl}"
    import functools
    import importlib

    from bench.conv_formulations import CONV_IMPLS, Conv
    if conv_impl not in CONV_IMPLS:
        raise SystemExit(f"--conv_impl={conv_impl!r}: use one of default, xla, gemm, "
                         f"{', '.join(CONV_IMPLS)}")
    for name in ("unet", "autoencoder", "attention", "discriminator"):
        importlib.import_module(f"ldm_jax.models.{name}").Conv = functools.partial(
            Conv, impl=conv_impl)
    return conv_impl


def set_field(config, dotted: str, value) -> None:
    """config.a.b = value for an existing key (ml_collections keeps types: tuples as tuples)."""
    *groups, name = dotted.split(".")
    node = config
    for g in groups:
        node = node[g]
    node[name] = value


# ------------------------------------------------------------------------------ ldm_jax builders
def diffusion_config(spec: str, *, width: int | None, size: int, channels: int, batch: int,
                     dtype: str = "float32", conv_impl: str = ""):
    """A stage-2 config (default structure: configs/f4_celebahq.py) on synthetic latents
    [size, size, channels]: the real DiffusionTask runs without any data or first stage.
    Returns (config, conv_impl applied)."""
    from ldm_jax.config import loading as config_lib
    config = config_lib.load_config(spec if os.path.isabs(spec.partition(":")[0])
                                    else os.path.join(REPO, spec))
    if width:
        set_field(config, "model.model_channels", int(width))
    set_field(config, "data.source", "synthetic_latents")
    set_field(config, "data.latent_shape", (int(size), int(size), int(channels)))
    set_field(config, "data.latents_dir", "")
    set_field(config, "model.in_channels", 0)
    set_field(config, "model.out_channels", 0)
    set_field(config, "batch_size", int(batch))
    set_field(config, "dtype", dtype)
    set_field(config, "compilation_cache_dir", "")
    applied = apply_conv_impl(config, conv_impl)
    return config, applied


def diffusion_task(config):
    """DiffusionTask + fresh TrainState (jit-initialised) + a synthetic batch + constants."""
    import jax
    from ldm_jax.tasks.diffusion import DiffusionTask
    task = DiffusionTask(config)
    state = jax.jit(task.init_state)(jax.random.key(config.seed))
    shape = (config.batch_size,) + tuple(task.latents.latent_shape)
    batch = {task.input_key: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    return task, state, batch, task.constants()


def autoencoder_config(spec: str, *, ch: int | None, size: int, batch: int,
                       dtype: str = "float32", conv_impl: str = "", lpips_weights: str = "",
                       disc_start: int | None = 0):
    """A first-stage config (default structure: configs/autoencoder_kl_f4.py) at image size
    `size`; lpips_weights='' turns the perceptual term off. Returns (config, conv_impl)."""
    from ldm_jax.config import loading as config_lib
    config = config_lib.load_config(spec if os.path.isabs(spec.partition(":")[0])
                                    else os.path.join(REPO, spec))
    if ch:
        set_field(config, "model.ch", int(ch))
    set_field(config, "data.image_size", int(size))
    set_field(config, "model.resolution", None)
    set_field(config, "batch_size", int(batch))
    set_field(config, "dtype", dtype)
    set_field(config, "compilation_cache_dir", "")
    set_field(config, "loss.lpips_weights", lpips_weights)
    set_field(config, "loss.perceptual_weight", 1.0 if lpips_weights else 0.0)
    if disc_start is not None:
        set_field(config, "loss.disc_start", int(disc_start))
    applied = apply_conv_impl(config, conv_impl)
    return config, applied


def random_lpips_weights(directory: str) -> str:
    """An LPIPS weight file with random VGG weights (no download), as
    tests/test_train_autoencoder.py makes one: lin heads kept non-negative."""
    import jax
    from ldm_jax.models import lpips
    params = lpips.LPIPS().init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32),
                                np.zeros((1, 16, 16, 3), np.float32))["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: np.abs(np.asarray(v)) if "lin" in str(p) else np.asarray(v), params)
    path = os.path.join(directory, "lpips_random.npz")
    lpips.save_lpips_params_npz(params, path)
    return path


def first_stage_model(spec: str, *, ch: int | None, size: int, dtype: str = "float32",
                      conv_impl: str = ""):
    """(model, params, f, latent channels) of the first stage of `spec` (random weights)."""
    import jax
    import jax.numpy as jnp
    from ldm_jax.models import autoencoder as ae
    config, _ = autoencoder_config(spec, ch=ch, size=size, batch=1, dtype=dtype,
                                   conv_impl=conv_impl)
    set_field(config, "model.resolution", int(size))
    model = ae.make_first_stage(config.model, jnp.dtype(dtype))
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    params = jax.jit(model.init)({"params": jax.random.key(0), "sample": jax.random.key(1)},
                                 x)["params"]
    return model, params, ae.downsampling_factor(config.model), ae.latent_channels(config.model)


def log(msg: str) -> None:
    """Progress line on stderr (tables and JSON go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

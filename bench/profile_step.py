"""Where a train step's time goes: per op kind and per UNet block, from a jax.profiler trace.

Runs the real stage-2 train step (`DiffusionTask.train_step`, configs/f4_celebahq.py structure
at --width/--batch/--size/--channels on synthetic latents, AOT compiled with the state donated,
as the trainer does), traces --steps calls, and joins the trace's per-thunk times with the
compiled HLO: each fused computation is classed by what it contains (convolution forward /
input gradient / weight gradient, dot, reduce, copy/transpose, other) and attributed to the
model block in its op_name metadata (input_blocks_4_1, ...). On a GPU it reads the kernels on
the device's timeline (each names its HLO instruction) and classes cuDNN/cuBLAS calls by their
target; the ops' total against the step time gives the device's idle share. Also counts the
minor page faults per step (see docs/performance.md, "Host memory"). Prints three tables;
--json writes them.

    python bench/profile_step.py --width 64 --batch 4 --size 64
Not a test (lives in bench/).
"""

from __future__ import annotations

import collections
import functools
import glob
import gzip
import json
import os
import re
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

_BLOCK = re.compile(r"(input_blocks_\d+_\d+|middle_block_\d+|output_blocks_\d+_\d+|time_embed|out_)")


def parse_args(argv=None):
    p = common.arg_parser(__doc__)
    p.add_argument("--config", default="configs/f4_celebahq.py")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--top", type=int, default=12, help="rows of the per-block table")
    p.add_argument("--ops", default="", help="also list the slowest thunks of this block "
                   "(e.g. input_blocks_4_1; '(outside the UNet)' for the rest; 'ALL': the "
                   "whole step)")
    p.add_argument("--save_trace", default="", help="also write the trace's events and the "
                   "compiled HLO to PATH (gzipped JSON) for a later --from_trace")
    p.add_argument("--from_trace", default="", help="analyse a --save_trace file instead of "
                   "running the step (e.g. a GPU run's, on a machine without the GPU)")
    common.add_common_args(p, steps=2, warmup=2, torch=False)
    return p.parse_args(argv)


def _hlo_index(hlo: str):
    """instruction name -> (op_name metadata, set of op kinds inside its fused computation)."""
    bodies, current, lines = {}, None, {}
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            current = head.group(1)
            bodies[current] = []
        elif current and line.startswith(" ") and line.strip():
            bodies[current].append(line)
            m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
            if m:
                lines[m.group(1)] = m.group(2)
    index = {}
    for name, body in lines.items():
        op = re.search(r'op_name="([^"]+)"', body)
        op_name = op.group(1) if op else ""
        called = re.search(r"calls=%?([\w.\-]+)", body)
        inner = bodies.get(called.group(1), []) if called else [body]
        kinds = set()
        for text in inner:
            k = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = \S+ ([\w\-]+)\(", text)
            if k:
                kinds.add(k.group(1))
        if not called:
            k = re.match(r"\S+ ([\w\-]+)\(", body)
            if k:
                kinds.add(k.group(1))
        target = re.search(r'custom_call_target="([^"]+)"', body)
        if target:
            kinds.add("target:" + target.group(1))
        index[name] = (op_name, kinds)
    return index


# jax.nn.dot_product_attention(implementation='xla') is a vmap of two einsums ('BTNH,BSNH->BNTS'
# and back) around a softmax: its ops carry these names in their metadata.
_XLA_ATTENTION = re.compile(r"/vmap\(B\w*,B\w*->B\w*\)/|/vmap\(\)/")

# GPU library calls by custom-call target prefix (XLA:GPU's names): what each one computes.
_GPU_TARGETS = (
    ("__cudnn$convBackwardInput", "conv input gradient"),
    ("__cudnn$convBackwardFilter", "conv weight gradient"),
    ("__cudnn$conv", "conv forward"),   # convForward, convBiasActivationForward
    ("__cudnn$fmha", "attention (cuDNN fused)"),
)


def _kind(name: str, op_name: str, kinds: set) -> str:
    backward = "transpose(" in op_name
    targets = [k[len("target:"):] for k in kinds if k.startswith("target:")]
    if any(t.startswith("ldm_jax_") for t in targets):
        # ldm_jax's C++ kernels (ldm_jax/kernels), by custom-call target.
        target = next(t for t in targets if t.startswith("ldm_jax_"))
        if target == "ldm_jax_flip_transpose":
            return "ldm_jax kernel: conv flipped weights"
        if target == "ldm_jax_adam_update":
            return "ldm_jax kernel: optimizer (Adam + EMA + grad norm)"
        what = next((w for w in ("attention", "group_norm") if w in target), "conv")
        part = "forward" if target.endswith(("forward", "forward_packed")) else "backward"
        return f"ldm_jax kernel: {what.replace('_', ' ')} {part}"
    for prefix, kind in _GPU_TARGETS:
        if any(t.startswith(prefix) for t in targets):
            return kind
    if _XLA_ATTENTION.search(op_name):
        return "attention (XLA: scores and probabilities in memory)"
    if "convolution" in kinds:
        return "conv input/weight gradient" if backward else "conv forward"
    # cuBLAS GEMMs (__cublas$gemm, __cublas$lt$matmul) are XLA:GPU's dots.
    if "dot" in kinds or any(t.startswith("__cublas") for t in targets):
        return "dot (matmul) backward" if backward else "dot (matmul) forward"
    if "reduce" in kinds:
        return "reduction fusion (norms, softmax sums)"
    if name.startswith("copy") or kinds & {"copy", "transpose"}:
        return "copy / transpose"
    if "concatenate" in kinds:
        return "concatenate (skip connections, im2col)"
    return "elementwise / other"


# Library kernels inside a CUDA graph name their command buffer, not their instruction, so they
# are classed by kernel name: cuBLAS/cuBLASLt GEMMs (nvjet_*, *gemm*, cutlass, xmma), cuDNN's
# flash attention (cudnn_generated_fort_native_sdpa_*), the rest (memcpy, memset, ...).
_GRAPH_KERNELS = (
    (re.compile(r"sdpa|fmha|flash", re.IGNORECASE), "attention (cuDNN fused)"),
    (re.compile(r"nvjet|gemm|cutlass|xmma", re.IGNORECASE),
     "dot (cuBLAS GEMM inside a CUDA graph)"),
)
UNATTRIBUTED = "other kernels (memcpy, memset, ...)"
_GRAPH_KINDS = {kind for _, kind in _GRAPH_KERNELS} | {UNATTRIBUTED}


def _graph_kernel_kind(name: str) -> str:
    return next((kind for pattern, kind in _GRAPH_KERNELS if pattern.search(name)), UNATTRIBUTED)


def op_events(events: list, index: dict):
    """([(HLO instruction or a class, duration us)] for the trace's executions of the step's
    ops, whether the trace has a device timeline).

    CPU: the thunk events of the host, named after their instruction. GPU/TPU: the kernels on
    the device's timeline (process '/device:GPU:0', ...), each naming the instruction that
    launched it in args['hlo_op'] (a cuDNN convolution may run several kernels; all count). The
    host's launch events of the same instructions are left out, or a GPU op would count twice.
    XLA:GPU runs most of a step as CUDA graphs ("command buffers"): their kernels name the
    command buffer in hlo_op and their instruction in the kernel name, with '_' for '.'
    (fusion_2085 is fusion.2085). Library kernels in a graph (cuBLAS GEMMs, memcpy) name no
    instruction: they come back as a kind (_graph_kernel_kind) in place of the instruction."""
    names = {e.get("pid"): str((e.get("args") or {}).get("name", "")) for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    devices = {pid for pid, n in names.items() if re.search(r"/device:(GPU|TPU)", n)}
    kernel_names = {re.sub(r"[.\-]", "_", name): name for name in index}
    out = []
    for e in events:
        if e.get("ph") != "X":
            continue
        if devices and e.get("pid") not in devices:
            continue
        name = e.get("name", "")
        op = (e.get("args") or {}).get("hlo_op") or name
        if op not in index and devices:
            if not str(op).startswith("command_buffer"):
                continue   # another program's kernel
            op = kernel_names.get(name) or _graph_kernel_kind(name)
        if op in index or op in _GRAPH_KINDS:
            out.append((op, float(e.get("dur", 0))))
    return out, bool(devices)


def trace_events(run, steps: int) -> list:
    """The perfetto trace events of `steps` calls of run() (blocking), from jax.profiler."""
    import jax
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                run()
        trace = json.load(gzip.open(glob.glob(f"{tmp}/**/perfetto_trace.json.gz",
                                              recursive=True)[0]))
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def measure(a) -> dict:
    """Compiles and runs the step, then traces a.steps calls: the trace's events, the compiled
    HLO and the untraced step's time, i.e. everything the tables are made from."""
    import jax

    load0 = os.getloadavg()
    config, applied = common.diffusion_config(a.config, width=a.width, size=a.size,
                                              channels=a.channels, batch=a.batch, dtype=a.dtype,
                                              conv_impl=a.conv_impl)
    task, state, batch, consts = common.diffusion_task(config)
    compiled, _, _ = common.aot_compile(functools.partial(task.train_step, phase="main"),
                                        (state, batch, consts), donate_argnums=0)
    run = common.jax_runner(compiled, {"s": state}, (batch, consts))
    for _ in range(a.warmup):
        run()
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    run()
    step_s = time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    events = trace_events(run, a.steps)
    return {"events": events, "hlo": compiled.as_text(), "step_ms": step_s * 1e3,
            "page_faults": faults, "conv": applied, "machine": common.machine_info(load0),
            "args": {k: getattr(a, k) for k in ("config", "width", "batch", "size",
                                                "channels", "dtype", "steps")}}


def load_trace(path: str) -> dict:
    """A --save_trace file; exits 2 with one line when it is missing or is not one."""
    try:
        with gzip.open(path, "rt") as f:
            saved = json.load(f)
        if not {"events", "hlo", "args", "step_ms"} <= set(saved):
            raise ValueError("keys missing")
    except (OSError, ValueError, TypeError) as e:   # gzip.BadGzipFile is an OSError
        common.usage_error(f"--from_trace {path}: not a trace written by --save_trace "
                           f"({type(e).__name__}: {e})")
    return saved


def main(argv=None):
    a = parse_args(argv)
    if a.save_trace and not os.access(os.path.dirname(os.path.abspath(a.save_trace)), os.W_OK):
        # checked before the minutes of compile and tracing, not after
        common.usage_error(f"--save_trace {a.save_trace}: its folder does not exist or is not "
                           "writable")
    if a.from_trace:
        saved = load_trace(a.from_trace)
        for k, v in saved["args"].items():  # the tables describe the traced run
            setattr(a, k, v)
    else:
        saved = measure(a)
        if a.save_trace:
            with gzip.open(a.save_trace, "wt") as f:
                json.dump(saved, f)
    report(a, saved)


def report(a, saved: dict):
    events, step_s, faults = saved["events"], saved["step_ms"] / 1e3, saved["page_faults"]
    applied, info = saved["conv"], saved["machine"]
    index = _hlo_index(saved["hlo"])
    by_kind, by_block = collections.Counter(), collections.defaultdict(collections.Counter)
    by_thunk = collections.Counter()
    ops, on_device = op_events(events, index)
    for op, dur_us in ops:
        op_name, kinds = index.get(op, ("", set()))
        ms = dur_us / 1e3 / a.steps
        kind = _kind(op, op_name, kinds) if op in index else op
        by_kind[kind] += ms
        block = _BLOCK.search(op_name)
        block = (block.group(1) if block else
                 "(outside the UNet)" if op in index else "(in a CUDA graph, unattributed)")
        by_block[block][kind] += ms
        if a.ops in (block, "ALL"):
            by_thunk[(op, kind, op_name.split("/")[-1][:60])] += ms
    total = sum(by_kind.values())
    if not total:
        sys.exit("the trace holds no events of the step's HLO instructions: this jax's "
                 "profiler format is not the one bench/profile_step.py reads")

    print(f"train step: {a.config} width {a.width}, batch {a.batch}, "
          f"{a.size}x{a.size}x{a.channels}, {a.dtype}, conv {applied}; "
          f"step {step_s * 1e3:.0f} ms untraced, {faults} minor page faults per step")
    # On a device the ops' sum against the step shows the idle time between kernels (launch
    # gaps, host work); on CPU the thunks of two threads may overlap, so it can exceed 100 %.
    print(f"{'device kernels' if on_device else 'thunks'}: {total:.1f} ms per step, "
          f"{100 * total / (step_s * 1e3):.0f} % of the untraced step")
    kind_rows = [{"kind": k, "ms": v, "share": 100 * v / total} for k, v in by_kind.most_common()]
    common.print_table([("kind", "kind", ""), ("ms", "ms/step", ".1f"), ("share", "%", ".1f")],
                       kind_rows)
    block_rows = sorted(({"block": b, "ms": sum(c.values()),
                          "top": ", ".join(f"{k} {v:.0f}" for k, v in c.most_common(2))}
                         for b, c in by_block.items()), key=lambda r: -r["ms"])[:a.top]
    common.print_table([("block", "block", ""), ("ms", "ms/step", ".1f"),
                        ("top", "largest kinds (ms)", "")], block_rows)
    if a.ops and a.ops != "ALL" and a.ops not in by_block:
        sys.exit(f"--ops {a.ops!r}: no such block in this step; use one of "
                 f"{sorted(by_block)}")
    if a.ops:
        thunk_rows = [{"thunk": n, "kind": k, "op": o, "ms": v}
                      for (n, k, o), v in by_thunk.most_common(a.top)]
        common.print_table([("thunk", "thunk", ""), ("kind", "kind", ""), ("op", "op", ""),
                            ("ms", "ms/step", ".1f")], thunk_rows)
    common.print_machine(info)
    if a.json:
        common.write_json(a.json, {"args": vars(a), "step_ms": step_s * 1e3,
                                   "ops_ms": total, "on_device": on_device,
                                   "page_faults": faults, "by_kind": kind_rows,
                                   "by_block": block_rows, "machine": info})


if __name__ == "__main__":
    main()

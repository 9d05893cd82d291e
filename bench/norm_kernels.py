"""Microbenchmark: one GroupNorm(32) + SiLU layer, forward and forward + gradients, per
implementation.

Rows per shape: flax's `nn.GroupNorm` + `jax.nn.silu` under autodiff ('flax'), and
`ldm_jax.models.group_norm.group_norm` with `impl` 'xla' (its hand-written backward pass in
XLA) and 'cpu_fused' (ldm_jax/kernels/cpu_norm.cc), then torch's `GroupNorm` + `silu`
(channels_last) with 1 and 2 intra-op threads. The gradient rows differentiate
sum(y * g) for a fixed g, with respect to x, scale and bias. Times are the minimum over --reps
runs; all rows of a shape run back to back in one process. Prints a table; --json writes it.

Usage: python bench/norm_kernels.py [--reps 20] [--shapes 4x64x64x128,4x64x64x384,...]
       [--impls flax,xla,cpu_fused] [--no_torch] [--json out.json]
A shape is NxHxWxC. Not a test (lives in bench/).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench import common  # noqa: E402

# The f4_celebahq UNet's norms at widths 64-128 (batch 4, 64x64 latents) and a digits-sized one.
DEFAULT_SHAPES = "4x64x64x128,4x64x64x384,4x32x32x256,4x16x16x512,32x16x16x64"
IMPLS = ("flax", "xla", "cpu_fused")
GROUPS, EPS = 32, 1e-5


def parse_shapes(text: str) -> list:
    """--shapes as [(n, h, w, c)], each NxHxWxC with C a multiple of the 32 groups; otherwise
    exits 2 naming the bad item."""
    shapes = []
    for item in common.comma_list(text):
        parts = item.split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            common.usage_error(f"--shapes item {item!r}: use NxHxWxC, e.g. 4x64x64x128")
        n, h, w, c = (int(p) for p in parts)
        if c % GROUPS:
            common.usage_error(f"--shapes item {item!r}: C={c} is not a multiple of the "
                               f"{GROUPS} groups")
        shapes.append((n, h, w, c))
    if not shapes:
        common.usage_error("--shapes is empty; e.g. 4x64x64x128")
    return shapes


def main(argv=None):
    from ldm_jax.cli import host_memory
    host_memory.maybe_reexec()  # the malloc settings ldm_jax's commands use on CPU
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES)
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no_torch", action="store_true")
    p.add_argument("--torch_threads", default="1,2")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    impls = common.checked_list("--impls", a.impls, IMPLS)
    shapes = parse_shapes(a.shapes)

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ldm_jax.models.group_norm import group_norm

    def layer(impl):
        if impl == "flax":
            module = nn.GroupNorm(num_groups=GROUPS, epsilon=EPS)
            return lambda x, s, b: jax.nn.silu(
                module.apply({"params": {"scale": s, "bias": b}}, x))
        return lambda x, s, b: group_norm(x, s, b, GROUPS, EPS, True, "silu", impl)

    torch, load0 = common.kernel_bench_start(a.no_torch)
    rows = []
    print("| shape (NxHxWxC) | row | fwd ms | fwd+grad ms | fwd GB/s (x in, y out) |")
    print("|---|---|---:|---:|---:|")
    for n, h, w, c in shapes:
        shape = f"{n}x{h}x{w}x{c}"
        rng = np.random.default_rng(0)
        xn = rng.standard_normal((n, h, w, c), dtype=np.float32)
        gn = rng.standard_normal((n, h, w, c), dtype=np.float32)
        x, g = jnp.asarray(xn), jnp.asarray(gn)
        scale, bias = jnp.ones((c,), jnp.float32), jnp.zeros((c,), jnp.float32)
        for impl in impls:
            fn = layer(impl)
            f = jax.jit(fn)
            fg = common.forward_and_grads(fn)
            t_f = common.min_ms(lambda: jax.block_until_ready(f(x, scale, bias)), a.reps)
            t_fg = common.min_ms(lambda: jax.block_until_ready(fg(x, scale, bias, g)), a.reps)
            rows.append(dict(shape=shape, row=f"jax {impl}", fwd_ms=t_f, fwd_grad_ms=t_fg))
        if torch is not None:
            for threads in (int(t) for t in a.torch_threads.split(",")):
                torch.set_num_threads(threads)
                norm = torch.nn.GroupNorm(GROUPS, c, eps=EPS)
                cl = torch.channels_last
                tx = torch.from_numpy(xn).permute(0, 3, 1, 2).contiguous(memory_format=cl)
                tg = torch.from_numpy(gn).permute(0, 3, 1, 2).contiguous(memory_format=cl)
                tx.requires_grad_(True)

                def fwd():
                    with torch.no_grad():
                        torch.nn.functional.silu(norm(tx))

                def fwdbwd():
                    tx.grad = None
                    norm.zero_grad(set_to_none=True)
                    torch.nn.functional.silu(norm(tx)).backward(tg)
                rows.append(dict(shape=shape, row=f"torch channels_last {threads}T",
                                 fwd_ms=common.min_ms(fwd, a.reps),
                                 fwd_grad_ms=common.min_ms(fwdbwd, a.reps)))
        for r in rows:
            if r["shape"] == shape:
                gbs = 2 * xn.nbytes / r["fwd_ms"] / 1e6
                print(f"| {shape} | {r['row']} | {r['fwd_ms']:.2f} | {r['fwd_grad_ms']:.2f} | "
                      f"{gbs:.1f} |", flush=True)
    common.kernel_bench_finish(load0, rows, a.json)


if __name__ == "__main__":
    main()

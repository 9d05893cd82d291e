"""Microbenchmark: one multi-head attention, fwd and fwd+grad(q, k, v), per implementation.

Rows per shape: each ldm_jax implementation (`ldm_jax.models.attention.attention`: 'cpu_fused'
= the C++ kernel, 'chunked', 'xla'), jitted, and torch's fused
`F.scaled_dot_product_attention` with 1 and 2 intra-op threads. OMP_WAIT_POLICY=PASSIVE is set
before torch is imported. Times are the minimum over --reps runs; all rows of a shape run back
to back in the same process, so compare within a run. Prints a table, or JSON (--json).

Usage: python bench/attention_kernels.py [--reps 20] [--impls cpu_fused,chunked,xla]
       [--no_torch] [--shapes 4x1024x4x32,4x1024x77x8x64,...] [--json out.json]
A shape is BxLxHEADSxD (self-attention) or BxLqxLkxHEADSxD (cross-attention).
Not a test (lives in bench/).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench import common  # noqa: E402

# The f4_celebahq UNet at width 64, batch 4 (32x32, 16x16, 8x8 positions, 32-wide heads) and a
# text-conditioned layer (64x64 latent queries over a 77-token context, 8 heads of 40).
DEFAULT_SHAPES = "4x1024x4x32,4x256x8x32,4x64x12x32,4x4096x77x8x40"



def main(argv=None):
    from ldm_jax.cli import host_memory
    host_memory.maybe_reexec()  # the malloc settings ldm_jax's commands use on CPU
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES)
    p.add_argument("--impls", default="cpu_fused,chunked,xla")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no_torch", action="store_true")
    p.add_argument("--torch_threads", default="1,2")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from ldm_jax.models.attention import attention

    torch, load0 = common.kernel_bench_start(a.no_torch)
    rows = []
    print("| shape | row | fwd ms | fwd+grad ms | fwd+grad GFLOP/s |")
    print("|---|---|---:|---:|---:|")
    for shape in a.shapes.split(","):
        dims = [int(v) for v in shape.split("x")]
        if len(dims) == 4:
            b, lq, heads, d = dims
            lk = lq
        else:
            b, lq, lk, heads, d = dims
        # fwd 2 matmuls, backward 5 (the score product recomputed): 7 x 2 x B H Lq Lk d.
        flops = 7 * 2.0 * b * heads * lq * lk * d
        rng = np.random.default_rng(0)
        qn = rng.standard_normal((b, lq, heads, d), dtype=np.float32)
        kn = rng.standard_normal((b, lk, heads, d), dtype=np.float32)
        vn = rng.standard_normal((b, lk, heads, d), dtype=np.float32)
        gn = rng.standard_normal((b, lq, heads, d), dtype=np.float32)
        q, k, v, g = (jnp.asarray(t) for t in (qn, kn, vn, gn))
        for impl in a.impls.split(","):
            f = jax.jit(lambda q, k, v, impl=impl: attention(q, k, v, implementation=impl))
            fg = common.forward_and_grads(
                lambda q, k, v, impl=impl: attention(q, k, v, implementation=impl))
            t_f = common.min_ms(lambda: jax.block_until_ready(f(q, k, v)), a.reps)
            t_fg = common.min_ms(lambda: jax.block_until_ready(fg(q, k, v, g)), a.reps)
            rows.append(dict(shape=shape, row=f"jax {impl}", fwd_ms=t_f, fwd_grad_ms=t_fg))
        if torch is not None:
            import torch.nn.functional as F
            # [B, L, H, D] -> [B, H, L, D], torch's layout for SDPA
            tq, tk, tv, tg = (torch.from_numpy(t).permute(0, 2, 1, 3).contiguous()
                              for t in (qn, kn, vn, gn))
            for t in (tq, tk, tv):
                t.requires_grad_(True)
            for threads in (int(t) for t in a.torch_threads.split(",")):
                torch.set_num_threads(threads)

                def fwd():
                    with torch.no_grad():
                        F.scaled_dot_product_attention(tq, tk, tv)

                def fwdbwd():
                    tq.grad = tk.grad = tv.grad = None
                    F.scaled_dot_product_attention(tq, tk, tv).backward(tg)
                rows.append(dict(shape=shape, row=f"torch SDPA {threads}T",
                                 fwd_ms=common.min_ms(fwd, a.reps), fwd_grad_ms=common.min_ms(fwdbwd, a.reps)))
        for r in rows:
            if r["shape"] == shape:
                print(f"| {shape} | {r['row']} | {r['fwd_ms']:.2f} | {r['fwd_grad_ms']:.2f} | "
                      f"{flops / r['fwd_grad_ms'] / 1e6:.1f} |", flush=True)
    common.kernel_bench_finish(load0, rows, a.json)


if __name__ == "__main__":
    main()

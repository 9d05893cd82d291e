"""Microbenchmark: one 3x3 stride-1 'same' convolution, fwd and fwd+grad(x, w), per formulation.

Rows per shape: each impl, jitted: bench.conv_formulations' ('xla', 'im2col', 'shifted') and
the models' own `ldm_jax.models.conv.conv2d` as 'ldm:<weight_grad>' ('ldm:gemm' = XLA's
convolution with the GEMM weight gradient, 'ldm:cpu_fused' = ldm_jax's C++ kernel), and torch
(F.conv2d) in NCHW and channels_last with 1 and 2 intra-op threads. OMP_WAIT_POLICY=PASSIVE is
set before torch is imported and torch.set_flush_denormal(True) (XLA:CPU flushes denormals).
Times are the minimum over --reps runs (robust on a shared machine); all rows of a shape run
back to back in the same process, so compare within a run. Prints a table, or JSON (--json).

Usage: python bench/conv_kernels.py [--reps 20] [--impls xla,ldm:gemm,ldm:cpu_fused]
       [--no_torch] [--shapes 32x32x32x16,4x64x64x128x64,...] [--json out.json]
A shape is NxHxWxC (C -> C channels) or NxHxWxCinxCout.
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

# batch x H x W x C (C -> C): the digits first stage (batch 32, ch 16/32/64) and the
# f4_celebahq-structure UNet at width 64 (batch 4, 64x64 latent, 64/128/256 channels).
DEFAULT_SHAPES = ("32x32x32x16,32x16x16x32,32x8x8x64,4x64x64x64,4x64x64x128x64,4x64x64x192x64,"
                  "4x32x32x128,4x32x32x256x128,4x16x16x256")



def main(argv=None):
    from ldm_jax.cli import host_memory
    host_memory.maybe_reexec()  # the malloc settings ldm_jax's commands use on CPU
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES)
    p.add_argument("--impls", default="xla,ldm:gemm,ldm:cpu_fused")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no_torch", action="store_true")
    p.add_argument("--torch_threads", default="1,2")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.conv_formulations import conv2d as formulation_conv2d
    from ldm_jax.models.conv import conv2d as model_conv2d

    def conv2d(x, w, strides, pad, impl):
        if impl.startswith("ldm:"):
            return model_conv2d(x, w, strides, pad, weight_grad=impl[4:])
        return formulation_conv2d(x, w, strides, pad, impl)

    torch, load0 = common.kernel_bench_start(a.no_torch)
    rows = []
    print("| shape (NxHxWxC) | row | fwd ms | fwd+grad ms | fwd GFLOP/s |")
    print("|---|---|---:|---:|---:|")
    for shape in a.shapes.split(","):
        dims = [int(v) for v in shape.split("x")]
        n, h, w, c = dims[:4]
        cout = dims[4] if len(dims) > 4 else c
        flops = 2.0 * n * h * w * c * cout * 9
        rng = np.random.default_rng(0)
        xn = rng.standard_normal((n, h, w, c), dtype=np.float32)
        wn = (rng.standard_normal((3, 3, c, cout)) / np.sqrt(9 * c)).astype(np.float32)
        gn = rng.standard_normal((n, h, w, cout), dtype=np.float32)
        x, wt, g = jnp.asarray(xn), jnp.asarray(wn), jnp.asarray(gn)
        pad = ((1, 1), (1, 1))
        for impl in a.impls.split(","):
            f = jax.jit(lambda x, w, impl=impl: conv2d(x, w, (1, 1), pad, impl))
            fg = common.forward_and_grads(lambda x, w, impl=impl: conv2d(x, w, (1, 1), pad, impl))
            t_f = common.min_ms(lambda: jax.block_until_ready(f(x, wt)), a.reps)
            t_fg = common.min_ms(lambda: jax.block_until_ready(fg(x, wt, g)), a.reps)
            rows.append(dict(shape=shape, row=f"jax {impl}", fwd_ms=t_f, fwd_grad_ms=t_fg))
        if torch is not None:
            import torch.nn.functional as F
            for threads in (int(t) for t in a.torch_threads.split(",")):
                torch.set_num_threads(threads)
                for layout in ("NCHW", "channels_last"):
                    mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                    tx = torch.from_numpy(xn).permute(0, 3, 1, 2).contiguous(memory_format=mf)
                    tw = torch.from_numpy(wn).permute(3, 2, 0, 1).contiguous(memory_format=mf)
                    tg = torch.from_numpy(gn).permute(0, 3, 1, 2).contiguous(memory_format=mf)
                    tx.requires_grad_(True)
                    tw.requires_grad_(True)

                    def fwd():
                        with torch.no_grad():
                            F.conv2d(tx, tw, padding=1)

                    def fwdbwd():
                        tx.grad = tw.grad = None
                        y = F.conv2d(tx, tw, padding=1)
                        y.backward(tg)
                    t_f = common.min_ms(fwd, a.reps)
                    t_fg = common.min_ms(fwdbwd, a.reps)
                    rows.append(dict(shape=shape, row=f"torch {layout} {threads}T", fwd_ms=t_f,
                                     fwd_grad_ms=t_fg))
        for r in rows:
            if r["shape"] == shape:
                print(f"| {shape} | {r['row']} | {r['fwd_ms']:.2f} | {r['fwd_grad_ms']:.2f} | "
                      f"{flops / r['fwd_ms'] / 1e6:.1f} |", flush=True)
    common.kernel_bench_finish(load0, rows, a.json)


if __name__ == "__main__":
    main()

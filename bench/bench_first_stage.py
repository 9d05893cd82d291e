"""Benchmark one first-stage (KL autoencoder) TRAINING step: ldm_jax vs the PyTorch reference.

Rows (same architecture, same batch, same machine):
  ldm_jax (model)  make_first_stage(cfg) + loss sum|x-recon|/B + 1e-6*KL + optax.adam, jitted
                   with the params/opt state donated and compiled ahead of time.
  ldm_jax (task)   the real project step: AutoencoderTask(config).train_step(.., phase='rec')
                   (learned-logvar NLL, KL, Adam with schedule, grad norm, finite check) built
                   from configs/autoencoder_kl_f4_digits.py with overrides; jitted exactly as
                   ldm_jax/training/trainer.py does (state donated, AOT compiled).
  torch (NCHW / channels_last)  diffusers.AutoencoderKL with DownEncoderBlock2D/UpDecoderBlock2D,
                   block_out_channels=ch*mult, layers_per_block=num_res_blocks, same loss,
                   torch.optim.Adam. Its mid blocks have attention, as do ldm_jax's (CompVis
                   Encoder/Decoder always have mid.attn_1), so parameter counts match exactly.

Step time = median over --steps timed steps after warm-up (JAX: jax.block_until_ready on the
whole output; torch is synchronous on CPU). FLOPs/step come from the compiled ldm_jax (model)
step's cost_analysis() and the same count is used for every row, so MFU columns compare
directly; torch's own FlopCounterMode count (conv/matmul only) is printed as a cross-check.
"params" counts the autoencoder only (the task row also trains one scalar logvar).

Usage: python bench/bench_first_stage.py [--batch 16] [--size 32] [--ch 32] [--ch_mult 1,2,4]
       [--num_res_blocks 2] [--norm_groups 32] [--steps 10] [--peak_gflops 68] [--dtype float32]
       [--torch_threads 1,2] [--channels_last both|on|off] [--omp_wait_policy default|passive]
       [--torch_ftz on|off] [--skip_task] [--skip_torch]; XLA_FLAGS pass through to XLA.
Not a test (lives in bench/, pytest only collects tests/).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args(argv=None):
    from ldm_jax.cli import host_memory
    host_memory.maybe_reexec()  # the malloc settings ldm_jax's commands use on CPU
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--ch", type=int, default=32)
    p.add_argument("--ch_mult", type=str, default="1,2,4")
    p.add_argument("--num_res_blocks", type=int, default=2)
    p.add_argument("--norm_groups", type=int, default=32)
    p.add_argument("--z_channels", type=int, default=3, help="= embed_dim (diffusers ties them)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compile")
    p.add_argument("--peak_gflops", type=float, default=68.0, help="machine peak for MFU")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="ldm_jax compute dtype (params stay float32); torch always float32")
    p.add_argument("--torch_threads", type=str,
                   default=",".join(sorted({"1", str(os.cpu_count())}, key=int)),
                   help="comma list of torch intra-op thread counts, one row each")
    p.add_argument("--omp_wait_policy", choices=("default", "passive", "active"),
                   default="default", help="OMP_WAIT_POLICY for torch's OpenMP pool (set before "
                   "torch is imported); 'passive' avoids spin-wait stalls on a loaded machine")
    p.add_argument("--torch_ftz", choices=("on", "off"), default="on",
                   help="torch.set_flush_denormal; XLA:CPU flushes denormals, torch does not")
    p.add_argument("--skip_task", action="store_true", help="skip the AutoencoderTask row")
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--channels_last", choices=("both", "on", "off"), default="both")
    p.add_argument("--conv_impl", choices=("default", "xla", "im2col", "shifted"),
                   default="default", help="ldm_jax conv formulation (bench/conv_formulations.py). "
                   "'default' leaves the models' flax.linen.Conv alone; the others replace "
                   "flax.linen.Conv in this process by bench.conv_formulations.Conv(impl=...), "
                   "which has the same parameter tree (benchmark-only switch)")
    return p.parse_args(argv)


def apply_conv_impl(impl):
    """Benchmark-only: make every flax.linen.Conv built by the models use ``impl``."""
    if impl == "default":
        return
    import functools

    import flax.linen as nn
    from bench.conv_formulations import Conv
    nn.Conv = functools.partial(Conv, impl=impl)


# Shared with the other bench/ scripts (bench/common.py).
from bench.common import flops_of as _flops_of  # noqa: E402
from bench.common import timed_steps  # noqa: E402


# --------------------------------------------------------------------------------------- JAX
def bench_jax_model(a, x_nhwc):
    import jax
    import jax.numpy as jnp
    import optax
    from ldm_jax.models.autoencoder import make_first_stage

    cfg = dict(kind="kl", ch=a.ch, ch_mult=a.ch_mult, num_res_blocks=a.num_res_blocks,
               attn_resolutions=(), resolution=a.size, in_channels=3, out_ch=3,
               z_channels=a.z_channels, embed_dim=a.z_channels, dropout=0.0,
               norm_groups=a.norm_groups)
    model = make_first_stage(cfg, dtype=jnp.dtype(a.dtype))
    x = jnp.asarray(x_nhwc)
    params = jax.jit(model.init)({"params": jax.random.key(0), "sample": jax.random.key(1)},
                                 x)["params"]
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    tx = optax.adam(1e-4)
    opt_state = tx.init(params)

    def loss_fn(p, x, key):
        out = model.apply({"params": p}, x, sample_posterior=True, train=True,
                          rngs={"sample": key})
        return jnp.sum(jnp.abs(x - out["recon"])) / x.shape[0] + 1e-6 * out["reg_loss"]

    def step(p, s, x, key):
        loss, g = jax.value_and_grad(loss_fn)(p, x, key)
        upd, s = tx.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, opt_state, x, jax.random.key(2)).compile()
    compile_s = time.perf_counter() - t0
    flops = _flops_of(compiled)
    state = {"p": params, "s": opt_state, "i": 0}

    def run():
        state["i"] += 1
        out = compiled(state["p"], state["s"], x, jax.random.key(state["i"]))
        jax.block_until_ready(out)
        state["p"], state["s"], loss = out
        return loss

    warm, times = timed_steps(run, a.warmup, a.steps)
    return dict(name=f"ldm_jax model ({a.dtype})", params=n_params, compile=compile_s,
                warm=warm, times=times, flops=flops, loss=float(run()))


def bench_jax_task(a, x_nhwc):
    import functools

    import jax
    import jax.numpy as jnp
    from ldm_jax.config import loading as config_lib
    from ldm_jax.tasks.autoencoder import AutoencoderTask

    c = config_lib.load_config(os.path.join(REPO, "configs/autoencoder_kl_f4_digits.py"))
    config_lib.apply_overrides(c, [
        f"model.ch={a.ch}", f"model.ch_mult={','.join(map(str, a.ch_mult))}",
        f"model.num_res_blocks={a.num_res_blocks}", f"model.norm_groups={a.norm_groups}",
        f"model.resolution={a.size}", f"data.image_size={a.size}",
        f"model.z_channels={a.z_channels}", f"model.embed_dim={a.z_channels}",
        f"batch_size={a.batch}", f"dtype={a.dtype}"])
    task = AutoencoderTask(c)
    batch = {"image": jnp.asarray(x_nhwc)}
    state = jax.jit(functools.partial(task.init_state, image_shape=x_nhwc.shape))(
        jax.random.key(0))
    n_params = sum(int(np.prod(p.shape)) for p in
                   jax.tree_util.tree_leaves(state.params["generator"]["model"]))
    consts = task.constants()
    t0 = time.perf_counter()
    compiled = jax.jit(functools.partial(task.train_step, phase="rec"),
                       donate_argnums=0).lower(state, batch, consts).compile()
    compile_s = time.perf_counter() - t0
    box = {"s": state}

    def run():
        out = compiled(box["s"], batch, consts)
        jax.block_until_ready(out)
        box["s"], m = out
        return m

    warm, times = timed_steps(run, a.warmup, a.steps)
    return dict(name=f"ldm_jax task ({a.dtype})", params=n_params, compile=compile_s, warm=warm,
                times=times, flops=_flops_of(compiled), loss=float(run()["loss"]))


# ------------------------------------------------------------------------------------- torch
def bench_torch(a, x_nhwc, channels_last, threads):
    import torch
    from diffusers import AutoencoderKL

    torch.set_num_threads(threads)
    torch.set_flush_denormal(a.torch_ftz == "on")
    torch.manual_seed(0)
    n = len(a.ch_mult)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n,
                        block_out_channels=tuple(a.ch * m for m in a.ch_mult),
                        layers_per_block=a.num_res_blocks, latent_channels=a.z_channels,
                        norm_num_groups=a.norm_groups, sample_size=a.size,
                        mid_block_add_attention=True).train()
    n_params = sum(p.numel() for p in vae.parameters())
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    if channels_last:
        vae = vae.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-4)

    def run():
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        loss = (x - recon).abs().sum() / x.shape[0] + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    t0 = time.perf_counter()
    run()  # first step (allocations, lazy init): reported as warm-up
    first = time.perf_counter() - t0
    warm, times = timed_steps(run, max(a.warmup - 1, 0), a.steps)
    counted = float("nan")
    try:
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as fc:
            loss = run()
        counted = float(fc.get_total_flops())
    except Exception:  # pragma: no cover - cross-check only
        loss = run()
    name = f"torch {'channels_last' if channels_last else 'NCHW'} {threads}T"
    name += " noFTZ" if a.torch_ftz == "off" else ""
    name += f" {a.omp_wait_policy}" if a.omp_wait_policy != "default" else ""
    return dict(name=name, params=n_params,
                compile=first + warm, warm=0.0, times=times, flops=float("nan"),
                torch_flops=counted, loss=float(loss.detach()))


# ------------------------------------------------------------------------------------ report
def main(argv=None):
    a = parse_args(argv)
    a.ch_mult = tuple(int(m) for m in str(a.ch_mult).split(","))
    load0 = os.getloadavg()
    x = np.random.default_rng(0).uniform(-1, 1, (a.batch, a.size, a.size, 3)).astype(np.float32)
    import jax
    apply_conv_impl(a.conv_impl)
    rows = [bench_jax_model(a, x)]
    if not a.skip_task:
        rows.append(bench_jax_task(a, x))
    if not a.skip_torch:
        if a.omp_wait_policy != "default":
            os.environ["OMP_WAIT_POLICY"] = a.omp_wait_policy.upper()
        import torch
        modes = {"both": (False, True), "on": (True,), "off": (False,)}[a.channels_last]
        rows += [bench_torch(a, x, cl, int(t)) for t in a.torch_threads.split(",") for cl in modes]
    flops = rows[0]["flops"]
    torch_rows = [r for r in rows if r["name"].startswith("torch")]
    best_torch = max((a.batch / statistics.median(r["times"]) for r in torch_rows), default=None)

    print(f"\nfirst-stage KL training step: batch {a.batch}, {a.size}x{a.size}x3, ch {a.ch}, "
          f"ch_mult {a.ch_mult}, num_res_blocks {a.num_res_blocks}, norm_groups {a.norm_groups}, "
          f"z {a.z_channels}, jax dtype {a.dtype}, conv_impl {a.conv_impl}")
    print(f"machine: {platform.machine()} nproc {os.cpu_count()}, load avg before "
          f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, after "
          + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    vers = f"jax {jax.__version__}"
    if torch_rows:
        import diffusers
        import torch
        vers += (f", torch {torch.__version__} (FTZ {a.torch_ftz}, OMP_WAIT_POLICY="
                 f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}), "
                 f"diffusers {diffusers.__version__}")
    print(f"versions: {vers}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"FLOPs/step (XLA cost_analysis of the ldm_jax model step, used for every row): "
          f"{flops / 1e9:.3f} GFLOP"
          + "".join(f"; task step {r['flops'] / 1e9:.3f}" for r in rows if "task" in r["name"])
          + "".join(f"; torch FlopCounterMode {r['torch_flops'] / 1e9:.3f}"
                    for r in torch_rows[:1]))
    hdr = (f"| {'framework':<32} | {'params':>10} | {'compile/warm-up s':>17} | {'step ms':>8} | "
           f"{'min ms':>7} | {'images/s':>8} | {'GFLOP/s':>7} | {'MFU':>6} | {'jax/torch':>9} |")
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for r in rows:
        ms = statistics.median(r["times"]) * 1e3
        ips = a.batch / (ms / 1e3)
        gfs = flops / (ms / 1e3) / 1e9
        ratio = f"{ips / best_torch:.2f}" if best_torch and "ldm_jax" in r["name"] else ""
        cw = f"{r['compile']:.1f}" + (f" / {r['warm']:.1f}" if r["warm"] else "")
        print(f"| {r['name']:<32} | {r['params']:>10,} | {cw:>17} | {ms:>8.1f} | "
              f"{min(r['times']) * 1e3:>7.1f} | {ips:>8.1f} | {gfs:>7.1f} | "
              f"{100 * gfs / a.peak_gflops:>5.1f}% | {ratio:>9} |")
    print("step ms: median of", a.steps, "steps (min ms: fastest); max ms: " + ", ".join(
        f"{r['name']} {max(r['times']) * 1e3:.0f}" for r in rows))
    print("final losses: " + ", ".join(f"{r['name']} {r['loss']:.4g}" for r in rows))
    print(f"jax/torch = ldm_jax images/s over the best torch row; MFU vs --peak_gflops "
          f"{a.peak_gflops:g}; compile/warm-up = jax: AOT compile s / warm-up s of {a.warmup} "
          f"steps; torch: first {a.warmup} steps (no compile)")


if __name__ == "__main__":
    main()

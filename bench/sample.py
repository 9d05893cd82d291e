"""DDIM sampling throughput (images/s): ldm_jax vs diffusers with the SAME weights, in one run.

  ldm_jax         the computation `python -m ldm_jax.sample` runs per batch
                  (ldm_jax/inference/sampling.py:sample_batches: task.sample_latents with the
                  config's DDIM sampler, one key per sample fold_in(key(seed), j), then
                  task.decode), jitted and compiled ahead of time once, then timed.
                  'generate() s' is one call of sampling.generate() itself (it compiles on
                  every call, so this is compile + one batch), as a check that the path is the
                  real one (its images are compared with the timed function's).
  torch <mode> <N>T  diffusers UNet2DModel loaded with ldm_jax's weights converted by
                  ldm_jax.convert.unet_params_to_diffusers + DDIMScheduler from
                  ldm_jax.convert.configs.scheduler_from_diffusion (leading spacing,
                  steps_offset 1, set_alpha_to_one False), a plain Python loop under
                  torch.inference_mode; modes eager, eager_cl (channels_last), compile.
The model is the stage-2 UNet of --config (configs/f4_celebahq.py) at --width/--size/--channels
with random weights on synthetic latents (no first stage: decode is the identity-like
latents-as-image map). Both sides start from the same initial noise (ldm_jax's per-sample
keys); 'max |diff|' is the largest absolute difference of the final latents between torch and
ldm_jax (float32; it grows with the number of steps and the width, ~1e-4..1e-3 is agreement).
FLOPs/call: XLA cost_analysis of one compiled ldm_jax UNet forward x --ddim_steps (XLA's cost
analysis of the sampling executable counts the fori_loop body once, so it is printed only as
a cross-check).

Usage: python bench/sample.py [--width 32] [--batch 4] [--size 32] [--channels 3]
  [--ddim_steps 50] [--steps 3] [--warmup 1] [--torch_modes eager,eager_cl,compile]
  [--torch_threads 1,2] [--json out.json]
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

COLUMNS = [("name", "row"), ("params", "params"), ("compile_s", "compile/first s", ".1f"),
           ("ms", "batch ms", ".1f"), ("min_ms", "min ms", ".1f"), ("img_s", "img/s", ".3f"),
           ("ms_per_img_step", "ms/img/step", ".2f"), ("gflop_s", "GFLOP/s", ".1f"),
           ("mfu_pct", "MFU %", ".1f"), ("ratio", "jax/torch", ".2f"),
           ("max_abs_diff", "max |diff|", ".2e"), ("note", "note")]


def parse_args(argv=None):
    p = common.arg_parser(__doc__)
    p.add_argument("--config", default="configs/f4_celebahq.py", help="stage-2 structure")
    p.add_argument("--width", type=int, default=32, help="UNet model_channels (multiple of 32)")
    p.add_argument("--batch", type=int, default=4, help="images per sampling call")
    p.add_argument("--size", type=int, default=32, help="latent resolution")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch_modes", default="eager,eager_cl,compile",
                   help="comma list of eager, eager_cl (channels_last), compile")
    p.add_argument("--skip_generate", action="store_true",
                   help="skip the one sampling.generate() call (compile + 1 batch)")
    common.add_common_args(p, steps=3, warmup=1)
    return p.parse_args(argv)


def _row(name, times, a, flops, params, compile_s, note=""):
    s = common.summarize(times, a.batch)
    sec = s["ms"] / 1e3
    return {"name": name, "params": params, "compile_s": compile_s, "ms": s["ms"],
            "min_ms": s["min_ms"], "max_ms": s["max_ms"], "img_s": s["items_s"],
            "ms_per_img_step": s["ms"] / a.batch / a.ddim_steps,
            "gflop_s": flops / sec / 1e9 if sec > 0 else float("nan"),
            "mfu_pct": 100 * common.mfu(flops, sec, a.peak_gflops), "note": note}


def jax_side(a, config):
    import jax
    import jax.numpy as jnp
    from ldm_jax.diffusion import samplers
    from ldm_jax.inference import sampling
    from ldm_jax.parallel import sharding
    from ldm_jax.tasks.diffusion import DiffusionTask, make_sampler

    task = DiffusionTask(config)
    state = jax.jit(task.init_state)(jax.random.key(1))
    params = state.ema_params
    n_params = common.count_params(params)
    constants = task.constants()
    sampler = make_sampler(task.config, task.schedule, name="ddim", num_steps=a.ddim_steps,
                           eta=0.0)
    B, seed = a.batch, a.seed

    def keys_of(i):  # as sampling.sample_batches: sample j's key is fold_in(key(seed), j)
        index = i * B + jnp.arange(B, dtype=jnp.uint32)
        return jax.vmap(lambda j: jax.random.fold_in(jax.random.key(seed), j))(index)

    def sample_index(params, constants, i):
        z = task.sample_latents(params, keys_of(i), B, cond=None, constants=constants,
                                sampler=sampler, guidance_scale=1.0)
        return task.decode(constants, z), z

    common.log("sampling: ldm_jax")
    i0 = np.uint32(0)
    compiled, lower_s, comp_s = common.aot_compile(sample_index, (params, constants, i0))
    # XLA's cost analysis counts a while loop's body once, not times its trip count, so the
    # sampling call's FLOPs = one UNet forward (compiled alone) x the DDIM steps.
    shape = (B,) + tuple(task.latents.latent_shape)
    unet_flops = common.xla_flops(lambda p, x, t: task._apply(p, x, t, {}),
                                  (params, jnp.zeros(shape, jnp.float32),
                                   jnp.zeros((B,), jnp.int32)))
    flops = unet_flops * a.ddim_steps
    loop_flops = common.flops_of(compiled)
    out = {}

    def run():
        out["r"] = compiled(params, constants, i0)
        jax.block_until_ready(out["r"])
    _, times = common.timed_steps(run, a.warmup, a.steps)
    images, z = (np.asarray(v) for v in out["r"])
    rows = [_row(f"ldm_jax ({a.dtype})", times, a, flops, n_params, lower_s + comp_s,
                 note="sample_batches computation, AOT")]
    # The initial noise the sampler draws from those keys (samplers._split/_normal).
    noise = np.asarray(jax.jit(lambda: samplers._normal(samplers._split(keys_of(0), shape)[0],
                                                          shape))())
    gen = {"unet_forward_flops": unet_flops, "xla_loop_flops": loop_flops}
    if not a.skip_generate:
        mesh = sharding.make_mesh(task.config.mesh)
        t0 = time.perf_counter()
        got = sampling.generate(task, params, constants, num=B, batch_size=B, seed=seed,
                                sampler=sampler, guidance_scale=1.0, mesh=mesh)
        gen.update({"generate_s": time.perf_counter() - t0,
               "generate_max_uint8_diff": int(np.max(np.abs(
                   got.astype(np.int32) - _to_uint8(images).astype(np.int32))))})
        rows[0]["note"] += (f"; generate() {gen['generate_s']:.1f}s (compile+1 batch), "
                            f"uint8 diff {gen['generate_max_uint8_diff']}")
    return task, params, n_params, rows, flops, noise, z, gen


def _to_uint8(images):
    from ldm_jax.storage import images as image_files
    return image_files.to_uint8(images)


def torch_side(a, torch, task, params, noise_nhwc, z_jax, flops, n_params_jax):
    from diffusers import DDIMScheduler, UNet2DModel
    from ldm_jax import convert
    from ldm_jax.convert.configs import scheduler_from_diffusion
    fields = dict(task.config.model)
    cfg = convert.unet_diffusers_config(fields, sample_size=a.size)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    sd = convert.unet_params_to_diffusers(params, fields)
    sched_cfg = {k: v for k, v in scheduler_from_diffusion(dict(task.config.diffusion)).items()
                 if not k.startswith("_")}
    dev = a.torch_device
    x_T = torch.from_numpy(np.ascontiguousarray(noise_nhwc.transpose(0, 3, 1, 2))).to(dev)
    sync = common.torch_sync(torch, dev)
    rows = []
    for threads, mode, name in common.torch_variants(a):
        common.log(f"sampling: {name}")
        if threads:
            torch.set_num_threads(threads)
        unet = UNet2DModel(**cfg).eval()
        unet.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
                             strict=True)
        unet = unet.to(dev)
        n_params = common.count_params(unet)
        if n_params != n_params_jax:
            raise AssertionError(f"parameter counts differ: ldm_jax {n_params_jax:,} vs "
                                 f"diffusers {n_params:,}")
        x0 = x_T
        if mode == "eager_cl":
            unet = unet.to(memory_format=torch.channels_last)
            x0 = x_T.contiguous(memory_format=torch.channels_last)
        fwd = unet
        if mode == "compile":
            fwd, reason = common.torch_compile(unet, torch)
            if fwd is None:
                rows.append({"name": name, "note": f"n/a: {reason}"})
                continue
        sched = DDIMScheduler(**sched_cfg)
        sched.set_timesteps(a.ddim_steps)
        res = {}

        def run():
            with torch.inference_mode():
                x = x0
                for t in sched.timesteps:
                    with common.torch_autocast(torch, a):
                        eps = fwd(x, t).sample
                    x = sched.step(eps.float(), t, x, eta=0.0).prev_sample
            res["x"] = x
            sync()
        t0 = time.perf_counter()
        try:
            run()
        except Exception as e:  # noqa: BLE001
            rows.append({"name": name, "note": f"n/a: {common.short_reason(e)}"})
            continue
        first = time.perf_counter() - t0
        _, times = common.timed_steps(run, max(a.warmup - 1, 0), a.steps)
        row = _row(name, times, a, flops, n_params, first)
        x = res["x"].float().cpu().numpy().transpose(0, 2, 3, 1)
        row["max_abs_diff"] = float(np.max(np.abs(x - z_jax)))
        rows.append(row)
    return rows


def main(argv=None):
    a = parse_args(argv)
    load0 = os.getloadavg()
    torch = None if a.skip_torch else common.import_torch(a)
    common.resolve_peak(a, torch)
    config, applied = common.diffusion_config(a.config, width=a.width, size=a.size,
                                              channels=a.channels, batch=a.batch, dtype=a.dtype,
                                              conv_impl=a.conv_impl)
    set_ = common.set_field
    set_(config, "sampling.num_steps", a.ddim_steps)
    set_(config, "sampling.eta", 0.0)
    set_(config, "sampling.guidance_scale", 1.0)
    task, params, n_params, rows, flops, noise, z_jax, gen = jax_side(a, config)
    if torch is not None:
        rows += torch_side(a, torch, task, params, noise, z_jax, flops, n_params)
    ok = [r for r in rows if r["name"].startswith("torch") and r.get("img_s", 0) == r.get("img_s")]
    best = max(ok, key=lambda r: r["img_s"]) if ok else None
    if best:
        rows[0]["ratio"] = rows[0]["img_s"] / best["img_s"]
    diffs = [r["max_abs_diff"] for r in ok if "max_abs_diff" in r]
    m = task.config.model
    print(f"\nDDIM {a.ddim_steps} steps, eta 0: {a.config} structure, model_channels "
          f"{m.model_channels}, channel_mult {tuple(m.channel_mult)}, batch {a.batch}, latents "
          f"{a.size}x{a.size}x{a.channels}, dtype {a.dtype}, conv_impl {applied}; params "
          f"{n_params:,}" + (" (diffusers asserted equal, same weights)" if torch else ""))
    print(f"FLOPs per sampling call: {flops / 1e9:.3f} GFLOP = {a.ddim_steps} DDIM steps x "
          f"{gen['unet_forward_flops'] / 1e9:.4f} GFLOP per UNet forward (XLA cost_analysis of "
          f"the forward alone; the whole sampling executable reports "
          f"{gen['xla_loop_flops'] / 1e9:.4f}: XLA counts a loop body once)")
    common.print_table(COLUMNS, rows)
    if diffs:
        print(f"outputs agree: max |z_torch - z_ldm_jax| = {max(diffs):.3e} over the torch rows "
              f"(same weights, same initial noise)")
    info = common.machine_info(load0, with_torch=torch is not None)
    common.print_machine(info)
    print(f"batch ms: median of {a.steps} sampling calls ({a.batch} images x {a.ddim_steps} DDIM "
          f"steps) after {a.warmup} warm-up; compile/first s: jax lower+compile, torch first call")
    out = {"args": vars(a), "ldm_jax_img_s": rows[0]["img_s"],
           "torch_img_s": best["img_s"] if best else None,
           "torch_best_row": best["name"] if best else None,
           "ratio": rows[0].get("ratio"), "flops_per_call": flops,
           "flops_per_image": flops / a.batch,
           "mfu_ldm_jax": common.mfu(flops, rows[0]["ms"] / 1e3, a.peak_gflops),
           "mfu_torch": common.mfu(flops, best["ms"] / 1e3, a.peak_gflops) if best else None,
           "params": n_params, "max_abs_diff": max(diffs) if diffs else None,
           "conv_impl": applied, **gen, "rows": rows, "machine": info}
    common.write_json(a.json, out)
    return out


if __name__ == "__main__":
    main()

"""The paper's claim, measured: the same UNet on pixels (f=1) vs on latents (f=4, f=8).

One UNet structure (--config, configs/f4_celebahq.py: mult 1,2,3,4, attention at downsampling
8,4,2, 32 channels per head; width --width) trained and sampled on
  f1  --size_px x --size_px x 3 pixels (no first stage)
  f4  size_px/4 x size_px/4 x 3 latents of the KL-f4 autoencoder (configs/autoencoder_kl_f4.py)
  f8  size_px/8 x size_px/8 x 4 latents of the KL-f8 autoencoder (configs/autoencoder_kl_f8.py)
Per setting, each jitted and compiled ahead of time, random weights:
  train      the real DiffusionTask.train_step (eps-MSE, AdamW, EMA), state donated: img/s
  +encode    the first stage's encoder on the pixel batch (posterior sample), as training on
             raw images would need: img/s of (train step + encode) = batch / (t_train + t_enc)
  sample     DDIM (--ddim_steps, eta 0) through task.sample_latents: seconds per image
  +decode    plus the first stage's decoder on the sampled latents: seconds per image
Speedups f4/f1 and f8/f1 compare each latent setting with pixels (> 1: latents faster).
Note: the attention levels are named by downsampling factor, so on 256x256 pixels the UNet
attends over 128x128 = 16384 tokens at ds 2 (memory-hungry: O(tokens^2) per head; reduce
--size_px if a run runs out of memory). A setting that fails is reported as n/a.
The DDIM rows can use fewer than 50 steps on CPU; the '@50' column scales the per-step time
linearly to 50 steps (the loop is steps x one UNet call), marked 'extrap.' when scaled.

CPU defaults (when jax's backend is cpu): --batch 1, --steps 2, --warmup 1, --ddim_steps 5;
otherwise --batch 8, --steps 5, --warmup 2, --ddim_steps 50.

Usage: python bench/latent_vs_pixel.py [--width 64] [--size_px 256] [--batch N] [--steps N]
  [--ddim_steps N] [--ae_ch 128] [--settings f1,f4,f8] [--json out.json]
"""

from __future__ import annotations

import functools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

SETTINGS = {"f1": (1, 3, None), "f4": (4, 3, "configs/autoencoder_kl_f4.py"),
            "f8": (8, 4, "configs/autoencoder_kl_f8.py")}
COLUMNS = [("setting", "setting"), ("shape", "UNet input"), ("params", "UNet params"),
           ("train_gflop", "train GFLOP/step", ".1f"), ("train_img_s", "train img/s", ".3g"),
           ("enc_ms", "encode ms/batch", ".1f"), ("train_enc_img_s", "train+encode img/s", ".3g"),
           ("sample_s_img", "sample s/img", ".3g"), ("sample50_s_img", "sample s/img @50", ".3g"),
           ("dec_ms", "decode ms/batch", ".1f"),
           ("sample_dec50_s_img", "sample+decode s/img @50", ".3g"), ("note", "note")]


def parse_args(argv=None):
    p = common.arg_parser(__doc__)
    p.add_argument("--config", default="configs/f4_celebahq.py", help="stage-2 UNet structure")
    p.add_argument("--width", type=int, default=64, help="UNet model_channels (config: 224)")
    p.add_argument("--size_px", type=int, default=256, help="pixel resolution (divisible by 64)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--ddim_steps", type=int, default=None)
    p.add_argument("--ae_ch", type=int, default=128, help="first-stage ch (configs: 128)")
    p.add_argument("--settings", default="f1,f4,f8")
    p.add_argument("--skip_sample", action="store_true")
    p.add_argument("--skip_first_stage", action="store_true")
    common.add_common_args(p, steps=None, warmup=None, torch=False)
    a = p.parse_args(argv)
    import jax
    cpu = jax.default_backend() == "cpu"
    a.batch = a.batch or (1 if cpu else 8)
    a.steps = a.steps or (2 if cpu else 5)
    a.warmup = a.warmup if a.warmup is not None else (1 if cpu else 2)
    a.ddim_steps = a.ddim_steps or (5 if cpu else 50)
    return a


def _time(fn, a):
    _, times = common.timed_steps(fn, a.warmup, a.steps)
    return common.summarize(times, 1)["ms"] / 1e3


def bench_setting(a, name):
    import jax
    import jax.numpy as jnp
    from ldm_jax.tasks.diffusion import make_sampler
    f, ch, ae_spec = SETTINGS[name]
    size = a.size_px // f
    row = {"setting": name, "shape": f"{size}x{size}x{ch}"}
    config, applied = common.diffusion_config(a.config, width=a.width, size=size, channels=ch,
                                              batch=a.batch, dtype=a.dtype,
                                              conv_impl=a.conv_impl)
    row["conv_impl"] = applied
    task, state, batch, consts = common.diffusion_task(config)
    row["params"] = common.count_params(state.params["model"])
    # ---- train step
    compiled, lo, co = common.aot_compile(functools.partial(task.train_step, phase="main"),
                                          (state, batch, consts), donate_argnums=0)
    row["train_compile_s"] = lo + co
    row["train_gflop"] = common.xla_flops(functools.partial(task.train_step, phase="main"),
                                          (state, batch, consts)) / 1e9
    sample_params = jax.tree_util.tree_map(jnp.copy, state.ema_params)
    t_train = _time(common.jax_runner(compiled, {"s": state}, (batch, consts)), a)
    row["train_ms"] = t_train * 1e3
    row["train_img_s"] = a.batch / t_train
    del compiled
    # ---- sampling
    if not a.skip_sample:
        sampler = make_sampler(task.config, task.schedule, name="ddim", num_steps=a.ddim_steps,
                               eta=0.0)

        def sample(params, rng):
            return task.sample_latents(params, rng, a.batch, constants=consts, sampler=sampler,
                                       guidance_scale=1.0)
        compiled, lo, co = common.aot_compile(sample, (sample_params, jax.random.key(0)))
        row["sample_compile_s"] = lo + co
        box = {}

        def run():
            box["z"] = compiled(sample_params, jax.random.key(0))
            jax.block_until_ready(box["z"])
        t_sample = _time(run, a)
        row["sample_s_img"] = t_sample / a.batch
        row["sample50_s_img"] = row["sample_s_img"] * 50 / a.ddim_steps
        del compiled
    # ---- first stage
    if ae_spec and not a.skip_first_stage:
        model, ae_params, f_ae, z_ch = common.first_stage_model(
            ae_spec, ch=a.ae_ch, size=a.size_px, dtype=a.dtype, conv_impl=a.conv_impl)
        assert (f_ae, z_ch) == (f, ch), (ae_spec, f_ae, z_ch)
        row["ae_params"] = common.count_params(ae_params)
        x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (a.batch, a.size_px, a.size_px, 3)
                                                        ).astype(np.float32))

        def encode(p, x, key):
            post = model.apply({"params": p}, x, method=model.encode)
            return post.sample(key)

        def decode(p, z):
            return model.apply({"params": p}, z, method=model.decode)
        enc, lo, co = common.aot_compile(encode, (ae_params, x, jax.random.key(0)))
        z = jnp.zeros((a.batch, size, size, ch), jnp.float32)
        dec, lo2, co2 = common.aot_compile(decode, (ae_params, z))
        row["ae_compile_s"] = lo + co + lo2 + co2
        row["enc_gflop"] = common.xla_flops(encode, (ae_params, x, jax.random.key(0))) / 1e9
        row["dec_gflop"] = common.xla_flops(decode, (ae_params, z)) / 1e9
        t_enc = _time(lambda: jax.block_until_ready(enc(ae_params, x, jax.random.key(0))), a)
        t_dec = _time(lambda: jax.block_until_ready(dec(ae_params, z)), a)
        row["enc_ms"], row["dec_ms"] = t_enc * 1e3, t_dec * 1e3
    else:
        t_enc = t_dec = 0.0
    row["train_enc_img_s"] = a.batch / (t_train + t_enc)
    if "sample_s_img" in row:
        row["sample_dec_s_img"] = row["sample_s_img"] + t_dec / a.batch
        row["sample_dec50_s_img"] = row["sample50_s_img"] + t_dec / a.batch
    return row


def main(argv=None):
    a = parse_args(argv)
    load0 = os.getloadavg()
    rows = []
    for name in common.comma_list(a.settings):
        t0 = time.perf_counter()
        common.log(f"setting {name}")
        try:
            rows.append(bench_setting(a, name))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at f1: report and go on
            rows.append({"setting": name, "note": f"n/a: {common.short_reason(e)}"})
        rows[-1]["wall_s"] = time.perf_counter() - t0
        if a.ddim_steps != 50 and "sample_s_img" in rows[-1]:
            rows[-1]["note"] = f"@50 extrap. from {a.ddim_steps} DDIM steps"
    by = {r["setting"]: r for r in rows}
    speedups = {}
    base = by.get("f1", {})
    for name in ("f4", "f8"):
        r = by.get(name, {})
        sp = {}
        for key, higher_better in (("train_img_s", True), ("train_enc_img_s", True),
                                   ("sample_s_img", False), ("sample_dec_s_img", False)):
            if key in r and key in base:
                sp[key] = r[key] / base[key] if higher_better else base[key] / r[key]
        if sp:
            speedups[f"{name}/f1"] = sp
    print(f"\nsame UNet ({a.config} structure, model_channels {a.width}) on pixels vs latents: "
          f"{a.size_px}px, batch {a.batch}, dtype {a.dtype}, DDIM {a.ddim_steps} steps, first "
          f"stage ch {a.ae_ch} (random weights)")
    common.print_table(COLUMNS, rows)
    if speedups:
        print()
        common.print_table([("pair", "speedup"), ("train_img_s", "train", ".2f"),
                            ("train_enc_img_s", "train (latents: +encode)", ".2f"),
                            ("sample_s_img", "sample", ".2f"),
                            ("sample_dec_s_img", "sample (latents: +decode)", ".2f")],
                           [{"pair": k, **v} for k, v in speedups.items()])
    info = common.machine_info(load0)
    common.print_machine(info)
    print(f"times: median of {a.steps} calls after {a.warmup} warm-up; speedup = latent setting "
          f"faster than f1 by this factor (train: img/s ratio; sample: s/img ratio)")
    common.write_json(a.json, {"args": vars(a), "rows": rows, "speedups": speedups,
                               "machine": info})


if __name__ == "__main__":
    main()

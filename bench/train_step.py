"""Training-step throughput: ldm_jax vs the PyTorch (diffusers) reference, in one run.

(a) stage 2 (the latent UNet, structure of configs/f4_celebahq.py at --width/--size/--channels):
  ldm_jax task    the real DiffusionTask.train_step (eps-MSE loss, AdamW, EMA, grad norm, finite
                  check) on synthetic latents, jitted as ldm_jax/training/trainer.py does it
                  (state donated, compiled ahead of time)
  ldm_jax model   UNet + the same eps-MSE loss + the task's AdamW step only (no EMA),
                  params and optimiser state donated, AOT compiled: the like-for-like row
  torch <mode> <N>T  diffusers UNet2DModel configured by ldm_jax.convert.unet_diffusers_config
                  (the same architecture: parameter counts are asserted equal), same loss,
                  torch.optim.AdamW; modes: eager (NCHW), eager_cl (channels_last), compile
                  (torch.compile of the UNet; 'n/a' with the reason when it fails here)
(b) stage 1 (KL autoencoder, structure of configs/autoencoder_kl_f4.py at --ae_ch/--ae_size):
  ldm_jax task    the real AutoencoderTask.train_step in phase 'gan': generator update with
                  L1 + LPIPS (VGG16 with RANDOM weights written to a temp file, no download)
                  + learned-logvar NLL + KL + PatchGAN generator loss with the adaptive weight,
                  then the discriminator update (hinge)
  torch <mode> <N>T  diffusers AutoencoderKL + a torch PatchGAN NLayerDiscriminator (pix2pix,
                  BatchNorm in train mode) + LPIPS-VGG16 (torchvision vgg16, random weights),
                  taming's LPIPSWithDiscriminator loss (adaptive weight by autograd.grad on the
                  decoder's conv_out), two torch.optim.Adam (b1 0.5, b2 0.9)
FLOPs/step: XLA cost_analysis of the ldm_jax task step compiled with ldm_jax's CPU kernels off (XLA counts no custom call); MFU = FLOPs / step time / peak, the peak measured in the same run (a 4096^3 float32 matmul, best of jax and torch) unless --peak_gflops is given.
ratio = ldm_jax task img/s over the best torch row's img/s.
On a GPU (jax's backend) the torch rows run on the same device (--torch_device auto) with
autocast to --dtype over float32 weights, one row per mode; the peak is an 8192^3 matmul in
--dtype, and the FLOPs are counted by the host CPU backend from the traced program.

Usage: python bench/train_step.py [--width 64] [--batch 4] [--size 64] [--channels 3]
  [--ae_ch 64] [--ae_size 64] [--ae_batch 4] [--parts unet,ae] [--torch_modes eager,eager_cl,
  compile] [--torch_optimizer default|foreach|fused] [--torch_threads 1,2] [--steps 5]
  [--warmup 2] [--peak_gflops 0 (measure)] [--conv_impl X] [--omp_wait_policy passive]
  [--json out.json] [--flops_only]
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

COLUMNS = [("name", "row"), ("params", "params"), ("compile_s", "compile/first s", ".1f"),
           ("ms", "step ms", ".1f"), ("min_ms", "min ms", ".1f"), ("img_s", "img/s", ".2f"),
           ("gflop_s", "GFLOP/s", ".1f"), ("mfu_pct", "MFU %", ".1f"), ("ratio", "jax/torch", ".2f"),
           ("loss", "loss", ".4g"), ("note", "note")]


def parse_args(argv=None):
    p = common.arg_parser(__doc__)
    p.add_argument("--parts", default="unet,ae", help="comma list: unet (stage 2), ae (stage 1)")
    p.add_argument("--config", default="configs/f4_celebahq.py", help="stage-2 structure")
    p.add_argument("--width", type=int, default=64, help="UNet model_channels")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64, help="latent resolution")
    p.add_argument("--channels", type=int, default=3, help="latent channels")
    p.add_argument("--ae_config", default="configs/autoencoder_kl_f4.py", help="stage-1 structure")
    p.add_argument("--ae_ch", type=int, default=64, help="autoencoder ch (config: 128)")
    p.add_argument("--ae_size", type=int, default=64, help="image size of stage 1")
    p.add_argument("--ae_batch", type=int, default=0, help="stage-1 batch (0 = --batch)")
    p.add_argument("--ae_lpips", choices=("on", "off"), default="on",
                   help="perceptual term (random VGG weights) on both sides")
    p.add_argument("--skip_model_row", action="store_true", help="skip the 'ldm_jax model' row")
    p.add_argument("--flops_only", action="store_true",
                   help="print the FLOPs of the stage-2 task step as an accelerator run counts "
                        "them (host CPU cost analysis of the lowered program) and exit: no "
                        "compile, no step, no torch")
    p.add_argument("--torch_modes", default="eager,eager_cl,compile",
                   help="comma list of eager, eager_cl (channels_last), compile")
    p.add_argument("--torch_optimizer", choices=("default", "foreach", "fused"),
                   default="default",
                   help="torch's Adam/AdamW implementation: default (what the reference "
                        "training code gets: torch.optim.AdamW(params, lr), a per-parameter "
                        "loop on CPU), foreach, or fused (one kernel per step; the counterpart "
                        "of ldm_jax's optimizer.impl='cpu_fused')")
    common.add_common_args(p, steps=5, warmup=2)
    return p.parse_args(argv)


def _row(name, *, params, compile_s, times, batch, flops, peak, loss=float("nan"), note=""):
    s = common.summarize(times, batch)
    sec = s["ms"] / 1e3
    return {"name": name, "params": params, "compile_s": compile_s, "ms": s["ms"],
            "min_ms": s["min_ms"], "max_ms": s["max_ms"], "img_s": s["items_s"],
            "gflop_s": flops / sec / 1e9 if sec == sec and sec > 0 else float("nan"),
            "mfu_pct": 100 * common.mfu(flops, sec, peak), "loss": float(loss), "note": note}


def _na_row(name, reason):
    return {"name": name, "params": None, "compile_s": float("nan"), "ms": float("nan"),
            "min_ms": float("nan"), "img_s": float("nan"), "gflop_s": float("nan"),
            "mfu_pct": float("nan"), "loss": float("nan"), "note": f"n/a: {reason}"}


# ====================================================================== stage 2: the UNet
def jax_unet_rows(a, config):
    import jax
    import jax.numpy as jnp
    from ldm_jax.diffusion.schedules import q_sample

    task, state, batch, consts = common.diffusion_task(config)
    task_cfg = task.config
    n_params = common.count_params(state.params["model"])
    rows = []
    # The model row first (it copies the fresh parameters before the task step donates them).
    if not a.skip_model_row:
        common.log("stage 2: ldm_jax model step")
        params = jax.tree_util.tree_map(jnp.copy, state.params["model"])
        opt_state = task.optimizer.init(params)
        T = task.schedule.num_timesteps

        def loss_fn(p, z0, key):
            k_t, k_n = jax.random.split(key)
            t = jax.random.randint(k_t, (z0.shape[0],), 0, T)
            noise = jax.random.normal(k_n, z0.shape)
            out = task.model.apply({"params": p}, q_sample(task.schedule, z0, t, noise), t,
                                   train=True)
            return jnp.mean(jnp.square(out.astype(jnp.float32) - noise))

        def step(st, z0, key):
            p, s = st
            loss, g = jax.value_and_grad(loss_fn)(p, z0, key)
            p, s, _, _ = task.optimizer.step(p, s, g)  # the task's optimiser, without the EMA
            return (p, s), loss

        z0 = jnp.asarray(batch[task.input_key])
        compiled, lower_s, comp_s = common.aot_compile(step, ((params, opt_state), z0,
                                                              jax.random.key(1)), donate_argnums=0)
        box = {"s": (params, opt_state), "i": 0}

        def run():
            box["i"] += 1
            out = compiled(box["s"], z0, jax.random.key(box["i"]))
            jax.block_until_ready(out)
            box["s"] = out[0]
            return out[1]
        _, times = common.timed_steps(run, a.warmup, a.steps)
        model_flops = common.xla_flops(step, ((params, opt_state), z0, jax.random.key(1)))
        rows.append(_row(f"ldm_jax model ({a.dtype})", params=n_params,
                         compile_s=lower_s + comp_s, times=times, batch=a.batch,
                         flops=model_flops, peak=a.peak_gflops, loss=run()))
        rows[-1]["flops"] = model_flops
    common.log("stage 2: ldm_jax task step")
    fn = functools.partial(task.train_step, phase="main")
    flops = common.xla_flops(fn, (state, batch, consts))
    compiled, lower_s, comp_s = common.aot_compile(fn, (state, batch, consts), donate_argnums=0)
    run = common.jax_runner(compiled, {"s": state}, (batch, consts))
    _, times = common.timed_steps(run, a.warmup, a.steps)
    row = _row(f"ldm_jax task ({a.dtype})", params=n_params, compile_s=lower_s + comp_s,
               times=times, batch=a.batch, flops=flops, peak=a.peak_gflops,
               loss=float(run()[1]["loss"]), note="real DiffusionTask.train_step")
    row["flops"] = flops
    rows.append(row)
    return task_cfg, rows, flops, np.asarray(batch[task.input_key])


def torch_unet(torch, model_cfg, size):
    from diffusers import UNet2DModel
    from ldm_jax import convert
    cfg = convert.unet_diffusers_config(dict(model_cfg), sample_size=size)
    cls = cfg.pop("_class_name")
    if cls != "UNet2DModel":
        raise RuntimeError(f"the stage-2 config maps to diffusers {cls}; this bench builds "
                           f"UNet2DModel (unconditional) only")
    return UNet2DModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})


def torch_unet_rows(a, torch, task_cfg, z0_nhwc, flops, n_params_jax):
    from ldm_jax.diffusion.schedules import make_beta_schedule
    d, o = task_cfg.diffusion, task_cfg.optimizer
    betas = make_beta_schedule(d.beta_schedule, d.timesteps, d.linear_start, d.linear_end)
    abar = np.cumprod(1.0 - betas)
    dev = a.torch_device
    sa = torch.tensor(np.sqrt(abar), dtype=torch.float32, device=dev)
    s1ma = torch.tensor(np.sqrt(1.0 - abar), dtype=torch.float32, device=dev)
    lr = o.base_learning_rate * (task_cfg.batch_size if o.scale_lr_by_batch else 1)
    rows = []
    for threads, mode, name in _torch_variants(a):
        common.log(f"stage 2: {name}")
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(0)
        unet = torch_unet(torch, task_cfg.model, a.size).train()
        n_params = common.count_params(unet)
        if n_params != n_params_jax:
            raise AssertionError(f"parameter counts differ: ldm_jax {n_params_jax:,} vs "
                                 f"diffusers {n_params:,}")
        unet = unet.to(dev)
        x0 = torch.from_numpy(np.ascontiguousarray(z0_nhwc.transpose(0, 3, 1, 2))).to(dev)
        if mode == "eager_cl":
            unet = unet.to(memory_format=torch.channels_last)
            x0 = x0.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(o.b1, o.b2), eps=o.eps,
                                weight_decay=o.weight_decay, **_torch_opt_kwargs(a))
        fwd = unet
        if mode == "compile":
            fwd, reason = common.torch_compile(unet, torch)
            if fwd is None:
                rows.append(_na_row(name, reason))
                continue

        def run():
            t = torch.randint(0, d.timesteps, (x0.shape[0],), device=dev)
            noise = torch.randn_like(x0)
            x_t = sa[t].view(-1, 1, 1, 1) * x0 + s1ma[t].view(-1, 1, 1, 1) * noise
            with common.torch_autocast(torch, a):
                out = fwd(x_t, t).sample
            loss = torch.mean((out.float() - noise) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss
        rows.append(_torch_timed(a, name, run, n_params, a.batch, flops))
    return rows


def _torch_opt_kwargs(a) -> dict:
    """torch.optim.Adam/AdamW keyword arguments for --torch_optimizer."""
    return {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[
        getattr(a, "torch_optimizer", "default")]


def _torch_variants(a):
    """common.torch_variants, each row named with --torch_optimizer unless it is 'default'
    (the n/a rows too)."""
    opt = getattr(a, "torch_optimizer", "default")
    for threads, mode, name in common.torch_variants(a):
        yield threads, mode, name if opt == "default" else f"{name} {opt} Adam"


def _torch_timed(a, name, run, n_params, batch, flops):
    import torch
    sync = common.torch_sync(torch, a.torch_device)
    step = run

    def run():  # device work is asynchronous: a step ends when the device is done
        out = step()
        sync()
        return out
    t0 = time.perf_counter()
    try:
        run()  # first step: lazy init / torch.compile happens here
    except Exception as e:  # noqa: BLE001 - reported as n/a
        return _na_row(name, common.short_reason(e))
    first = time.perf_counter() - t0
    _, times = common.timed_steps(run, max(a.warmup - 1, 0), a.steps)
    loss = float(run().detach())
    return _row(name, params=n_params, compile_s=first, times=times, batch=batch, flops=flops,
                peak=a.peak_gflops, loss=loss)


# ====================================================================== stage 1: KL + GAN
def jax_ae_rows(a, config):
    import jax
    from ldm_jax.tasks.autoencoder import AutoencoderTask
    task = AutoencoderTask(config)
    x = np.random.default_rng(0).uniform(-1, 1, (a.ae_batch, a.ae_size, a.ae_size, 3)
                                         ).astype(np.float32)
    state = jax.jit(functools.partial(task.init_state, input_shape=x.shape))(jax.random.key(0))
    consts = task.constants()
    batch = {"image": x}
    n_gen = common.count_params(state.params["generator"]["model"])
    n_disc = common.count_params(state.params["discriminator"])
    phase = task.phase_for_step(0)
    common.log(f"stage 1: ldm_jax task step (phase {phase})")
    fn = functools.partial(task.train_step, phase=phase)
    flops = common.xla_flops(fn, (state, batch, consts))
    compiled, lower_s, comp_s = common.aot_compile(fn, (state, batch, consts), donate_argnums=0)
    run = common.jax_runner(compiled, {"s": state}, (batch, consts))
    _, times = common.timed_steps(run, a.warmup, a.steps)
    row = _row(f"ldm_jax task ({a.dtype})", params=n_gen + n_disc, compile_s=lower_s + comp_s,
               times=times, batch=a.ae_batch, flops=flops, peak=a.peak_gflops,
               loss=float(run()[1]["loss"]),
               note=f"AutoencoderTask phase '{phase}'"
                    + (", LPIPS random weights" if config.loss.perceptual_weight > 0 else ""))
    row["flops"] = flops
    return task.config, [row], flops, x, (n_gen, n_disc)


def torch_modules(torch, cfg, size):
    """(AutoencoderKL, NLayerDiscriminator, LPIPS or None) in torch for the ldm_jax config."""
    import torch.nn as nn
    from diffusers import AutoencoderKL
    m, l = cfg.model, cfg.loss
    n = len(m.ch_mult)
    if m.attn_resolutions:
        raise RuntimeError("the torch reference covers attn_resolutions=() (KL-f4/f8) only")
    vae = AutoencoderKL(in_channels=m.in_channels, out_channels=m.out_ch,
                        down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n,
                        block_out_channels=tuple(m.ch * k for k in m.ch_mult),
                        layers_per_block=m.num_res_blocks, latent_channels=m.z_channels,
                        norm_num_groups=m.norm_groups, sample_size=size,
                        mid_block_add_attention=True)

    class NLayerDiscriminator(nn.Module):  # pix2pix / taming, BatchNorm in train mode
        def __init__(self, ndf, n_layers):
            super().__init__()
            layers = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
            mult = 1
            for k in range(1, n_layers + 1):
                prev, mult = mult, min(2 ** k, 8)
                layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if k < n_layers else 1, 1,
                                     bias=False), nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2)]
            layers += [nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
            self.main = nn.Sequential(*layers)

        def forward(self, x):
            return self.main(x)

    class LPIPS(nn.Module):  # LPIPS-VGG: one VGG pass over cat(x, y), as ldm_jax's LPIPS
        def __init__(self):
            super().__init__()
            import torchvision
            self.vgg = torchvision.models.vgg16(weights=None).features[:30]
            self.taps = (3, 8, 15, 22, 29)
            chans = (64, 128, 256, 512, 512)
            self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in chans)
            for lin, c in zip(self.lins, chans):
                nn.init.constant_(lin.weight, 1.0 / c)
            self.register_buffer("shift", torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1))
            self.register_buffer("scale", torch.tensor([.458, .448, .450]).view(1, 3, 1, 1))
            self.requires_grad_(False)

        def forward(self, x, y):
            b = x.shape[0]
            h = (torch.cat([x, y]) - self.shift) / self.scale
            total, k = 0, 0
            for i, layer in enumerate(self.vgg):
                h = layer(h)
                if i in self.taps:
                    f = h / (torch.sqrt(torch.sum(h ** 2, dim=1, keepdim=True)) + 1e-10)
                    total = total + self.lins[k]((f[:b] - f[b:]) ** 2).mean(dim=(2, 3))
                    k += 1
            return total[:, 0]

    disc = NLayerDiscriminator(l.disc_ndf, l.disc_num_layers)
    for mod in disc.modules():  # pix2pix init
        if isinstance(mod, nn.Conv2d):
            nn.init.normal_(mod.weight, 0.0, 0.02)
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.normal_(mod.weight, 1.0, 0.02)
            nn.init.zeros_(mod.bias)
    return vae, disc, (LPIPS() if l.perceptual_weight > 0 else None)


def torch_ae_rows(a, torch, cfg, x_nhwc, flops, counts_jax):
    import torch.nn as nn
    l, o = cfg.loss, cfg.optimizer
    lr = o.base_learning_rate * (cfg.batch_size if o.scale_lr_by_batch else 1)
    rows = []
    dev = a.torch_device
    for threads, mode, name in _torch_variants(a):
        common.log(f"stage 1: {name}")
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(0)
        vae, disc, lpips = torch_modules(torch, cfg, a.ae_size)
        vae, disc = vae.to(dev), disc.to(dev)
        lpips = lpips.to(dev) if lpips is not None else None
        vae.train(), disc.train()
        counts = (common.count_params(vae), common.count_params(disc))
        if counts != tuple(counts_jax):
            raise AssertionError(f"parameter counts (autoencoder, discriminator) differ: "
                                 f"ldm_jax {counts_jax} vs torch {counts}")
        x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))).to(dev)
        if mode == "eager_cl":
            vae = vae.to(memory_format=torch.channels_last)
            disc = disc.to(memory_format=torch.channels_last)
            lpips = lpips.to(memory_format=torch.channels_last) if lpips else None
            x = x.contiguous(memory_format=torch.channels_last)
        logvar = nn.Parameter(torch.tensor(float(l.logvar_init), device=dev))
        opt_g = torch.optim.Adam(list(vae.parameters()) + [logvar], lr=lr, betas=(o.b1, o.b2),
                                 eps=o.eps, **_torch_opt_kwargs(a))
        opt_d = torch.optim.Adam(disc.parameters(), lr=lr * o.disc_lr_mult,
                                 betas=(o.b1, o.b2), eps=o.eps, **_torch_opt_kwargs(a))

        class AE(nn.Module):  # encode -> sample -> decode as one module (compilable)
            def __init__(self, vae):
                super().__init__()
                self.vae = vae

            def forward(self, x, noise):
                moments = self.vae.quant_conv(self.vae.encoder(x))
                mean, lv = torch.chunk(moments, 2, dim=1)
                lv = torch.clamp(lv, -30.0, 20.0)
                z = mean + torch.exp(0.5 * lv) * noise
                recon = self.vae.decoder(self.vae.post_quant_conv(z))
                kl = 0.5 * torch.sum(mean ** 2 + torch.exp(lv) - 1.0 - lv, dim=[1, 2, 3])
                return recon, kl.mean()

        ae_fwd, disc_fwd, lpips_fwd = AE(vae), disc, lpips
        if mode == "compile":
            compiled = [common.torch_compile(m, torch) for m in (ae_fwd, disc, lpips) if m is not None]
            bad = [r for c, r in compiled if c is None]
            if bad:
                rows.append(_na_row(name, bad[0]))
                continue
            ae_fwd, disc_fwd = compiled[0][0], compiled[1][0]
            lpips_fwd = compiled[2][0] if lpips is not None else None
        last = vae.decoder.conv_out.weight
        z_shape = (x.shape[0], cfg.model.embed_dim, a.ae_size // 2 ** (len(cfg.model.ch_mult) - 1),
                   a.ae_size // 2 ** (len(cfg.model.ch_mult) - 1))

        amp = lambda: common.torch_autocast(torch, a)

        def run():
            disc.requires_grad_(False)
            with amp():
                recon, kl = ae_fwd(x, torch.randn(z_shape, device=dev))
                p_loss = lpips_fwd(x, recon) if lpips_fwd is not None else None
                logits_fake = disc_fwd(recon)
            recon, kl = recon.float(), kl.float()
            rec = l.pixel_weight * torch.abs(x - recon)
            if p_loss is not None:
                rec = rec + l.perceptual_weight * p_loss.float().view(-1, 1, 1, 1)
            nll = torch.sum(rec / torch.exp(logvar) + logvar) / x.shape[0]
            g_loss = -torch.mean(logits_fake.float())
            nll_g = torch.autograd.grad(nll, last, retain_graph=True)[0]
            g_g = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
            d_weight = torch.clamp(torch.norm(nll_g) / (torch.norm(g_g) + 1e-4), 0.0,
                                   l.adaptive_weight_max).detach() * l.disc_weight
            loss = nll + l.kl_weight * kl + d_weight * l.disc_factor * g_loss
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
            disc.requires_grad_(True)
            r_det = recon.detach()
            with amp():
                real, fake = disc_fwd(x).float(), disc_fwd(r_det).float()
            d_loss = l.disc_factor * 0.5 * (torch.mean(torch.relu(1.0 - real))
                                            + torch.mean(torch.relu(1.0 + fake)))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            return loss
        rows.append(_torch_timed(a, name, run, sum(counts), a.ae_batch, flops))
    return rows


# ====================================================================== report
def _finish(part, rows, flops, params, a, extra):
    jax_rows = [r for r in rows if r["name"].startswith("ldm_jax task")]
    torch_rows = [r for r in rows if r["name"].startswith("torch") and r["img_s"] == r["img_s"]]
    best = max(torch_rows, key=lambda r: r["img_s"]) if torch_rows else None
    for r in rows:
        if r["name"].startswith("ldm_jax") and best:
            r["ratio"] = r["img_s"] / best["img_s"]
    j = jax_rows[0] if jax_rows else rows[0]
    summary = {"ldm_jax_img_s": j["img_s"], "torch_img_s": best["img_s"] if best else None,
               "torch_best_row": best["name"] if best else None,
               "ratio": j["img_s"] / best["img_s"] if best else None,
               "flops_per_step": flops,
               "mfu_ldm_jax": common.mfu(flops, j["ms"] / 1e3, a.peak_gflops),
               "mfu_torch": common.mfu(flops, best["ms"] / 1e3, a.peak_gflops) if best else None,
               "params": params, **extra, "rows": rows}
    print(f"FLOPs/step (XLA cost_analysis of the ldm_jax task step, used for every row): "
          f"{flops / 1e9:.3f} GFLOP" + "".join(
              f"; {r['name']} {r['flops'] / 1e9:.3f}" for r in rows
              if "flops" in r and r["name"] != j["name"]))
    common.print_table(COLUMNS, rows)
    return summary


def print_task_flops(a) -> float:
    """--flops_only: the stage-2 task step's FLOPs at --width/--batch/--size/--channels/--dtype,
    counted from the traced program without compiling it, as a GPU run counts them (the model
    FLOPs of `common.xla_flops`: XLA's convolutions and 'xla' attention), whatever this
    machine is."""
    import jax
    config, _ = common.diffusion_config(a.config, width=a.width, size=a.size,
                                        channels=a.channels, batch=a.batch, dtype=a.dtype)
    from ldm_jax.tasks.diffusion import DiffusionTask
    task = DiffusionTask(config)
    state = jax.eval_shape(task.init_state, jax.random.key(config.seed))
    shape = (a.batch,) + tuple(task.latents.latent_shape)
    batch = {task.input_key: jax.ShapeDtypeStruct(shape, np.float32)}
    flops = common.xla_flops(functools.partial(task.train_step, phase="main"),
                             (state, batch, task.constants()), host=True)
    print(f"stage-2 task step FLOPs ({a.config}, width {a.width}, batch {a.batch}, "
          f"{a.size}x{a.size}x{a.channels}, {a.dtype}): {flops:.6g}")
    return flops


def main(argv=None):
    a = parse_args(argv)
    a.ae_batch = a.ae_batch or a.batch
    if a.flops_only:
        return print_task_flops(a)
    parts = set(common.checked_list("--parts", a.parts, ("unet", "ae")))
    if not a.skip_torch:
        common.checked_list("--torch_modes", a.torch_modes, common.TORCH_MODES)
    load0 = os.getloadavg()
    torch = None if a.skip_torch else common.import_torch(a)
    common.resolve_peak(a, torch)
    import jax  # noqa: F401  (after OMP_WAIT_POLICY is set)
    out = {"args": vars(a)}
    if "unet" in parts:
        config, applied = common.diffusion_config(a.config, width=a.width, size=a.size,
                                                  channels=a.channels, batch=a.batch,
                                                  dtype=a.dtype, conv_impl=a.conv_impl)
        task_cfg, rows, flops, z0 = jax_unet_rows(a, config)
        n_params = rows[-1]["params"]
        if torch is not None:
            rows += torch_unet_rows(a, torch, task_cfg, z0, flops, n_params)
        m = task_cfg.model
        print(f"\n(a) stage-2 UNet train step: {a.config} structure, model_channels "
              f"{m.model_channels}, channel_mult {tuple(m.channel_mult)}, attention "
              f"{tuple(m.attention_resolutions)}, batch {a.batch}, latents {a.size}x{a.size}x"
              f"{a.channels}, dtype {a.dtype}, conv_impl {applied}")
        print(f"params: ldm_jax {n_params:,}" + (f", diffusers UNet2DModel {n_params:,} (asserted "
                                                 f"equal)" if torch is not None else ""))
        out["unet"] = _finish("unet", rows, flops, n_params, a, {"conv_impl": applied})
    if "ae" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            lp = common.random_lpips_weights(tmp) if a.ae_lpips == "on" else ""
            config, applied = common.autoencoder_config(a.ae_config, ch=a.ae_ch, size=a.ae_size,
                                                        batch=a.ae_batch, dtype=a.dtype,
                                                        conv_impl=a.conv_impl, lpips_weights=lp)
            cfg, rows, flops, x, counts = jax_ae_rows(a, config)
        if torch is not None:
            rows += torch_ae_rows(a, torch, cfg, x, flops, counts)
        m = cfg.model
        print(f"\n(b) stage-1 KL + GAN train step: {a.ae_config} structure, ch {m.ch}, ch_mult "
              f"{tuple(m.ch_mult)}, num_res_blocks {m.num_res_blocks}, z {m.z_channels}, "
              f"batch {a.ae_batch}, {a.ae_size}x{a.ae_size}x3, LPIPS {a.ae_lpips} (random VGG), "
              f"disc ndf {cfg.loss.disc_ndf}, dtype {a.dtype}, conv_impl {applied}")
        print(f"params (autoencoder + discriminator): ldm_jax {counts[0]:,} + {counts[1]:,}"
              + (" (torch asserted equal)" if torch is not None else ""))
        out["ae"] = _finish("ae", rows, flops, sum(counts), a,
                            {"conv_impl": applied, "params_autoencoder": counts[0],
                             "params_discriminator": counts[1]})
    out["machine"] = common.machine_info(load0, with_torch=torch is not None)
    common.print_machine(out["machine"])
    print(f"step ms: median of {a.steps} steps after {a.warmup} warm-up; compile/first s: jax "
          f"lower+compile, torch first step (incl. torch.compile); MFU vs --peak_gflops "
          f"{a.peak_gflops:g}; jax/torch = img/s over the best torch row")
    common.write_json(a.json, out)
    return out


if __name__ == "__main__":
    main()

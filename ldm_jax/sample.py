"""Command line: sample a trained latent diffusion run (or a bundle) through its first stage.

  python -m ldm_jax.sample --workdir=runs/ldm_digits --num=64 --sampler=ddim --steps=50 \
      --out=samples/ [--eta=0] [--guidance_scale=2] [--labels=0,1,2] [--seed=0] [--no_ema]

Writes `<out>/000000.png ...` (one PNG per sample), `<out>/grid.png` and `<out>/samples.npz`
(`images` uint8 [N, H, W, 3], plus `labels` int32 [N] for class-conditional runs). Samples come
from the EMA weights unless --no_ema. `--workdir` may also be an inference bundle written by
`python -m ldm_jax.export` or `python -m ldm_jax.convert` (see ldm_jax/bundle.py). Batches
are sharded over all devices; the noise of sample j is a function of (seed, j) only, so the
same seed gives the same samples whatever the device count, batch size or number of hosts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ldm_jax import checkpointing, cli, config_lib, distributed, logging_utils, sharding
from ldm_jax.diffusion import samplers


def load_run(workdir: str):
    """(config, task) of a stage-2 run directory or an inference bundle."""
    from ldm_jax import bundle as bundle_lib
    if bundle_lib.is_bundle(workdir):
        config, task, _ = load_bundle_task(workdir)
        return config, task
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--workdir={workdir}: no config.json there; is it a training run "
                                f"(or a bundle from python -m ldm_jax.export)?")
    with open(path) as f:
        config = config_lib.config_from_json(json.load(f))
    if config.stage != "diffusion":
        raise ValueError(f"--workdir={workdir} is a {config.stage!r} run; sampling needs a "
                         f"diffusion (stage 2) run.")
    from ldm_jax.tasks.diffusion import DiffusionTask
    return config, DiffusionTask(config)


def load_bundle_task(directory: str):
    """(config, task, bundle) of an inference bundle (see ldm_jax.bundle)."""
    from ldm_jax import bundle as bundle_lib
    from ldm_jax.tasks.diffusion import DiffusionTask, LatentContext
    bundle = bundle_lib.load_bundle(directory)
    return bundle.config, DiffusionTask(bundle.config, LatentContext.from_bundle(bundle)), bundle


def load_params(workdir: str, *, step: int | None = None, use_ema: bool = True):
    """(config, task, params, step) to sample with, from a run (EMA or raw weights) or a bundle."""
    from ldm_jax import bundle as bundle_lib
    if bundle_lib.is_bundle(workdir):
        if not use_ema or step is not None:
            raise ValueError(f"--workdir={workdir} is a bundle: it holds one set of weights, so "
                             f"--no_ema and --step do not apply (export the run again instead).")
        config, task, bundle = load_bundle_task(workdir)
        return config, task, bundle.unet_params, int(bundle.source.get("step", 0))
    config, task = load_run(workdir)
    state, step = checkpointing.restore_raw_state(workdir, step)
    return config, task, (state["ema_params"] if use_ema else state["params"]["model"]), step


def generate(task, params, constants, *, num: int, batch_size: int, seed: int, sampler,
             guidance_scale: float, labels: np.ndarray | None, mesh) -> np.ndarray:
    """uint8 images [num, H, W, 3], the same on every process; batches sharded over the mesh.

    Multi-host: every process runs this with the same arguments (the noise and labels of batch
    i depend only on (seed, i) and `labels`), and each batch is gathered from all hosts, so
    the result does not depend on the number of processes or devices.
    """
    out = [logging_utils.to_uint8(_gather(images)) for images in sample_batches(
        task, params, constants, num=num, batch_size=batch_size, seed=seed, sampler=sampler,
        guidance_scale=guidance_scale, labels=labels, mesh=mesh)]
    return np.concatenate(out)[:num]


def _gather(array: jax.Array) -> np.ndarray:
    """A global array as numpy on this host; across processes when it spans several."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _global(value, sharding_):
    """Host numpy (the same on every process) -> a global array with `sharding_`. Unlike
    device_put, also valid for shardings that span devices of other processes."""
    value = np.asarray(jax.device_get(value))
    return jax.make_array_from_callback(value.shape, sharding_, lambda index: value[index])


def sample_batches(task, params, constants, *, num: int, batch_size: int, seed: int, sampler,
                   guidance_scale: float, labels: np.ndarray | None, mesh):
    """Yields ceil(num / batch_size) decoded batches [batch_size, H, W, 3] in [-1, 1], global
    arrays sharded over the mesh (the last batch is padded: keep its first rows only). Sample j
    draws its noise from fold_in(key(seed), j) alone; batch i takes labels[i * batch_size:]
    (cycled)."""
    batch_sharding = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)

    def sample_batch(params, constants, rng, batch_labels):
        z = task.sample_latents(params, rng, batch_size, labels=batch_labels, sampler=sampler,
                                guidance_scale=guidance_scale)
        z = jax.lax.with_sharding_constraint(z, batch_sharding)
        return task.decode(constants, z)

    def sample_index(params, constants, i, batch_labels):
        # Every input is a global array made from host numpy that is identical on all
        # processes; the key is derived inside the computation from the batch index.
        # One key per sample (sample j: fold_in(key(seed), j)), so a sample does not depend
        # on the batch size, hence not on the device count either.
        index = i * batch_size + jnp.arange(batch_size, dtype=jnp.uint32)
        keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.key(seed), j))(index)
        return sample_batch(params, constants, keys, batch_labels)

    fn = jax.jit(sample_index, out_shardings=batch_sharding)
    params = jax.tree_util.tree_map(lambda x: _global(x, replicated), params)
    constants = jax.tree_util.tree_map(lambda x: _global(x, replicated), constants)
    for i in range(-(-num // batch_size)):
        batch_labels = None
        if labels is not None:
            chunk = np.resize(labels[i * batch_size:(i + 1) * batch_size], batch_size)
            batch_labels = _global(chunk.astype(np.int32), batch_sharding)
        args = (params, constants, _global(np.uint32(i), replicated), batch_labels)
        if i == 0:
            # Compile first, then start the first batch on all processes together.
            fn = fn.lower(*args).compile()
            distributed.barrier("sample_compiled")
        yield fn(*args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm_jax.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True,
                        help="stage-2 run directory, or a bundle (python -m ldm_jax.export / convert)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--sampler", default="ddim", choices=sorted(samplers.SAMPLERS))
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (ddim/plms)")
    parser.add_argument("--eta", type=float, default=None)
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="classifier-free guidance scale (default: the run's config)")
    parser.add_argument("--labels", default="", help="class ids, comma separated (cycled)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=0, help="0: num rounded to devices")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--no_ema", action="store_true", help="use the raw (non-EMA) weights")
    cli.add_distributed_flags(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cli.initialize_distributed(args)  # before anything touches a device (multi-host)

    config, task, params, step = load_params(args.workdir, step=args.step, use_ema=not args.no_ema)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    n_dev = mesh.devices.size
    batch_size = args.batch_size or min(-(-args.num // n_dev) * n_dev, max(n_dev, 64 // n_dev * n_dev))
    sharding.check_batch_divides(batch_size, mesh, field="batch_size (--batch_size)")
    labels = None
    if task.class_conditional:
        labels = (np.array([int(v) for v in args.labels.split(",")], np.int32) if args.labels
                  else np.arange(args.num, dtype=np.int32) % task.null_label)
        labels = np.resize(labels, args.num)
        if labels.min() < 0 or labels.max() > task.null_label:
            raise ValueError(f"--labels must lie in [0, {task.null_label}] ({task.null_label} = null).")
    from ldm_jax.tasks.diffusion import make_sampler
    sampler = make_sampler(config, task.schedule, name=args.sampler, num_steps=args.steps, eta=args.eta)
    images = generate(task, params, task.constants(), num=args.num, batch_size=batch_size,
                      seed=args.seed, sampler=sampler, guidance_scale=args.guidance_scale,
                      labels=labels, mesh=mesh)
    if jax.process_index() == 0:
        os.makedirs(args.out, exist_ok=True)
        for i, image in enumerate(images):
            logging_utils.save_png(image, os.path.join(args.out, f"{i:06d}.png"))
        ncols = int(np.ceil(np.sqrt(len(images)))) if labels is None else min(len(images), task.null_label)
        logging_utils.save_png(logging_utils.make_grid(images, ncols=ncols),
                               os.path.join(args.out, "grid.png"), upscale=max(1, 64 // images.shape[1]))
        arrays = {"images": images}
        if labels is not None:
            arrays["labels"] = labels
        np.savez(os.path.join(args.out, "samples.npz"), **arrays)
        print(f"Wrote {len(images)} samples ({args.sampler}, step {step}, "
              f"{'raw' if args.no_ema else 'EMA'} weights) to {args.out}/ (grid.png, samples.npz).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sampling a trained latent diffusion model (a stage-2 run or an inference bundle) to images.

The library half of `python -m ldm_jax.sample`: load the model (`load_params`), draw decoded
batches sharded over the mesh (`sample_batches`, `generate`) and write PNGs, a grid and
`samples.npz` (`sample_to_folder`). The noise of sample j is a function of (seed, j) only, so
the same seed gives the same samples whatever the device count, batch size or number of hosts.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import UserError
from ldm_jax.parallel import distributed, sharding
from ldm_jax.storage import files, run_dir
from ldm_jax.storage import images as image_files


class SamplingError(UserError, ValueError):
    """The sampling request does not fit the model (labels, --step on a bundle, batch size)."""


def load_run(workdir: str):
    """(config, task) of a stage-2 run directory or an inference bundle."""
    from ldm_jax.storage import bundle as bundle_lib
    if bundle_lib.is_bundle(workdir):
        config, task, _ = load_bundle_task(workdir)
        return config, task
    config = run_dir.read_stage_config(workdir, "diffusion",
                                       purpose="sampling needs a diffusion (stage 2) run or a bundle.")
    from ldm_jax.tasks.diffusion import DiffusionTask
    return config, DiffusionTask(config)


def load_bundle_task(directory: str):
    """(config, task, bundle) of an inference bundle (see ldm_jax.storage.bundle)."""
    from ldm_jax.storage import bundle as bundle_lib
    from ldm_jax.tasks.diffusion import DiffusionTask, LatentContext
    bundle = bundle_lib.load_bundle(directory)
    return bundle.config, DiffusionTask(bundle.config, LatentContext.from_bundle(bundle)), bundle


def load_params(workdir: str, *, step: int | None = None, use_ema: bool = True):
    """(config, task, params, step) to sample with, from a run (EMA or raw weights) or a bundle."""
    from ldm_jax.storage import bundle as bundle_lib
    if bundle_lib.is_bundle(workdir):
        if not use_ema or step is not None:
            raise SamplingError(f"--workdir={workdir} is a bundle: it holds one set of weights, so "
                                f"--no_ema and --step do not apply (export the run again instead).")
        config, task, bundle = load_bundle_task(workdir)
        return config, task, bundle.unet_params, int(bundle.source.get("step", 0))
    config, task = load_run(workdir)
    params, step = run_dir.diffusion_weights(workdir, step=step, use_ema=use_ema)
    return config, task, params, step


def generate(task, params, constants, *, num: int, batch_size: int, seed: int, sampler,
             guidance_scale: float, labels: np.ndarray | None, mesh) -> np.ndarray:
    """uint8 images [num, H, W, 3], the same on every process; batches sharded over the mesh.

    Multi-host: every process runs this with the same arguments (the noise and labels of batch
    i depend only on (seed, i) and `labels`), and each batch is gathered from all hosts, so
    the result does not depend on the number of processes or devices.
    """
    out = [image_files.to_uint8(sharding.to_host(images)) for images in sample_batches(
        task, params, constants, num=num, batch_size=batch_size, seed=seed, sampler=sampler,
        guidance_scale=guidance_scale, labels=labels, mesh=mesh)]
    return np.concatenate(out)[:num]


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
    params = sharding.put_global(params, replicated)
    constants = sharding.put_global(constants, replicated)
    for i in range(-(-num // batch_size)):
        batch_labels = None
        if labels is not None:
            chunk = np.resize(labels[i * batch_size:(i + 1) * batch_size], batch_size)
            batch_labels = sharding.put_global(chunk.astype(np.int32), batch_sharding)
        args = (params, constants, sharding.put_global(np.uint32(i), replicated), batch_labels)
        if i == 0:
            # Compile first, then start the first batch on all processes together.
            fn = fn.lower(*args).compile()
            distributed.barrier("sample_compiled")
        yield fn(*args)


def default_batch_size(num: int, mesh) -> int:
    """`num` rounded up to the device count, at most about 64 (a multiple of the devices)."""
    n_dev = mesh.devices.size
    return min(-(-num // n_dev) * n_dev, max(n_dev, 64 // n_dev * n_dev))


def parse_labels(text: str, num: int, *, num_classes: int, class_names=None) -> np.ndarray:
    """`--labels` (class ids or class names, comma separated, cycled) -> int32 [num]; empty
    cycles 0, 1, ..., num_classes - 1."""
    if not text.strip():
        return np.arange(num, dtype=np.int32) % num_classes
    names = list(class_names or ())
    ids = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        if item in names:
            ids.append(names.index(item))
            continue
        try:
            ids.append(int(item))
        except ValueError:
            known = f"class names {names}" if names else "no class names (ids only)"
            raise SamplingError(f"--labels: {item!r} is neither a class id in [0, {num_classes}) "
                                f"nor a class name; this model has {known}.") from None
    labels = np.resize(np.asarray(ids, np.int32), num)
    if labels.min() < 0 or labels.max() > num_classes:
        raise SamplingError(f"--labels must lie in [0, {num_classes}] ({num_classes} = the null "
                            f"label for guidance), got {sorted(set(ids))}.")
    return labels


def sample_to_folder(workdir: str, out: str, *, num: int, sampler_name: str,
                     steps: int | None = None, eta: float | None = None,
                     guidance_scale: float | None = None, labels: str = "", seed: int = 0,
                     batch_size: int = 0, step: int | None = None, use_ema: bool = True,
                     overrides=()) -> dict:
    """Samples `num` images of a run or bundle into `out`: 000000.png ..., grid.png and
    samples.npz (`images` uint8 [N, H, W, 3], plus `labels` for class-conditional models).

    `overrides` are `--config.key=value` settings for the sampling run itself: the mesh
    (`mesh.data`, `mesh.fsdp`) and the `sampling` group. Returns a summary dict.
    """
    from ldm_jax.config import loading as config_lib
    from ldm_jax.tasks.diffusion import make_sampler
    if num < 1:
        raise SamplingError(f"--num={num}: sample at least one image.")
    config_lib.check_inference_overrides(overrides)
    config, task, params, step = load_params(workdir, step=step, use_ema=use_ema)
    config = config_lib.apply_inference_overrides(config, overrides)
    mesh = sharding.make_mesh(config.mesh)
    batch_size = batch_size or default_batch_size(num, mesh)
    sharding.check_batch_divides(batch_size, mesh, field="batch_size (--batch_size)")
    label_ids = None
    if task.class_conditional:
        label_ids = parse_labels(labels, num, num_classes=task.null_label,
                                 class_names=task.latents.class_names)
    elif labels:
        raise SamplingError(f"--labels={labels}: {workdir} is not class-conditional "
                            f"(conditioning.kind={config.conditioning.kind!r}).")
    sampler = make_sampler(config, task.schedule, name=sampler_name, num_steps=steps, eta=eta)
    images = generate(task, params, task.constants(), num=num, batch_size=batch_size,
                      seed=seed, sampler=sampler, guidance_scale=guidance_scale,
                      labels=label_ids, mesh=mesh)
    if jax.process_index() == 0:
        for i, image in enumerate(images):
            image_files.save_png(image, os.path.join(out, f"{i:06d}.png"))
        ncols = (int(np.ceil(np.sqrt(len(images)))) if label_ids is None
                 else min(len(images), task.null_label))
        image_files.save_png(image_files.make_grid(images, ncols=ncols),
                             os.path.join(out, "grid.png"), upscale=max(1, 64 // images.shape[1]))
        arrays = {"images": images}
        if label_ids is not None:
            arrays["labels"] = label_ids
        files.write_npz(os.path.join(out, "samples.npz"), **arrays)
        print(f"Wrote {len(images)} samples ({sampler_name}, step {step}, "
              f"{'EMA' if use_ema else 'raw'} weights) to {out}/ (grid.png, samples.npz).",
              flush=True)
    return {"num": len(images), "step": step, "batch_size": batch_size}

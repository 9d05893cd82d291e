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
from ldm_jax.conditioning.encoders import parse_labels  # noqa: F401  (re-exported)
from ldm_jax.parallel import distributed, sharding
from ldm_jax.storage import files, run_dir
from ldm_jax.storage import images as image_files


class SamplingError(UserError, ValueError):
    """The sampling request does not fit the model (--step on a bundle, batch size, files)."""


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
             guidance_scale: float, labels: np.ndarray | None = None, mesh,
             cond: dict | None = None) -> np.ndarray:
    """uint8 images [num, H, W, 3], the same on every process; batches sharded over the mesh.

    Multi-host: every process runs this with the same arguments (the noise and labels of batch
    i depend only on (seed, i) and `labels`), and each batch is gathered from all hosts, so
    the result does not depend on the number of processes or devices.
    """
    out = [image_files.to_uint8(sharding.to_host(images)) for images in sample_batches(
        task, params, constants, num=num, batch_size=batch_size, seed=seed, sampler=sampler,
        guidance_scale=guidance_scale, labels=labels, mesh=mesh, cond=cond)]
    return np.concatenate(out)[:num]


def sample_batches(task, params, constants, *, num: int, batch_size: int, seed: int, sampler,
                   guidance_scale: float, labels: np.ndarray | None = None, mesh,
                   cond: dict | None = None):
    """Yields ceil(num / batch_size) decoded batches [batch_size, H, W, 3] in [-1, 1], global
    arrays sharded over the mesh (the last batch is padded: keep its first rows only). Sample j
    draws its noise from fold_in(key(seed), j) alone; batch i takes the rows
    [i * batch_size, (i + 1) * batch_size) of `cond` (a condition batch of `num` rows, cycled;
    `labels` is shorthand for {'label': labels}); None samples the null condition."""
    if cond is None and labels is not None:
        cond = {"label": np.asarray(labels, np.int32)}
    batch_sharding = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)

    def sample_batch(params, constants, rng, batch_cond):
        z = task.sample_latents(params, rng, batch_size, cond=batch_cond, constants=constants,
                                sampler=sampler, guidance_scale=guidance_scale)
        z = jax.lax.with_sharding_constraint(z, batch_sharding)
        return task.decode(constants, z)

    def sample_index(params, constants, i, batch_cond):
        # Every input is a global array made from host numpy that is identical on all
        # processes; the key is derived inside the computation from the batch index.
        # One key per sample (sample j: fold_in(key(seed), j)), so a sample does not depend
        # on the batch size, hence not on the device count either.
        index = i * batch_size + jnp.arange(batch_size, dtype=jnp.uint32)
        keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.key(seed), j))(index)
        return sample_batch(params, constants, keys, batch_cond)

    fn = jax.jit(sample_index, out_shardings=batch_sharding)
    params = sharding.put_global(params, replicated)
    constants = sharding.put_global(constants, replicated)
    for i in range(-(-num // batch_size)):
        batch_cond = None
        if cond is not None:
            rows = np.arange(i * batch_size, (i + 1) * batch_size) % len(next(iter(cond.values())))
            batch_cond = {k: sharding.put_global(np.asarray(v)[rows], batch_sharding)
                          for k, v in cond.items()}
        args = (params, constants, sharding.put_global(np.uint32(i), replicated), batch_cond)
        if i == 0:
            # Compile first, then start the first batch on all processes together.
            fn = fn.lower(*args).compile()
            distributed.barrier("sample_compiled")
        yield fn(*args)


def default_batch_size(num: int, mesh) -> int:
    """`num` rounded up to the device count, at most about 64 (a multiple of the devices)."""
    n_dev = mesh.devices.size
    return min(-(-num // n_dev) * n_dev, max(n_dev, 64 // n_dev * n_dev))


def read_prompts(prompts=(), prompts_file: str = "") -> list[str]:
    """`--prompt` values then the lines of `--prompts_file` (blank lines skipped)."""
    out = list(prompts or ())
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise SamplingError(f"--prompts_file={prompts_file}: no such file.")
        with open(prompts_file, encoding="utf-8") as f:
            out += [line.strip() for line in f if line.strip()]
    return out


def read_condition_images(task, inputs: str, masks: str) -> dict:
    """{'inputs', 'masks'?} uint8 arrays of --input / --mask; a one-line error when the model
    takes no image (or an inpainting model gets no mask)."""
    if not task.image_conditional:
        if inputs or masks:
            raise SamplingError(f"--input/--mask were given, but this model takes no image "
                                f"(conditioning.kind={task.config.conditioning.kind!r}).")
        return {}
    if not inputs:
        raise SamplingError(f"this model (conditioning.image_task="
                            f"{task.condition.task!r}) samples from an input image: give --input.")
    semantic = task.condition.task == "semantic"
    out = {"inputs": image_files.read_image_inputs(
        inputs, key="segmentations" if semantic else "images", flag="--input", gray=semantic)}
    if masks:
        out["masks"] = (image_files.read_image_inputs(masks, key="masks", flag="--mask",
                                                      gray=True) > 0).astype(np.uint8)
    if task.condition.task == "inpaint" and "masks" in out:
        if out["masks"].shape[1:] != out["inputs"].shape[1:3]:
            raise SamplingError(f"--mask={masks}: masks are {out['masks'].shape[2]}x"
                                f"{out['masks'].shape[1]} pixels but --input={inputs} images are "
                                f"{out['inputs'].shape[2]}x{out['inputs'].shape[1]}.")
    return out


def finish_image_task(task, images: np.ndarray, arrays: dict, *, blend: bool = True):
    """Inpainting: the visible pixels of each result are the input's (blended back in pixel
    space) unless blend=False. Returns (images, the arrays samples.npz records: `inputs`
    and `masks`, cycled to the number of images)."""
    n = len(images)
    cycle = lambda a: a[np.arange(n) % len(a)]
    record = {k: cycle(v) for k, v in arrays.items() if v is not None}
    if task.condition.task == "inpaint" and blend and "masks" in record:
        fill = record["masks"][..., None].astype(bool)
        images = np.where(fill, images, record["inputs"]).astype(np.uint8)
    return images, record


def sample_to_folder(workdir: str, out: str, *, num: int, sampler_name: str,
                     steps: int | None = None, eta: float | None = None,
                     guidance_scale: float | None = None, labels: str = "", prompts=(),
                     layouts=(), inputs: str = "", masks: str = "", blend: bool = True,
                     seed: int = 0, batch_size: int = 0, step: int | None = None,
                     use_ema: bool = True, overrides=()) -> dict:
    """Samples `num` images of a run or bundle into `out`: 000000.png ..., grid.png and
    samples.npz (`images` uint8 [N, H, W, 3], plus the conditions asked for: `labels` int32 [N],
    `prompts` str [N] or `layouts` str [N], each cycled to N).

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
    prompts, layouts = list(prompts or ()), list(layouts or ())
    image_arrays = read_condition_images(task, inputs, masks)
    extra = {}
    if task.image_conditional:
        extra = {"inputs": image_arrays.get("inputs"), "masks": image_arrays.get("masks"),
                 "levels": 2 ** (len(config.model.channel_mult) - 1)}
    cond = task.condition.request(num, prompts=prompts, layouts=layouts, labels=labels,
                                  class_names=config.conditioning.class_names, **extra)
    sampler = make_sampler(config, task.schedule, name=sampler_name, num_steps=steps, eta=eta)
    images = generate(task, params, task.constants(), num=num, batch_size=batch_size,
                      seed=seed, sampler=sampler, guidance_scale=guidance_scale,
                      cond=cond or None, mesh=mesh)
    if task.image_conditional:
        images, image_arrays = finish_image_task(task, images, image_arrays, blend=blend)
    if jax.process_index() == 0:
        for i, image in enumerate(images):
            image_files.save_png(image, os.path.join(out, f"{i:06d}.png"))
        ncols = int(np.ceil(np.sqrt(len(images))))
        if task.class_conditional:
            ncols = min(len(images), task.null_label)
        elif prompts or layouts:
            ncols = min(len(images), len(prompts or layouts))
        image_files.save_png(image_files.make_grid(images, ncols=ncols),
                             os.path.join(out, "grid.png"), upscale=max(1, 64 // images.shape[1]))
        arrays = {"images": images}
        if task.class_conditional:
            arrays["labels"] = cond["label"]
        cycle = lambda items: np.asarray([items[i % len(items)] for i in range(len(images))])
        if prompts or config.conditioning.kind == "text":
            arrays["prompts"] = cycle(prompts or [""])
        if layouts or config.conditioning.kind == "layout":
            arrays["layouts"] = cycle(layouts or [""])
        arrays.update(image_arrays)
        files.write_npz(os.path.join(out, "samples.npz"), **arrays)
        print(f"Wrote {len(images)} samples ({sampler_name}, step {step}, "
              f"{'EMA' if use_ema else 'raw'} weights) to {out}/ (grid.png, samples.npz).",
              flush=True)
    return {"num": len(images), "step": step, "batch_size": batch_size}

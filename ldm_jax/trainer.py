"""The one train loop every stage uses: `train_and_evaluate(config, workdir)`.

Order of work (also the resume order):
 1. check the config, build the mesh (clear error if the batch does not divide), the task;
 2. abstract state -> shardings; restore the latest checkpoint in `<workdir>/checkpoints` onto
    the current mesh, or initialise under jit with those shardings;
 3. open the input pipeline at the saved data position;
 4. compile the step ahead of time with the state donated (other step variants on first use);
 5. loop: step, log (progress line, metrics.jsonl, TensorBoard), images, eval, checkpoint;
    SIGTERM saves a checkpoint and exits cleanly; NaN/Inf stops with the last good checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from ldm_jax import checkpointing, config_lib, distributed, logging_utils, sharding
from ldm_jax.data import pipeline
from ldm_jax.tasks import make_task


class NonFiniteError(FloatingPointError):
    """Loss or gradients became NaN/Inf; the message names the last good checkpoint."""


class _TerminationFlag:
    """Set by SIGTERM (preemption, scheduler kill) so the loop can save before exiting."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def install(self):
        if _preemption_service_active():
            # jax.distributed's preemption service owns SIGTERM (it tells every host and picks
            # a common step: Checkpointer.reached_preemption); a Python handler would replace
            # it and stop this host alone.
            return
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. under some test runners): no handler.
            self._previous = None

    def _handle(self, signum, frame):
        self.requested = True

    def uninstall(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _preemption_service_active() -> bool:
    """True in a jax.distributed job whose preemption service is running (no public API)."""
    from jax._src import distributed as jax_distributed
    state = jax_distributed.global_state
    return (getattr(state, "client", None) is not None
            and getattr(state, "preemption_sync_manager", None) is not None)


def _to_host(tree):
    """Fully replicated / global arrays -> numpy on every host."""
    return jax.tree_util.tree_map(
        lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
        if isinstance(x, jax.Array) and not x.is_fully_replicated else np.asarray(x), tree)


def _mean_metrics(pending: list[dict]) -> dict:
    fetched = jax.device_get(pending)
    keys = fetched[-1].keys()
    return {k: float(np.mean([m[k] for m in fetched if k in m])) for k in keys}


def _evaluate(task, state, constants, compiled_eval, config, mesh) -> dict:
    """One pass over the held-out split; sums are accumulated on device then summarised."""
    totals = None
    iterator = pipeline.make_eval_iterator(config.data, global_batch_size=config.batch_size,
                                           num_examples=config.eval_num_examples)
    for local in iterator:
        sums = compiled_eval(state, sharding.global_batch(local, mesh), constants)
        totals = sums if totals is None else jax.tree_util.tree_map(lambda a, b: a + b, totals, sums)
    return task.summarise_eval(jax.device_get(totals))


def _write_images(state, constants, image_step, image_batch, workdir, step, writer, num):
    sets = _to_host(image_step(state, image_batch, constants))
    rows = [logging_utils.to_uint8(images[:num]) for images in sets.values()]
    grid = logging_utils.make_grid(np.concatenate(rows), ncols=num)
    name = "_".join(sets.keys())
    path = os.path.join(workdir, "images", f"{name}_{step:08d}.png")
    logging_utils.save_png(grid, path, upscale=max(1, 64 // rows[0].shape[1]))
    writer.write_image(step, name, grid)
    return path


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains `config.stage` in `workdir`, resuming from its latest checkpoint; returns the last
    logged metrics (and eval results under 'eval_*')."""
    config_lib.check_common_fields(config)
    if config.compilation_cache_dir and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_divides(config.batch_size, mesh)
    task = make_task(config)
    config_json = config_lib.to_json_dict(config)
    os.makedirs(workdir, exist_ok=True)

    # --- state: abstract -> shardings -> restore or init -----------------------------------
    example_iter = pipeline.make_eval_iterator(
        config.data, global_batch_size=config.batch_size, num_examples=config.batch_size)
    example = next(iter(example_iter))
    example_iter.close()
    example.pop("mask", None)
    abstract_batch = sharding.abstract_batch(example, mesh)
    rng = jax.random.key(config.seed)
    first_key = sorted(k for k in abstract_batch if k not in ("index", "label", "mask"))[0]
    init_fn = functools.partial(task.init_state, image_shape=abstract_batch[first_key].shape)
    abstract_state = jax.eval_shape(init_fn, rng)
    state_shardings = sharding.tree_shardings(abstract_state, mesh, config.sharding)
    abstract_state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_shardings)

    ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints,
                                      async_save=config.async_checkpointing)
    # Everything after this point runs under the finally below, so a failure anywhere (a bad
    # input found while compiling, a damaged checkpoint) still stops orbax's background
    # threads instead of leaving them to the garbage collector.
    writer = None
    terminate = _TerminationFlag()
    try:
        latest = ckpt.latest_step()
        if latest is not None:
            state, meta = ckpt.restore(latest, abstract_state, config_json)
            start_step, data_step = int(jax.device_get(state.step)), int(meta["data_step"])
            print(f"Resuming from {ckpt.directory}/{latest} (step {start_step}).", flush=True)
        else:
            with jax.set_mesh(mesh):
                state = jax.jit(init_fn, out_shardings=state_shardings)(rng)
            start_step = data_step = 0
        last_good = latest
        # Written only once the checkpoint (if any) is known to match: tools that read the run
        # (sample, load_first_stage) must never see a config the parameters do not follow.
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                json.dump(config_json, f, indent=2, sort_keys=True)

        train_iter = pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size,
                                                  seed=config.seed, start_step=data_step)

        # --- compile the step before the loop (state donated); the eval step too -----------------
        # A stage with several step variants (the first stage's 'rec' and 'gan') compiles the
        # variant the run starts in now and each other one once, when the run first reaches it.
        batch_sharding = sharding.batch_sharding(mesh)
        batch_shardings = {k: batch_sharding for k in abstract_batch}
        replicated = sharding.replicated(mesh)
        compiled = {}
        constants = jax.device_put(task.constants(), replicated)
        constants_shardings = jax.tree_util.tree_map(lambda _: replicated, constants)
        abstract_constants = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), constants)

        def compiled_step(phase: str):
            if phase not in compiled:
                t0 = time.perf_counter()
                step_fn = jax.jit(functools.partial(task.train_step, phase=phase),
                                  in_shardings=(state_shardings, batch_shardings, constants_shardings),
                                  out_shardings=(state_shardings, replicated), donate_argnums=0)
                compiled[phase] = step_fn.lower(abstract_state, abstract_batch, abstract_constants).compile()
                print(f"Compiled train step '{phase}' in {time.perf_counter() - t0:.1f}s on mesh "
                      f"{dict(mesh.shape)} ({jax.device_count()} devices, {jax.process_count()} "
                      f"process(es)).", flush=True)
            return compiled[phase]

        if start_step < config.total_steps:
            compiled_step(task.phase_for_step(start_step))
        # Multi-host: start the first step together (see distributed.barrier); no-op on one process.
        distributed.barrier("train_step_compiled")
        eval_batch = dict(abstract_batch, mask=jax.ShapeDtypeStruct(
            abstract_batch[first_key].shape[:1], np.bool_, sharding=batch_sharding))
        eval_fn = jax.jit(task.eval_step, in_shardings=(
            state_shardings, {k: batch_sharding for k in eval_batch}, constants_shardings),
            out_shardings=replicated)
        image_fn = jax.jit(task.image_step, in_shardings=(state_shardings, batch_shardings,
                                                          constants_shardings))

        image_batch = sharding.global_batch(example, mesh)
        writer = logging_utils.MetricWriter(workdir)
        progress = logging_utils.ProgressLogger(config.total_steps, config.batch_size)
        terminate.install()
        pending, last_metrics = [], {}

        def save(step_num: int):
            nonlocal last_good
            ckpt.save(step_num, state, checkpointing.make_meta(data_step=step_num, config_json=config_json))
            last_good = step_num

        def check_finite(step_num: int, logged: dict):
            if config.check_finite and logged.get("finite", 1.0) < 1.0:
                where = (f"the last good checkpoint is {ckpt.directory}/{last_good}" if last_good is not None
                         else "no checkpoint was written yet")
                raise NonFiniteError(
                    f"loss or gradients became NaN/Inf by step {step_num} (last metrics: "
                    f"{ {k: v for k, v in logged.items() if k in ('loss', 'grad_norm', 'd_loss')} }); "
                    f"{where}. Lower optimizer.base_learning_rate, enable optimizer.grad_clip_norm or "
                    f"use dtype=float32, then rerun to resume from that checkpoint.")

        progress.start(start_step)
        step_num = start_step
        for step in range(start_step, config.total_steps):
            batch = sharding.global_batch(next(train_iter), mesh)
            state, step_metrics = compiled_step(task.phase_for_step(step))(state, batch, constants)
            pending.append(step_metrics)
            step_num = step + 1
            is_last = step_num == config.total_steps
            # Read the flag once: SIGTERM may land between here and the save below, and the
            # run must never report a save it did not make.
            preempted = ckpt.reached_preemption(step_num)  # every step: a multi-host sync point.
            stopping = terminate.requested or preempted
            want_save = step_num % config.checkpoint_every_steps == 0 or is_last or stopping
            if step_num % config.log_every_steps == 0 or want_save:
                logged = _mean_metrics(pending)
                pending = []
                check_finite(step_num, logged)
                logged.update(progress.log(step_num, logged))
                writer.write(step_num, logged)
                last_metrics = logged
            if config.image_every_steps and (step_num % config.image_every_steps == 0 or is_last):
                _write_images(state, constants, image_fn, image_batch, workdir, step_num, writer,
                              config.num_grid_images)
            if config.eval_every_steps and (step_num % config.eval_every_steps == 0 or is_last):
                results = _evaluate(task, state, constants, eval_fn, config, mesh)
                writer.write(step_num, {f"eval_{k}": v for k, v in results.items()})
                last_metrics.update({f"eval_{k}": v for k, v in results.items()})
                print(f"eval @ {step_num}: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items()),
                      flush=True)
            if want_save:
                save(step_num)
            if stopping:
                why = "Preemption notice" if preempted else "SIGTERM"
                print(f"{why}: saved checkpoint at step {step_num}; rerun the same command to "
                      f"resume.", flush=True)
                break
    finally:
        terminate.uninstall()
        ckpt.close()
        if writer is not None:
            writer.close()
    last_metrics["step"] = step_num
    return last_metrics

"""The one train loop every stage uses: `train_and_evaluate(config, workdir)`.

Order of work (also the resume order), one function each:
 1. `_set_up`: check the config, build the mesh (clear error if the batch does not divide) and
    the task (which fills what it derives from the data into its config), read one example
    batch, abstract state -> shardings;
 2. `_restore_or_init`: restore the latest checkpoint in `<workdir>/checkpoints` onto the
    current mesh, or initialise under jit with those shardings; then write config.json;
 3. open the input pipeline at the saved data position;
 4. `_compile`: the train step ahead of time with the state donated (other step variants on
    first use), the eval and image steps;
 5. `_loop`: step, log (progress line, metrics.jsonl, TensorBoard), images, eval, checkpoint;
    SIGTERM saves a checkpoint and exits cleanly; NaN/Inf stops with the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from typing import Any, Callable

import jax
import numpy as np

from ldm_jax import UserError
from ldm_jax.config import loading as config_lib
from ldm_jax.parallel import distributed, sharding
from ldm_jax.storage import images as image_files
from ldm_jax.storage import run_dir
from ldm_jax.training import checkpointing, logging_utils
from ldm_jax.data import pipeline
from ldm_jax.tasks import make_task


class NonFiniteError(UserError, FloatingPointError):
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


def _mean_metrics(pending: list[dict]) -> dict:
    fetched = jax.device_get(pending)
    keys = fetched[-1].keys()
    return {k: float(np.mean([m[k] for m in fetched if k in m])) for k in keys}


@dataclasses.dataclass
class _Setup:
    """What `_set_up` derives from the config before any state exists."""

    config: Any  # the task's config: the user's, with derived fields filled in
    task: Any
    mesh: jax.sharding.Mesh
    example: dict  # one host-local batch (image grids; shapes for compilation)
    abstract_batch: dict
    abstract_state: Any  # ShapeDtypeStructs carrying the state shardings
    state_shardings: Any
    init_fn: Callable


def _set_up(config) -> _Setup:
    config_lib.check_common_fields(config)
    if config.compilation_cache_dir and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_divides(config.batch_size, mesh)
    task = make_task(config)
    config = task.config
    example_iter = pipeline.make_eval_iterator(
        config.data, global_batch_size=config.batch_size, num_examples=config.batch_size,
        condition_fn=_condition_fn(task))
    example = next(iter(example_iter))
    example_iter.close()
    example.pop("mask", None)
    abstract_batch = sharding.abstract_batch(example, mesh)
    init_fn = functools.partial(task.init_state,
                                input_shape=abstract_batch[task.input_key].shape)
    abstract_state = jax.eval_shape(init_fn, jax.random.key(config.seed))
    state_shardings = sharding.tree_shardings(abstract_state, mesh, config.sharding)
    abstract_state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_shardings)
    return _Setup(config=config, task=task, mesh=mesh, example=example,
                  abstract_batch=abstract_batch, abstract_state=abstract_state,
                  state_shardings=state_shardings, init_fn=init_fn)


def _condition_fn(task):
    """The task's per-example condition hook for the input pipeline (captions / layouts ->
    tokens), if it has one."""
    return getattr(task, "condition_fn", None)


def _restore_or_init(setup: _Setup, ckpt, workdir: str, config_json: dict):
    """(state, start_step, data_step, last checkpoint step or None); writes config.json once
    the checkpoint (if any) is known to match the config."""
    latest = ckpt.latest_step()
    if latest is not None:
        state, meta = ckpt.restore(latest, setup.abstract_state, config_json)
        start_step, data_step = int(jax.device_get(state.step)), int(meta["data_step"])
        print(f"Resuming from {ckpt.directory}/{latest} (step {start_step}).", flush=True)
    else:
        with jax.set_mesh(setup.mesh):
            state = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)(
                jax.random.key(setup.config.seed))
        start_step = data_step = 0
    # Tools that read the run (sample, load_first_stage) must never see a config the
    # parameters do not follow, hence only now.
    if jax.process_index() == 0:
        run_dir.write_config(workdir, config_json)
    return state, start_step, data_step, latest


@dataclasses.dataclass
class _Steps:
    """The jitted step functions of a run."""

    train: Callable[[str], Callable]  # phase -> compiled train step (compiled on first use)
    eval: Callable
    image: Callable
    constants: Any


def _remat_compiler_options(config) -> dict | None:
    """XLA options that keep model.remat's recomputation on this backend (XLA:CPU otherwise
    folds it back into the forward pass; see ldm_jax/models/remat.py); None without remat."""
    from ldm_jax.models.remat import compiler_options
    if config.model.get("remat", "nothing") == "nothing":
        return None
    return compiler_options() or None


def _compile(setup: _Setup, start_step: int) -> _Steps:
    """Compiles the train step the run starts in before the loop (state donated); a stage with
    several variants (the first stage's 'rec' and 'gan') compiles each other one once, when the
    run first reaches it."""
    task, mesh, config = setup.task, setup.mesh, setup.config
    batch_sharding = sharding.batch_sharding(mesh)
    batch_shardings = {k: batch_sharding for k in setup.abstract_batch}
    replicated = sharding.replicated(mesh)
    constants = jax.device_put(task.constants(), replicated)
    constants_shardings = jax.tree_util.tree_map(lambda _: replicated, constants)
    abstract_constants = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), constants)
    compiled = {}

    def train(phase: str):
        if phase not in compiled:
            t0 = time.perf_counter()
            step_fn = jax.jit(functools.partial(task.train_step, phase=phase),
                              in_shardings=(setup.state_shardings, batch_shardings, constants_shardings),
                              out_shardings=(setup.state_shardings, replicated), donate_argnums=0)
            compiled[phase] = step_fn.lower(setup.abstract_state, setup.abstract_batch,
                                            abstract_constants).compile(
                                                _remat_compiler_options(config))
            print(f"Compiled train step '{phase}' in {time.perf_counter() - t0:.1f}s on mesh "
                  f"{dict(mesh.shape)} ({jax.device_count()} devices, {jax.process_count()} "
                  f"process(es)).", flush=True)
        return compiled[phase]

    if start_step < config.total_steps:
        train(task.phase_for_step(start_step))
    # Multi-host: start the first step together (see distributed.barrier); no-op on one process.
    distributed.barrier("train_step_compiled")
    eval_keys = list(setup.abstract_batch) + ["mask"]
    eval_fn = jax.jit(task.eval_step, in_shardings=(
        setup.state_shardings, {k: batch_sharding for k in eval_keys}, constants_shardings),
        out_shardings=replicated)
    image_fn = jax.jit(task.image_step, in_shardings=(setup.state_shardings, batch_shardings,
                                                      constants_shardings))
    return _Steps(train=train, eval=eval_fn, image=image_fn, constants=constants)


def _evaluate(setup: _Setup, state, steps: _Steps) -> dict:
    """One pass over the held-out split; sums are accumulated on device then summarised."""
    config = setup.config
    totals = None
    iterator = pipeline.make_eval_iterator(config.data, global_batch_size=config.batch_size,
                                           num_examples=config.eval_num_examples,
                                           condition_fn=_condition_fn(setup.task))
    try:
        for local in iterator:
            sums = steps.eval(state, sharding.global_batch(local, setup.mesh), steps.constants)
            totals = sums if totals is None else jax.tree_util.tree_map(lambda a, b: a + b, totals, sums)
    finally:
        iterator.close()
    return setup.task.summarise_eval(jax.device_get(totals))


def _write_images(setup: _Setup, state, steps: _Steps, workdir: str, step: int, writer) -> str:
    image_batch = sharding.global_batch(setup.example, setup.mesh)
    num = setup.config.num_grid_images
    sets = sharding.to_host(steps.image(state, image_batch, steps.constants))
    rows = [image_files.to_uint8(images[:num]) for images in sets.values()]
    grid = image_files.make_grid(np.concatenate(rows), ncols=num)
    name = "_".join(sets.keys())
    path = os.path.join(workdir, "images", f"{name}_{step:08d}.png")
    image_files.save_png(grid, path, upscale=max(1, 64 // rows[0].shape[1]))
    writer.write_image(step, name, grid)
    return path


def _non_finite_error(step_num: int, logged: dict, ckpt, last_good) -> NonFiniteError:
    where = (f"the last good checkpoint is {ckpt.directory}/{last_good}" if last_good is not None
             else "no checkpoint was written yet")
    shown = {k: v for k, v in logged.items() if k in ("loss", "grad_norm", "d_loss")}
    return NonFiniteError(
        f"loss or gradients became NaN/Inf by step {step_num} (last metrics: {shown}); {where}. "
        f"Lower optimizer.base_learning_rate, enable optimizer.grad_clip_norm or use "
        f"dtype=float32, then rerun to resume from that checkpoint.")


def _loop(setup: _Setup, steps: _Steps, state, ckpt, train_iter, workdir: str, *,
          start_step: int, last_good, config_json: dict, writer, terminate) -> tuple[dict, int]:
    """Runs steps start_step..total_steps; returns (last logged metrics, last step)."""
    config = setup.config
    progress = logging_utils.ProgressLogger(config.total_steps, config.batch_size)
    pending, last_metrics = [], {}
    progress.start(start_step)
    step_num = start_step
    for step in range(start_step, config.total_steps):
        batch = sharding.global_batch(next(train_iter), setup.mesh)
        state, step_metrics = steps.train(setup.task.phase_for_step(step))(state, batch, steps.constants)
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
            if config.check_finite and logged.get("finite", 1.0) < 1.0:
                raise _non_finite_error(step_num, logged, ckpt, last_good)
            logged.update(progress.log(step_num, logged))
            writer.write(step_num, logged)
            last_metrics = logged
        if config.image_every_steps and (step_num % config.image_every_steps == 0 or is_last):
            _write_images(setup, state, steps, workdir, step_num, writer)
        if config.eval_every_steps and (step_num % config.eval_every_steps == 0 or is_last):
            results = _evaluate(setup, state, steps)
            writer.write(step_num, {f"eval_{k}": v for k, v in results.items()})
            last_metrics.update({f"eval_{k}": v for k, v in results.items()})
            print(f"eval @ {step_num}: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items()),
                  flush=True)
        if want_save:
            ckpt.save(step_num, state, checkpointing.make_meta(data_step=step_num,
                                                               config_json=config_json))
            last_good = step_num
        if stopping:
            why = "Preemption notice" if preempted else "SIGTERM"
            print(f"{why}: saved checkpoint at step {step_num}; rerun the same command to "
                  f"resume.", flush=True)
            break
    return last_metrics, step_num


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains `config.stage` in `workdir`, resuming from its latest checkpoint; returns the last
    logged metrics (and eval results under 'eval_*')."""
    setup = _set_up(config)
    config_json = config_lib.to_json_dict(setup.config)
    os.makedirs(workdir, exist_ok=True)
    ckpt = checkpointing.Checkpointer(workdir, keep=setup.config.keep_checkpoints,
                                      async_save=setup.config.async_checkpointing)
    # Everything after this point runs under the finally below, so a failure anywhere (a bad
    # input found while compiling, a damaged checkpoint) still stops orbax's background
    # threads and the reader threads instead of leaving them to the garbage collector.
    writer = train_iter = None
    terminate = _TerminationFlag()
    try:
        state, start_step, data_step, last_good = _restore_or_init(setup, ckpt, workdir, config_json)
        train_iter = pipeline.make_train_iterator(setup.config.data,
                                                  global_batch_size=setup.config.batch_size,
                                                  seed=setup.config.seed, start_step=data_step,
                                                  condition_fn=_condition_fn(setup.task))
        steps = _compile(setup, start_step)
        writer = logging_utils.MetricWriter(workdir)
        terminate.install()
        last_metrics, step_num = _loop(setup, steps, state, ckpt, train_iter, workdir,
                                       start_step=start_step, last_good=last_good,
                                       config_json=config_json, writer=writer,
                                       terminate=terminate)
    finally:
        terminate.uninstall()
        ckpt.close()
        if train_iter is not None:
            train_iter.close()
        if writer is not None:
            writer.close()
    last_metrics["step"] = step_num
    return last_metrics

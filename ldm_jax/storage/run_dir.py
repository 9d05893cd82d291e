"""Training run directories: the one place that knows their layout.

  <workdir>/config.json       the run's full config (written by the train loop once the
                              checkpoint is known to match it; completed with today's defaults
                              when read, so runs saved by older versions still load)
  <workdir>/checkpoints/<k>/  orbax checkpoints (ldm_jax.training.checkpointing)
  <workdir>/metrics.jsonl, images/, eval/<step>.json

`sample`, `export`, `evaluate` and first-stage loading read runs only through this module.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from ldm_jax import UserError
from ldm_jax.config import loading as config_lib
from ldm_jax.storage import files

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class RunError(UserError, FileNotFoundError):
    """A run directory is missing, unfinished, or of the wrong stage for the command."""


def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


def checkpoint_dir(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))


def write_config(workdir: str, config_json: dict) -> None:
    """Writes `<workdir>/config.json` atomically (tools may read it while a run starts)."""
    files.write_json(config_path(workdir), config_json)


def read_config(workdir: str, *, flag: str = "--workdir") -> ml_collections.ConfigDict:
    """The run's saved config, completed with the defaults of fields added since it was saved."""
    path = config_path(workdir)
    if not os.path.isfile(path):
        raise RunError(f"{flag}={workdir}: no {CONFIG_FILE} there, so it is not a training run "
                       f"(train one with python -m ldm_jax.train --config=... --workdir={workdir}).")
    return config_lib.config_from_json(files.read_json(path))


def read_stage_config(workdir: str, stage: str, *, purpose: str, flag: str = "--workdir"
                      ) -> ml_collections.ConfigDict:
    """`read_config`, checking that the run trained `stage`; `purpose` says what needs it
    (e.g. "export needs a diffusion (stage 2) run.")."""
    config = read_config(workdir, flag=flag)
    if config.stage != stage:
        raise RunError(f"{flag}={workdir} is a {config.stage!r} run: {purpose}")
    return config


def latest_step(workdir: str) -> int | None:
    """The newest finished checkpoint step of a run, or None."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return None
    with ocp.CheckpointManager(directory) as manager:
        return manager.latest_step()


def restore_raw_state(workdir: str, step: int | None = None, *, flag: str = "--workdir"
                      ) -> tuple[dict, int]:
    """The saved train state of a run (latest step by default) as nested dicts of numpy-backed
    arrays on this host's first device, whatever mesh wrote it. Reads without a target
    structure, so it needs neither the task nor the training mesh."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise RunError(f"{flag}={workdir}: no checkpoints in {directory}; train first with "
                       f"python -m ldm_jax.train --workdir={workdir}.")
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(directory, item_handlers=handlers) as manager:
        available = list(manager.all_steps())
        if step is None:
            step = manager.latest_step()
            if step is None:
                raise RunError(f"{flag}={workdir}: the run has no finished checkpoint yet.")
        elif int(step) not in available:
            raise RunError(f"--step={step}: {flag}={workdir} has checkpoints at steps "
                           f"{sorted(available)}; pick one of them.")
        try:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree_util.tree_map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                manager.item_metadata(int(step))["state"])
            restored = manager.restore(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target)))
        except Exception as e:  # orbax raises many types; all mean "unreadable".
            raise RunError(f"checkpoint {directory}/{step} is unreadable "
                           f"({type(e).__name__}: {e}); delete it to use an earlier one.") from e
    state = restored["state"]
    if not isinstance(state, dict):
        state = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    return state, int(step)


def diffusion_weights(workdir: str, *, step: int | None = None, use_ema: bool = True
                      ) -> tuple[object, int]:
    """(UNet parameters, step) of a stage-2 run: the EMA weights, or the raw ones."""
    state, step = restore_raw_state(workdir, step)
    if use_ema:
        if state.get("ema_params") is None:
            raise RunError(f"--workdir={workdir}: checkpoint {step} holds no EMA weights; use "
                           f"--no_ema for the raw weights.")
        return state["ema_params"], step
    return state["params"]["model"], step


def first_stage_weights(workdir: str, *, step: int | None = None, flag: str = "--first_stage"
                        ) -> tuple[object, int]:
    """(generator parameters, step) of an autoencoder run."""
    state, step = restore_raw_state(workdir, step, flag=flag)
    return state["params"]["generator"]["model"], step

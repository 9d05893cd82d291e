"""Orbax checkpoints for the train loop: async saves, keep-last-N, resume, restore on any mesh.

Each checkpoint is `<workdir>/checkpoints/<step>/` with two items:
  state: the TrainState pytree (step, params, optimiser state, EMA, RNG);
  meta:  JSON with the data position, the config and the ldm_jax version.
Orbax writes into a temporary directory and renames it when complete, so a crash mid-save never
leaves a checkpoint that looks finished. Restoring takes the abstract state of the *current* run
(shapes + shardings on the current mesh), so a run saved on 8 devices resumes on 1 or 16.
A checkpoint that cannot be read, or whose model config differs from the current one, is a clear
error; the loop never silently starts over.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import orbax.checkpoint as ocp

from ldm_jax import UserError, __version__
from ldm_jax.storage import run_dir

# Config fields that change the meaning of the saved parameters: a resumed run must match them.
_MODEL_DEFINING_FIELDS = ("stage", "model")
# Keys of those fields that change how the step computes, not what the parameters mean: left out
# of the comparison (a run may resume with another rematerialisation policy; a checkpoint from
# before the key existed still resumes).
_NON_DEFINING_KEYS = {"model": ("remat",)}
# Keys added after checkpoints were written, at the value that builds the old model: a key at
# this value counts as absent, so those checkpoints still resume (and a config that sets the
# key to anything else is refused as a different model).
_ADDED_KEY_DEFAULTS = {"model": {"transformer_position_frequencies": 0}}


def _defining(field: str, value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    added = _ADDED_KEY_DEFAULTS.get(field, {})
    return {k: v for k, v in value.items() if k not in _NON_DEFINING_KEYS.get(field, ())
            and not (k in added and v == added[k])}


def _describe_difference(name: str, saved: Any, now: Any) -> str:
    """'config.model.ch: saved 16, now 32; ...' for the keys that differ (whole values otherwise)."""
    if not (isinstance(saved, dict) and isinstance(now, dict)):
        return f"saved: {json.dumps(saved, sort_keys=True)}; now: {json.dumps(now, sort_keys=True)}"
    missing = "(absent)"
    parts = [f"config.{name}.{key}: saved {json.dumps(saved.get(key, missing))}, now "
             f"{json.dumps(now.get(key, missing))}"
             for key in sorted(set(saved) | set(now)) if saved.get(key, missing) != now.get(key, missing)]
    return "; ".join(parts)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint exists but cannot be used; the message says which and what to do."""


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` for one workdir."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = run_dir.checkpoint_dir(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, *, force: bool = True) -> None:
        """Starts an (async) save of `state` and the JSON `meta` at `step`."""
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave(meta)),
            force=force)

    def reached_preemption(self, step: int) -> bool:
        """True when the JAX preemption service (multi-host, e.g. a TPU maintenance notice or
        SIGTERM to any host) has agreed on `step` as the step every host saves at.

        Must be called at every step on every host (it is a sync point). Without
        jax.distributed it returns False at once (about 10 us on CPU).
        """
        return bool(self._manager.reached_preemption(int(step)))

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        try:
            restored = self._manager.restore(int(step), args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types; all mean "unreadable".
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} is unreadable ({type(e).__name__}: {e}). "
                f"Delete that step directory to resume from an earlier one, or use a fresh "
                f"--workdir.") from e
        return dict(restored.meta)

    def restore(self, step: int, abstract_state: Any, config_json: dict) -> tuple[Any, dict]:
        """Restores the state onto the shardings in `abstract_state`; checks config compatibility."""
        meta = self.read_meta(step)
        saved = meta.get("config", {})
        current = json.loads(json.dumps(config_json))  # tuples -> lists, as saved.
        for field in _MODEL_DEFINING_FIELDS:
            if field in saved and (_defining(field, saved[field])
                                   != _defining(field, current.get(field))):
                raise CheckpointError(
                    f"checkpoint {self.directory}/{step} was written with a different "
                    f"config.{field} than this run ({_describe_difference(field, saved[field], current.get(field))}). "
                    f"Use the original config, or a fresh --workdir to start a new run.")
        try:
            restored = self._manager.restore(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))
        except Exception as e:  # structure/shape mismatch or damaged files.
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} cannot be restored into this run's state "
                f"({type(e).__name__}: {str(e)[:500]}). It is damaged or from an incompatible "
                f"version; delete that step directory to use an earlier one, or use a fresh "
                f"--workdir.") from e
        return restored.state, meta

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def make_meta(*, data_step: int, config_json: dict, extra: dict | None = None) -> dict:
    """The JSON saved beside the state."""
    meta = {"data_step": int(data_step), "config": config_json, "ldm_jax_version": __version__,
            "process_count": jax.process_count(), "device_count": jax.device_count()}
    meta.update(extra or {})
    return meta

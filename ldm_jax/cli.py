"""What the command line entry points share: config loading, multi-host start-up, and
reporting mistakes in the user's input as one clear line instead of a traceback."""

from __future__ import annotations

import sys
from typing import Callable

from ldm_jax import config_lib, distributed


def load_config(spec: str, overrides) -> "config_lib.ml_collections.ConfigDict":
    """`--config=path.py[:variant]` plus the `--config.key=value` overrides."""
    return config_lib.apply_overrides(config_lib.load_config(spec), overrides)


def add_distributed_flags(parser) -> None:
    """--coordinator_address / --num_processes / --process_id / --jax_distributed."""
    distributed.add_flags(parser)


def initialize_distributed(args) -> "distributed.Settings":
    """Joins the multi-host job described by the flags `add_distributed_flags` added, the
    launcher's environment, SLURM or the TPU pod (see ldm_jax/distributed.py); a no-op for one
    process. Call it before anything touches a device."""
    return distributed.initialize_from_args(args)


def maybe_initialize_distributed(enabled: bool = False) -> "distributed.Settings":
    """Kept for old callers: the same resolution with only --jax_distributed as a flag."""
    return distributed.initialize(distributed.resolve(jax_distributed=enabled))


def _user_error_types() -> tuple[type[BaseException], ...]:
    # Imported here: these modules pull in jax, which the config-only paths do not need.
    from ldm_jax import checkpointing, first_stage, precompute_latents, sharding, trainer
    from ldm_jax.data import latents, sources
    return (config_lib.ConfigError, distributed.DistributedConfigError, sharding.MeshError,
            checkpointing.CheckpointError, sources.DataConfigError, first_stage.FirstStageError, latents.FirstStageMismatchError,
            precompute_latents.PrecomputeError, trainer.NonFiniteError)


def run_reporting_user_errors(command: Callable[[], object]) -> int:
    """Runs `command`; an error about the user's input (config, mesh, data, checkpoints, NaN)
    prints its message alone and returns exit code 2. Anything else is a bug and keeps its
    traceback."""
    try:
        command()
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if isinstance(e, _user_error_types()):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0

"""What the command line entry points share: config loading, multi-host start-up, and
reporting mistakes in the user's input as one clear line instead of a traceback."""

from __future__ import annotations

import sys
from typing import Callable

from ldm_jax import config_lib


def load_config(spec: str, overrides) -> "config_lib.ml_collections.ConfigDict":
    """`--config=path.py[:variant]` plus the `--config.key=value` overrides."""
    return config_lib.apply_overrides(config_lib.load_config(spec), overrides)


def maybe_initialize_distributed(enabled: bool) -> None:
    """`jax.distributed.initialize()` from the environment when --jax_distributed is given."""
    if enabled:
        import jax
        jax.distributed.initialize()


def _user_error_types() -> tuple[type[BaseException], ...]:
    # Imported here: these modules pull in jax, which the config-only paths do not need.
    from ldm_jax import checkpointing, first_stage, precompute_latents, sharding, trainer
    from ldm_jax.data import latents, sources
    return (config_lib.ConfigError, sharding.MeshError, checkpointing.CheckpointError,
            sources.DataConfigError, first_stage.FirstStageError, latents.FirstStageMismatchError,
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

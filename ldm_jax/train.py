"""Command line: `python -m ldm_jax.train --config=configs/NAME.py[:variant] --workdir=DIR
[--config.key=value ...]`.

Rerunning the same command resumes from the latest checkpoint in DIR.
"""

from __future__ import annotations

import argparse
import sys

from ldm_jax import config_lib


def parse_args(argv):
    """Splits `--config.x=y` overrides from the regular flags; unknown flags are an error."""
    overrides, rest = config_lib.split_config_args(argv)
    parser = argparse.ArgumentParser(prog="python -m ldm_jax.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="config file with optional variant, e.g. configs/autoencoder_kl_f4.py:smoke")
    parser.add_argument("--workdir", required=True, help="run directory (checkpoints, logs, images)")
    parser.add_argument("--jax_distributed", action="store_true",
                        help="call jax.distributed.initialize() from the environment (multi-host)")
    args = parser.parse_args(rest)
    return args, overrides


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = config_lib.apply_overrides(config_lib.load_config(args.config), overrides)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax
    if args.jax_distributed:
        jax.distributed.initialize()
    from ldm_jax import checkpointing, first_stage, sharding, trainer
    from ldm_jax.data import latents, sources
    # Errors about the user's input (config, mesh, data, checkpoints, NaN) print their message
    # alone; anything else is a bug and keeps its traceback.
    user_errors = (config_lib.ConfigError, sharding.MeshError, checkpointing.CheckpointError,
                   sources.DataConfigError, first_stage.FirstStageError,
                   latents.FirstStageMismatchError, trainer.NonFiniteError)
    try:
        trainer.train_and_evaluate(config, args.workdir)
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

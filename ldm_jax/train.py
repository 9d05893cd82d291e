"""Command line: `python -m ldm_jax.train --config=configs/NAME.py[:variant] --workdir=DIR
[--config.key=value ...]`.

Trains the stage the config names (`config.stage`) with the one train loop
(`ldm_jax.training.trainer.train_and_evaluate`). Rerunning the same command resumes from the
latest checkpoint in DIR. This file is intentionally kept short.
"""

from __future__ import annotations

import sys

from ldm_jax.cli import runner


def build_parser():
    parser = runner.ArgumentParser("python -m ldm_jax.train", __doc__)
    parser.add_argument("--config", required=True,
                        help="config file with optional variant, e.g. configs/autoencoder_kl_f4.py:smoke")
    parser.add_argument("--workdir", required=True, help="run directory (checkpoints, logs, images)")
    runner.add_distributed_flags(parser)
    return parser


def command(args, overrides) -> None:
    config = runner.load_config(args.config, overrides)
    runner.initialize_distributed(args)
    from ldm_jax.training.trainer import train_and_evaluate
    train_and_evaluate(config, args.workdir)


def main(argv=None) -> int:
    return runner.main_for(build_parser, command, argv, config_overrides=True)


if __name__ == "__main__":
    sys.exit(main())

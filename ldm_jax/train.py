"""Command line: `python -m ldm_jax.train --config=configs/NAME.py[:variant] --workdir=DIR
[--config.key=value ...]`.

Rerunning the same command resumes from the latest checkpoint in DIR.
"""

from __future__ import annotations

import argparse
import sys

from ldm_jax import cli, config_lib


def parse_args(argv):
    """Splits `--config.x=y` overrides from the regular flags; unknown flags are an error."""
    overrides, rest = config_lib.split_config_args(argv)
    parser = argparse.ArgumentParser(prog="python -m ldm_jax.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="config file with optional variant, e.g. configs/autoencoder_kl_f4.py:smoke")
    parser.add_argument("--workdir", required=True, help="run directory (checkpoints, logs, images)")
    cli.add_distributed_flags(parser)
    args = parser.parse_args(rest)
    return args, overrides


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)

    def command():
        config = cli.load_config(args.config, overrides)
        cli.initialize_distributed(args)
        from ldm_jax.trainer import train_and_evaluate
        train_and_evaluate(config, args.workdir)

    return cli.run_reporting_user_errors(command)


if __name__ == "__main__":
    sys.exit(main())

"""Command line: encode an image data set with a frozen first stage into a TFDS latents data set.

  python -m ldm_jax.precompute_latents --config=configs/X.py[:variant] --first_stage=RUN_DIR \\
      --output=OUT_DIR [--config.key=value ...] [--splits=train,test] [--batch_size=N] \\
      [--examples_per_shard=N] [multi-host flags: docs/multihost.md]

Writes the splits stage 2 reads (`data.train_split`, `data.eval_split`) from the config's
`source_data` images; rerunning the same command resumes a crashed run. What is written and how
it resumes: ldm_jax/data/precompute.py. This file is intentionally kept short.
"""

from __future__ import annotations

import sys

from ldm_jax.cli import runner

DEFAULT_EXAMPLES_PER_SHARD = 1024  # ~100 MB of KL-f4 moments at 256 px: TFDS's shard size.


def build_parser():
    parser = runner.ArgumentParser("python -m ldm_jax.precompute_latents", __doc__)
    parser.add_argument("--config", required=True,
                        help="stage-2 config with source_data and latents groups")
    parser.add_argument("--first_stage", required=True, help="the autoencoder's run directory")
    parser.add_argument("--output", required=True, help="OUT_DIR for the latents data set")
    parser.add_argument("--splits", default="",
                        help="comma separated source splits to write under their own names "
                             "(default: the splits stage 2 reads)")
    parser.add_argument("--batch_size", type=int, default=0,
                        help="global encode batch (default: config.batch_size)")
    parser.add_argument("--examples_per_shard", type=int, default=DEFAULT_EXAMPLES_PER_SHARD)
    runner.add_distributed_flags(parser)
    return parser


def command(args, overrides) -> None:
    config = runner.load_config(args.config, overrides)
    runner.initialize_distributed(args)
    from ldm_jax.data.precompute import precompute
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    precompute(config, args.first_stage, args.output, splits=splits or None,
               batch_size=args.batch_size or None, examples_per_shard=args.examples_per_shard)


def main(argv=None) -> int:
    return runner.main_for(build_parser, command, argv, config_overrides=True)


if __name__ == "__main__":
    sys.exit(main())

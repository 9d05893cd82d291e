"""Command line: export a stage-2 training run as an inference bundle.

  python -m ldm_jax.export --workdir=runs/ldm_digits --output=bundles/ldm_digits \
      [--step=K] [--no_ema] [--overwrite]

The bundle holds the UNet (EMA weights unless --no_ema), the frozen first stage, the stage-2
config and the latent scale factor; `python -m ldm_jax.sample --workdir=BUNDLE` samples from it
on any number of devices. The library half is ldm_jax/inference/export.py.
"""

from __future__ import annotations

import sys

from ldm_jax.cli import runner


def build_parser():
    parser = runner.ArgumentParser("python -m ldm_jax.export", __doc__)
    parser.add_argument("--workdir", required=True, help="stage-2 training run directory")
    parser.add_argument("--output", required=True, help="bundle directory to create")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--no_ema", action="store_true", help="export the raw (non-EMA) weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    return parser


def command(args, overrides) -> None:
    from ldm_jax.inference.export import export
    export(args.workdir, args.output, step=args.step, use_ema=not args.no_ema,
           overwrite=args.overwrite)


def main(argv=None) -> int:
    return runner.main_for(build_parser, command, argv)


if __name__ == "__main__":
    sys.exit(main())

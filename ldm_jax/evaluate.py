"""Command line: sample-quality metrics of a run, written to `<workdir>/eval/<step>.json`.

  python -m ldm_jax.evaluate --workdir=W [--num_samples=N] [--features=inception|digits]
      [--inception_weights=PATH] [--sampler=ddim] [--steps=50] [--eta=0] [--guidance_scale=G]
      [--step=K] [--batch_size=B] [--seed=0] [--no_ema] [--cache_dir=DIR]
      [--config.mesh.data=N --config.mesh.fsdp=M]

Stage 2 runs: FID / Inception Score / precision-recall of N samples against the held-out
images (`source_data.eval_split`); stage 1 runs: PSNR, SSIM, LPIPS and rFID of held-out
reconstructions. What each metric compares and how reference statistics are cached:
ldm_jax/evaluation/runner.py. This file is intentionally kept short.
"""

from __future__ import annotations

import sys

from ldm_jax.cli import runner


def build_parser():
    from ldm_jax.diffusion import samplers
    from ldm_jax.evaluation import inception
    parser = runner.ArgumentParser("python -m ldm_jax.evaluate", __doc__)
    parser.add_argument("--workdir", required=True, help="training run (stage 1 or 2)")
    parser.add_argument("--num_samples", type=int, default=0,
                        help="samples / reconstructions (default: the held-out split's size)")
    parser.add_argument("--features", choices=("inception", "digits"), default=None,
                        help="feature network (default inception)")
    parser.add_argument("--inception_weights", default=None,
                        help=f"path to {inception.FID_WEIGHTS_FILE}")
    parser.add_argument("--cache_dir", default=None,
                        help="default $LDM_JAX_CACHE or ~/.cache/ldm_jax")
    parser.add_argument("--sampler", default="ddim", choices=sorted(samplers.SAMPLERS))
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (every sampler but ddpm)")
    parser.add_argument("--eta", type=float, default=None)
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="classifier-free guidance scale (default: the run's config)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--batch_size", type=int, default=0, help="0: a multiple of the devices")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_ema", action="store_true", help="stage 2: the raw (non-EMA) weights")
    runner.add_distributed_flags(parser)
    return parser


def command(args, overrides) -> None:
    runner.initialize_distributed(args)
    from ldm_jax.evaluation.runner import EvalRequest, evaluate
    features = args.features or ("inception" if args.inception_weights else None)
    evaluate(EvalRequest(
        workdir=args.workdir, num_samples=args.num_samples, features=features,
        inception_weights=args.inception_weights, cache_dir=args.cache_dir, sampler=args.sampler,
        steps=args.steps, eta=args.eta, guidance_scale=args.guidance_scale, step=args.step,
        batch_size=args.batch_size, seed=args.seed, no_ema=args.no_ema,
        overrides=tuple(overrides)))


def main(argv=None) -> int:
    return runner.main_for(build_parser, command, argv, config_overrides=True)


if __name__ == "__main__":
    sys.exit(main())

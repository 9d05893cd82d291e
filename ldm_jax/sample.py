"""Command line: sample a trained latent diffusion run (or a bundle) through its first stage.

  python -m ldm_jax.sample --workdir=runs/ldm_digits --num=64 --sampler=ddim --steps=50 \
      --out=samples/ [--eta=0] [--guidance_scale=2] [--labels=0,1,2 | --labels=cat,dog]
      [--prompt="a handwritten seven" ... | --prompts_file=FILE]
      [--layout="7:0.1,0.1,0.45,0.45;3:0.55,0.5,0.95,0.95" ...]
      [--input=low_res.png|folder/|inputs.npz [--mask=mask.png|masks.npz] [--no_blend]] [--seed=0] [--no_ema] [--config.mesh.data=N --config.mesh.fsdp=M]

Writes `<out>/000000.png ...` (one PNG per sample), `<out>/grid.png` and `<out>/samples.npz`
(`images` uint8 [N, H, W, 3], plus the conditions: `labels` int32 [N] for class-conditional
runs, `prompts` / `layouts` for text / layout runs). Samples come from the EMA weights unless
--no_ema. Samplers: ddpm, ddim, plms, dpmpp_2m (DPM-Solver++ 2M; `--karras` for Karras noise
levels) and euler_a (Euler ancestral). `--eta` overrides the run's sampling.eta; unset, each
sampler uses its own default (0 = deterministic for ddim/plms/dpmpp_2m, 1 = the standard
ancestral noise for euler_a). `--labels` takes class ids or the class names of
the training folder (cycled);
`--prompt` (repeatable) and `--prompts_file` (one prompt per line) give text prompts, cycled;
`--layout` (repeatable) gives one layout per image: `class:x0,y0,x1,y1` objects separated by
`;`, class ids or names, coordinates in [0, 1]; an empty string is the empty layout.
Image-conditioned models (super-resolution, inpainting, semantic synthesis) take `--input`
(and `--mask` for inpainting, 1 = fill): the output size follows the input's (a model trained
at 32 px super-resolves a 16x16 input to 64x64: convolutional sampling), inpainting outputs keep
the input's visible pixels unless --no_blend, and `samples.npz` also holds `inputs` (and
`masks`). `--workdir` may also be an inference bundle written by
`python -m ldm_jax.export` or `python -m ldm_jax.convert`. The mesh is data parallel over every
device unless `--config.mesh.*` says otherwise (the training run's mesh may not fit this
machine); the noise of sample j depends on (seed, j) only, so the same seed gives the same
samples on any mesh. The library half is `ldm_jax.inference.sampling`.
"""

from __future__ import annotations

import sys

from ldm_jax.cli import runner


def build_parser():
    from ldm_jax.diffusion import samplers
    parser = runner.ArgumentParser("python -m ldm_jax.sample", __doc__)
    parser.add_argument("--workdir", required=True,
                        help="stage-2 run directory, or a bundle (python -m ldm_jax.export / convert)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--sampler", default="ddim", choices=sorted(samplers.SAMPLERS))
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (all but ddpm)")
    parser.add_argument("--eta", type=float, default=None)
    parser.add_argument("--karras", action="store_true",
                        help="dpmpp_2m: Karras noise levels "
                             "(--config.sampling.karras_sigmas=true)")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="classifier-free guidance scale (default: the run's config)")
    parser.add_argument("--labels", default="",
                        help="class ids or class names, comma separated (cycled)")
    parser.add_argument("--prompt", action="append", default=[],
                        help="text prompt (repeatable; cycled over the samples)")
    parser.add_argument("--prompts_file", default="", help="file with one prompt per line")
    parser.add_argument("--layout", action="append", default=[],
                        help="layout 'class:x0,y0,x1,y1;...' (repeatable; cycled)")
    parser.add_argument("--input", default="",
                        help="image-conditioned models: the low-resolution image (sr), the image "
                             "(inpaint) or the label map (semantic): a PNG, a folder of PNGs or "
                             "an .npz with 'images' uint8 [N,H,W,3] ('segmentations' [N,H,W])")
    parser.add_argument("--mask", default="",
                        help="inpainting: the fill mask (1/white = fill), same forms as --input "
                             "(.npz key 'masks' [N,H,W])")
    parser.add_argument("--no_blend", action="store_true",
                        help="inpainting: keep the model's pixels outside the mask too")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=0, help="0: num rounded to devices")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--no_ema", action="store_true", help="use the raw (non-EMA) weights")
    runner.add_distributed_flags(parser)
    return parser


def command(args, overrides) -> None:
    runner.initialize_distributed(args)  # before anything touches a device (multi-host)
    from ldm_jax.inference.sampling import SamplingError, read_prompts, sample_to_folder
    if args.karras:
        import inspect
        from ldm_jax.diffusion import samplers
        if "karras_sigmas" not in inspect.signature(samplers.get_sampler(args.sampler)).parameters:
            raise SamplingError(f"--karras: the {args.sampler} sampler has no Karras sigmas "
                                "(use --sampler=dpmpp_2m).")
        overrides = list(overrides) + ["sampling.karras_sigmas=true"]
    sample_to_folder(args.workdir, args.out, num=args.num, sampler_name=args.sampler,
                     steps=args.steps, eta=args.eta, guidance_scale=args.guidance_scale,
                     labels=args.labels, prompts=read_prompts(args.prompt, args.prompts_file),
                     layouts=args.layout, inputs=args.input, masks=args.mask,
                     blend=not args.no_blend, seed=args.seed, batch_size=args.batch_size,
                     step=args.step, use_ema=not args.no_ema, overrides=overrides)


def main(argv=None) -> int:
    return runner.main_for(build_parser, command, argv, config_overrides=True)


if __name__ == "__main__":
    sys.exit(main())

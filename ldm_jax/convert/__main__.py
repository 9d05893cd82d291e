"""Command line: convert CompVis / diffusers weights to ldm_jax, or ldm_jax to diffusers.

  # CompVis LatentDiffusion checkpoint + its YAML -> inference bundle (EMA weights preferred);
  # a BERTEmbedder (text2img) or ClassEmbedder (cin256-v2) cond_stage_model converts with it, and
  # so do concat image conditions: bsr_sr (Identity), inpainting ('__is_first_stage__'),
  # semantic synthesis (SpatialRescaler)
  python -m ldm_jax.convert --source=model.ckpt --config=config.yaml --output=bundles/ldm \
      [--tokenizer_path=vocab.txt] [--drop=cond_stage_model] [--no_ema]
  # CompVis autoencoder checkpoint + YAML -> first-stage run (usable as --first_stage)
  python -m ldm_jax.convert --source=vq-f4.ckpt --config=vq-f4.yaml --output=runs/ae_vq_f4
  # diffusers pipeline folder (unet/ + vae/ or vqvae/ [+ scheduler/]) -> bundle; with bert/ or
  # text_encoder/ + tokenizer/ (LDMTextToImagePipeline, Stable Diffusion 1.x) it samples prompts;
  # an LDMSuperResolutionPipeline folder becomes a super-resolution bundle
  python -m ldm_jax.convert --source=ldm-pipeline/ --output=bundles/ldm
  # lone diffusers UNet folder + VAE folder [+ scheduler_config.json] -> bundle
  python -m ldm_jax.convert --source=unet/ --vae=vae/ [--scheduler=s.json] --output=bundles/ldm
  # lone diffusers AutoencoderKL / VQModel folder -> first-stage run
  python -m ldm_jax.convert --source=vae/ --output=runs/ae_kl
  # back to diffusers: a bundle -> unet/ vae|vqvae/ scheduler/ [bert/|text_encoder/ tokenizer/]
  # (+ model_index.json where a stock pipeline fits: LDMPipeline, LDMTextToImagePipeline,
  # StableDiffusionPipeline, LDMSuperResolutionPipeline); an autoencoder run -> one folder
  python -m ldm_jax.convert --source=bundles/ldm --output=out/ --to=diffusers

Nothing is dropped silently: unknown or missing keys are errors listing them; groups ldm_jax
cannot use (other cond_stage_model.* encoders) must be named in --drop. Text bundles carry
their tokenizer (and a frozen encoder's folder). Torch pickles are read with a restricted
unpickler (no code in the file runs).
"""

from __future__ import annotations

import sys
from typing import List, Optional

from ldm_jax.cli import runner


def build_parser():
    parser = runner.ArgumentParser("python -m ldm_jax.convert", __doc__)
    parser.add_argument("--source", required=True,
                        help="CompVis .ckpt, diffusers folder, ldm_jax bundle or autoencoder run")
    parser.add_argument("--output", required=True, help="folder to create")
    parser.add_argument("--to", choices=("ldm_jax", "diffusers"), default="ldm_jax")
    parser.add_argument("--config", default="", help="CompVis YAML of a .ckpt source")
    parser.add_argument("--vae", default="", help="diffusers VAE folder for a lone UNet folder")
    parser.add_argument("--scheduler", default="", help="diffusers scheduler_config.json")
    parser.add_argument("--drop", action="append", default=[],
                        help="checkpoint key groups to drop explicitly, e.g. cond_stage_model")
    parser.add_argument("--tokenizer_path", default="",
                        help="WordPiece vocab.txt / tokenizer.json of a CompVis BERTEmbedder "
                             "(default: the shipped bert-base-uncased vocabulary)")
    parser.add_argument("--no_ema", action="store_true",
                        help="convert the raw UNet weights even when model_ema.* is present")
    parser.add_argument("--scale_factor", type=float, default=None,
                        help="latent scale factor (default: from the YAML / VAE config)")
    return parser


def command(args, overrides) -> None:
    from ldm_jax.convert import commands
    summary = (commands.convert_to_diffusers(args) if args.to == "diffusers"
               else commands.convert_to_ldm_jax(args))
    print(summary, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    return runner.main_for(build_parser, command, argv)


if __name__ == "__main__":
    sys.exit(main())

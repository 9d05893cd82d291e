"""LDM-4 on CelebA-HQ 256: VQ-f4 first stage, 64x64x3 latents, unconditional.

UNet 224 channels, mult 1,2,3,4, attention at downsampling 8,4,2 with 32 channels per head,
T = 1000 linear 0.0015..0.0195, AdamW lr 9.6e-5 (2e-6 x batch 48), EMA 0.9999.
Pipeline:
  python -m ldm_jax.precompute_latents --config=configs/f4_celebahq.py --first_stage=runs/ae_vq_f4 \
      --output=data/celebahq_vq_f4
  python -m ldm_jax.train --config=configs/f4_celebahq.py --workdir=runs/ldm_f4_celebahq
CelebA-HQ comes from TFDS (`celeb_a_hq/256`, manual download; see the TFDS catalogue) or an
image folder (--config.source_data.source=folder --config.source_data.folder=DIR).
Variants: none, `smoke` (tiny UNet on synthetic latents, < 3 minutes on 2 CPU cores).
"""

from ldm_jax.config import defaults as config_defaults


def get_config(arg=None):
    c = config_defaults.diffusion_config(
        first_stage_kind="vq", model_channels=224,
        channel_mult=(1, 2, 3, 4), attention_resolutions=(8, 4, 2), num_head_channels=32)
    c.data.latents_dir = "data/celebahq_vq_f4"
    if arg == "smoke":
        c = config_defaults.smoke_diffusion(c, latent_channels=3)
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use none or 'smoke'.")
    return c

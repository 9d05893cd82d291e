"""Inpainting LDM (the paper's inpainting model, Places): VQ-f4, 64x64x3 latents; the
first-stage latent of the masked image and the mask at the latent grid are concatenated to
z_t (3 + 1 channels: in_channels 7).

UNet 256 channels, mult 1,2,3,4, attention at downsampling 8,4,2 with 8 heads, resblock
up/down. Training masks drawn per example: boxes, free-form strokes and half-image masks
(ldm_jax/data/masks.py), covering 10-50 % of the image. Sampling blends the result back into
the visible pixels (python -m ldm_jax.sample --input=img.png --mask=mask.png).
Pipeline:
  python -m ldm_jax.precompute_latents --config=configs/ldm_inpainting.py --first_stage=runs/ae_vq_f4 \\
      --output=data/places_inpaint_vq_f4
  python -m ldm_jax.train --config=configs/ldm_inpainting.py --workdir=runs/ldm_inpainting
Variants: none, `smoke` (tiny UNet on synthetic latents).
"""

from ldm_jax.config import defaults as config_defaults


def get_config(arg=None):
    c = config_defaults.diffusion_config(
        first_stage_kind="vq", model_channels=256,
        channel_mult=(1, 2, 3, 4), attention_resolutions=(8, 4, 2), num_heads=8)
    c.source_data = config_defaults.data_config(
        source="tfds", name="places365_small", image_size=256, train_split="train",
        eval_split="validation", label_key=None)
    c.latents.keep_images = True  # the images the masks are drawn on
    c.data.latents_dir = "data/places_inpaint_vq_f4"
    c.data.label_key = None
    c.model.resblock_updown = True
    c.conditioning.kind = "concat"
    c.conditioning.image_task = "inpaint"
    c.conditioning.mask_kinds = ("box", "stroke", "half")
    c.batch_size = 48
    c.optimizer.base_learning_rate = 1.0e-6
    if arg == "smoke":
        c = config_defaults.smoke_diffusion(c, latent_channels=3)
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use none or 'smoke'.")
    return c

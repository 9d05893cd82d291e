"""4x super-resolution LDM (the paper's bsr_sr, ImageNet): VQ-f4, 64x64x3 latents from 256 px
targets, the 64 px low-resolution input concatenated at the latent grid (in_channels 6).

UNet 160 channels, mult 1,2,2,4, self-attention at downsampling 4 and 8 (16x16, 8x8) with 32
channels per head. Inputs are made on the fly from the stored targets by the "bsr" degradation
pipeline (random blur, down-sampling kernel, Gaussian and JPEG noise in random order;
ldm_jax/data/degradations.py), seeded per example. No condition dropout: the low-resolution
image is always given (guidance 1). The UNet is convolutional, so a trained model
super-resolves inputs larger than 64 px too.
Pipeline:
  python -m ldm_jax.precompute_latents --config=configs/ldm_bsr_sr.py --first_stage=runs/ae_vq_f4 \\
      --output=data/imagenet_sr_vq_f4
  python -m ldm_jax.train --config=configs/ldm_bsr_sr.py --workdir=runs/ldm_bsr_sr
  python -m ldm_jax.sample --workdir=runs/ldm_bsr_sr --input=low_res.png --num=1 --out=s/
Variants: none, `smoke` (tiny UNet on synthetic latents, 4x4 -> 8x8).
"""

from ldm_jax.config import defaults as config_defaults


def get_config(arg=None):
    c = config_defaults.diffusion_config(
        first_stage_kind="vq", model_channels=160,
        channel_mult=(1, 2, 2, 4), attention_resolutions=(8, 4), num_head_channels=32)
    c.source_data = config_defaults.data_config(
        source="tfds", name="imagenet2012", image_size=256, train_split="train",
        eval_split="validation", label_key=None)
    c.latents.keep_images = True  # the targets the inputs are degraded from
    c.data.latents_dir = "data/imagenet_sr_vq_f4"
    c.data.label_key = None
    c.conditioning.kind = "concat"
    c.conditioning.image_task = "sr"
    c.conditioning.sr_factor = 4
    c.conditioning.degradation = "bsr"
    c.batch_size = 64
    c.optimizer.base_learning_rate = 1.0e-6
    if arg == "smoke":
        c = config_defaults.smoke_diffusion(c, latent_channels=3)
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use none or 'smoke'.")
    return c

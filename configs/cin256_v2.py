"""Class-conditional LDM-4 on ImageNet 256 (the reference's cin256-v2): VQ-f4, 64x64x3 latents.

UNet 192 channels, mult 1,2,3,5, attention at downsampling 8,4,2 with one head; the class
reaches the UNet through cross-attention: a learned embedding of 1001 classes (1000 = the null
class for guidance) of width 512 as a length-1 context (conditioning.kind='class_crossattn').
Images from TFDS `imagenet2012` (manual download), labels from its ClassLabel.
Pipeline:
  python -m ldm_jax.precompute_latents --config=configs/cin256_v2.py --first_stage=runs/ae_vq_f4 \\
      --output=data/imagenet_vq_f4
  python -m ldm_jax.train --config=configs/cin256_v2.py --workdir=runs/ldm_cin256_v2
  python -m ldm_jax.sample --workdir=runs/ldm_cin256_v2 --labels=88,979 --guidance_scale=3 --out=s/
Variants: none, `smoke` (tiny UNet and embedding on synthetic latents with 4 classes).
"""

from ldm_jax.config import defaults as config_defaults


def get_config(arg=None):
    c = config_defaults.diffusion_config(
        first_stage_kind="vq", model_channels=192,
        channel_mult=(1, 2, 3, 5), attention_resolutions=(8, 4, 2), num_heads=1)
    c.source_data = config_defaults.data_config(
        source="tfds", name="imagenet2012", image_size=256, train_split="train",
        eval_split="validation", random_crop=True)
    c.data.latents_dir = "data/imagenet_vq_f4"
    c.data.label_key = "label"
    c.conditioning.kind = "class_crossattn"
    c.conditioning.num_embed_classes = 1001  # 1000 ImageNet classes + the null class
    c.model.context_dim = 512
    c.conditioning.p_uncond = 0.1
    c.sampling.guidance_scale = 3.0
    c.batch_size = 64
    c.optimizer.base_learning_rate = 1.0e-6  # x batch 64 = 6.4e-5
    if arg == "smoke":
        c = config_defaults.smoke_diffusion(c, latent_channels=3)
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use none or 'smoke'.")
    return c

"""LDM-8 on LSUN-churches 256: KL-f8 first stage (scale_by_std), 32x32x4 latents.

UNet 192 channels, mult 1,2,2,4,4, attention at downsampling 1,2,4,8 with 8 heads,
T = 1000 linear 0.0015..0.0195, EMA 0.9999. Source images: TFDS `lsun/church_outdoor`
(manual preparation) or an image folder.
Variants: none, `smoke` (tiny UNet on synthetic latents).
"""

from ldm_jax.config import defaults as config_defaults


def get_config(arg=None):
    c = config_defaults.diffusion_config(
        first_stage_kind="kl", model_channels=192,
        channel_mult=(1, 2, 2, 4, 4), attention_resolutions=(1, 2, 4, 8), num_heads=8)
    c.source_data.name = "lsun/church_outdoor"
    c.source_data.eval_split = "validation"
    c.data.latents_dir = "data/churches_kl_f8"
    c.batch_size = 96
    c.optimizer.base_learning_rate = 5.0e-5 / 96  # 5e-5 at batch 96, as the reference config.
    if arg == "smoke":
        c = config_defaults.smoke_diffusion(c, latent_channels=4)
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use none or 'smoke'.")
    return c

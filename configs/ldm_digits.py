"""Class-conditional LDM on the embedded digits: stage 2 of the README's pipeline.

First stage: configs/autoencoder_kl_f4_digits.py (KL-f4, 8x8x3 latents, scale_by_std). A small
UNet (32 channels, mult 1,2, self-attention at 4x4) with a class embedding (10 digits + the null
label 10), condition dropout 0.1 and classifier-free guidance 2.0 for the sample grids.
Variants: none, `smoke` (tiny UNet on synthetic latents).
"""

from ldm_jax.config import defaults as config_defaults


def get_config(arg=None):
    c = config_defaults.diffusion_config(
        first_stage_kind="kl", model_channels=32,
        channel_mult=(1, 2), attention_resolutions=(2,), num_head_channels=32)
    c.source_data = config_defaults.data_config(source="digits", image_size=32)
    c.latents.scale_num_examples = 1024
    c.data.latents_dir = "data/digits_kl_f4_latents"
    c.data.label_key = "label"
    c.model.num_classes = 11
    c.conditioning.kind = "class"
    c.conditioning.p_uncond = 0.1
    c.sampling.guidance_scale = 2.0
    config_defaults.digits_schedule(c, num_grid_images=20)
    if arg == "smoke":
        c = config_defaults.smoke_diffusion(c, latent_channels=3)
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use none or 'smoke'.")
    return c

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
    c.sampling.num_steps = 50
    c.batch_size = 64
    c.total_steps = 3000  # ~8-11 minutes on 2 CPU cores: the README pipeline fits in 20.
    c.log_every_steps = 100
    c.eval_every_steps = 1500
    c.eval_num_examples = 299
    c.image_every_steps = 1500
    c.checkpoint_every_steps = 1000
    c.num_grid_images = 20
    c.ema.decay = 0.999
    c.optimizer.base_learning_rate = 1e-3 / 64  # 1e-3 at batch 64: a tiny model, few steps.
    c.optimizer.warmup_steps = 100
    c.optimizer.weight_decay = 0.0
    if arg == "smoke":
        c = config_defaults.smoke_diffusion(c, latent_channels=3)
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use none or 'smoke'.")
    return c

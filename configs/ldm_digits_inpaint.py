"""Inpainting LDM on the embedded digits (32 px, the digits KL-f4 autoencoder's 8x8x3 latents).

Training masks per example: a box (1/4), free-form strokes (1/4) or a half of the image
(1/2: left, right, top or bottom), boxes and strokes covering 10-50 %. Halves get the most
weight: a digit's missing half must be inferred from the other one (which digit it is), the
hardest case and the one the evaluation measures; with uniform kinds (a left or right half in
1/6 of the masks) and eps-prediction the filled digit was right in 82 % (left half masked)
and 72 % (right half) of held-out cases. The masked image goes through the frozen first
stage and its latent, with the mask at the latent grid, is concatenated to z_t (3 + 1
channels: in_channels 7). UNet 32 channels, mult 1,2, self-attention at 4x4 (a filled half
must agree with the kept one). v-prediction (as the digits SR model). No condition dropout,
guidance 1. Evaluation masks the left or the right half.
Pipeline: bash launch/digits_pipeline.sh inpaint
Variants: none, `smoke` (tiny UNet on synthetic latents).
"""

from ldm_jax.config import defaults as config_defaults


def get_config(arg=None):
    c = config_defaults.diffusion_config(
        first_stage_kind="kl", model_channels=32, channel_mult=(1, 2),
        attention_resolutions=(2,), num_head_channels=32)
    c.source_data = config_defaults.data_config(source="digits", image_size=32)
    c.latents.scale_num_examples = 1024
    c.latents.keep_images = True  # the images the masks are drawn on
    c.data.latents_dir = "data/digits_inpaint_kl_f4_latents"
    c.conditioning.kind = "concat"
    c.conditioning.image_task = "inpaint"
    c.diffusion.parameterization = "v"
    c.conditioning.mask_kinds = ("box", "stroke", "half")
    c.conditioning.mask_kind_weights = (1, 1, 2)
    c.conditioning.mask_min_coverage = 0.1
    c.conditioning.mask_max_coverage = 0.5
    config_defaults.digits_schedule(c)
    if arg == "smoke":
        c = config_defaults.smoke_diffusion(c, latent_channels=3)
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use none or 'smoke'.")
    return c

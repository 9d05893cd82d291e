"""The paper's 1.45B text-to-image LDM (LAION): KL-f8 (scale 0.18215), 32x32x4 latents.

UNet 320 channels, mult 1,2,4,4, SpatialTransformer at downsampling 4,2,1 with 8 heads;
tau_theta: the BERT transformer trained jointly, width 1280, 32 layers, 8 heads x 64, on
bert-base-uncased WordPiece tokens (77 per prompt). Images with captions from a folder
(`<image>.txt` beside each image), since LAION has no TFDS build; batch 8 per device as in
the memory table of bench/.
Pipeline:
  python -m ldm_jax.precompute_latents --config=configs/txt2img_1p4b.py --first_stage=runs/ae_kl_f8 \\
      --output=data/laion_kl_f8 --config.source_data.folder=/data/laion
  python -m ldm_jax.train --config=configs/txt2img_1p4b.py --workdir=runs/ldm_txt2img_1p4b
Variants: none, `smoke` (tiny UNet and transformer on synthetic latents with captions).
"""

from ldm_jax.config import defaults as config_defaults


def get_config(arg=None):
    c = config_defaults.diffusion_config(
        first_stage_kind="kl", model_channels=320,
        channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2, 1), num_heads=8)
    c.source_data = config_defaults.data_config(
        source="folder", folder="data/laion_images", image_size=256, label_key=None,
        caption_key="caption")
    c.latents.scale_factor = 0.18215
    c.data.latents_dir = "data/laion_kl_f8"
    c.data.label_key = None
    c.data.caption_key = "caption"
    c.conditioning.kind = "text"
    c.conditioning.text_encoder = "bert"
    c.conditioning.width, c.conditioning.depth = 1280, 32
    c.conditioning.p_uncond = 0.1
    c.sampling.guidance_scale = 5.0
    c.batch_size = 8
    c.optimizer.base_learning_rate = 1.0e-4 / 8  # 1e-4 at batch 8 per device
    if arg == "smoke":
        c = config_defaults.smoke_diffusion(c, latent_channels=4)
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use none or 'smoke'.")
    return c

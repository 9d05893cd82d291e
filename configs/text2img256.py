"""Text-to-image LDM-4 at 256 px (the paper's text2img256): VQ-f4, 64x64x3 latents.

UNet 192 channels, mult 1,2,3,5, SpatialTransformer (cross-attention) at downsampling 8,4,2
with 32 channels per head. tau_theta is the paper's BERT transformer trained jointly from
scratch (conditioning.text_encoder='bert'): bert-base-uncased WordPiece (30522 tokens, 77 per
prompt), width 640, 32 layers, 8 heads x 64. Captions from TFDS `coco_captions` (one of its 5
captions per image, drawn anew every epoch).
Pipeline:
  python -m ldm_jax.precompute_latents --config=configs/text2img256.py --first_stage=runs/ae_vq_f4 \\
      --output=data/coco_vq_f4
  python -m ldm_jax.train --config=configs/text2img256.py --workdir=runs/ldm_text2img256
  python -m ldm_jax.sample --workdir=runs/ldm_text2img256 --prompt="a red bus" --out=s/
Variants: none, `smoke` (tiny UNet and transformer on synthetic latents with captions).
"""

from ldm_jax.config import defaults as config_defaults


def get_config(arg=None):
    c = config_defaults.diffusion_config(
        first_stage_kind="vq", model_channels=192,
        channel_mult=(1, 2, 3, 5), attention_resolutions=(8, 4, 2), num_head_channels=32)
    c.source_data = config_defaults.data_config(
        source="tfds", name="coco_captions", image_size=256, train_split="train",
        eval_split="val", random_crop=True, label_key=None, caption_key="captions/text")
    c.data.latents_dir = "data/coco_vq_f4"
    c.data.label_key = None
    c.data.caption_key = "caption"
    c.conditioning.kind = "text"
    c.conditioning.text_encoder = "bert"
    c.conditioning.width, c.conditioning.depth = 640, 32
    c.conditioning.p_uncond = 0.1
    c.sampling.guidance_scale = 5.0
    c.batch_size = 64
    c.optimizer.base_learning_rate = 1.0e-6
    if arg == "smoke":
        c = config_defaults.smoke_diffusion(c, latent_channels=3)
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use none or 'smoke'.")
    return c

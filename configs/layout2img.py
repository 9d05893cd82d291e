"""Layout-to-image LDM-4 (the paper's layout2img, COCO / OpenImages): VQ-f4, 64x64x3 latents.

UNet 128 channels, mult 1,2,3,4, SpatialTransformer (depth 3) at downsampling 8,4,2 with 32
channels per head. A layout is a token sequence (per object: its class, then its two box
corners quantised to a 32x32 grid; ldm_jax/conditioning/layout.py) encoded by tau_theta, a
BERT transformer trained jointly (width 512, 16 layers). Boxes and labels from TFDS
`coco/2017` (`objects/bbox`, ymin,xmin,ymax,xmax; `objects/label`, 80 classes).
Pipeline:
  python -m ldm_jax.precompute_latents --config=configs/layout2img.py --first_stage=runs/ae_vq_f4 \\
      --output=data/coco_layout_vq_f4
  python -m ldm_jax.train --config=configs/layout2img.py --workdir=runs/ldm_layout2img
  python -m ldm_jax.sample --workdir=runs/ldm_layout2img --layout="person:0.1,0.2,0.5,0.9" --out=s/
Variants: none, `smoke` (tiny UNet and transformer on synthetic latents with one box each).
"""

from ldm_jax.config import defaults as config_defaults


def get_config(arg=None):
    c = config_defaults.diffusion_config(
        first_stage_kind="vq", model_channels=128,
        channel_mult=(1, 2, 3, 4), attention_resolutions=(8, 4, 2), num_head_channels=32)
    c.source_data = config_defaults.data_config(
        source="tfds", name="coco/2017", image_size=256, train_split="train",
        eval_split="validation", label_key=None, boxes_key="objects/bbox",
        box_labels_key="objects/label", box_format="yxyx")
    c.data.latents_dir = "data/coco_layout_vq_f4"
    c.data.label_key = None
    c.data.boxes_key, c.data.box_labels_key = "boxes", "box_labels"
    c.model.transformer_depth = 3
    c.conditioning.kind = "layout"
    c.conditioning.width, c.conditioning.depth = 512, 16
    c.conditioning.p_uncond = 0.1
    c.sampling.guidance_scale = 2.0
    c.batch_size = 64
    c.optimizer.base_learning_rate = 1.0e-6
    if arg == "smoke":
        c = config_defaults.smoke_diffusion(c, latent_channels=3)
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use none or 'smoke'.")
    return c

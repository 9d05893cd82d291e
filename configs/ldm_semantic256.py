"""Semantic synthesis LDM (the paper's semantic synthesis 256, landscapes / COCO-stuff): VQ-f4,
64x64x3 latents; the segmentation map (182 classes) as one-hot, averaged to the latent grid
and projected to 3 channels by a jointly trained 1x1 convolution (the reference's
SpatialRescaler), concatenated to z_t (in_channels 6).

UNet 128 channels, mult 1,4,8, attention at downsampling 2,4,8 (32, 16, 8 px) with 8 heads.
Data: an image folder with `<name>.seg.png` label maps beside the images (class ids 0..181).
Pipeline:
  python -m ldm_jax.precompute_latents --config=configs/ldm_semantic256.py --first_stage=runs/ae_vq_f4 \\
      --output=data/landscapes_semantic_vq_f4
  python -m ldm_jax.train --config=configs/ldm_semantic256.py --workdir=runs/ldm_semantic256
  python -m ldm_jax.sample --workdir=runs/ldm_semantic256 --input=labels.png --num=1 --out=s/
Variants: none, `smoke` (tiny UNet on synthetic latents and label maps).
"""

from ldm_jax.config import defaults as config_defaults


def get_config(arg=None):
    c = config_defaults.diffusion_config(
        first_stage_kind="vq", model_channels=128,
        channel_mult=(1, 4, 8), attention_resolutions=(2, 4, 8), num_heads=8)
    c.source_data = config_defaults.data_config(
        source="folder", folder="data/landscapes", image_size=256, label_key=None,
        segmentation_key="seg")
    c.data.latents_dir = "data/landscapes_semantic_vq_f4"
    c.data.label_key = None
    c.data.segmentation_key = "segmentation"
    c.conditioning.kind = "concat"
    c.conditioning.image_task = "semantic"
    c.conditioning.num_segmentation_classes = 182
    c.conditioning.concat_channels = 3
    c.batch_size = 48
    c.optimizer.base_learning_rate = 1.0e-6
    if arg == "smoke":
        c = config_defaults.smoke_diffusion(c, latent_channels=3)
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use none or 'smoke'.")
    return c

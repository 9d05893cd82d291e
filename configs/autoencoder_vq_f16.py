"""VQ-f16: 16x16x8 latents, codebook 16384, attention at 16 px.

Variants: none (the paper's run on ImageNet from TFDS at 256 px; needs the LPIPS weight files:
--config.loss.lpips_weights=vgg16-397923af.pth,vgg.pth), `smoke` (a tiny real
run on the embedded digits, < 2 minutes on 2 CPU cores).
"""

from ldm_jax.config import defaults as config_defaults


def get_config(arg=None):
    c = config_defaults.autoencoder_config(
        kind="vq", ch_mult=(1, 1, 2, 2, 4), z_channels=8, embed_dim=8,
        attn_resolutions=(16,), n_embed=16384)
    if arg == "smoke":
        c = config_defaults.smoke_autoencoder(c)
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of this config; use no variant or 'smoke'.")
    return c

"""KL-f8: 32x32x4 latents at 256 px (the Stable Diffusion first stage).

Variants: none (the paper's run on ImageNet from TFDS at 256 px; needs the LPIPS weight files:
--config.loss.lpips_weights=vgg16-397923af.pth,vgg.pth), `smoke` (a tiny real
run on the embedded digits, < 2 minutes on 2 CPU cores).
"""

from ldm_jax.config import defaults as config_defaults


def get_config(arg=None):
    c = config_defaults.autoencoder_config(
        kind="kl", ch_mult=(1, 2, 4, 4), z_channels=4, embed_dim=4,
        attn_resolutions=())
    if arg == "smoke":
        c = config_defaults.smoke_autoencoder(c)
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of this config; use no variant or 'smoke'.")
    return c

"""KL-f4 autoencoder on the embedded digits data (32x32 RGB -> 8x8x3 latents), CPU friendly.

The README's main job trains this config. The architecture is KL-f4's (ch_mult 1,2,4, z 3)
at a width a laptop CPU trains in minutes. Perceptual weight is 0 (no LPIPS
weights ship with the project) and the discriminator stays off: on digits the L1 + KL objective
alone reaches the PSNR target. Variants: none, `smoke` (a < 2 minute run), `vq` (VQ-f4 on
digits, codebook 256).
"""

from ldm_jax.config import defaults as config_defaults


def get_config(arg=None):
    kind = "vq" if arg == "vq" else "kl"
    c = config_defaults.autoencoder_config(
        kind=kind, ch_mult=(1, 2, 4), z_channels=3, embed_dim=3, attn_resolutions=(),
        n_embed=256 if kind == "vq" else 0, resolution=32)
    c.data = config_defaults.data_config(source="digits", image_size=32)
    c.model.ch = 16
    c.model.norm_groups = 8
    c.model.num_res_blocks = 1
    c.batch_size = 32
    c.total_steps = 600
    c.log_every_steps = 50
    c.eval_every_steps = 300
    c.eval_num_examples = 300  # the whole digits test split.
    c.image_every_steps = 300
    c.checkpoint_every_steps = 300
    c.optimizer.base_learning_rate = 2e-3 / 32  # x batch 32 = 2e-3 (the paper's 4.5e-6 x batch is
    # tuned for 256 px ImageNet; this tiny model trains fast at a larger step).
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.99
    c.optimizer.warmup_steps = 50
    c.optimizer.schedule = "cosine"
    c.loss.perceptual_weight = 0.0
    c.loss.disc_start = c.total_steps + 1  # discriminator off (see the docstring).
    if arg == "smoke":
        c = config_defaults.smoke_autoencoder(c)
    elif arg not in (None, "vq"):
        raise ValueError(f"unknown variant {arg!r}; use none, 'smoke' or 'vq'.")
    return c

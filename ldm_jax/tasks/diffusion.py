"""Stage 2 task: the latent UNet eps_theta(z_t, t, y) trained on precomputed first-stage latents.

Latents come from `python -m ldm_jax.precompute_latents` (KL: posterior moments, re-sampled every
step; VQ: pre-quantisation latents) and are multiplied by the data set's scale factor. The
train step applies condition dropout (`conditioning.p_uncond`, for classifier-free guidance),
the diffusion loss, AdamW and the EMA update. Grids are sampled from the EMA weights and decoded
through the frozen first stage.
"""

from __future__ import annotations

import copy
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.conditioning import encoders
from ldm_jax.conditioning import image as image_conditioning
from ldm_jax.config.loading import ConfigError
from ldm_jax.diffusion import ema as ema_lib
from ldm_jax.diffusion import losses as diffusion_losses
from ldm_jax.diffusion import samplers
from ldm_jax.diffusion.schedules import DiffusionSchedule
from ldm_jax.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from ldm_jax.models.attention import NORM_GROUPS, resolve_heads
from ldm_jax.models.remat import check_remat
from ldm_jax.models.unet import UNetModel
from ldm_jax.training.optimizer import make_optimizer
from ldm_jax.training.train_state import TrainState, all_finite, compute_dtype


def check_unet_config(model_cfg) -> None:
    """ConfigError naming the config.model fields whose values the UNet cannot be built from:
    channel counts GroupNorm's groups do not divide, head settings that do not divide an
    attention layer's channels (`resolve_heads`' rule). (The model would otherwise fail inside
    flax at the first call, naming none of them.)"""
    mc, mult = int(model_cfg.model_channels), tuple(int(m) for m in model_cfg.channel_mult)
    if mc <= 0 or not mult or min(mult) <= 0:
        raise ConfigError(f"config.model.model_channels={mc} and channel_mult={mult} must be "
                          "positive (e.g. model_channels=224, channel_mult=(1, 2, 3, 4)).")
    widths = sorted({mc} | {mc * m for m in mult})
    bad = [w for w in widths if w % NORM_GROUPS]
    if bad:
        raise ConfigError(
            f"config.model.model_channels={mc} with channel_mult={mult} gives channel counts "
            f"{bad} that the UNet's GroupNorm ({NORM_GROUPS} groups, as the reference) does "
            f"not divide; use a model_channels that is a multiple of {NORM_GROUPS}.")
    heads, head_ch = int(model_cfg.num_heads), int(model_cfg.num_head_channels)
    if (heads == -1) == (head_ch == -1):
        raise ConfigError("set exactly one of config.model.num_heads / num_head_channels (the "
                          f"other -1); got num_heads={heads}, num_head_channels={head_ch}.")
    # Attention at the levels whose downsampling factor is listed, and in the middle block.
    factors = [2 ** i for i in range(len(mult))]
    attn_widths = sorted({mc * m for f, m in zip(factors, mult)
                          if f in tuple(model_cfg.attention_resolutions)} | {mc * mult[-1]})

    def splits(width: int) -> bool:
        try:
            resolve_heads(width, heads, head_ch)
        except ValueError:
            return False
        return True

    bad = [w for w in attn_widths if not splits(w)]
    if bad:
        field, per = (("num_head_channels", head_ch) if head_ch != -1 else ("num_heads", heads))
        raise ConfigError(f"config.model.{field}={per} does not divide the channels {bad} of "
                          f"the UNet's attention layers (model_channels={mc}, channel_mult="
                          f"{mult}, attention_resolutions="
                          f"{tuple(model_cfg.attention_resolutions)}).")


def make_unet(model_cfg, dtype=jnp.float32) -> UNetModel:
    """UNetModel from `config.model` (0 means 'unset' for context_dim and num_classes)."""
    check_unet_config(model_cfg)
    # Configs written before the field: no remat.
    remat = check_remat(model_cfg.get("remat", "nothing"), "config.model.remat", ConfigError)
    if model_cfg.attention_impl not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"config.model.attention_impl={model_cfg.attention_impl!r} is not one "
                          f"of {ATTENTION_IMPLEMENTATIONS} (None picks per backend; see "
                          "docs/performance.md)")
    return UNetModel(
        in_channels=model_cfg.in_channels, out_channels=model_cfg.out_channels,
        model_channels=model_cfg.model_channels, num_res_blocks=model_cfg.num_res_blocks,
        attention_resolutions=tuple(model_cfg.attention_resolutions), dropout=model_cfg.dropout,
        channel_mult=tuple(model_cfg.channel_mult), num_heads=model_cfg.num_heads,
        num_head_channels=model_cfg.num_head_channels,
        use_scale_shift_norm=model_cfg.use_scale_shift_norm, resblock_updown=model_cfg.resblock_updown,
        use_spatial_transformer=model_cfg.use_spatial_transformer,
        transformer_depth=model_cfg.transformer_depth, context_dim=model_cfg.context_dim or None,
        use_linear_in_transformer=model_cfg.use_linear_in_transformer,
        num_classes=model_cfg.num_classes or None, attention_impl=model_cfg.attention_impl,
        transformer_position_frequencies=model_cfg.get("transformer_position_frequencies", 0),
        remat=remat, dtype=dtype)


def make_schedule(diffusion_cfg) -> DiffusionSchedule:
    return DiffusionSchedule.from_config(diffusion_cfg.beta_schedule, diffusion_cfg.timesteps,
                                         diffusion_cfg.linear_start, diffusion_cfg.linear_end)


def resolved_eta(config, name: str, eta=None):
    """The eta a sampler runs with: the given one, else config.sampling.eta, else (None) the
    sampler's own default (0 for ddim/plms/dpmpp_2m, 1 for euler_a); None for ddpm."""
    if name == "ddpm":
        return None
    if eta is None:
        eta = config.sampling.get("eta", None)
    if eta is None:
        default = inspect.signature(samplers.get_sampler(name)).parameters.get("eta")
        eta = None if default is None else default.default
    return None if eta is None else float(eta)


def make_sampler(config, schedule, *, name=None, num_steps=None, eta=None):
    """A registered sampler built from the config (overridable for the sample command)."""
    name = name or config.sampling.sampler
    factory = samplers.get_sampler(name)
    kwargs = {"parameterization": config.diffusion.parameterization}
    if name != "ddpm":
        kwargs["num_steps"] = num_steps or config.sampling.num_steps
        eta = resolved_eta(config, name, eta)
        if eta is not None:
            kwargs["eta"] = eta
    # sampling.karras_sigmas goes only to the samplers that have the option (dpmpp_2m).
    if "karras_sigmas" in inspect.signature(factory).parameters:
        kwargs["karras_sigmas"] = bool(config.sampling.get("karras_sigmas", False))
    try:
        return factory(schedule, **kwargs)
    except ValueError as e:  # a setting the sampler refuses (eta, steps): the user's to fix
        raise ConfigError(f"sampler {name!r} (--sampler / config.sampling): {e}") from None


class LatentContext:
    """What stage 2 knows about its latents: shape, batch key, scale factor, the first stage
    that decodes them and the class names of their labels."""

    def __init__(self, *, latent_shape, kind: str, scale_factor: float, first_stage=None,
                 class_names=(), num_classes: int = 0, box_classes: int = 0,
                 box_class_names=(), segmentation_classes: int = 0):
        self.latent_shape = tuple(int(d) for d in latent_shape)
        self.kind = kind  # 'kl' | 'vq' | 'synthetic'
        self.key = "moments" if kind == "kl" else "latent"
        self.scale_factor = float(scale_factor)
        self.first_stage = first_stage
        self.class_names = tuple(class_names)
        self.num_classes = int(num_classes)  # label classes in the data (0: no labels)
        self.box_classes = int(box_classes)  # classes of the layouts' box labels (0: none)
        self.box_class_names = tuple(box_class_names)
        self.segmentation_classes = int(segmentation_classes)  # label-map classes (0: none)

    @classmethod
    def from_bundle(cls, bundle) -> "LatentContext":
        """The latent context of an inference bundle (no data set is read)."""
        config = bundle.config
        kind = config.conditioning.kind
        classes = {"class": config.model.num_classes - 1,
                   "class_crossattn": config.conditioning.num_embed_classes - 1}.get(kind, 0)
        return cls(latent_shape=config.data.latent_shape,
                   kind="synthetic" if bundle.first_stage is None else bundle.first_stage.kind,
                   scale_factor=bundle.scale_factor, first_stage=bundle.first_stage,
                   class_names=config.conditioning.class_names, num_classes=classes,
                   # A bundle reads no data: its box-label classes are the saved config's.
                   box_classes=config.conditioning.num_layout_classes if kind == "layout" else 0,
                   segmentation_classes=config.conditioning.num_segmentation_classes)

    @classmethod
    def from_config(cls, config) -> "LatentContext":
        """From the precomputed latents' metadata (and the first stage it names), or the
        synthetic latents' config. With conditioning.precompute_context the latents must hold
        a context precomputed by the configured text encoder (a one-line error otherwise)."""
        data_cfg = config.data
        precomputed = encoders.TextCondition.wants_precomputed_context(config.conditioning)
        if precomputed and data_cfg.source != "latents":
            raise ConfigError(f"config.conditioning.precompute_context=True reads the context "
                              f"stored in precomputed latents, but data.source="
                              f"{data_cfg.source!r}: use data.source='latents' or set "
                              f"precompute_context=False.")
        if data_cfg.source == "synthetic_latents":
            if data_cfg.latent_shape is None:
                raise ConfigError("data.source='synthetic_latents' needs data.latent_shape, e.g. "
                                  "--config.data.latent_shape=8,8,3.")
            boxes = data_cfg.num_classes if data_cfg.boxes_key else 0
            segments = data_cfg.num_classes + 1 if data_cfg.segmentation_key else 0
            return cls(latent_shape=data_cfg.latent_shape, kind="synthetic", scale_factor=1.0,
                       num_classes=data_cfg.num_classes, box_classes=boxes,
                       segmentation_classes=segments)
        if data_cfg.source != "latents":
            raise ConfigError(f"config.data.source={data_cfg.source!r}: stage 2 trains on "
                              f"'latents' (from python -m ldm_jax.precompute_latents) or "
                              f"'synthetic_latents'.")
        from ldm_jax.data import latents as latents_lib
        from ldm_jax.storage.first_stage import load_first_stage
        meta = latents_lib.read_latents_metadata(data_cfg.latents_dir)
        workdir = config.first_stage.workdir or meta["first_stage"]["workdir"]
        first_stage = load_first_stage(workdir)
        latents_lib.check_first_stage_matches(meta, first_stage.identity)
        if precomputed:
            latents_lib.check_context_encoder_matches(
                meta, encoders.make_condition(config).context_identity(), data_cfg.latents_dir)
        label_key = data_cfg.label_key
        names = meta.get("class_names", {}).get(label_key, []) if label_key else []
        count = meta.get("num_classes", {}).get(label_key, len(names)) if label_key else 0
        box_names = meta.get("class_names", {}).get("box_labels", [])
        box_count = meta.get("num_classes", {}).get("box_labels", len(box_names))
        seg_names = meta.get("class_names", {}).get("segmentation", [])
        seg_count = meta.get("num_classes", {}).get("segmentation", len(seg_names))
        return cls(latent_shape=meta["latent_shape"], kind=meta["kind"],
                   scale_factor=meta["scale_factor"], first_stage=first_stage,
                   class_names=names, num_classes=count, box_classes=box_count,
                   box_class_names=box_names, segmentation_classes=seg_count)


def _check_or_fill(config, field: str, value, known: str, fix: str) -> None:
    """config.<field> = value when unset (None or 0); a ConfigError when it is set otherwise."""
    group, name = field.split(".")
    current = config[group][name]
    if current is None or current == 0 or current == ():
        config[group][name] = value
    elif (tuple(current) if isinstance(current, (tuple, list)) else current) != value:
        raise ConfigError(f"config.{field}={current} but {known} {value}; {fix}")


def resolve_config(config, latents: LatentContext):
    """A copy of `config` with what the latents determine filled in (when unset) or checked
    (when set): data.latent_shape, model.in/out_channels, model.num_classes (K classes + the
    null label) and conditioning.class_names."""
    config = copy.deepcopy(config)
    shape, channels = latents.latent_shape, latents.latent_shape[-1]
    unset = "set it to None to take it from the data"
    _check_or_fill(config, "data.latent_shape", shape, "the latents have shape",
                   f"{unset}, or point data.latents_dir at other latents.")
    kind = config.conditioning.kind
    if kind not in ("concat", "hybrid"):  # image conditions add channels: check_in_channels
        _check_or_fill(config, "model.in_channels", channels, "the latents have channels",
                       unset + ".")
    _check_or_fill(config, "model.out_channels", channels, "the latents have channels", unset + ".")
    halvings = len(config.model.channel_mult) - 1
    if shape[0] % 2**halvings or shape[1] % 2**halvings:
        raise ConfigError(
            f"the latents are {shape[0]}x{shape[1]} but the UNet (config.model.channel_mult="
            f"{tuple(config.model.channel_mult)}) halves them {halvings} times, so their size must "
            f"be divisible by {2**halvings}: precompute from an image size divisible by "
            f"{2**halvings} x the first stage's f, or use fewer levels.")
    if kind not in encoders.KINDS:
        raise ConfigError(f"config.conditioning.kind={kind!r}: use one of {encoders.KINDS}.")
    context_kind = config.conditioning.context_kind if kind == "hybrid" else kind
    if context_kind in ("class", "class_crossattn"):
        if latents.num_classes < 1:
            raise ConfigError(
                f"config.conditioning.kind={kind!r} needs class labels, but the data has none "
                f"under config.data.label_key={config.data.label_key!r} (an image folder needs "
                f"class sub-folders, a TFDS set a ClassLabel feature); use conditioning.kind="
                f"'none' or set data.label_key to the label feature and precompute again.")
        field = "model.num_classes" if context_kind == "class" else "conditioning.num_embed_classes"
        _check_or_fill(config, field, latents.num_classes + 1,
                       f"the data has {latents.num_classes} classes, so it should be",
                       f"(K + 1: the last id is the null label for guidance); set "
                       f"--config.{field}={latents.num_classes + 1} or 0 to derive it.")
        config.conditioning.class_names = tuple(latents.class_names)
    if context_kind == "layout":
        _check_or_fill(config, "conditioning.num_layout_classes", latents.box_classes,
                       "the data's box labels have classes", "set it to 0 to take it from the data.")
        if config.conditioning.num_layout_classes < 1:
            raise ConfigError("config.conditioning.kind='layout' needs the box label classes: set "
                              "conditioning.num_layout_classes (the data records none).")
        if latents.box_class_names and not config.conditioning.class_names:
            config.conditioning.class_names = tuple(latents.box_class_names)
    if kind in ("concat", "hybrid") and config.conditioning.image_task == "semantic":
        _check_or_fill(config, "conditioning.num_segmentation_classes",
                       latents.segmentation_classes, "the data's label maps have classes",
                       "set it to 0 to take it from the data.")
    if context_kind in ("class_crossattn", "text", "layout"):
        if context_kind == "class_crossattn" and not config.model.context_dim:
            config.model.context_dim = config.conditioning.width
        config.model.use_spatial_transformer = True
    elif config.model.use_spatial_transformer:
        raise ConfigError(f"config.model.use_spatial_transformer=True needs a cross-attention "
                          f"condition, but conditioning.kind={kind!r}: use 'text', 'layout' or "
                          f"'class_crossattn' (or 'hybrid' with one of them), or set "
                          f"use_spatial_transformer=False.")
    return config


def check_context_dim(config, condition) -> None:
    """model.context_dim = the condition encoder's width (filled when 0, checked otherwise)."""
    if condition.context_dim:
        _check_or_fill(config, "model.context_dim", condition.context_dim,
                       "the condition encoder's width is",
                       "set it to 0 to take it from the encoder.")


class DiffusionTask:
    """Builds, steps and evaluates the latent diffusion model for the generic train loop.

    Conditions travel as small dicts of arrays (`label` [B] or `tokens` [B, L], see
    ldm_jax/conditioning/encoders.py); `self.condition` turns them into the UNet's `context`
    / `y`. A jointly trained condition encoder's weights sit in the stage-2 parameter tree
    under `cond_stage_model`; a frozen one's are in `constants()['cond_stage']`.
    """

    name = "diffusion"

    def __init__(self, config, latents: LatentContext | None = None):
        self.latents = LatentContext.from_config(config) if latents is None else latents
        config = resolve_config(config, self.latents)
        self.condition = encoders.make_condition(config, latents=self.latents)
        check_context_dim(config, self.condition)
        if config.conditioning.kind in ("concat", "hybrid"):
            image_conditioning.check_in_channels(config, self.condition,
                                                 self.latents.latent_shape[-1])
        self.config = config
        self.input_key = self.latents.key
        self.dtype = compute_dtype(config.dtype)
        self.model = make_unet(config.model, self.dtype)
        self.schedule = make_schedule(config.diffusion)
        gamma = config.diffusion.min_snr_gamma or None
        self.loss_fn = diffusion_losses.make_diffusion_loss(
            self.schedule, config.diffusion.parameterization, config.diffusion.loss_type, gamma)
        self.optimizer = make_optimizer(config.optimizer, global_batch_size=config.batch_size,
                                        total_steps=config.total_steps)
        self.lr = self.optimizer.schedule
        kind = config.conditioning.kind
        self.class_conditional = kind in ("class", "class_crossattn") or (
            kind == "hybrid" and config.conditioning.context_kind == "class_crossattn")
        self.image_conditional = kind in ("concat", "hybrid")
        self.null_label = self.condition.null_label if self.class_conditional else None
        # The input pipeline's per-example hook (captions / layouts -> tokens); class labels
        # are read by the pipeline itself.
        self.condition_fn = (self.condition.condition_fn
                             if kind in ("text", "layout", "concat", "hybrid") else None)

    # ----------------------------------------------------------------------------- state
    def phase_for_step(self, step: int) -> str:
        return "main"

    def constants(self) -> dict:
        out = {}
        if self.latents.first_stage is not None:
            out["first_stage"] = self.latents.first_stage.params
        frozen = self.condition.frozen_params()
        if frozen is not None:
            out["cond_stage"] = frozen
        return out

    def init_state(self, rng: jax.Array, input_shape=None) -> TrainState:
        k_params, k_cond, k_state = jax.random.split(rng, 3)
        x = jnp.zeros((1,) + self.latents.latent_shape, jnp.float32)
        null = jax.tree_util.tree_map(jnp.asarray, self.condition.null(1))
        cond_params = self.condition.init(k_cond)
        frozen = self.condition.frozen_params()
        if getattr(self.condition, "reads_constants", False):
            frozen = self.constants()
        unet_kwargs = jax.eval_shape(lambda p, f: self.condition.encode(p, f, null),
                                     cond_params, frozen)
        unet_kwargs = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), unet_kwargs)
        x, unet_kwargs = image_conditioning.unet_input(x, unet_kwargs)
        params = self.model.init({"params": k_params}, x, jnp.zeros((1,), jnp.int32),
                                 **unet_kwargs)["params"]
        if cond_params is not None:
            params = {**params, encoders.COND_STAGE_KEY: cond_params}
        return TrainState(step=jnp.asarray(0, jnp.int32), params={"model": params},
                          opt_state={"model": self.optimizer.init(params)}, ema_params=params,
                          rng=jax.random.key_data(k_state))

    # ----------------------------------------------------------------------------- data
    def latents_from_batch(self, batch: dict, rng) -> jax.Array:
        """Scaled z_0: KL moments are re-sampled every step (as the reference encodes anew)."""
        if self.latents.key == "moments":
            mean, logvar = jnp.split(batch["moments"], 2, axis=-1)
            logvar = jnp.clip(logvar, -30.0, 20.0)
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        else:
            z = batch["latent"]
        return z.astype(jnp.float32) * self.latents.scale_factor

    def condition_from_batch(self, batch: dict, rng=None, p_uncond: float = 0.0) -> dict:
        """The batch's conditions, each replaced by the null one with probability p_uncond."""
        cond = {k: batch[k] for k in self.condition.keys}
        if cond and p_uncond > 0:
            cond = self.condition.drop(cond, rng, p_uncond)
        return cond

    def unet_inputs(self, params, constants: dict, cond: dict) -> dict:
        """The UNet's condition keyword arguments (`context`, `y`) for a condition batch."""
        _, cond_params = encoders.split_params(params)
        if getattr(self.condition, "reads_constants", False):  # image conditions: first stage
            return self.condition.encode(cond_params, constants, cond)
        return self.condition.encode(cond_params, constants.get("cond_stage"), cond)

    def _apply(self, params, x_t, t, unet_kwargs, *, train=False, dropout_rng=None):
        rngs = {"dropout": dropout_rng} if (train and dropout_rng is not None) else {}
        unet_params, _ = encoders.split_params(params)
        x_t, unet_kwargs = image_conditioning.unet_input(x_t, unet_kwargs)
        return self.model.apply({"params": unet_params}, x_t, t, train=train, rngs=rngs,
                                **unet_kwargs)

    # ----------------------------------------------------------------------------- steps
    def train_step(self, state: TrainState, batch: dict, constants: dict,
                   phase: str = "main") -> tuple[TrainState, dict]:
        k_latent, k_drop, k_loss, k_dropout = jax.random.split(state.step_rng(), 4)
        z0 = self.latents_from_batch(batch, k_latent)
        cond = self.condition_from_batch(batch, k_drop, self.config.conditioning.p_uncond)

        def loss(params):
            # The condition is encoded inside the loss: a jointly trained encoder gets gradients.
            unet_kwargs = self.unet_inputs(params, constants, cond)
            apply = lambda p, x_t, t, kw: self._apply(p, x_t, t, kw, train=True,
                                                      dropout_rng=k_dropout)
            return self.loss_fn(apply, params, z0, k_loss, unet_kwargs)

        (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(state.params["model"])
        decay = ema_lib.ema_decay(state.step, self.config.ema.decay, self.config.ema.use_warmup)
        # Adam, the EMA and the gradient norm in one step (one pass over memory on CPU).
        params, opt_state, ema_params, grad_norm = self.optimizer.step(
            state.params["model"], state.opt_state["model"], grads, state.ema_params, decay)
        metrics = {"loss": value, "grad_norm": grad_norm, "lr": self.lr(state.step),
                   "ema_decay": decay, "finite": all_finite(value, grad_norm).astype(jnp.float32)}
        new_state = state.replace(step=state.step + 1, params={"model": params},
                                  opt_state={"model": opt_state}, ema_params=ema_params)
        return new_state, metrics

    def eval_step(self, state: TrainState, batch: dict, constants: dict) -> dict:
        """Held-out loss (EMA weights) at evenly spaced timesteps, noise fixed per example."""
        cfg = self.config.diffusion
        mask = batch["mask"].astype(jnp.float32)
        z0 = self.latents_from_batch(batch, jax.random.key(0))
        unet_kwargs = self.unet_inputs(state.ema_params, constants, self.condition_from_batch(batch))
        noise_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(1), i))(batch["index"])
        noise = jax.vmap(lambda k: jax.random.normal(k, z0.shape[1:]))(noise_keys)
        buckets = np.linspace(0, cfg.timesteps - 1, cfg.eval_timestep_buckets).round().astype(int)
        sums = {"count": jnp.sum(mask)}
        from ldm_jax.diffusion.schedules import q_sample, v_target
        for t_value in buckets:
            t = jnp.full((z0.shape[0],), int(t_value), jnp.int32)
            x_t = q_sample(self.schedule, z0, t, noise)
            out = self._apply(state.ema_params, x_t, t, unet_kwargs)
            target = {"eps": noise, "x0": z0}.get(cfg.parameterization)
            if target is None:
                target = v_target(self.schedule, z0, t, noise)
            per_example = jnp.mean(((out - target) ** 2).reshape(z0.shape[0], -1), axis=1)
            sums[f"loss_t{int(t_value)}"] = jnp.sum(per_example * mask)
        return sums

    def summarise_eval(self, sums: dict) -> dict:
        count = max(float(sums["count"]), 1.0)
        result = {k: float(v) / count for k, v in sums.items() if k != "count"}
        result["loss"] = float(np.mean([v for k, v in result.items() if k.startswith("loss_t")]))
        result["num_examples"] = float(sums["count"])
        return result

    def sample_latents(self, params, rng, num: int, *, cond: dict | None = None, labels=None,
                       constants: dict | None = None, sampler=None,
                       guidance_scale: float | None = None) -> jax.Array:
        """Scaled latents z_0 sampled with the config's (or the given) sampler.

        `cond` is a condition batch of `num` rows (`labels` is shorthand for {'label': labels});
        None samples the null condition. The condition is encoded once, before the reverse
        loop; guidance scale s gives out_u + s (out_c - out_u), so s = 1 is the plain
        conditional prediction and costs one network call per step.
        """
        sampler = sampler or make_sampler(self.config, self.schedule)
        scale = self.config.sampling.guidance_scale if guidance_scale is None else guidance_scale
        constants = constants or {}
        if cond is None and labels is not None:
            cond = {"label": labels}
        hw = self.latents.latent_shape[:2]
        if self.image_conditional:
            if cond is None:
                raise encoders.ConditionError("an image-conditioned model samples from an input: "
                                              "pass cond (see condition.request).")
            hw = self.condition.latent_hw(cond)  # convolutional sampling: any size
        shape = (num,) + tuple(hw) + self.latents.latent_shape[-1:]
        null = jax.tree_util.tree_map(jnp.asarray,
                                      image_conditioning.guidance_null(self.condition, cond, num))
        conditioned = cond is not None and bool(self.condition.keys)
        c_kwargs = self.unet_inputs(params, constants, cond if conditioned else null)
        apply = lambda x, t, kw: self._apply(params, x, t, kw)
        if conditioned and scale != 1.0:
            u_kwargs = self.unet_inputs(params, constants, null)
            model_fn = samplers.guided_model_fn(apply, c_kwargs, u_kwargs, scale)
        else:
            model_fn = lambda x, t: apply(x, t, c_kwargs)
        return sampler(model_fn, shape, rng)

    def decode(self, constants: dict, z: jax.Array) -> jax.Array:
        """Scaled latents -> images in [-1, 1] through the first stage (latents as images if none)."""
        if "first_stage" in constants:
            return self.latents.first_stage.decode(constants["first_stage"], z / self.latents.scale_factor)
        z = z[..., :3] if z.shape[-1] >= 3 else jnp.repeat(z[..., :1], 3, axis=-1)
        return jnp.clip(z / 3.0, -1.0, 1.0)

    def grid_condition(self, batch: dict, num: int):
        """Conditions of the training grids: every class in turn, else the batch's own (image
        conditions: always the batch's own)."""
        if self.class_conditional and not self.image_conditional:
            return {"label": jnp.arange(num, dtype=jnp.int32) % self.null_label}
        cond = self.condition_from_batch(batch)
        return cond or None

    def image_step(self, state: TrainState, batch: dict, constants: dict) -> dict:
        """EMA samples (fixed seed) decoded through the first stage, beside decoded data latents."""
        num = batch[self.latents.key].shape[0]
        z = self.sample_latents(state.ema_params, jax.random.key(self.config.seed), num,
                                cond=self.grid_condition(batch, num), constants=constants)
        data = self.decode(constants, self.latents_from_batch(batch, jax.random.key(0)))
        return {"data": data, "samples": self.decode(constants, z)}

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

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.config.loading import ConfigError
from ldm_jax.diffusion import ema as ema_lib
from ldm_jax.diffusion import losses as diffusion_losses
from ldm_jax.diffusion import samplers
from ldm_jax.diffusion.schedules import DiffusionSchedule
from ldm_jax.models.unet import UNetModel
from ldm_jax.training.train_state import (TrainState, all_finite, apply_gradients, compute_dtype,
                                 global_norm, make_optimizer)


def make_unet(model_cfg, dtype=jnp.float32) -> UNetModel:
    """UNetModel from `config.model` (0 means 'unset' for context_dim and num_classes)."""
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
        dtype=dtype)


def make_schedule(diffusion_cfg) -> DiffusionSchedule:
    return DiffusionSchedule.from_config(diffusion_cfg.beta_schedule, diffusion_cfg.timesteps,
                                         diffusion_cfg.linear_start, diffusion_cfg.linear_end)


def make_sampler(config, schedule, *, name=None, num_steps=None, eta=None):
    """A registered sampler built from the config (overridable for the sample command)."""
    name = name or config.sampling.sampler
    factory = samplers.get_sampler(name)
    kwargs = {"parameterization": config.diffusion.parameterization}
    if name != "ddpm":
        kwargs["num_steps"] = num_steps or config.sampling.num_steps
        kwargs["eta"] = config.sampling.eta if eta is None else eta
    return factory(schedule, **kwargs)


class LatentContext:
    """What stage 2 knows about its latents: shape, batch key, scale factor, the first stage
    that decodes them and the class names of their labels."""

    def __init__(self, *, latent_shape, kind: str, scale_factor: float, first_stage=None,
                 class_names=(), num_classes: int = 0):
        self.latent_shape = tuple(int(d) for d in latent_shape)
        self.kind = kind  # 'kl' | 'vq' | 'synthetic'
        self.key = "moments" if kind == "kl" else "latent"
        self.scale_factor = float(scale_factor)
        self.first_stage = first_stage
        self.class_names = tuple(class_names)
        self.num_classes = int(num_classes)  # label classes in the data (0: no labels)

    @classmethod
    def from_bundle(cls, bundle) -> "LatentContext":
        """The latent context of an inference bundle (no data set is read)."""
        config = bundle.config
        classes = config.model.num_classes - 1 if config.conditioning.kind == "class" else 0
        return cls(latent_shape=config.data.latent_shape,
                   kind="synthetic" if bundle.first_stage is None else bundle.first_stage.kind,
                   scale_factor=bundle.scale_factor, first_stage=bundle.first_stage,
                   class_names=config.conditioning.class_names, num_classes=classes)

    @classmethod
    def from_config(cls, config) -> "LatentContext":
        """From the precomputed latents' metadata (and the first stage it names), or the
        synthetic latents' config."""
        data_cfg = config.data
        if data_cfg.source == "synthetic_latents":
            if data_cfg.latent_shape is None:
                raise ConfigError("data.source='synthetic_latents' needs data.latent_shape, e.g. "
                                  "--config.data.latent_shape=8,8,3.")
            return cls(latent_shape=data_cfg.latent_shape, kind="synthetic", scale_factor=1.0,
                       num_classes=data_cfg.num_classes)
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
        label_key = data_cfg.label_key
        names = meta.get("class_names", {}).get(label_key, []) if label_key else []
        count = meta.get("num_classes", {}).get(label_key, len(names)) if label_key else 0
        return cls(latent_shape=meta["latent_shape"], kind=meta["kind"],
                   scale_factor=meta["scale_factor"], first_stage=first_stage,
                   class_names=names, num_classes=count)


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
    _check_or_fill(config, "model.in_channels", channels, "the latents have channels", unset + ".")
    _check_or_fill(config, "model.out_channels", channels, "the latents have channels", unset + ".")
    halvings = len(config.model.channel_mult) - 1
    if shape[0] % 2**halvings or shape[1] % 2**halvings:
        raise ConfigError(
            f"the latents are {shape[0]}x{shape[1]} but the UNet (config.model.channel_mult="
            f"{tuple(config.model.channel_mult)}) halves them {halvings} times, so their size must "
            f"be divisible by {2**halvings}: precompute from an image size divisible by "
            f"{2**halvings} x the first stage's f, or use fewer levels.")
    kind = config.conditioning.kind
    if kind not in ("none", "class"):
        raise ConfigError(f"config.conditioning.kind={kind!r}: use 'none' or 'class'.")
    if kind == "class":
        if latents.num_classes < 1:
            raise ConfigError(
                f"config.conditioning.kind='class' needs class labels, but the data has none "
                f"under config.data.label_key={config.data.label_key!r} (an image folder needs "
                f"class sub-folders, a TFDS set a ClassLabel feature); use conditioning.kind="
                f"'none' or set data.label_key to the label feature and precompute again.")
        _check_or_fill(config, "model.num_classes", latents.num_classes + 1,
                       f"the data has {latents.num_classes} classes, so it should be",
                       f"(K + 1: the last id is the null label for guidance); set "
                       f"--config.model.num_classes={latents.num_classes + 1} or 0 to derive it.")
        config.conditioning.class_names = tuple(latents.class_names)
    return config


class DiffusionTask:
    """Builds, steps and evaluates the latent diffusion model for the generic train loop."""

    name = "diffusion"

    def __init__(self, config, latents: LatentContext | None = None):
        self.latents = LatentContext.from_config(config) if latents is None else latents
        config = self.config = resolve_config(config, self.latents)
        self.input_key = self.latents.key
        self.dtype = compute_dtype(config.dtype)
        self.model = make_unet(config.model, self.dtype)
        self.schedule = make_schedule(config.diffusion)
        gamma = config.diffusion.min_snr_gamma or None
        self.loss_fn = diffusion_losses.make_diffusion_loss(
            self.schedule, config.diffusion.parameterization, config.diffusion.loss_type, gamma)
        self.tx, self.lr = make_optimizer(config.optimizer, global_batch_size=config.batch_size,
                                          total_steps=config.total_steps)
        self.class_conditional = config.conditioning.kind == "class"
        self.null_label = config.model.num_classes - 1 if self.class_conditional else None

    # ----------------------------------------------------------------------------- state
    def phase_for_step(self, step: int) -> str:
        return "main"

    def constants(self) -> dict:
        fs = self.latents.first_stage
        return {} if fs is None else {"first_stage": fs.params}

    def init_state(self, rng: jax.Array, input_shape=None) -> TrainState:
        k_params, k_state = jax.random.split(rng)
        x = jnp.zeros((1,) + self.latents.latent_shape, jnp.float32)
        y = jnp.zeros((1,), jnp.int32) if self.class_conditional else None
        params = self.model.init({"params": k_params}, x, jnp.zeros((1,), jnp.int32), y=y)["params"]
        return TrainState(step=jnp.asarray(0, jnp.int32), params={"model": params},
                          opt_state={"model": self.tx.init(params)}, ema_params=params,
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

    def labels_from_batch(self, batch: dict, rng, p_uncond: float):
        if not self.class_conditional:
            return None
        y = batch["label"].astype(jnp.int32)
        if p_uncond > 0:
            drop = jax.random.bernoulli(rng, p_uncond, y.shape)
            y = jnp.where(drop, self.null_label, y)
        return y

    def _apply(self, params, x_t, t, y, *, train=False, dropout_rng=None):
        rngs = {"dropout": dropout_rng} if (train and dropout_rng is not None) else {}
        return self.model.apply({"params": params}, x_t, t, y=y, train=train, rngs=rngs)

    # ----------------------------------------------------------------------------- steps
    def train_step(self, state: TrainState, batch: dict, constants: dict,
                   phase: str = "main") -> tuple[TrainState, dict]:
        k_latent, k_drop, k_loss, k_dropout = jax.random.split(state.step_rng(), 4)
        z0 = self.latents_from_batch(batch, k_latent)
        y = self.labels_from_batch(batch, k_drop, self.config.conditioning.p_uncond)

        def loss(params):
            apply = lambda p, x_t, t, cond: self._apply(p, x_t, t, cond, train=True,
                                                        dropout_rng=k_dropout)
            return self.loss_fn(apply, params, z0, k_loss, y)

        (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(state.params["model"])
        params, opt_state = apply_gradients(self.tx, state.params["model"],
                                            state.opt_state["model"], grads)
        decay = ema_lib.ema_decay(state.step, self.config.ema.decay, self.config.ema.use_warmup)
        ema_params = ema_lib.ema_update(state.ema_params, params, decay)
        grad_norm = global_norm(grads)
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
        y = self.labels_from_batch(batch, None, 0.0)
        noise_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(1), i))(batch["index"])
        noise = jax.vmap(lambda k: jax.random.normal(k, z0.shape[1:]))(noise_keys)
        buckets = np.linspace(0, cfg.timesteps - 1, cfg.eval_timestep_buckets).round().astype(int)
        sums = {"count": jnp.sum(mask)}
        from ldm_jax.diffusion.schedules import q_sample, v_target
        for t_value in buckets:
            t = jnp.full((z0.shape[0],), int(t_value), jnp.int32)
            x_t = q_sample(self.schedule, z0, t, noise)
            out = self._apply(state.ema_params, x_t, t, y)
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

    def sample_latents(self, params, rng, num: int, *, labels=None, sampler=None,
                       guidance_scale: float | None = None) -> jax.Array:
        """Scaled latents z_0 sampled with the config's (or the given) sampler."""
        sampler = sampler or make_sampler(self.config, self.schedule)
        scale = self.config.sampling.guidance_scale if guidance_scale is None else guidance_scale
        shape = (num,) + self.latents.latent_shape
        if self.class_conditional:
            apply = lambda x, t, y: self._apply(params, x, t, y)
            if scale != 1.0:
                uncond = jnp.full_like(labels, self.null_label)
                model_fn = samplers.guided_model_fn(apply, labels, uncond, scale)
            else:
                model_fn = functools.partial(lambda x, t: apply(x, t, labels))
        else:
            model_fn = lambda x, t: self._apply(params, x, t, None)
        return sampler(model_fn, shape, rng)

    def decode(self, constants: dict, z: jax.Array) -> jax.Array:
        """Scaled latents -> images in [-1, 1] through the first stage (latents as images if none)."""
        if "first_stage" in constants:
            return self.latents.first_stage.decode(constants["first_stage"], z / self.latents.scale_factor)
        z = z[..., :3] if z.shape[-1] >= 3 else jnp.repeat(z[..., :1], 3, axis=-1)
        return jnp.clip(z / 3.0, -1.0, 1.0)

    def grid_labels(self, num: int):
        if not self.class_conditional:
            return None
        return jnp.arange(num, dtype=jnp.int32) % self.null_label

    def image_step(self, state: TrainState, batch: dict, constants: dict) -> dict:
        """EMA samples (fixed seed) decoded through the first stage, beside decoded data latents."""
        num = batch[self.latents.key].shape[0]
        z = self.sample_latents(state.ema_params, jax.random.key(self.config.seed), num,
                                labels=self.grid_labels(num))
        data = self.decode(constants, self.latents_from_batch(batch, jax.random.key(0)))
        return {"data": data, "samples": self.decode(constants, z)}

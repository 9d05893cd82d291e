"""Image conditions: super-resolution, inpainting and semantic synthesis by concatenation.

`conditioning.kind='concat'` brings an image condition to the latent grid and concatenates it
to z_t on the channel axis (the reference's `conditioning_key: concat`): the UNet reads
concat([z_t, c], -1), so `model.in_channels` = latent channels + `ImageCondition.channels`.
`kind='hybrid'` adds a cross-attention context (text, layout or class) on top
(`HybridCondition`). Three tasks (`conditioning.image_task`):

* 'sr': the low-resolution image, [h, w, 3] in [-1, 1], resized to the latent grid
  (identity when sr_factor = f, as in the paper's bsr_sr: 64 px inputs, 64x64 latents).
  Training inputs are made from the stored target image on the fly (`degradation` 'bicubic'
  or 'bsr', ldm_jax/data/degradations.py) or read from the data ('given': `low_res`).
* 'inpaint': the masked image [H, W, 3] (filled pixels set to -1, black) and the mask
  [H, W, 1] (1 = fill); on the device the masked image goes through the frozen first stage
  (KL: posterior mean; VQ: the pre-quantisation latent, as the reference's cond stage) times
  the scale factor, and the mask is subsampled to the latent grid (the reference's nearest
  interpolation) and fed as {-1, +1}: latent channels + 1. These are the reference
  inpainting script's conventions, so converted CompVis inpainting weights see their inputs.
  Training masks come from ldm_jax/data/masks.py.
* 'semantic': the label map [H, W] of class ids, one-hot, averaged over f x f cells (what the
  reference's SpatialRescaler's log2(f) bilinear halvings compute) and projected to
  `concat_channels` by a bias-free 1x1 convolution `channel_mapper` (trained jointly under
  `cond_stage_model`, or a fixed seeded one).

The condition has the same five duties as the others (ldm_jax/conditioning/encoders.py), plus
`latent_hw(cond)`: the latent grid a condition asks for. The UNet is convolutional, so a larger
condition samples a larger image ("convolutional sampling", no tiling).

Training draws degradations and masks from the pipeline's per-example generator (a function of
(seed, position)), so a resumed run sees the same ones; evaluation seeds them by the image's
bytes, so every evaluation sees the same inputs.
"""

from __future__ import annotations

import warnings
import zlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.conditioning.base import ConditionError, drop_rows, label_of, refuse
from ldm_jax.config.loading import ConfigError

IMAGE_TASKS = ("sr", "inpaint", "semantic")
DEGRADATIONS = ("bicubic", "bsr", "given")
PROJECTIONS = ("learned", "fixed")
_FIXED_PROJECTION_SEED = 20240613


def _condition_error(message: str):
    return ConditionError(message)


def to_unit_range(image) -> np.ndarray:
    """uint8 [.., 3] -> float32 in [-1, 1]."""
    return np.asarray(image, np.float32) / 127.5 - 1.0


def _example_rng(rng, image: np.ndarray) -> np.random.Generator:
    """Training: the pipeline's per-example generator; evaluation (rng None): one seeded by the
    image's bytes, so every evaluation degrades / masks an example the same way."""
    if rng is not None:
        return rng
    return np.random.default_rng(zlib.crc32(np.ascontiguousarray(image).tobytes()))


class ImageCondition:
    """An image condition concatenated to z_t (see the module docstring)."""

    kind = "concat"
    context_dim = 0
    reads_constants = True  # encode() gets the task's constants (the first stage)

    def __init__(self, cfg, *, latent_shape, downsampling_factor: int, latent_kind: str,
                 scale_factor: float, encode_moments=None, num_segmentation_classes: int = 0):
        task = cfg.image_task
        if task not in IMAGE_TASKS:
            raise ConfigError(f"config.conditioning.image_task={task!r}: use one of {IMAGE_TASKS}.")
        self.task = task
        self.latent_shape = tuple(int(d) for d in latent_shape)
        self.f = int(downsampling_factor)
        self.latent_channels = self.latent_shape[-1]
        self.latent_kind = latent_kind
        self.scale_factor = float(scale_factor)
        self._encode_moments = encode_moments  # first_stage.encode_moments, or None (synthetic)
        self.image_hw = (self.latent_shape[0] * self.f, self.latent_shape[1] * self.f)
        if task == "sr":
            self.sr_factor = int(cfg.sr_factor)
            if self.sr_factor < 1:
                raise ConfigError(f"config.conditioning.sr_factor={cfg.sr_factor}: use an "
                                  f"integer >= 1.")
            if cfg.degradation not in DEGRADATIONS:
                raise ConfigError(f"config.conditioning.degradation={cfg.degradation!r}: use one "
                                  f"of {DEGRADATIONS}.")
            self.degradation = cfg.degradation
            self._degrade = None
            if self.degradation != "given":
                from ldm_jax.data.degradations import make_degradation
                self._degrade = make_degradation(self.degradation, self.sr_factor)
            self.keys = ("low_res",)
            self.channels = 3
        elif task == "inpaint":
            from ldm_jax.data.masks import make_mask_fn
            self._mask_fn = make_mask_fn(
                tuple(cfg.mask_kinds), min_coverage=cfg.mask_min_coverage,
                max_coverage=cfg.mask_max_coverage, max_strokes=cfg.mask_max_strokes,
                stroke_width=tuple(cfg.mask_stroke_width), weights=tuple(cfg.mask_kind_weights))
            self.keys = ("masked_image", "fill_mask")
            self.channels = self.latent_channels + 1
        else:
            self.num_classes = int(cfg.num_segmentation_classes or num_segmentation_classes)
            if self.num_classes < 2:
                raise ConfigError(
                    "config.conditioning.image_task='semantic' needs the label-map classes: set "
                    "conditioning.num_segmentation_classes (the data records none).")
            if cfg.segmentation_projection not in PROJECTIONS:
                raise ConfigError(f"config.conditioning.segmentation_projection="
                                  f"{cfg.segmentation_projection!r}: use one of {PROJECTIONS}.")
            self.projection = cfg.segmentation_projection
            self.channels = int(cfg.concat_channels)
            if self.channels < 1:
                raise ConfigError(f"config.conditioning.concat_channels={cfg.concat_channels}: "
                                  f"use >= 1.")
            self.keys = ("segmentation",)

    # ------------------------------------------------------------------ sizes
    def identity(self) -> dict:
        return {"kind": self.kind, "image_task": self.task, "channels": self.channels}

    def input_hw(self, latent_hw) -> tuple[int, int]:
        """Pixel size of the condition input for a latent grid."""
        h, w = latent_hw
        if self.task == "sr":
            return (h * self.f // self.sr_factor, w * self.f // self.sr_factor)
        return (h * self.f, w * self.f)

    def latent_hw(self, cond: dict) -> tuple[int, int]:
        """The latent grid a condition batch asks for (static shapes)."""
        key = self.keys[0]
        h, w = cond[key].shape[1:3]
        if self.task == "sr":
            return (h * self.sr_factor // self.f, w * self.sr_factor // self.f)
        return (h // self.f, w // self.f)

    def check_input_hw(self, hw, *, what: str, levels: int = 1) -> None:
        """A one-line error when an input of size hw does not map onto a latent grid the UNet
        can halve `levels` times."""
        h, w = int(hw[0]), int(hw[1])
        if self.task == "sr":
            scale = f"x sr_factor {self.sr_factor} / f {self.f}"
            ok = (h * self.sr_factor) % self.f == 0 and (w * self.sr_factor) % self.f == 0
            lat = (h * self.sr_factor // self.f, w * self.sr_factor // self.f)
        else:
            scale = f"/ f {self.f}"
            ok = h % self.f == 0 and w % self.f == 0
            lat = (h // self.f, w // self.f)
        if not ok or lat[0] % levels or lat[1] % levels or min(lat) < 1:
            unit = self.f * levels
            if self.task == "sr":
                unit = max(1, self.f * levels // self.sr_factor)
            raise _condition_error(
                f"{what}: {h}x{w} pixels give a {scale} latent grid the UNet cannot use (it "
                f"halves it {levels.bit_length() - 1} times): use sizes divisible by {unit}.")

    # ------------------------------------------------------------------ host side
    def condition_fn(self, fields, rng, train):
        image = fields.get("image")
        if self.task == "sr":
            if self.degradation == "given":
                low = fields.get("low_res")
                if low is None:
                    raise _condition_error(
                        "conditioning.degradation='given' needs the data's low-resolution "
                        "images: set data.low_res_key (source_data.low_res_key when "
                        "precomputing), or use degradation='bicubic' or 'bsr'.")
                return {"low_res": to_unit_range(low)}
            image = self._need_image(image)
            return {"low_res": to_unit_range(self._degrade(image, _example_rng(rng, image)))}
        if self.task == "inpaint":
            image = self._need_image(image)
            mask = self._mask_fn(image.shape[0], image.shape[1], _example_rng(rng, image))
            return self.inpaint_inputs(image, mask)
        seg = fields.get("segmentation")
        if seg is None:
            raise _condition_error(
                "conditioning.image_task='semantic' needs label maps: set data.segmentation_key "
                "(source_data.segmentation_key when precomputing).")
        return {"segmentation": self._check_labels(np.asarray(seg), "the example's label map")}

    def _need_image(self, image):
        if image is None:
            raise _condition_error(
                f"conditioning.image_task={self.task!r} makes its input from the example's image, "
                f"but the latents store none: precompute them with latents.keep_images=True.")
        return np.asarray(image, np.uint8)

    def _check_labels(self, seg: np.ndarray, what: str, batched: bool = False) -> np.ndarray:
        if seg.ndim == (4 if batched else 3):  # a trailing channel axis
            seg = seg[..., 0]
        if seg.size and (seg.min() < 0 or seg.max() >= self.num_classes):
            raise _condition_error(
                f"{what} has label {int(seg.max() if seg.max() >= self.num_classes else seg.min())}"
                f" outside [0, {self.num_classes}) (conditioning.num_segmentation_classes="
                f"{self.num_classes}).")
        return seg.astype(np.int32)

    @staticmethod
    def inpaint_inputs(image: np.ndarray, mask: np.ndarray) -> dict:
        """uint8 image [H, W, 3] + mask [H, W] (1 = fill) -> the masked image in [-1, 1]
        (filled pixels -1, black) and the mask [H, W, 1] in {0, 1}, both float32. As the
        reference's inpainting script: (1 - mask) * image in [0, 1], then mapped to [-1, 1]."""
        keep = 1.0 - np.asarray(mask, np.float32)[..., None]
        masked = (np.asarray(image, np.float32) / 255.0) * keep * 2.0 - 1.0
        return {"masked_image": masked.astype(np.float32),
                "fill_mask": (1.0 - keep).astype(np.float32)}

    def null(self, n: int, latent_hw=None) -> dict:
        """All-zero inputs (a label map of -1: an all-zero one-hot) for n examples."""
        h, w = self.input_hw(latent_hw or self.latent_shape[:2])
        if self.task == "sr":
            return {"low_res": np.zeros((n, h, w, 3), np.float32)}
        if self.task == "inpaint":
            return {"masked_image": np.zeros((n, h, w, 3), np.float32),
                    "fill_mask": np.zeros((n, h, w, 1), np.float32)}
        return {"segmentation": np.full((n, h, w), -1, np.int32)}

    def drop(self, cond, rng, p):
        fill = {"segmentation": -1}
        return {k: drop_rows(v, jnp.asarray(fill.get(k, 0), v.dtype), rng, p)
                for k, v in cond.items()}

    # ------------------------------------------------------------------ device side
    def init(self, rng):
        if self.task != "semantic" or self.projection != "learned":
            return None
        # As torch's Conv2d default (kaiming-uniform, a=sqrt(5)): U(-1/sqrt(N), 1/sqrt(N)).
        bound = 1.0 / np.sqrt(self.num_classes)
        kernel = jax.random.uniform(rng, (1, 1, self.num_classes, self.channels), jnp.float32,
                                    -bound, bound)
        return {"channel_mapper": {"kernel": kernel}}

    def frozen_params(self):
        return None

    def _pool(self, x: jax.Array) -> jax.Array:
        """Mean over f x f cells: [B, H, W, C] -> [B, H/f, W/f, C]."""
        b, h, w, c = x.shape
        f = self.f
        return x.reshape(b, h // f, f, w // f, f, c).mean(axis=(2, 4))

    def encode(self, params, constants, cond) -> dict:
        """{'concat': [B, h, w, channels]} at the latent grid."""
        constants = constants or {}
        if self.task == "sr":
            low = jnp.asarray(cond["low_res"], jnp.float32)
            h, w = self.latent_hw(cond)
            if low.shape[1:3] != (h, w):
                low = jax.image.resize(low, (low.shape[0], h, w, 3), "bicubic")
            return {"concat": low}
        if self.task == "inpaint":
            masked = jnp.asarray(cond["masked_image"], jnp.float32)
            mask = jnp.asarray(cond["fill_mask"], jnp.float32)
            if "first_stage" in constants and self._encode_moments is not None:
                moments = self._encode_moments(constants["first_stage"], masked)
                latent = moments[..., :self.latent_channels]  # KL: the mean; VQ: pre-quant
                latent = jax.lax.stop_gradient(latent) * self.scale_factor
            else:  # synthetic latents: images are latents / 3 (DiffusionTask.decode)
                latent = 3.0 * self._pool(masked)[..., :self.latent_channels]
            # torch's nearest interpolation to h = H / f picks rows 0, f, 2f, ...; the
            # reference feeds the mask as {-1, +1}.
            mask = 2.0 * mask[:, ::self.f, ::self.f] - 1.0
            return {"concat": jnp.concatenate([latent, mask], -1)}
        seg = jnp.asarray(cond["segmentation"], jnp.int32)
        one_hot = self._pool(jax.nn.one_hot(seg, self.num_classes, dtype=jnp.float32))
        if self.projection == "learned":
            kernel = params["channel_mapper"]["kernel"]
        else:
            kernel = jax.random.normal(jax.random.key(_FIXED_PROJECTION_SEED),
                                       (1, 1, self.num_classes, self.channels)) / np.sqrt(
                                           self.num_classes)
        return {"concat": jnp.einsum("bhwn,nc->bhwc", one_hot, kernel[0, 0])}

    # ------------------------------------------------------------------ sampling requests
    def request(self, num, *, prompts=None, layouts=None, labels=None, class_names=(),
                inputs=None, masks=None, levels: int = 1):
        refuse(self.kind, prompts=prompts, layouts=layouts, labels=labels)
        if inputs is None:
            raise _condition_error(
                f"this model (conditioning.image_task={self.task!r}) samples from an input image: "
                f"give --input (a PNG, a folder of PNGs or an .npz with 'images')"
                + (" and --mask." if self.task == "inpaint" else "."))
        inputs = np.asarray(inputs)
        if masks is not None and self.task != "inpaint":
            raise _condition_error(f"--mask was given, but this model does "
                                   f"image_task={self.task!r}, not inpainting.")
        rows = np.arange(num) % len(inputs)
        if self.task == "semantic":
            seg = inputs[..., 0] if inputs.ndim == 4 else inputs
            self.check_input_hw(seg.shape[1:3], what="--input label map", levels=levels)
            return {"segmentation": self._check_labels(seg, "--input label map", True)[rows]}
        if inputs.ndim != 4 or inputs.shape[-1] != 3:
            raise _condition_error(f"--input: expected RGB images [N, H, W, 3], got shape "
                                   f"{inputs.shape}.")
        self.check_input_hw(inputs.shape[1:3], what="--input", levels=levels)
        if self.task == "sr":
            return {"low_res": to_unit_range(inputs)[rows]}
        if masks is None:
            raise _condition_error("an inpainting model needs --mask (1 = fill) with --input.")
        masks = np.asarray(masks)
        if masks.ndim == 4:
            masks = masks[..., 0]
        if masks.shape[1:] != inputs.shape[1:3] or len(masks) not in (1, len(inputs)):
            raise _condition_error(f"--mask: masks of shape {masks.shape} do not fit the inputs "
                                   f"{inputs.shape} (one [H, W] mask per image, or one for all).")
        masks = (masks > 0).astype(np.uint8)
        if len(masks) == 1:
            masks = np.repeat(masks, len(inputs), axis=0)
        for i, m in enumerate(masks):
            if not m.any():
                warnings.warn(f"--mask {i}: all zeros, nothing to fill (the input is kept).",
                              stacklevel=2)
            elif m.all():
                warnings.warn(f"--mask {i}: all ones, nothing of the input is kept.", stacklevel=2)
        out = [self.inpaint_inputs(img, m) for img, m in zip(inputs, masks)]
        return {k: np.stack([o[k] for o in out])[rows] for k in self.keys}


class HybridCondition:
    """An image condition (concatenated) plus a cross-attention context (`context_kind`).
    Condition dropout and guidance act on the context only: the image stays."""

    kind = "hybrid"
    reads_constants = True

    def __init__(self, image: ImageCondition, context):
        self.image, self.context = image, context
        self.keys = tuple(image.keys) + tuple(context.keys)
        self.context_dim = context.context_dim
        self.channels = image.channels
        self.task = image.task

    @property
    def null_label(self):
        """The context's null class id (class contexts only)."""
        return self.context.null_label

    def identity(self) -> dict:
        return {"kind": self.kind, "image": self.image.identity(),
                "context": getattr(self.context, "identity", lambda: {"kind": self.context.kind})()}

    def latent_hw(self, cond):
        return self.image.latent_hw(cond)

    def condition_fn(self, fields, rng, train):
        out = dict(self.image.condition_fn(fields, rng, train))
        if self.context.kind == "class_crossattn":
            label_of(fields, "data.label_key")  # the pipeline itself adds 'label' to the batch
        else:
            out.update(self.context.condition_fn(fields, rng, train))
        return out

    def _split(self, cond):
        return ({k: cond[k] for k in self.image.keys if k in cond},
                {k: cond[k] for k in self.context.keys if k in cond})

    def null(self, n, latent_hw=None):
        return {**self.image.null(n, latent_hw), **self.context.null(n)}

    def null_like(self, cond, n):
        """The guidance's unconditional batch: the same image, the null context."""
        image, _ = self._split(cond)
        return {**image, **self.context.null(n)}

    def drop(self, cond, rng, p):
        image, context = self._split(cond)
        return {**image, **self.context.drop(context, rng, p)}

    def init(self, rng):
        k_image, k_context = jax.random.split(rng)
        parts = [self.image.init(k_image), self.context.init(k_context)]
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        merged = {}
        for part in parts:
            merged.update(part)
        return merged

    def frozen_params(self):
        return self.context.frozen_params()

    def encode(self, params, constants, cond):
        constants = constants or {}
        image, context = self._split(cond)
        out = self.image.encode(params, constants, image)
        out.update(self.context.encode(params, constants.get("cond_stage"), context))
        return out

    def request(self, num, *, prompts=None, layouts=None, labels=None, class_names=(),
                inputs=None, masks=None, levels: int = 1):
        image = self.image.request(num, inputs=inputs, masks=masks, levels=levels)
        context = self.context.request(num, prompts=prompts, layouts=layouts, labels=labels,
                                       class_names=class_names)
        return {**image, **context}


def check_in_channels(config, condition, latent_channels: int) -> None:
    """model.in_channels = latent channels + the condition's channels (filled when 0)."""
    expected = latent_channels + condition.channels
    current = config.model.in_channels
    if current in (0, None, latent_channels) and current != expected:
        config.model.in_channels = expected
    elif current != expected:
        raise ConfigError(
            f"config.model.in_channels={current}, but the latents have {latent_channels} channels "
            f"and the {condition.task!r} condition adds {condition.channels}: set it to "
            f"{expected} (or 0 to derive it).")


def unet_input(x_t: jax.Array, unet_kwargs: dict) -> tuple[jax.Array, dict]:
    """(concat([x_t, c], -1), the remaining UNet keyword arguments)."""
    if "concat" not in unet_kwargs:
        return x_t, unet_kwargs
    rest = {k: v for k, v in unet_kwargs.items() if k != "concat"}
    return jnp.concatenate([x_t, unet_kwargs["concat"].astype(x_t.dtype)], axis=-1), rest


def guidance_null(condition, cond: Optional[dict], n: int) -> dict:
    """The unconditional batch guidance compares against (same image for hybrid models)."""
    if cond is not None and hasattr(condition, "null_like"):
        return condition.null_like(cond, n)
    if cond is not None and hasattr(condition, "latent_hw") and condition.keys:
        return condition.null(n, condition.latent_hw(cond))
    return condition.null(n)

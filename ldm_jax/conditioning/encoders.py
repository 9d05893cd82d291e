"""Condition encoders: `config.conditioning.kind` -> how a condition reaches the UNet.

One object per kind, with the same five duties, so the diffusion task has one code path:

* `condition_fn(fields, rng, train)`: the input pipeline's hook (host side, per example). It
  turns the example's canonical fields (`label`, `caption` str or list of str, `boxes`,
  `box_labels`) into fixed-shape arrays: `label` int32 [] or `tokens` int32 [L].
* `null(n)`: the null condition for n examples (the last class id, the empty prompt, the empty
  layout); `drop(cond, rng, p)` replaces each example's condition by it with probability p
  (classifier-free guidance training).
* `init(rng)`: parameters trained jointly with the UNet (the paper's tau_theta), or None;
  `frozen_params()`: weights of a frozen pretrained encoder (passed to the jitted steps as
  arguments, never trained and never baked into the compiled program), or None.
* `encode(params, frozen, cond)`: the UNet's keyword arguments, {'context': [B, L, D]} for
  cross-attention and/or {'y': [B]} for the class embedding.
* `request(num, prompts=, layouts=, labels=)`: a sampling request (the command line) as a
  condition batch, with a one-line error when the request does not fit the model.

Jointly trained encoder parameters live beside the UNet's in the stage-2 parameter tree under
`COND_STAGE_KEY` (as the reference's `cond_stage_model`), so the optimiser, EMA, FSDP rules,
checkpoints and bundles treat them like any other stage-2 weight.
"""

from __future__ import annotations

import threading
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import UserError
from ldm_jax.config.loading import ConfigError

COND_STAGE_KEY = "cond_stage_model"
KINDS = ("none", "class", "class_crossattn", "text", "layout")
TEXT_ENCODERS = ("bert", "clip_text", "hf_bert")


class ConditionError(UserError, ValueError):
    """A condition that does not fit the model (a prompt for a class model, no caption...)."""


def split_params(params: dict) -> tuple[dict, Optional[dict]]:
    """(UNet params, jointly trained encoder params or None) of a stage-2 parameter tree."""
    if COND_STAGE_KEY not in params:
        return params, None
    unet = {k: v for k, v in params.items() if k != COND_STAGE_KEY}
    return unet, params[COND_STAGE_KEY]


def _drop_rows(cond: jax.Array, null: jax.Array, rng, p: float) -> jax.Array:
    drop = jax.random.bernoulli(rng, p, (cond.shape[0],))
    drop = drop.reshape((-1,) + (1,) * (cond.ndim - 1))
    return jnp.where(drop, null.astype(cond.dtype), cond)


class NoCondition:
    kind = "none"
    context_dim = 0
    keys: tuple = ()

    def condition_fn(self, fields, rng, train):
        return {}

    def null(self, n):
        return {}

    def drop(self, cond, rng, p):
        return cond

    def init(self, rng):
        return None

    def frozen_params(self):
        return None

    def encode(self, params, frozen, cond):
        return {}

    def request(self, num, *, prompts=None, layouts=None, labels=None, class_names=()):
        _refuse(self.kind, prompts=prompts, layouts=layouts, labels=labels)
        return {}


def _refuse(kind: str, **given) -> None:
    flags = {"prompts": "--prompt/--prompts_file", "layouts": "--layout", "labels": "--labels"}
    for name, value in given.items():
        if value:
            raise ConditionError(f"{flags[name]} was given, but this model takes no such "
                                 f"condition (conditioning.kind={kind!r}).")


def _label_of(fields: dict, key_hint: str) -> np.ndarray:
    if "label" not in fields:
        raise ConditionError(f"the example has no class label; set data.label_key to the label "
                             f"feature ({key_hint}) and precompute again.")
    return np.asarray(fields["label"], np.int32)


class ClassCondition:
    """Class label -> the UNet's label embedding (`kind='class'`) or a length-1 context of a
    learned embedding (`kind='class_crossattn'`, the reference's ClassEmbedder: cin256-v2).
    The last id (num_classes - 1) is the null label."""

    def __init__(self, kind: str, num_classes: int, context_dim: int = 0):
        self.kind = kind
        self.num_classes = int(num_classes)
        self.null_label = self.num_classes - 1
        self.context_dim = int(context_dim) if kind == "class_crossattn" else 0
        self.keys = ("label",)

    def condition_fn(self, fields, rng, train):
        return {"label": _label_of(fields, "data.label_key")}

    def null(self, n):
        return {"label": np.full((n,), self.null_label, np.int32)}

    def drop(self, cond, rng, p):
        return {"label": _drop_rows(cond["label"], jnp.int32(self.null_label), rng, p)}

    def init(self, rng):
        if self.kind != "class_crossattn":
            return None
        return {"embedding": jax.random.normal(rng, (self.num_classes, self.context_dim))}

    def frozen_params(self):
        return None

    def encode(self, params, frozen, cond):
        y = cond["label"].astype(jnp.int32)
        if self.kind == "class":
            return {"y": y}
        return {"context": jnp.take(params["embedding"], y, axis=0)[:, None, :]}

    def request(self, num, *, prompts=None, layouts=None, labels=None, class_names=()):
        _refuse(self.kind, prompts=prompts, layouts=layouts)
        return {"label": parse_labels(labels or "", num, num_classes=self.null_label,
                                      class_names=class_names)}


class _TokenCondition:
    """Shared by text and layout: a token sequence [L] encoded by a transformer."""

    keys = ("tokens",)

    def __init__(self):
        self._lock = threading.Lock()  # the tokenizers are shared by the reader threads
        self._null = None

    def tokenize(self, items) -> np.ndarray:
        with self._lock:
            return np.asarray(self._tokenize(items), np.int32)

    def null(self, n):
        if self._null is None:
            self._null = self.tokenize([self._empty])[0]
        return {"tokens": np.repeat(self._null[None], n, axis=0)}

    def drop(self, cond, rng, p):
        return {"tokens": _drop_rows(cond["tokens"], jnp.asarray(self.null(1)["tokens"][0]),
                                     rng, p)}


class TextCondition(_TokenCondition):
    """Captions -> tokens -> text encoder -> context [B, L, width]."""

    kind = "text"

    def __init__(self, cfg):
        super().__init__()
        from ldm_jax.conditioning import tokenizers
        if cfg.text_encoder not in TEXT_ENCODERS:
            raise ConfigError(f"config.conditioning.text_encoder={cfg.text_encoder!r}: use one "
                              f"of {TEXT_ENCODERS}.")
        self.encoder_name = cfg.text_encoder
        self.tokenizer = tokenizers.load_tokenizer(cfg.tokenizer, cfg.tokenizer_path,
                                                   max_length=cfg.max_length)
        self._tokenize = self.tokenizer
        self._empty = ""
        self._frozen = None
        if self.encoder_name == "bert":
            from ldm_jax.conditioning.ldm_bert import LDMBert
            self.module = LDMBert(vocab_size=self.tokenizer.vocab_size, max_length=cfg.max_length,
                                  width=cfg.width, depth=cfg.depth, heads=cfg.heads,
                                  dim_head=cfg.dim_head)
            self.context_dim = int(cfg.width)
        else:
            if not cfg.encoder_path:
                raise ConfigError(f"config.conditioning.text_encoder={self.encoder_name!r} is a "
                                  f"frozen pretrained encoder: set conditioning.encoder_path to "
                                  f"its folder (config.json + model.safetensors).")
            if self.encoder_name == "clip_text":
                from ldm_jax.conditioning.clip_text import load_clip_text as load
            else:
                from ldm_jax.conditioning.hf_bert import load_hf_bert as load
            from ldm_jax.conditioning.tokenizers import resolve_asset_path
            self.module, self._frozen = load(resolve_asset_path(cfg.encoder_path))
            self.context_dim = int(self.module.width)

    def identity(self) -> dict:
        return {"kind": self.kind, "text_encoder": self.encoder_name,
                "tokenizer": self.tokenizer.identity()}

    def condition_fn(self, fields, rng, train):
        caption = fields.get("caption")
        if caption is None:
            raise ConditionError("conditioning.kind='text' needs captions: set data.caption_key "
                                 "(source_data.caption_key when precomputing) to the caption "
                                 "feature, or add <image>.txt files beside a folder's images.")
        if not isinstance(caption, str):
            captions = [c.decode() if isinstance(c, bytes) else str(c) for c in caption]
            if not captions:
                caption = ""
            elif train and rng is not None:
                caption = captions[int(rng.integers(len(captions)))]
            else:
                caption = captions[0]
        elif isinstance(caption, bytes):
            caption = caption.decode()
        return {"tokens": self.tokenize([caption])[0]}

    def init(self, rng):
        if self._frozen is not None:
            return None
        tokens = jnp.zeros((1, self.tokenizer.max_length), jnp.int32)
        return self.module.init({"params": rng}, tokens)["params"]

    def frozen_params(self):
        return self._frozen

    def encode(self, params, frozen, cond):
        weights = frozen if self._frozen is not None else params
        return {"context": self.module.apply({"params": weights}, cond["tokens"])}

    def request(self, num, *, prompts=None, layouts=None, labels=None, class_names=()):
        _refuse(self.kind, layouts=layouts, labels=labels)
        prompts = list(prompts or [""])
        return {"tokens": self.tokenize([prompts[i % len(prompts)] for i in range(num)])}


class LayoutCondition(_TokenCondition):
    """Boxes + box labels -> layout tokens -> the jointly trained 'bert' transformer."""

    kind = "layout"

    def __init__(self, cfg, num_classes: int):
        super().__init__()
        from ldm_jax.conditioning.layout import LayoutTokenizer
        from ldm_jax.conditioning.ldm_bert import LDMBert
        self.tokenizer = LayoutTokenizer(num_classes, grid=cfg.layout_grid,
                                         max_length=cfg.max_length)
        self._tokenize = self.tokenizer
        self._empty = (np.zeros((0,), np.int64), np.zeros((0, 4), np.float32))
        self.module = LDMBert(vocab_size=self.tokenizer.vocab_size, max_length=cfg.max_length,
                              width=cfg.width, depth=cfg.depth, heads=cfg.heads,
                              dim_head=cfg.dim_head)
        self.context_dim = int(cfg.width)

    def identity(self) -> dict:
        return {"kind": self.kind, "tokenizer": self.tokenizer.identity()}

    def condition_fn(self, fields, rng, train):
        if "boxes" not in fields or "box_labels" not in fields:
            raise ConditionError("conditioning.kind='layout' needs boxes: set data.boxes_key and "
                                 "data.box_labels_key (source_data.* when precomputing).")
        layout = (np.asarray(fields["box_labels"], np.int64),
                  np.asarray(fields["boxes"], np.float32).reshape(-1, 4))
        return {"tokens": self.tokenize([layout])[0]}

    def init(self, rng):
        tokens = jnp.zeros((1, self.tokenizer.max_length), jnp.int32)
        return self.module.init({"params": rng}, tokens)["params"]

    def frozen_params(self):
        return None

    def encode(self, params, frozen, cond):
        return {"context": self.module.apply({"params": params}, cond["tokens"])}

    def request(self, num, *, prompts=None, layouts=None, labels=None, class_names=()):
        _refuse(self.kind, prompts=prompts, labels=labels)
        from ldm_jax.conditioning.layout import parse_layout
        parsed = [parse_layout(text, class_names) for text in (layouts or [""])]
        return {"tokens": self.tokenize([parsed[i % len(parsed)] for i in range(num)])}


def parse_labels(text: str, num: int, *, num_classes: int, class_names=None) -> np.ndarray:
    """`--labels` (class ids or class names, comma separated, cycled) -> int32 [num]; empty
    cycles 0, 1, ..., num_classes - 1."""
    if not text.strip():
        return np.arange(num, dtype=np.int32) % num_classes
    names = list(class_names or ())
    ids = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        if item in names:
            ids.append(names.index(item))
            continue
        try:
            ids.append(int(item))
        except ValueError:
            known = f"class names {names}" if names else "no class names (ids only)"
            raise ConditionError(f"--labels: {item!r} is neither a class id in [0, {num_classes}) "
                                f"nor a class name; this model has {known}.") from None
    labels = np.resize(np.asarray(ids, np.int32), num)
    if labels.min() < 0 or labels.max() > num_classes:
        raise ConditionError(f"--labels must lie in [0, {num_classes}] ({num_classes} = the null "
                            f"label for guidance), got {sorted(set(ids))}.")
    return labels



def make_condition(config, *, num_classes: int = 0) -> Any:
    """The condition object of a (resolved) stage-2 config. `num_classes` is the data's label
    (or box-label) class count where the config leaves it to the data."""
    cfg = config.conditioning
    kind = cfg.kind
    if kind == "none":
        return NoCondition()
    if kind == "class":
        return ClassCondition(kind, config.model.num_classes)
    if kind == "class_crossattn":
        return ClassCondition(kind, cfg.num_embed_classes, context_dim=config.model.context_dim)
    if kind == "text":
        return TextCondition(cfg)
    if kind == "layout":
        return LayoutCondition(cfg, cfg.num_layout_classes or num_classes)
    raise ConfigError(f"config.conditioning.kind={kind!r}: use one of {KINDS}.")


def stack_requests(conds: Sequence[dict]) -> dict:
    return {k: np.concatenate([c[k] for c in conds]) for k in (conds[0] if conds else {})}

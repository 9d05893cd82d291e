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

from ldm_jax.conditioning.base import (ConditionError, drop_rows, label_of,  # noqa: F401
                                       refuse)
from ldm_jax.config.loading import ConfigError

COND_STAGE_KEY = "cond_stage_model"
KINDS = ("none", "class", "class_crossattn", "text", "layout", "concat", "hybrid")
CONTEXT_KINDS = ("class_crossattn", "text", "layout")  # what kind='hybrid' can add
TEXT_ENCODERS = ("bert", "clip_text", "hf_bert")


def split_params(params: dict) -> tuple[dict, Optional[dict]]:
    """(UNet params, jointly trained encoder params or None) of a stage-2 parameter tree."""
    if COND_STAGE_KEY not in params:
        return params, None
    unet = {k: v for k, v in params.items() if k != COND_STAGE_KEY}
    return unet, params[COND_STAGE_KEY]


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
        refuse(self.kind, prompts=prompts, layouts=layouts, labels=labels)
        return {}


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
        return {"label": label_of(fields, "data.label_key")}

    def null(self, n):
        return {"label": np.full((n,), self.null_label, np.int32)}

    def drop(self, cond, rng, p):
        return {"label": drop_rows(cond["label"], jnp.int32(self.null_label), rng, p)}

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
        refuse(self.kind, prompts=prompts, layouts=layouts)
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
        return {"tokens": drop_rows(cond["tokens"], jnp.asarray(self.null(1)["tokens"][0]),
                                     rng, p)}


class TextCondition(_TokenCondition):
    """Captions -> tokens -> text encoder -> context [B, L, width].

    With `conditioning.precompute_context` (frozen encoders only) the context is computed once,
    by precompute_latents (`encode_texts`), and stored in the latent shards: batches then carry
    `context` [B, L, width] (one of the example's captions, drawn as captions are) instead of
    `tokens`, `encode` passes it through, and the null condition is the encoded empty prompt.
    The frozen weights then stay out of the jitted steps (`frozen_params()` is None); prompts
    for sampling are encoded on the host by `request`.
    """

    kind = "text"
    FROZEN_ENCODERS = ("clip_text", "hf_bert")
    _ENCODE_ROWS = 64  # most texts per call of the host-side encoder

    @classmethod
    def wants_precomputed_context(cls, cfg) -> bool:
        """`cfg.precompute_context` of a `conditioning` config group, checked: only kind='text'
        with a frozen text encoder can precompute its context."""
        if not cfg.precompute_context:
            return False
        if cfg.kind != "text" or cfg.text_encoder not in cls.FROZEN_ENCODERS:
            raise ConfigError(
                f"config.conditioning.precompute_context=True needs conditioning.kind='text' with "
                f"a frozen text_encoder {cls.FROZEN_ENCODERS}, got kind={cfg.kind!r}, "
                f"text_encoder={cfg.text_encoder!r}; set precompute_context=False.")
        return True

    def __init__(self, cfg, remat: str = "nothing"):
        super().__init__()
        from ldm_jax.conditioning import tokenizers
        if cfg.text_encoder not in TEXT_ENCODERS:
            raise ConfigError(f"config.conditioning.text_encoder={cfg.text_encoder!r}: use one "
                              f"of {TEXT_ENCODERS}.")
        self.precomputed = self.wants_precomputed_context(cfg)
        if self.precomputed:
            self.keys = ("context",)
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
                                  dim_head=cfg.dim_head, remat=remat)
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
        self._host_lock = threading.RLock()  # the host encoder and the null context, built once
        self._host_encoder = None
        self._null_context = None
        self._weights_sha256 = None

    def identity(self) -> dict:
        return {"kind": self.kind, "text_encoder": self.encoder_name,
                "tokenizer": self.tokenizer.identity()}

    def context_identity(self) -> dict:
        """What decides a precomputed context: the frozen encoder (name, sha256 of its weights,
        width) and the token ids it reads (tokenizer identity, max_length). Stored in the
        latents' metadata as `context_encoder` and compared when training reads them."""
        if self._weights_sha256 is None:
            import hashlib
            digest = hashlib.sha256()
            leaves = jax.tree_util.tree_leaves_with_path(self._frozen)
            for path, leaf in sorted(leaves, key=lambda x: jax.tree_util.keystr(x[0])):
                leaf = np.ascontiguousarray(np.asarray(leaf))
                digest.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape}".encode())
                digest.update(leaf.tobytes())
            self._weights_sha256 = digest.hexdigest()
        return {"text_encoder": self.encoder_name, "weights_sha256": self._weights_sha256,
                "width": self.context_dim, "max_length": self.tokenizer.max_length,
                "tokenizer": self.tokenizer.identity()}

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [N, L, width]: `texts` tokenised and run through the frozen encoder on this
        host's first device (jitted; rows padded to a power of two up to _ENCODE_ROWS, so a few
        shapes compile). Used by precompute_latents, the null context and sampling prompts."""
        tokens = self.tokenize(list(texts))
        out = []
        for start in range(0, len(tokens), self._ENCODE_ROWS):
            chunk = tokens[start:start + self._ENCODE_ROWS]
            rows = min(self._ENCODE_ROWS, 1 << (len(chunk) - 1).bit_length())
            padded = np.zeros((rows,) + chunk.shape[1:], np.int32)
            padded[:len(chunk)] = chunk
            out.append(np.asarray(self._host_apply(padded), np.float32)[:len(chunk)])
        if not out:
            return np.zeros((0, self.tokenizer.max_length, self.context_dim), np.float32)
        return np.concatenate(out)

    def _host_apply(self, tokens: np.ndarray):
        # Compiled ahead of time, once per row count: a compiled executable runs at once even
        # when called while a step is being traced (the null context inside init_state).
        with self._host_lock:
            if self._host_encoder is None:
                with jax.ensure_compile_time_eval():  # real arrays, also inside a trace
                    weights = jax.device_put(self._frozen, jax.local_devices()[0])
                self._host_encoder = (weights, {})
            weights, compiled = self._host_encoder
            if tokens.shape not in compiled:
                apply = jax.jit(lambda w, t: self.module.apply({"params": w}, t))
                compiled[tokens.shape] = apply.lower(weights, tokens).compile()
        return compiled[tokens.shape](weights, tokens)

    def null_context(self) -> np.ndarray:
        """float32 [L, width]: the encoded empty prompt (computed once, on the host)."""
        with self._host_lock:
            if self._null_context is None:
                self._null_context = self.encode_texts([self._empty])[0]
        return self._null_context

    @staticmethod
    def _pick(count: int, rng, train: bool) -> Optional[int]:
        """Which of an example's `count` captions conditions it: a random one per epoch in
        training, the first in eval (None: it has none)."""
        if count == 0:
            return None
        if train and rng is not None:
            return int(rng.integers(count))
        return 0

    def condition_fn(self, fields, rng, train):
        if self.precomputed:
            context = fields.get("context")
            if context is None:
                raise ConditionError(
                    "conditioning.precompute_context=True needs latents with a stored context: "
                    "precompute them with it set, or set conditioning.precompute_context=False.")
            context = np.asarray(context, np.float32)
            row = self._pick(len(context), rng, train)
            return {"context": self.null_context() if row is None else context[row]}
        caption = fields.get("caption")
        if caption is None:
            raise ConditionError("conditioning.kind='text' needs captions: set data.caption_key "
                                 "(source_data.caption_key when precomputing) to the caption "
                                 "feature, or add <image>.txt files beside a folder's images.")
        if not isinstance(caption, str):
            captions = [c.decode() if isinstance(c, bytes) else str(c) for c in caption]
            row = self._pick(len(captions), rng, train)
            caption = "" if row is None else captions[row]
        elif isinstance(caption, bytes):
            caption = caption.decode()
        return {"tokens": self.tokenize([caption])[0]}

    def null(self, n):
        if not self.precomputed:
            return super().null(n)
        return {"context": np.repeat(self.null_context()[None], n, axis=0)}

    def drop(self, cond, rng, p):
        if not self.precomputed:
            return super().drop(cond, rng, p)
        return {"context": drop_rows(cond["context"], jnp.asarray(self.null_context()), rng, p)}

    def init(self, rng):
        if self._frozen is not None:
            return None
        tokens = jnp.zeros((1, self.tokenizer.max_length), jnp.int32)
        return self.module.init({"params": rng}, tokens)["params"]

    def frozen_params(self):
        # A precomputed context needs no encoder in the jitted steps.
        return None if self.precomputed else self._frozen

    def encode(self, params, frozen, cond):
        if self.precomputed:
            if "context" not in cond:
                raise ConditionError("conditioning.precompute_context=True: conditions carry the "
                                     "encoded 'context'; build them with condition.request(...) "
                                     "or condition.encode_texts(...), not tokens.")
            return {"context": jnp.asarray(cond["context"], jnp.float32)}
        weights = frozen if self._frozen is not None else params
        return {"context": self.module.apply({"params": weights}, cond["tokens"])}

    def request(self, num, *, prompts=None, layouts=None, labels=None, class_names=()):
        refuse(self.kind, layouts=layouts, labels=labels)
        prompts = list(prompts or [""])
        rows = [prompts[i % len(prompts)] for i in range(num)]
        if self.precomputed:  # encoded here, on the host: the steps hold no text encoder
            unique = list(dict.fromkeys(rows))
            context = self.encode_texts(unique)
            return {"context": context[[unique.index(r) for r in rows]]}
        return {"tokens": self.tokenize(rows)}


class LayoutCondition(_TokenCondition):
    """Boxes + box labels -> layout tokens -> the jointly trained 'bert' transformer."""

    kind = "layout"

    def __init__(self, cfg, num_classes: int, remat: str = "nothing"):
        super().__init__()
        from ldm_jax.conditioning.layout import LayoutTokenizer
        from ldm_jax.conditioning.ldm_bert import LDMBert
        self.tokenizer = LayoutTokenizer(num_classes, grid=cfg.layout_grid,
                                         max_length=cfg.max_length)
        self._tokenize = self.tokenizer
        self._empty = (np.zeros((0,), np.int64), np.zeros((0, 4), np.float32))
        self.module = LDMBert(vocab_size=self.tokenizer.vocab_size, max_length=cfg.max_length,
                              width=cfg.width, depth=cfg.depth, heads=cfg.heads,
                              dim_head=cfg.dim_head, coord_offset=self.tokenizer.coord_offset,
                              coord_grid=self.tokenizer.grid,
                              coord_frequencies=cfg.get("layout_coord_frequencies", 0),
                              remat=remat)
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
        refuse(self.kind, prompts=prompts, labels=labels)
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



def make_condition(config, *, num_classes: int = 0, latents=None, kind: str | None = None) -> Any:
    """The condition object of a (resolved) stage-2 config. `num_classes` is the data's label
    (or box-label) class count where the config leaves it to the data; `latents` (the task's
    LatentContext) is needed by image conditions (kind 'concat' / 'hybrid')."""
    cfg = config.conditioning
    kind = kind or cfg.kind
    if kind in ("concat", "hybrid"):
        from ldm_jax.conditioning import image
        if latents is None:
            raise ConfigError(f"conditioning.kind={kind!r} needs the latents' context "
                              f"(first stage, latent shape) to build its condition.")
        first = latents.first_stage
        image_cond = image.ImageCondition(
            cfg, latent_shape=latents.latent_shape,
            downsampling_factor=first.downsampling_factor if first is not None else 1,
            latent_kind=latents.kind, scale_factor=latents.scale_factor,
            encode_moments=first.encode_moments if first is not None else None,
            num_segmentation_classes=latents.segmentation_classes)
        if kind == "concat":
            return image_cond
        if cfg.context_kind not in CONTEXT_KINDS:
            raise ConfigError(f"config.conditioning.context_kind={cfg.context_kind!r}: "
                              f"kind='hybrid' adds one of {CONTEXT_KINDS}.")
        return image.HybridCondition(image_cond, make_condition(
            config, num_classes=num_classes, latents=latents, kind=cfg.context_kind))
    if kind == "none":
        return NoCondition()
    if kind == "class":
        return ClassCondition(kind, config.model.num_classes)
    if kind == "class_crossattn":
        return ClassCondition(kind, cfg.num_embed_classes, context_dim=config.model.context_dim)
    # The jointly trained transformer (LDMBert) follows the UNet's remat policy.
    remat = config.model.get("remat", "nothing")
    if kind == "text":
        return TextCondition(cfg, remat=remat)
    if kind == "layout":
        return LayoutCondition(cfg, cfg.num_layout_classes or num_classes, remat=remat)
    raise ConfigError(f"config.conditioning.kind={kind!r}: use one of {KINDS}.")


def stack_requests(conds: Sequence[dict]) -> dict:
    return {k: np.concatenate([c[k] for c in conds]) for k in (conds[0] if conds else {})}

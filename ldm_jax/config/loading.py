"""Loading `configs/NAME.py[:variant]` files and applying `--config.key=value` overrides.

ml_collections' own flag machinery reports an unknown key as a bare AttributeError traceback
and cannot override fields whose default is None; this module gives both a clear message that
names the key and the fix, and is used by every command line entry point.
"""

from __future__ import annotations

import ast
import copy
import difflib
import importlib.util
import json
import os
from typing import Any, Iterable, Sequence

import ml_collections

from ldm_jax import UserError
from ldm_jax.config import defaults

# Fields every training config carries: tools (launchers, mesh sweeps) rely on these names.
COMMON_FIELDS = (
    "stage",
    "total_steps",
    "batch_size",
    "seed",
    "log_every_steps",
    "eval_every_steps",
    "checkpoint_every_steps",
    "mesh",
    "data",
    "model",
    "optimizer",
    "loss",
)


# `--config.x=None` (or null) sets an optional field (a string, tuple or unset field) to None.
NONE_SPELLINGS = ("None", "none", "null")


class ConfigError(UserError, ValueError):
    """A config file, variant or override is wrong; the message says what and how to fix it."""


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:arg]` by calling the file's `get_config(arg)`.

    The variant after the colon (e.g. `smoke`) is passed as a string; no colon passes None.
    """
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(
            f"--config={spec}: config file {path!r} does not exist "
            f"(configs live in configs/, e.g. --config=configs/autoencoder_kl_f4_digits.py)."
        )
    module_name = "ldm_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config={spec}: {path!r} defines no get_config(arg) function.")
    config = module.get_config(arg or None)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"--config={spec}: get_config() must return an ml_collections.ConfigDict.")
    return config


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(_all_keys(value, full + "."))
    return keys


def _parse_value(key: str, raw: str, current: Any) -> Any:
    """Parses `raw` into the type of the field's current value, with a clear error."""
    if raw.strip() in NONE_SPELLINGS and (current is None or isinstance(current, (str, tuple, list))):
        return None  # optional fields (keys, paths, implementations): None switches them off.

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"--config.{key}={raw}: expected {expected} (the field's current value is "
                           f"{current!r}); fix the value on the command line.")

    if isinstance(current, bool):
        lowered = raw.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise fail("a boolean (true/false)")
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            raise fail("an integer") from None
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise fail("a number") from None
    if isinstance(current, str):
        return raw
    if isinstance(current, (tuple, list)):
        text = raw.strip()
        if not text:
            return ()
        try:
            value = ast.literal_eval(text if text[0] in "([" else f"({text},)")
        except (ValueError, SyntaxError):
            # A comma separated list of bare words, e.g. --config.x=a,b.
            value = tuple(part.strip() for part in text.strip("()[]").split(",") if part.strip())
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return tuple(value)
    if current is None:
        # Optional fields: a Python literal if it parses, else the string; "" clears.
        if not raw.strip():
            return None
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"--config.{key}={raw}: {key!r} is a group of settings; override its "
                          f"fields instead (e.g. --config.{key}.<field>=...).")
    raise fail(type(current).__name__)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Applies `key.path=value` overrides (the part after `--config.`) in place and returns config.

    Unknown keys raise ConfigError with the closest valid key; values are parsed to the type of
    the existing field.
    """
    valid = _all_keys(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"--config.{item}: an override needs a value, e.g. --config.{key}=VALUE.")
        parts = key.split(".")
        node = config
        for depth, part in enumerate(parts):
            path = ".".join(parts[: depth + 1])
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                close = difflib.get_close_matches(path, valid, n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"--config.{key}: unknown config key {path!r}.{hint} "
                                  f"Valid top-level keys: {', '.join(sorted(config.keys()))}.")
            if depth < len(parts) - 1:
                node = node[part]
        with config.unlocked() if config.is_locked else _null_context():
            node[parts[-1]] = _parse_value(key, raw, node[parts[-1]])
    return config


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.key=value` arguments (returned without the prefix) from the rest."""
    overrides, rest = [], []
    for arg in argv:
        if arg.startswith("--config."):
            overrides.append(arg[len("--config."):])
        else:
            rest.append(arg)
    return overrides, rest


def check_common_fields(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError when a training config lacks one of COMMON_FIELDS."""
    missing = [name for name in COMMON_FIELDS if name not in config]
    if missing:
        raise ConfigError(f"config is missing the common field(s) {', '.join(missing)}; every "
                          f"training config defines {', '.join(COMMON_FIELDS)}.")
    for name in ("total_steps", "batch_size", "log_every_steps", "checkpoint_every_steps"):
        if int(config[name]) <= 0:
            raise ConfigError(f"config.{name}={config[name]} must be a positive integer.")


def to_json_dict(config: ml_collections.ConfigDict) -> dict:
    """A JSON-serialisable plain dict of the config (tuples become lists)."""
    return ml_collections.ConfigDict(config).to_dict()


# Fields the models and the pipeline take as tuples; JSON stores them as lists.
_TUPLE_FIELDS = {"model": ("ch_mult", "attn_resolutions", "attention_resolutions", "channel_mult"),
                 "data": ("latent_shape",), "source_data": ("latent_shape",),
                 "conditioning": ("class_names",)}


def config_from_json(config_json: dict) -> ml_collections.ConfigDict:
    """The inverse of `to_json_dict`: a ConfigDict with its tuple fields as tuples again, and
    with every field added to the defaults since the config was saved filled in (the one place
    old run directories and bundles are brought up to date; see `defaults.complete`).

    The tuples are restored in the plain dict, before the ConfigDict exists: a ConfigDict keeps
    a field's first type, so assigning a tuple to a field that was built as a list leaves a list.
    """
    config_json = defaults.complete(json.loads(json.dumps(config_json)))
    for group, keys in _TUPLE_FIELDS.items():
        fields = config_json.get(group)
        if isinstance(fields, dict):
            for key in keys:
                if isinstance(fields.get(key), list):
                    fields[key] = tuple(fields[key])
    return ml_collections.ConfigDict(config_json)


# Groups a trained model's saved config may change when it is sampled or evaluated.
INFERENCE_OVERRIDABLE = ("mesh", "sampling")


def check_inference_overrides(overrides: Iterable[str]) -> None:
    """Raises ConfigError unless every override is in INFERENCE_OVERRIDABLE (checked before a
    run is loaded, so the mistake is reported first)."""
    for item in overrides:
        group = item.split("=", 1)[0].split(".", 1)[0]
        if group not in INFERENCE_OVERRIDABLE:
            raise ConfigError(
                f"--config.{item}: a trained model's config is fixed; only "
                f"{', '.join(g + '.*' for g in INFERENCE_OVERRIDABLE)} can be set here (e.g. "
                f"--config.mesh.fsdp=2, --config.sampling.num_steps=100).")


def apply_inference_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]
                              ) -> ml_collections.ConfigDict:
    """`--config.key=value` for commands that use a trained model (sample, evaluate): only the
    mesh and the sampling settings may change; the model is what was trained. The mesh starts
    from the default (data parallel over every device here), not from the training run's: a
    run trained on a pod must sample on a laptop."""
    overrides = list(overrides)
    check_inference_overrides(overrides)
    config = copy.deepcopy(config)  # the caller's config stays as saved
    config.mesh = defaults.base_config().mesh
    return apply_overrides(config, overrides)

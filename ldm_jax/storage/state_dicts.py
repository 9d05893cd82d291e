"""Nested state dicts as loaded from checkpoints: flattening to dotted names and back, and
finding the model's state dict inside training wrappers (Lightning's {'state_dict': ...},
{'model': ...}, ...). Re-exported by `ldm_jax.storage.weights_io`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np


def flatten_state_dict(tree: Any, sep: str = ".", prefix: str = "") -> Dict[str, Any]:
    """Flatten nested mappings into ``{"a.b.c": leaf}`` (non-mapping values are leaves)."""
    out: Dict[str, Any] = {}
    if not isinstance(tree, Mapping):
        return {prefix: tree} if prefix else {"": tree}
    for k, v in tree.items():
        name = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten_state_dict(v, sep, name))
        else:
            out[name] = v
    return out


def unflatten_state_dict(flat: Mapping[str, Any], sep: str = ".") -> Dict[str, Any]:
    """The inverse of `flatten_state_dict`: ``{"a.b.c": leaf}`` -> nested dicts."""
    tree: Dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(sep)
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "params")


def _has_arrays(tree: Any) -> bool:
    return isinstance(tree, Mapping) and any(
        isinstance(v, np.ndarray) or _has_arrays(v) for v in tree.values())


def find_state_dict(obj: Any, key: Optional[Union[str, Sequence[str]]] = None) -> Mapping:
    """Locate the (possibly nested) state dict inside a loaded checkpoint.

    Args:
      obj: result of :func:`load_torch_checkpoint` (or any nested mapping).
      key: explicit path, e.g. ``"state_dict"`` or ``"ema/state_dict"`` / ``("ema", "model")``.
        Without it, the first of ``state_dict, model_state_dict, model, module, net, params``
        that is a mapping containing arrays is used, else ``obj`` itself if it holds arrays.
    """
    if key is not None:
        parts = key.split("/") if isinstance(key, str) else list(key)
        cur = obj
        for i, part in enumerate(parts):
            if not isinstance(cur, Mapping) or part not in cur:
                have = sorted(map(str, cur.keys())) if isinstance(cur, Mapping) else type(cur)
                raise KeyError(f"checkpoint has no entry {'/'.join(parts[:i + 1])!r}; "
                               f"available: {have}")
            cur = cur[part]
        if not isinstance(cur, Mapping):
            raise ValueError(f"checkpoint entry {key!r} is a {type(cur).__name__}, not a mapping")
        return cur
    if isinstance(obj, Mapping):
        for k in _WRAPPER_KEYS:
            if isinstance(obj.get(k), Mapping) and _has_arrays(obj[k]):
                return obj[k]
        if _has_arrays(obj):
            return obj
    have = sorted(map(str, obj.keys())) if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(f"could not locate a state dict in the checkpoint (top level: {have}); "
                     "pass key=... explicitly")

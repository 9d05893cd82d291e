"""Shared machinery of the weight converters: a declarative leaf map and its two directions.

Every converter describes a model as a list of `Leaf` entries, produced by walking the model's
structure exactly as the ldm_jax module builds it. A leaf names one flax module (its path in the
params tree and what it holds) and the same module's key prefix in the two PyTorch layouts
(CompVis and diffusers), each with its tensor format. `to_flax` and `from_flax` then convert a
whole state dict in either direction; every key must be consumed and every leaf found, otherwise
the error lists the offending names (nothing is dropped silently).

Tensor layouts: torch conv OIHW <-> flax HWIO; torch Linear [out, in] <-> flax Dense [in, out];
a 1x1 conv (conv1d / conv2d) stands in for a Linear where one side uses it.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ldm_jax import UserError


class ConversionError(UserError, ValueError):
    """Weights or a config cannot be converted; the message names the key / option and the fix."""


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One module of the map.

    ldm: path of the flax module in the params tree.
    kind: what the flax module holds: 'conv' (kernel HWIO [+ bias]), 'dense' (kernel [in, out]
      [+ bias]), 'conv1x1' (a 1x1 flax Conv fed from a torch Linear / 1x1 conv), 'norm'
      (scale, bias), 'embed' (embedding).
    cv / df: key prefix in the CompVis / diffusers state dict.
    cv_fmt / df_fmt: torch tensor format there: 'conv', 'linear', 'conv1x1' / 'conv1d' (a
      kernel-1 conv2d / conv1d used as a matrix), 'norm', 'embed', or 'qkv_split' (diffusers' separate
      to_q/to_k/to_v Linears of an attention whose flax side is one fused legacy-order qkv).
    bias: whether the module has a bias.
    heads: number of heads ('qkv_split' only).
    """

    ldm: Tuple[str, ...]
    kind: str
    cv: str
    cv_fmt: str
    df: str
    df_fmt: str
    bias: bool = True
    heads: int = 0


def leaf(ldm: str, kind: str, cv: str, df: str, cv_fmt: Optional[str] = None,
         df_fmt: Optional[str] = None, bias: bool = True, heads: int = 0) -> Leaf:
    """`Leaf` with '/'-separated flax path; torch formats default from the flax kind."""
    default = {"conv": "conv", "dense": "linear", "conv1x1": "conv1x1", "norm": "norm",
               "embed": "embed"}[kind]
    return Leaf(tuple(ldm.split("/")), kind, cv, cv_fmt or default, df, df_fmt or default,
                bias, heads)


# ------------------------------------------------------------------------------------------------
# torch side: read / write one leaf in a "canonical" form
#   conv: (W [O,I,kh,kw], b)   matrix: (W [O,I], b)   norm: (w, b)   embed: (W,)
# ------------------------------------------------------------------------------------------------

class _Reader:
    """Pulls tensors out of a flat state dict, remembering used keys and missing ones."""

    def __init__(self, sd: Mapping[str, np.ndarray], what: str):
        self.sd, self.what = sd, what
        self.used: set = set()
        self.missing: List[str] = []

    def get(self, key: str) -> Optional[np.ndarray]:
        if key not in self.sd:
            self.missing.append(key)
            return None
        self.used.add(key)
        return np.asarray(self.sd[key])

    def shape_error(self, key: str, shape, expected: str) -> ConversionError:
        return ConversionError(f"{self.what}: '{key}' has shape {tuple(shape)}, expected "
                               f"{expected}; the checkpoint does not match the config.")


def _read_torch(r: _Reader, prefix: str, fmt: str, bias: bool, heads: int):
    if fmt == "norm":
        return r.get(prefix + ".weight"), r.get(prefix + ".bias")
    if fmt == "embed":
        return (r.get(prefix + ".weight"),)
    if fmt == "qkv_split":
        parts = [r.get(f"{prefix}.to_{s}.weight") for s in "qkv"]
        biases = [r.get(f"{prefix}.to_{s}.bias") for s in "qkv"] if bias else [None] * 3
        if any(p is None for p in parts) or (bias and any(b is None for b in biases)):
            return None, None
        c_out, c_in = parts[0].shape
        d = c_out // heads
        # Legacy CompVis order of the fused qkv output channels: per head [q, k, v].
        w = np.stack([p.reshape(heads, d, c_in) for p in parts], axis=1).reshape(3 * c_out, c_in)
        b = (np.stack([x.reshape(heads, d) for x in biases], axis=1).reshape(3 * c_out)
             if bias else None)
        return w, b
    w = r.get(prefix + ".weight")
    b = r.get(prefix + ".bias") if bias else None
    if w is None:
        return None, b
    if fmt == "conv" and w.ndim != 4:
        raise r.shape_error(prefix + ".weight", w.shape, "a 4-d conv weight [O, I, kh, kw]")
    if fmt == "linear" and w.ndim != 2:
        raise r.shape_error(prefix + ".weight", w.shape, "a 2-d Linear weight [out, in]")
    if fmt in ("conv1x1", "conv1d"):
        if w.ndim < 3 or any(s != 1 for s in w.shape[2:]):
            raise r.shape_error(prefix + ".weight", w.shape, "a 1x1 conv weight [O, I, 1(, 1)]")
        w = w.reshape(w.shape[0], w.shape[1])
    return w, b


def _write_torch(canon, prefix: str, fmt: str, bias: bool, heads: int, out: Dict[str, np.ndarray]) -> None:
    if fmt == "norm":
        out[prefix + ".weight"], out[prefix + ".bias"] = canon
        return
    if fmt == "embed":
        out[prefix + ".weight"] = canon[0]
        return
    w, b = canon
    if fmt == "qkv_split":
        c3, c_in = w.shape
        c_out = c3 // 3
        d = c_out // heads
        w = w.reshape(heads, 3, d, c_in)
        for i, s in enumerate("qkv"):
            out[f"{prefix}.to_{s}.weight"] = np.ascontiguousarray(w[:, i].reshape(c_out, c_in))
            if bias:
                out[f"{prefix}.to_{s}.bias"] = np.ascontiguousarray(
                    b.reshape(heads, 3, d)[:, i].reshape(c_out))
        return
    if fmt in ("conv1x1", "conv1d"):
        w = w.reshape(w.shape + (1,) * (2 if fmt == "conv1x1" else 1))
    out[prefix + ".weight"] = np.ascontiguousarray(w)
    if bias:
        out[prefix + ".bias"] = b


# ------------------------------------------------------------------------------------------------
# flax side
# ------------------------------------------------------------------------------------------------

def _to_flax_leaf(canon, kind: str, bias: bool) -> Dict[str, np.ndarray]:
    f32 = lambda a: np.asarray(a, np.float32)
    if kind == "norm":
        return {"scale": f32(canon[0]), "bias": f32(canon[1])}
    if kind == "embed":
        return {"embedding": f32(canon[0])}
    w, b = canon
    if kind == "conv":
        kernel = np.transpose(w, (2, 3, 1, 0))
    elif kind == "dense":
        kernel = w.T
    else:  # conv1x1
        kernel = w.T[None, None]
    d = {"kernel": f32(kernel)}
    if bias:
        d["bias"] = f32(b)
    return d


def _from_flax_leaf(node: Mapping, kind: str, bias: bool):
    if kind == "norm":
        return np.asarray(node["scale"]), np.asarray(node["bias"])
    if kind == "embed":
        return (np.asarray(node["embedding"]),)
    k = np.asarray(node["kernel"])
    if kind == "conv":
        w = np.transpose(k, (3, 2, 0, 1))
    elif kind == "dense":
        w = k.T
    else:
        w = k[0, 0].T
    return w, (np.asarray(node["bias"]) if bias else None)


def _node(tree: Mapping, path: Sequence[str], create: bool = False):
    for p in path:
        if p not in tree:
            if not create:
                raise KeyError("/".join(path))
            tree[p] = {}
        tree = tree[p]
    return tree


def _side(lf: Leaf, layout: str) -> Tuple[str, str]:
    if layout == "compvis":
        return lf.cv, lf.cv_fmt
    if layout == "diffusers":
        return lf.df, lf.df_fmt
    raise ValueError(f"layout must be 'compvis' or 'diffusers', got {layout!r}")


def _fmt_list(names: Iterable[str], limit: int = 40) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _incomplete(canon, fmt: str, bias: bool) -> bool:
    if fmt in ("norm", "embed"):
        return any(c is None for c in canon)
    return canon[0] is None or (bias and canon[1] is None)


def to_flax(state_dict: Mapping[str, np.ndarray], leaves: Sequence[Leaf], layout: str,
            what: str) -> dict:
    """Convert a flat torch state dict (layout 'compvis' or 'diffusers') to a flax params tree.

    Raises ConversionError listing every missing key and every key the map does not consume.
    """
    r = _Reader(state_dict, what)
    params: dict = {}
    for lf in leaves:
        prefix, fmt = _side(lf, layout)
        canon = _read_torch(r, prefix, fmt, lf.bias, lf.heads)
        if _incomplete(canon, fmt, lf.bias):
            continue  # recorded as missing; reported below with all the others
        parent = _node(params, lf.ldm[:-1], create=True)
        parent[lf.ldm[-1]] = _to_flax_leaf(canon, lf.kind, lf.bias)
    unknown = set(state_dict) - r.used
    problems = []
    if r.missing:
        problems.append(f"missing keys ({len(r.missing)}): {_fmt_list(r.missing)}")
    if unknown:
        problems.append(f"unexpected keys ({len(unknown)}): {_fmt_list(unknown)}")
    if problems:
        raise ConversionError(f"{what}: the weights do not match the {layout} layout of this "
                              f"config; " + "; ".join(problems))
    return params


def from_flax(params: Mapping, leaves: Sequence[Leaf], layout: str,
              what: str) -> Dict[str, np.ndarray]:
    """Convert a flax params tree to a flat torch state dict (float32 numpy arrays).

    Raises ConversionError naming params the map does not cover (or lacks).
    """
    out: Dict[str, np.ndarray] = {}
    seen = set()
    missing = []
    for lf in leaves:
        prefix, fmt = _side(lf, layout)
        try:
            node = _node(params, lf.ldm)
        except KeyError:
            missing.append("/".join(lf.ldm))
            continue
        seen.add(lf.ldm)
        canon = _from_flax_leaf(node, lf.kind, lf.bias)
        _write_torch(canon, prefix, fmt, lf.bias, lf.heads, out)
    extra = [p for p in _module_paths(params) if p not in seen]
    if missing or extra:
        raise ConversionError(f"{what}: the params tree does not match its config; missing "
                              f"modules: {_fmt_list('/'.join(p) for p in missing) or 'none'}; "
                              f"unmapped modules: {_fmt_list('/'.join(p) for p in extra) or 'none'}")
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def _module_paths(tree: Mapping, prefix: Tuple[str, ...] = ()) -> List[Tuple[str, ...]]:
    """Paths of the modules that directly hold arrays."""
    paths = []
    if any(not isinstance(v, Mapping) for v in tree.values()):
        paths.append(prefix)
    for k, v in tree.items():
        if isinstance(v, Mapping):
            paths.extend(_module_paths(v, prefix + (k,)))
    return paths

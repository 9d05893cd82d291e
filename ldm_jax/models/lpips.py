"""LPIPS perceptual distance (Zhang et al., CVPR 2018), VGG16 variant "v0.1", in Flax linen.

This is the perceptual loss used by the LDM autoencoder (taming-transformers' ``LPIPS``), with
the same architecture as the ``lpips`` package's ``LPIPS(net='vgg')``:

  x in [-1, 1] --scaling layer--> VGG16 conv stack --> relu1_2, relu2_2, relu3_3, relu4_3,
  relu5_3 --> unit-normalise over channels --> (f(x) - f(y))^2 --> 1x1 "lin" layer (no bias)
  --> spatial mean --> sum over the 5 layers --> distance per image.

Weights come from two public files, converted on load (OIHW -> HWIO):

* torchvision ``vgg16-397923af.pth`` (ImageNet VGG16; ``features.N.weight/bias``, the
  ``classifier.*`` keys are ignored);
* the lpips package's ``lpips/weights/v0.1/vgg.pth`` (``lin{k}.model.1.weight``, [1, C, 1, 1]).

Both are legacy (pre torch 1.6) pickles; :mod:`ldm_jax.storage.weights_io` reads them without torch and
without executing pickled code. The state dict of a full ``lpips.LPIPS`` module
(``net.slice{s}.N.weight`` keys) is accepted too.
:func:`save_lpips_params_npz` writes one combined file whose keys are the Flax parameter paths
joined by ``/`` (table below), which :func:`load_lpips_params` reads back directly.

Conv layer naming (torchvision ``features.N`` -> Flax module ``vgg/<name>``)::

    features.0  -> conv1_1    features.10 -> conv3_1    features.21 -> conv4_3
    features.2  -> conv1_2    features.12 -> conv3_2    features.24 -> conv5_1
    features.5  -> conv2_1    features.14 -> conv3_3    features.26 -> conv5_2
    features.7  -> conv2_2    features.17 -> conv4_1    features.28 -> conv5_3
                              features.19 -> conv4_2

Combined-file keys: ``vgg/conv{s}_{j}/kernel`` [3, 3, in, out] (HWIO), ``vgg/conv{s}_{j}/bias``
[out], ``lin{k}/kernel`` [C_k, 1] for k = 0..4 with C = 64, 128, 256, 512, 512.
"""

from __future__ import annotations

import argparse
import functools
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.conv import Conv
from ldm_jax.storage import weights_io
from ldm_jax.storage.weights_io import load_weights, save_safetensors, unflatten_state_dict

PathLike = Union[str, "os.PathLike[str]"]

# (channels, number of 3x3 convs) per VGG16 stage; a 2x2 max-pool precedes stages 2..5.
VGG16_STAGES: Tuple[Tuple[int, int], ...] = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
VGG16_CONV_NAMES: Tuple[str, ...] = tuple(
    f"conv{s + 1}_{j + 1}" for s, (_, n) in enumerate(VGG16_STAGES) for j in range(n))
# Index of each conv inside torchvision's ``vgg16().features`` Sequential (ReLUs and pools
# occupy the other indices), in the same order as VGG16_CONV_NAMES.
TORCHVISION_CONV_INDICES: Tuple[int, ...] = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
TORCHVISION_TO_FLAX: Dict[int, str] = dict(zip(TORCHVISION_CONV_INDICES, VGG16_CONV_NAMES))
LPIPS_CHANNELS: Tuple[int, ...] = tuple(c for c, _ in VGG16_STAGES)
# ImageNet statistics re-expressed for inputs in [-1, 1] (values of the lpips ScalingLayer).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_LIN_HINT = ("lpips/weights/v0.1/vgg.pth from the lpips package "
                  "(richzhang/PerceptualSimilarity)")


def _max_pool_2x2(x: jax.Array) -> jax.Array:
    """torch's MaxPool2d(2, 2) (odd sizes floored, like VALID padding) as a max over a reshape.

    Same values as nn.max_pool. Its gradient is elementwise (the window's maximum gets it)
    where reduce_window's builds iotas of the input's shape to pick the arg max: 45 ms of a
    first-stage step at 64 px on CPU. The two differ only on exact ties inside a window, where
    this one splits the gradient; in VGG ties are ReLU zeros, whose gradient is 0 either way."""
    b, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2]
    return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


class VGG16Features(nn.Module):
    """torchvision VGG16 ``features`` conv stack (NHWC); returns the 5 stage-final ReLU maps.

    Outputs (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) at strides 1, 2, 4, 8, 16. The final
    max-pool of torchvision's stack (features.30) is omitted because LPIPS never uses it.
    """

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> Tuple[jax.Array, ...]:
        x = x.astype(self.dtype)
        outs = []
        names = iter(VGG16_CONV_NAMES)
        for stage, (channels, n_convs) in enumerate(VGG16_STAGES):
            if stage > 0:
                x = _max_pool_2x2(x)
            for _ in range(n_convs):
                # ldm_jax's Conv (same parameters) unless a precision is asked for: on CPU the
                # input gradient (all a frozen LPIPS needs) then takes the kernel's flipped
                # weights from a C++ copy, not from XLA's transpose (~45 ms of a first-stage
                # step at 64 px went to those of VGG's 512-channel layers).
                if self.precision is None:
                    conv = Conv(channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                                param_dtype=self.param_dtype, name=next(names))
                else:
                    conv = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                                   param_dtype=self.param_dtype, precision=self.precision,
                                   name=next(names))
                x = conv(x)
                x = nn.relu(x)
            outs.append(x)
        return tuple(outs)


def _unit_normalize(f: jax.Array) -> jax.Array:
    """f / (||f||_2 over channels + eps), with a NaN-free gradient where ||f|| == 0.

    A plain sqrt has an infinite derivative at 0 and all-zero ReLU columns do occur, which
    would give 0 * inf = NaN gradients; the forward value is unchanged by the guard.
    """
    sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return f / (norm + _EPS)


class LPIPS(nn.Module):
    """LPIPS-VGG distance between two image batches in [-1, 1], NHWC -> [B] (float32).

    ``dtype`` is the compute dtype of the VGG convolutions (e.g. bfloat16 to save memory); the
    normalisation and reductions always run in float32 because the 1e-10 epsilon and the sum of
    squares over 512 channels are not representable / overflow-safe in half precision.
    ``precision`` is passed to the convs (e.g. ``"highest"`` to avoid TF32 on GPUs).
    A freshly initialised LPIPS is not a meaningful metric; load weights with
    :func:`load_lpips_params`. (The random init keeps the lin weights non-negative like the
    shipped ones so that distances stay >= 0.)
    """

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS expects two [B, H, W, 3] batches, got {x.shape}, {y.shape}")
        shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
        scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
        batch = x.shape[0]
        # One VGG pass over both inputs (bigger, fewer convs; half the HLO to compile).
        xy = (jnp.concatenate([x, y], axis=0).astype(jnp.float32) - shift) / scale
        feats = VGG16Features(self.dtype, self.param_dtype, self.precision, name="vgg")(xy)
        total = jnp.zeros((batch,), jnp.float32)
        for k, (f, channels) in enumerate(zip(feats, LPIPS_CHANNELS)):
            f = _unit_normalize(f.astype(jnp.float32))
            diff = jnp.square(f[:batch] - f[batch:])
            lin = nn.Dense(1, use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype,
                           precision=self.precision,
                           kernel_init=nn.initializers.constant(1.0 / channels),
                           name=f"lin{k}")
            total = total + jnp.mean(lin(diff), axis=(1, 2, 3))
        return total


# --------------------------------------------------------------------------------------------
# Weight conversion
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _expected_shapes() -> Dict[str, Tuple[int, ...]]:
    """Flax parameter path ('/'-joined) -> shape, for the whole LPIPS model."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    names = iter(VGG16_CONV_NAMES)
    c_in = 3
    for channels, n_convs in VGG16_STAGES:
        for _ in range(n_convs):
            name = next(names)
            shapes[f"vgg/{name}/kernel"] = (3, 3, c_in, channels)
            shapes[f"vgg/{name}/bias"] = (channels,)
            c_in = channels
    for k, channels in enumerate(LPIPS_CHANNELS):
        shapes[f"lin{k}/kernel"] = (channels, 1)
    return shapes


def _resolve_key(key: str) -> Optional[Tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """Map a source key to (flax path, converter); None if unknown. '' path means 'ignore'."""
    ident = lambda a: a  # noqa: E731
    if key in _expected_shapes():  # already the combined Flax layout
        return key, ident
    parts = key.split(".")
    if key.startswith("classifier.") or key.startswith("scaling_layer."):
        return "", ident  # VGG classifier head / lpips constant buffers: not used
    if (len(parts) == 3 and parts[0] == "features") or (
            len(parts) == 4 and parts[0] == "net" and parts[1].startswith("slice")):
        idx, leaf = parts[-2], parts[-1]
        if not (idx.isdigit() and int(idx) in TORCHVISION_TO_FLAX and leaf in ("weight", "bias")):
            return None
        name = TORCHVISION_TO_FLAX[int(idx)]
        if leaf == "weight":
            return f"vgg/{name}/kernel", lambda a: np.transpose(a, (2, 3, 1, 0))  # OIHW -> HWIO
        return f"vgg/{name}/bias", ident
    # lin{k}.model.1.weight (lpips wraps the 1x1 conv after a Dropout; .0 without dropout)
    if (len(parts) == 4 and parts[0].startswith("lin") and parts[0][3:].isdigit()
            and parts[1] == "model" and parts[2] in ("0", "1") and parts[3] == "weight"
            and int(parts[0][3:]) < len(LPIPS_CHANNELS)):
        return f"{parts[0]}/kernel", lambda a: a.reshape(a.shape[0], a.shape[1]).T  # [1,C,1,1]
    return None


def lpips_params_from_state_dict(state_dict: Mapping[str, Any], source: str = "weights"
                                 ) -> Dict[str, Any]:
    """Convert a flat state dict (torch layout, lpips layout or combined Flax layout) to params.

    Raises ValueError listing unknown keys, missing parameters, duplicates and shape mismatches.
    """
    expected = _expected_shapes()
    flat: Dict[str, np.ndarray] = {}
    unknown, duplicate, bad_shape = [], [], []
    for key, value in state_dict.items():
        resolved = _resolve_key(str(key))
        if resolved is None:
            unknown.append(str(key))
            continue
        path, convert = resolved
        if not path:
            continue
        arr = np.asarray(value)
        want_src = _source_shape(key, expected[path])
        if arr.shape != want_src:
            bad_shape.append(f"{key}: {arr.shape} (expected {want_src})")
            continue
        if path in flat:
            duplicate.append(f"{key} (-> {path})")
        flat[path] = np.asarray(convert(arr), dtype=np.float32)
    missing = [p for p in expected if p not in flat]
    problems = []
    if unknown:
        problems.append(f"unknown keys {sorted(unknown)}")
    if missing:
        problems.append(f"missing parameters {missing}")
    if duplicate:
        problems.append(f"parameters given twice {duplicate}")
    if bad_shape:
        problems.append(f"wrong shapes {bad_shape}")
    if problems:
        raise ValueError(f"Cannot build LPIPS params from {source}: " + "; ".join(problems)
                         + f". Expected torchvision '{os.path.basename(VGG16_URL)}' + "
                         f"{LPIPS_LIN_HINT}, or a combined file from save_lpips_params_npz.")
    return unflatten_state_dict(flat, sep="/")


def _source_shape(key: str, flax_shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """Shape a source tensor must have, given the Flax shape it converts to."""
    if key.count("/"):
        return flax_shape
    if key.endswith(".weight") and len(flax_shape) == 4:  # conv OIHW
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if key.endswith(".weight"):  # lin [1, C, 1, 1]
        return (1, flax_shape[0], 1, 1)
    return flax_shape


def load_lpips_params(vgg_path: PathLike, lin_path: Optional[PathLike] = None
                      ) -> Dict[str, Any]:
    """Load LPIPS-VGG params (the contents of the ``'params'`` collection).

    Args:
      vgg_path: torchvision ``vgg16-397923af.pth`` -- or, with ``lin_path=None``, one combined
        file (``.npz``/``.safetensors`` from :func:`save_lpips_params_npz`, or any weight file
        holding both parts).
      lin_path: the lpips package's ``weights/v0.1/vgg.pth`` (lin heads).
    """
    state = dict(load_weights(vgg_path))
    sources = [os.fspath(vgg_path)]
    if lin_path is not None:
        lin = load_weights(lin_path)
        overlap = sorted(set(state) & set(lin))
        if overlap:
            raise ValueError(f"'{vgg_path}' and '{lin_path}' both define {overlap}")
        state.update(lin)
        sources.append(os.fspath(lin_path))
    return lpips_params_from_state_dict(state, source=" + ".join(f"'{s}'" for s in sources))


def _flatten_params(params: Mapping[str, Any], prefix: str = "") -> Dict[str, np.ndarray]:
    out: Dict[str, np.ndarray] = {}
    for k, v in params.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten_params(v, name))
        else:
            out[name] = np.asarray(v, dtype=np.float32)
    return out


def _unwrap(params: Mapping[str, Any]) -> Mapping[str, Any]:
    return params["params"] if set(params) == {"params"} else params


def save_lpips_params_npz(params: Mapping[str, Any], path: PathLike) -> None:
    """Write params as one combined file (``.npz``, or ``.safetensors`` by suffix).

    Keys are the '/'-joined Flax paths documented in the module docstring.
    """
    flat = _flatten_params(_unwrap(params))
    lpips_params_from_state_dict(flat, source="params to save")  # validate before writing
    if os.fspath(path).endswith(".safetensors"):
        save_safetensors(flat, path, metadata={"format": "ldm_jax.lpips_vgg.v1"})
    else:
        with open(os.fspath(path), "wb") as f:  # file object: np.savez would append '.npz'
            np.savez(f, **flat)


def make_lpips_fn(params: Mapping[str, Any], dtype: Any = jnp.float32
                  ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Return a pure ``lpips(x, y) -> [B]`` (NHWC inputs in [-1, 1]) with params bound.

    The params are frozen with ``stop_gradient`` so the function can be used as a loss inside
    ``jax.jit``/``jax.grad`` w.r.t. the images only.

    The result is a ``jax.tree_util.Partial`` (a pytree whose leaves are the params). Closing
    over it inside a jitted function works, but embeds the ~59 MB of VGG weights as compile-time
    constants; passing it *as an argument* of the jitted function (or keeping it in the train
    state) makes them ordinary device inputs, which compiles much faster.
    """
    params = jax.tree_util.tree_map(jnp.asarray, dict(_unwrap(params)))
    return jax.tree_util.Partial(functools.partial(_apply_lpips, dtype=dtype), params)


def _apply_lpips(params: Mapping[str, Any], x: jax.Array, y: jax.Array, *, dtype: Any
                 ) -> jax.Array:
    return LPIPS(dtype=dtype).apply({"params": jax.lax.stop_gradient(params)}, x, y)


_FIELD_HELP = (
    "Set '{field}' to either (a) the two public files, comma separated: torchvision's ImageNet "
    "VGG16 weights 'vgg16-397923af.pth' ({url}) and the LPIPS linear heads 'vgg.pth' ({lin}), "
    "e.g. {field}=/path/vgg16-397923af.pth,/path/vgg.pth; or (b) one combined file converted "
    "once with `python -m ldm_jax.models.lpips --vgg vgg16-397923af.pth --lin vgg.pth "
    "--out lpips_vgg.npz`, e.g. {field}=/path/lpips_vgg.npz.")


def require_lpips_weights(path_or_none: Union[None, PathLike, Sequence[PathLike]],
                          field_name: str) -> Tuple[str, Optional[str]]:
    """Validate a config value naming the LPIPS weights; return ``(vgg_path, lin_path|None)``.

    Accepts a combined file, ``"vgg.pth,lin.pth"`` or a 2-sequence. Raises ValueError saying
    which files to supply (and naming ``field_name``) when unset, FileNotFoundError when a
    named file does not exist. Use as ``load_lpips_params(*require_lpips_weights(v, name))``.
    """
    hint = _FIELD_HELP.format(field=field_name, url=VGG16_URL, lin=LPIPS_LIN_HINT)
    if isinstance(path_or_none, (str, os.PathLike)):
        paths = [p.strip() for p in os.fspath(path_or_none).split(",") if p.strip()]
    elif path_or_none is None:
        paths = []
    else:
        paths = [os.fspath(p) for p in path_or_none]
    if not paths:
        raise weights_io.WeightsConfigError(f"The LPIPS perceptual loss needs pretrained weights, but config field "
                         f"'{field_name}' is not set. " + hint)
    if len(paths) > 2:
        raise weights_io.WeightsConfigError(f"'{field_name}' names {len(paths)} files; expected 1 or 2. " + hint)
    for p in paths:
        if not os.path.isfile(p):
            raise weights_io.MissingWeightsError(f"LPIPS weight file '{p}' (from '{field_name}') does not "
                                    "exist. " + hint)
    return paths[0], (paths[1] if len(paths) == 2 else None)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """CLI: convert the two public torch files into one combined .npz/.safetensors."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--vgg", required=True, help="torchvision vgg16-397923af.pth")
    ap.add_argument("--lin", required=True, help="lpips package weights/v0.1/vgg.pth")
    ap.add_argument("--out", required=True, help="output .npz or .safetensors")
    args = ap.parse_args(argv)
    save_lpips_params_npz(load_lpips_params(args.vgg, args.lin), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""FID Inception-v3 (the TF-FID / pytorch-fid network) in Flax, and the feature-extractor interface.

The network is the "FID Inception" of pytorch-fid (``pytorch_fid.inception.InceptionV3`` with
``use_fid_inception=True``): torchvision's Inception-v3 graph, 1008 output classes, no aux head,
with the quirks of the 2015-12-05 TF graph the FID was defined on:

* ``Mixed_5b/5c/5d`` (InceptionA), ``Mixed_6b..6e`` (InceptionC) and ``Mixed_7b`` (InceptionE)
  average-pool their pool branch with ``count_include_pad=False`` (TF's 'SAME' average pool
  divides by the number of real pixels);
* ``Mixed_7c`` (the last InceptionE) *max*-pools its pool branch (3x3, stride 1, pad 1);
* every conv is conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU.

Features are the 2048-d "pool3" output (global average pool after ``Mixed_7c``), exactly what
pytorch-fid's ``InceptionV3([3])`` returns. ``logits`` are ``fc`` (2048 -> 1008) applied to pool3:
the TF-IS reference scores the softmax over all 1008 outputs (index 0 is a "background" class and
1001..1007 are unused), and so does :func:`~ldm_jax.evaluation.statistics.inception_score` when
given these logits.

Preprocessing (input mapping): our extractor takes NHWC images in ``[-1, 1]``; pytorch-fid takes
NCHW images in ``[0, 1]``. We map ``x01 = (x + 1) / 2``, resize ``x01`` to 299x299 with a
bilinear resize that reproduces ``F.interpolate(mode='bilinear', align_corners=False)`` (no
antialiasing, also when downsampling; source index ``(dst + 0.5) * in/out - 0.5`` clamped at 0,
computed in float32 like torch), then ``2 * x01 - 1`` -- the same operations in the same order
as pytorch-fid with ``resize_input=True, normalize_input=True``. Values outside the range are not
clipped (pytorch-fid does not clip either). One-channel images are repeated to RGB.

Weights: :func:`load_inception_extractor` reads the public ``pt_inception-2015-12-05-6726825d.pth``
(the torch state dict of pytorch-fid's FID Inception: ``Conv2d_1a_3x3.conv.weight``,
``...bn.{weight,bias,running_mean,running_var}``, ``Mixed_5b.branch1x1.conv.weight``, ...,
``fc.weight`` [1008, 2048], ``fc.bias``) with :func:`ldm_jax.storage.weights_io.load_torch_state_dict`
(restricted unpickler: nothing in the file is executed; torch is not needed).

Every conv / matmul runs at ``Precision.HIGHEST`` by default: on GPUs and TPUs the default
float32 precision is TF32 / bf16, which moves Inception features by ~1e-3 relative and FID
values with them.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Dict, Mapping, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.storage.weights_io import MissingWeightsError, load_torch_state_dict

__all__ = ["FeatureExtractor", "FIDInceptionV3", "load_inception_extractor",
           "inception_variables_from_state_dict", "resize_bilinear_torch",
           "FID_WEIGHTS_URL", "FID_WEIGHTS_FILE"]

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS_FILE)
INCEPTION_NAME = "inception_v3_fid"

IntPair = Union[int, Tuple[int, int]]


class FeatureExtractor:
    """The interface every feature network offers to the evaluation code.

    Attributes: ``name`` (goes into cache metadata and reports), ``dim`` (pool feature width),
    ``params`` (the network's variables, a pytree). ``extractor(params, images)`` with NHWC
    float images in ``[-1, 1]`` returns ``{"pool": [B, dim] float32, "logits": [B, K] float32}``.
    The call is pure, so callers ``jax.jit`` it (``params`` as an argument keeps the weights out
    of the compiled program) with the batch sharded over their mesh.
    """

    def __init__(self, name: str, dim: int, params: Any,
                 apply_fn: Callable[[Any, jax.Array], Dict[str, jax.Array]]):
        self.name = str(name)
        self.dim = int(dim)
        self.params = params
        self.apply_fn = apply_fn

    def __call__(self, params: Any, images: jax.Array) -> Dict[str, jax.Array]:
        if images.ndim != 4:
            raise ValueError(f"{self.name}: images must be NHWC [batch, height, width, "
                             f"channels], got shape {images.shape}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise TypeError(f"{self.name}: images must be floating point in [-1, 1], got dtype "
                            f"{images.dtype} (convert uint8 images with x / 127.5 - 1)")
        return self.apply_fn(params, images)

    def __repr__(self) -> str:
        return f"FeatureExtractor(name={self.name!r}, dim={self.dim})"


# --------------------------------------------------------------------------------------------
# torch-compatible bilinear resize
# --------------------------------------------------------------------------------------------

def _torch_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out, in]`` interpolation matrix of torch's bilinear, ``align_corners=False``.

    Follows ATen's ``area_pixel_compute_source_index`` / ``guard_index_and_lambda`` in float32
    (torch's opmath type for float), so the two weights per output pixel equal torch's bit for
    bit (checked in tests/test_inception.py).
    """
    m = np.zeros((out_size, in_size), np.float32)
    if in_size == out_size:  # torch copies the input in this case
        np.fill_diagonal(m, 1.0)
        return m
    scale = np.float32(in_size) / np.float32(out_size)
    # torch evaluates scale * (dst + 0.5) - 0.5 as one fused multiply-add in float32: the float64
    # product of two float32 values is exact, so one rounding to float32 reproduces it.
    dst = np.arange(out_size, dtype=np.float64)
    src = (np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam1 = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0))
    lam0 = np.float32(1.0) - lam1
    i1 = i0 + (i0 < in_size - 1)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), lam0)
    np.add.at(m, (rows, i1), lam1)
    return m


def resize_bilinear_torch(x: jax.Array, height: int, width: int,
                          precision: Any = jax.lax.Precision.HIGHEST) -> jax.Array:
    """Resize NHWC ``x`` like ``F.interpolate(x, (height, width), mode='bilinear',
    align_corners=False)`` (no antialias) as two separable matrix products."""
    if x.shape[1] != height:
        x = jnp.einsum("oh,nhwc->nowc", _torch_bilinear_matrix(x.shape[1], height), x,
                       precision=precision)
    if x.shape[2] != width:
        x = jnp.einsum("pw,nowc->nopc", _torch_bilinear_matrix(x.shape[2], width), x,
                       precision=precision)
    return x


# --------------------------------------------------------------------------------------------
# the network (module and submodule names = the torch state-dict names)
# --------------------------------------------------------------------------------------------

def _pair(v: IntPair) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm(eps=1e-3, running stats) -> ReLU, as torchvision's."""
    features: int
    kernel_size: IntPair
    strides: int = 1
    padding: IntPair = 0
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel_size), strides=(self.strides,) * 2,
                    padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision,
                    name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    # TF's 'SAME' average pool: padded pixels are not counted (pytorch-fid's FID patch).
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Block(nn.Module):
    precision: Any = None

    def conv(self, name: str, features: int, kernel: IntPair, strides: int = 1,
             padding: IntPair = 0) -> BasicConv2d:
        return BasicConv2d(features, kernel, strides, padding, precision=self.precision,
                           name=name)


class FIDInceptionA(_Block):
    pool_features: int = 32

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", 64, 1)(x)
        b5 = self.conv("branch5x5_2", 64, 5, padding=2)(self.conv("branch5x5_1", 48, 1)(x))
        b3 = self.conv("branch3x3dbl_1", 64, 1)(x)
        b3 = self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3)
        b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(b3)
        bp = self.conv("branch_pool", self.pool_features, 1)(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3", 384, 3, strides=2)(x)
        bd = self.conv("branch3x3dbl_1", 64, 1)(x)
        bd = self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd)
        bd = self.conv("branch3x3dbl_3", 96, 3, strides=2)(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(_Block):
    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = self.conv("branch1x1", 192, 1)(x)
        b7 = self.conv("branch7x7_1", c7, 1)(x)
        b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
        bd = self.conv("branch7x7dbl_1", c7, 1)(x)
        bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
        bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
        bp = self.conv("branch_pool", 192, 1)(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3_2", 320, 3, strides=2)(self.conv("branch3x3_1", 192, 1)(x))
        b7 = self.conv("branch7x7x3_1", 192, 1)(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = self.conv("branch7x7x3_4", 192, 3, strides=2)(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(_Block):
    """InceptionE; ``pool="avg"`` is pytorch-fid's FIDInceptionE_1, ``"max"`` FIDInceptionE_2."""
    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", 320, 1)(x)
        b3 = self.conv("branch3x3_1", 384, 1)(x)
        b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                              self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], -1)
        bd = self.conv("branch3x3dbl_1", 448, 1)(x)
        bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(bd)
        bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                              self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], -1)
        if self.pool == "avg":
            bp = _avg_pool_3x3_same(x)
        elif self.pool == "max":
            # The TF graph max-pools here (a bug in that graph that FID numbers depend on).
            bp = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            raise ValueError(f"FIDInceptionE.pool must be 'avg' or 'max', got {self.pool!r}")
        bp = self.conv("branch_pool", 192, 1)(bp)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """FID Inception-v3: NHWC images in [-1, 1] -> ``{"pool": [B, 2048], "logits": [B, 1008]}``.

    ``image_size`` is the resize target; 299 (the default) is the FID definition -- other sizes
    give features that are not comparable with published FIDs (tests use a small size to save
    CPU time). Minimum 75.
    """
    image_size: int = 299
    num_classes: int = 1008
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, images: jax.Array) -> Dict[str, jax.Array]:
        if images.shape[-1] == 1:
            images = jnp.repeat(images, 3, axis=-1)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"FID Inception expects NHWC images with 1 or 3 channels, got "
                             f"shape {images.shape}")
        # pytorch-fid's order of operations: [0, 1] -> bilinear resize -> 2 x - 1.
        x = (images.astype(jnp.float32) + 1.0) * 0.5
        x = resize_bilinear_torch(x, self.image_size, self.image_size, self.precision)
        x = 2.0 * x - 1.0

        def conv(name, features, kernel, strides=1, padding=0):
            return BasicConv2d(features, kernel, strides, padding, precision=self.precision,
                               name=name)

        p = self.precision
        x = conv("Conv2d_1a_3x3", 32, 3, strides=2)(x)
        x = conv("Conv2d_2a_3x3", 32, 3)(x)
        x = conv("Conv2d_2b_3x3", 64, 3, padding=1)(x)
        x = _max_pool_3x3_s2(x)
        x = conv("Conv2d_3b_1x1", 80, 1)(x)
        x = conv("Conv2d_4a_3x3", 192, 3)(x)
        x = _max_pool_3x3_s2(x)
        x = FIDInceptionA(p, pool_features=32, name="Mixed_5b")(x)
        x = FIDInceptionA(p, pool_features=64, name="Mixed_5c")(x)
        x = FIDInceptionA(p, pool_features=64, name="Mixed_5d")(x)
        x = InceptionB(p, name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                         ("Mixed_6e", 192)):
            x = FIDInceptionC(p, channels_7x7=c7, name=name)(x)
        x = InceptionD(p, name="Mixed_7a")(x)
        x = FIDInceptionE(p, pool="avg", name="Mixed_7b")(x)
        x = FIDInceptionE(p, pool="max", name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)): "pool3"
        logits = nn.Dense(self.num_classes, precision=p, name="fc")(pool)
        return {"pool": pool, "logits": logits}


# --------------------------------------------------------------------------------------------
# torch state dict -> Flax variables
# --------------------------------------------------------------------------------------------

_BN_STATS = {"mean": "running_mean", "var": "running_var"}
_PARAM_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


@functools.lru_cache(maxsize=None)
def _expected_variables(num_classes: int = 1008) -> Dict[str, Tuple[Tuple[str, ...], tuple]]:
    """``{torch key: (flax variable path, flax shape)}`` of the whole network."""
    module = FIDInceptionV3(image_size=75, num_classes=num_classes)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        names = tuple(p.key for p in path)
        collection, *mods, last = names
        torch_leaf = _BN_STATS[last] if collection == "batch_stats" else _PARAM_LEAVES[last]
        out[".".join(mods + [torch_leaf])] = (names, tuple(leaf.shape))
    return out


def _to_flax(torch_value: np.ndarray, flax_shape: tuple) -> np.ndarray:
    if len(flax_shape) == 4:  # conv OIHW -> HWIO
        return torch_value.transpose(2, 3, 1, 0)
    if len(flax_shape) == 2:  # Linear [out, in] -> Dense [in, out]
        return torch_value.T
    return torch_value


def _torch_shape(flax_shape: tuple) -> tuple:
    if len(flax_shape) == 4:
        h, w, i, o = flax_shape
        return (o, i, h, w)
    return tuple(reversed(flax_shape)) if len(flax_shape) == 2 else flax_shape


def inception_variables_from_state_dict(state_dict: Mapping[str, Any], source: str = "weights"
                                        ) -> Dict[str, Any]:
    """Flax variables ``{"params", "batch_stats"}`` of :class:`FIDInceptionV3` from the torch
    state dict of pytorch-fid's FID Inception (keys as in ``pt_inception-2015-12-05``).

    ``*.num_batches_tracked`` entries are ignored. Missing keys, unknown keys and shape
    mismatches are all reported together in one ``ValueError``.
    """
    expected = _expected_variables()
    given = {k: v for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")}
    missing = sorted(k for k in expected if k not in given)
    unknown = sorted(k for k in given if k not in expected)
    bad_shape = sorted(f"{k}: {tuple(np.shape(given[k]))}, expected {_torch_shape(s)}"
                       for k, (_, s) in expected.items()
                       if k in given and tuple(np.shape(given[k])) != _torch_shape(s))
    if missing or unknown or bad_shape:
        parts = [f"{source} is not the state dict of pytorch-fid's FID Inception-v3 "
                 f"({FID_WEIGHTS_FILE}, {FID_WEIGHTS_URL})."]
        for what, keys in (("missing keys", missing), ("unknown keys", unknown),
                           ("wrong shapes", bad_shape)):
            if keys:
                parts.append(f"{what} ({len(keys)}): {keys[:20]}"
                             + (" ..." if len(keys) > 20 else ""))
        raise ValueError(" ".join(parts))
    variables: Dict[str, Any] = {}
    for key, (path, shape) in expected.items():
        node = variables
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = jnp.asarray(_to_flax(np.asarray(given[key], np.float32), shape))
    return variables


def _as_precision(precision: Union[str, jax.lax.Precision, None]) -> Any:
    if isinstance(precision, str):
        names = {"highest": jax.lax.Precision.HIGHEST, "high": jax.lax.Precision.HIGH,
                 "default": jax.lax.Precision.DEFAULT}
        if precision.lower() not in names:
            raise ValueError(f"precision must be one of {sorted(names)}, got {precision!r}")
        return names[precision.lower()]
    return precision


def make_inception_extractor(variables: Mapping[str, Any], *, image_size: int = 299,
                             precision: Union[str, jax.lax.Precision] = "highest"
                             ) -> FeatureExtractor:
    """A :class:`FeatureExtractor` for already converted FID-Inception ``variables``.

    The name is ``"inception_v3_fid"`` at the FID resolution 299, else
    ``"inception_v3_fid@<size>"`` so cached statistics of different resolutions never mix.
    """
    if int(image_size) != image_size or image_size < 75:
        raise ValueError(f"image_size must be an integer >= 75 (Inception-v3's minimum), got "
                         f"{image_size!r}; use 299 for FID")
    module = FIDInceptionV3(image_size=int(image_size), precision=_as_precision(precision))

    def apply_fn(params, images):
        return module.apply(params, images)

    name = INCEPTION_NAME if image_size == 299 else f"{INCEPTION_NAME}@{image_size}"
    return FeatureExtractor(name, 2048, dict(variables), apply_fn)


def load_inception_extractor(path: Union[str, os.PathLike], *, image_size: int = 299,
                             precision: Union[str, jax.lax.Precision] = "highest"
                             ) -> FeatureExtractor:
    """Load ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's FID weights) as an extractor.

    No torch needed and nothing in the file is executed (restricted unpickler).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingWeightsError(
            f"FID Inception weights not found: {path!r}. Download {FID_WEIGHTS_FILE} from "
            f"{FID_WEIGHTS_URL} (the file pytorch-fid uses) and pass its path.")
    variables = inception_variables_from_state_dict(load_torch_state_dict(path), source=path)
    return make_inception_extractor(variables, image_size=image_size, precision=precision)

"""Reading (and writing) weight files without PyTorch and without running pickled code.

Supported formats
-----------------
* PyTorch zip checkpoints (``torch.save``, torch >= 1.6: ``.pt/.pth/.ckpt/.bin``). The zip
  holds ``<prefix>/data.pkl`` (the pickled object tree), ``<prefix>/data/<key>`` (raw tensor
  storages) and optionally ``<prefix>/byteorder``. ``data.pkl`` is decoded with a *restricted*
  unpickler: ``find_class`` only resolves a small allowlist of globals (tensor
  rebuild functions, storage and dtype names, ``collections.OrderedDict``, a few builtins, numpy
  array reconstruction), each mapped to an implementation in *this* module. Every other global
  raises :class:`UnsafeCheckpointError` before anything is called. Tensors come back as numpy
  arrays (bfloat16 / float8 via ``ml_dtypes``).
* Legacy (pre torch 1.6, non-zip) ``torch.save`` files -- the format of the public torchvision
  and lpips weight files: three small header pickles (magic number, protocol 1001, sys info),
  the main pickle, the list of storage keys, then per storage an int64 element count and the raw
  bytes. Same restricted unpickler; tensors are materialised once the storages have been read.
* safetensors (parsed with numpy; no dependency on the ``safetensors`` package).
* ``.npz`` (loaded with ``allow_pickle=False``).

Nested checkpoints
------------------
:func:`load_torch_checkpoint` returns the *nested* object tree exactly as pickled (dicts, lists,
numpy arrays). :func:`load_torch_state_dict` is the convenience entry point: it locates the state
dict inside wrappers such as Lightning's ``{'state_dict': {...}, 'global_step': ...}`` with
:func:`find_state_dict`, flattens any nested mappings with :func:`flatten_state_dict` (dotted
keys) and keeps only array leaves. This split was chosen so that non-tensor metadata
(``global_step``, ``epoch``) stays reachable while the common case is one call.

Lightning checkpoints sometimes pickle arbitrary objects (e.g. ``ModelCheckpoint`` callbacks,
OmegaConf hyper-parameters). Pass ``unknown_globals="stub"`` to replace such globals by inert
:class:`OpaqueObject` placeholders (which record their constructor arguments and state but never
import or call the original class) instead of raising.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import sys
import tarfile
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Dict, Optional, Sequence, Union

import ml_dtypes
import numpy as np

from ldm_jax import UserError
from ldm_jax.storage.state_dicts import (find_state_dict, flatten_state_dict,  # noqa: F401
                                         unflatten_state_dict)

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "UnsafeCheckpointError", "UnsupportedCheckpointError", "OpaqueObject",
    "load_torch_checkpoint", "load_torch_state_dict", "find_state_dict", "flatten_state_dict",
    "load_safetensors", "save_safetensors", "load_npz", "load_weights",
]


class UnsafeCheckpointError(UserError, pickle.UnpicklingError):
    """A pickle referenced a global outside the allowlist (nothing was executed)."""


class MissingWeightsError(UserError, FileNotFoundError):
    """A weight file a config field or flag names does not exist (no downloads at run time)."""


class WeightsConfigError(UserError, ValueError):
    """A config field naming weight files is unset or malformed."""


class UnsupportedCheckpointError(UserError, ValueError):
    """The file is not in a format (or uses a feature) this reader supports."""


# --------------------------------------------------------------------------------------------
# dtype tables
# --------------------------------------------------------------------------------------------

# Legacy typed-storage class names that torch still writes for the classic dtypes.
_STORAGE_DTYPES: Dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64), "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    # Newer dtypes (float8, uint16, ...) are saved as raw bytes + an explicit torch dtype.
    "UntypedStorage": np.dtype(np.uint8),
}

# ``torch.<name>`` dtype globals (they appear as arguments of ``_rebuild_tensor_v3``).
_TORCH_DTYPES: Dict[str, np.dtype] = {
    "float64": np.dtype(np.float64), "double": np.dtype(np.float64),
    "float32": np.dtype(np.float32), "float": np.dtype(np.float32),
    "float16": np.dtype(np.float16), "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64), "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32), "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16), "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16), "uint32": np.dtype(np.uint32), "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64), "cfloat": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128), "cdouble": np.dtype(np.complex128),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "float8_e8m0fnu": np.dtype(ml_dtypes.float8_e8m0fnu),
}


def _native_from_bytes(raw: np.ndarray, dtype: np.dtype, little_endian: bool) -> np.ndarray:
    """View a uint8 buffer as ``dtype`` in native byte order (byte-swapping a copy if needed).

    Byte swapping is done on raw bytes rather than with ``dtype.newbyteorder`` because the
    ml_dtypes types (bfloat16, float8) do not support non-native byte orders.
    """
    if dtype.itemsize > 1 and little_endian != (sys.byteorder == "little"):
        unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize  # complex: per part
        raw = np.ascontiguousarray(raw.reshape(-1, unit)[:, ::-1]).reshape(-1)
    return raw.view(dtype)


# --------------------------------------------------------------------------------------------
# Restricted unpickler for torch checkpoints
# --------------------------------------------------------------------------------------------


class _Tag:
    """Inert stand-in for a torch global (``kind``: "storage", "dtype" or "type"); slots only,
    so a hostile BUILD cannot graft attributes onto it."""

    __slots__ = ("kind", "name")

    def __init__(self, kind: str, name: str):
        self.kind, self.name = kind, name

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _Storage:
    """A storage: raw little/big-endian bytes plus the element dtype torch recorded.

    ``raw`` is None while a legacy file's storages (stored after the pickle) are still unread.
    """

    __slots__ = ("raw", "dtype", "little_endian")

    def __init__(self, raw: Optional[np.ndarray], dtype: np.dtype, little_endian: bool):
        self.raw, self.dtype, self.little_endian = raw, dtype, little_endian


class _PendingTensor:
    """A tensor whose (legacy-format) storage bytes have not been read yet."""

    __slots__ = ("args",)

    def __init__(self, *args):
        self.args = args

    def materialize(self) -> np.ndarray:
        return _tensor_from_storage(*self.args)


class _LegacyTensor:
    """``torch.FloatTensor`` & co. as pickled by torch 0.1.x: ``cls()`` + ``__setstate__``."""

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 4:
            raise UnsupportedCheckpointError("malformed legacy tensor state")
        storage = state[0]
        if not isinstance(storage, _Storage):
            raise UnsupportedCheckpointError("legacy tensor without a storage")
        self.pending = _PendingTensor(storage, state[1], state[2], state[3], storage.dtype)


def _check_int_tuple(value: Any, what: str) -> tuple:
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise UnsupportedCheckpointError(f"malformed tensor {what}: {value!r}")
    return tuple(value)


def _tensor_from_storage(storage: Any, offset: Any, size: Any, stride: Any,
                         dtype: np.dtype) -> np.ndarray:
    """Materialise ``storage[offset:]`` viewed with (size, stride) as a fresh C-contiguous array.

    The bounds check matters for safety: ``as_strided`` trusts its arguments, so unchecked
    values from a hostile pickle could read arbitrary process memory.
    """
    if not isinstance(storage, _Storage):
        raise UnsupportedCheckpointError(f"tensor built from a non-storage {type(storage)}")
    (offset,) = _check_int_tuple((offset,), "storage offset")
    size, stride = _check_int_tuple(size, "size"), _check_int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise UnsupportedCheckpointError(f"size {size} and stride {stride} differ in rank")
    if storage.raw is None:  # legacy file: bytes come after the pickle; resolve later
        return _PendingTensor(storage, offset, size, stride, dtype)
    if storage.raw.size % dtype.itemsize:
        raise UnsupportedCheckpointError("storage byte size is not a multiple of the dtype size")
    flat = _native_from_bytes(storage.raw, dtype, storage.little_endian)
    if any(s == 0 for s in size):
        return np.zeros(size, dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise UnsupportedCheckpointError(
            f"tensor (offset={offset}, size={size}, stride={stride}) exceeds its storage "
            f"of {flat.size} elements")
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(s * dtype.itemsize for s in stride),
        writeable=False)
    # Copy: the result must not alias a (possibly much larger) shared storage buffer.
    return np.array(view, copy=True, order="C")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise UnsupportedCheckpointError("_rebuild_tensor_v2 expects a storage argument")
    return _tensor_from_storage(storage, storage_offset, size, stride, storage.dtype)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    if not (isinstance(dtype, _Tag) and dtype.kind == "dtype" and dtype.name in _TORCH_DTYPES):
        raise UnsupportedCheckpointError(f"unsupported tensor dtype {dtype!r}")
    return _tensor_from_storage(storage, storage_offset, size, stride, _TORCH_DTYPES[dtype.name])


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    # nn.Parameter is just its data for our purposes.
    if not isinstance(data, (np.ndarray, _PendingTensor)):
        raise UnsupportedCheckpointError("parameter data is not a tensor")
    return data


_REBUILD_FNS = (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type_v2(func, new_type, args, state):
    # Tensor subclasses / tensors carrying Python attributes: keep the plain tensor data only.
    if func not in _REBUILD_FNS or not isinstance(args, tuple):
        raise UnsupportedCheckpointError(f"unsupported tensor rebuild function {func!r}")
    return func(*args)


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles store ``bytes`` as _codecs.encode(str, 'latin1'); nothing else needed.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsupportedCheckpointError(f"unsupported _codecs.encode({type(text)}, {encoding!r})")
    return text.encode(encoding)


def _np_reconstruct(subtype, shape, typecode):
    if not (isinstance(subtype, _Tag) and subtype.name == "numpy.ndarray"):
        raise UnsupportedCheckpointError("numpy _reconstruct of a non-ndarray type")
    # The real array state (dtype, shape, bytes) arrives via ndarray.__setstate__ (BUILD).
    return np.empty((0,), np.uint8)


def _np_dtype(spec, align=False, copy=False):
    if not isinstance(spec, str):
        raise UnsupportedCheckpointError(f"numpy dtype from non-string {type(spec)}")
    return np.dtype(spec)


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype):
        raise UnsupportedCheckpointError("numpy scalar without a dtype")
    if dtype.hasobject:
        return data
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsupportedCheckpointError("malformed numpy scalar")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


# Allowlist: "module.name" -> object handed to the unpickler. Every callable here is ours.
_SAFE_GLOBALS: Dict[str, Any] = {
    "torch._utils._rebuild_tensor": _rebuild_tensor_v2,  # torch < 0.4: no requires_grad
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.Tensor": _Tag("type", "Tensor"),  # only ever an inert type tag
    "torch.nn.parameter.Parameter": _Tag("type", "Parameter"),
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set, "builtins.frozenset": frozenset, "builtins.slice": slice,
    "builtins.complex": complex, "_codecs.encode": _codecs_encode,
    "numpy.core.multiarray._reconstruct": _np_reconstruct,
    "numpy._core.multiarray._reconstruct": _np_reconstruct,
    "numpy.ndarray": _Tag("type", "numpy.ndarray"),
    "numpy.dtype": _np_dtype,
    "numpy.core.multiarray.scalar": _np_scalar,
    "numpy._core.multiarray.scalar": _np_scalar,
}
_MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class OpaqueObject:
    """Inert placeholder for a non-allowlisted global (``unknown_globals="stub"``).

    It records what the pickle asked for (``global_name``, constructor ``args``/``kwargs``,
    ``state``, appended ``items`` and set ``entries``) without importing or calling anything.
    """

    global_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items, obj.entries = args, kwargs, None, [], {}
        return obj

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def append(self, item):
        self.items.append(item)

    def extend(self, items):
        self.items.extend(items)

    def __setitem__(self, key, value):
        self.entries[key] = value

    def __repr__(self) -> str:
        return f"<OpaqueObject {self.global_name}>"


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, storage_loader, unknown_globals: str = "raise"):
        super().__init__(file, encoding="utf-8")  # Python-2 era files hold byte strings
        self._storage_loader = storage_loader
        self._unknown_globals = unknown_globals

    def find_class(self, module: str, name: str) -> Any:
        # The base class maps Python-2 module names itself, but we bypass it entirely.
        module = _MODULE_ALIASES.get(module, module)
        full = f"{module}.{name}"
        if full in _SAFE_GLOBALS:
            found = _SAFE_GLOBALS[full]  # tags are copied so no load can mutate the shared ones
            return _Tag(found.kind, found.name) if isinstance(found, _Tag) else found
        if module in ("torch", "torch.cuda", "torch.storage") and name in _STORAGE_DTYPES:
            return _Tag("storage", name)
        if module in ("torch", "torch.cuda") and name[:-6] + "Storage" in _STORAGE_DTYPES:
            return _LegacyTensor  # "FloatTensor" etc.
        if module == "torch" and name in _TORCH_DTYPES:
            return _Tag("dtype", name)
        if self._unknown_globals == "stub":
            # A fresh subclass per name: NEWOBJ requires a real class; nothing of the original.
            return type(f"Opaque[{full}]", (OpaqueObject,), {"global_name": full})
        raise UnsafeCheckpointError(
            f"checkpoint references the non-allowlisted global '{full}'; refusing to load it "
            "(nothing was executed). If this is an otherwise trusted Lightning checkpoint with "
            "pickled Python objects, pass unknown_globals='stub' to replace them by inert "
            "placeholders.")

    def persistent_load(self, pid: Any) -> Any:
        if self._storage_loader is None:
            raise UnsupportedCheckpointError("unexpected storage reference in a header pickle")
        # zip format: 5 fields; legacy: a 6th, view_metadata, that is None for real files.
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and (len(pid) == 5 or pid[5] is None)):
            raise UnsupportedCheckpointError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        if not (isinstance(storage_type, _Tag) and storage_type.kind == "storage"
                and storage_type.name in _STORAGE_DTYPES):
            raise UnsupportedCheckpointError(f"unsupported storage type {storage_type!r}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise UnsupportedCheckpointError(f"malformed storage reference {pid!r}")
        return self._storage_loader(key, _STORAGE_DTYPES[storage_type.name], numel)


def _check_file(path: PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingWeightsError(
            f"Weight file not found: '{path}' (absolute: '{os.path.abspath(path)}').")
    return path


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _materialize(obj: Any, seen: set) -> Any:
    """Replace pending legacy tensors inside containers by arrays (in place where mutable)."""
    if isinstance(obj, _PendingTensor):
        return obj.materialize()
    if isinstance(obj, _LegacyTensor):
        return obj.pending.materialize()
    if id(obj) in seen:  # shared / cyclic containers
        return obj
    if isinstance(obj, (dict, list, OpaqueObject)):
        seen.add(id(obj))
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = _materialize(v, seen)
    elif isinstance(obj, list):
        obj[:] = [_materialize(v, seen) for v in obj]
    elif isinstance(obj, tuple):
        return tuple(_materialize(v, seen) for v in obj)
    elif isinstance(obj, OpaqueObject):
        obj.args = _materialize(obj.args, seen)
        obj.state, obj.items = _materialize(obj.state, seen), _materialize(obj.items, seen)
        obj.entries = _materialize(obj.entries, seen)
    return obj


def _load_legacy(path: str, unknown_globals: str) -> Any:
    """Read a pre-1.6 (non-zip) torch.save file with the restricted unpickler."""
    with open(path, "rb") as f:
        try:
            magic = _RestrictedUnpickler(f, None).load()
        except Exception as e:
            raise UnsupportedCheckpointError(f"'{path}' is not a PyTorch checkpoint ({e})") from e
        if magic != _LEGACY_MAGIC:
            raise UnsupportedCheckpointError(f"'{path}' is not a PyTorch checkpoint (bad magic)")
        protocol = _RestrictedUnpickler(f, None).load()
        sys_info = _RestrictedUnpickler(f, None).load()
        if protocol != _LEGACY_PROTOCOL:
            raise UnsupportedCheckpointError(f"unsupported legacy protocol {protocol!r}")
        little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
        storages: Dict[str, _Storage] = {}

        def load_storage(key: str, dtype: np.dtype, numel: int) -> _Storage:
            return storages.setdefault(key, _Storage(None, dtype, little))

        obj = _RestrictedUnpickler(f, load_storage, unknown_globals).load()
        keys = _RestrictedUnpickler(f, None).load()
        if not isinstance(keys, list) or set(keys) != set(storages):
            raise UnsupportedCheckpointError(f"'{path}': storage key list does not match")
        for key in keys:  # each: int64 element count, then the raw bytes
            head = f.read(8)
            if len(head) != 8:
                raise UnsupportedCheckpointError(f"'{path}' is truncated")
            (numel,) = struct.unpack("<q" if little else ">q", head)
            nbytes = numel * storages[key].dtype.itemsize
            raw = f.read(nbytes)
            if numel < 0 or len(raw) != nbytes:
                raise UnsupportedCheckpointError(f"'{path}' is truncated (storage {key})")
            storages[key].raw = np.frombuffer(raw, dtype=np.uint8)
    return _materialize(obj, set())


def load_torch_checkpoint(path: PathLike, *, unknown_globals: str = "raise") -> Any:
    """Load a ``torch.save`` file as a nested Python structure with numpy arrays.

    Args:
      path: ``.pt/.pth/.ckpt/.bin`` file: zip format (torch >= 1.6) or the legacy format.
      unknown_globals: ``"raise"`` (default): any non-allowlisted global raises
        :class:`UnsafeCheckpointError`; ``"stub"``: it becomes an inert :class:`OpaqueObject`.

    Returns: the unpickled object (dicts/lists/tuples/scalars, tensors as numpy arrays).
    """
    if unknown_globals not in ("raise", "stub"):
        raise ValueError(f"unknown_globals must be 'raise' or 'stub', got {unknown_globals!r}")
    path = _check_file(path)
    if not zipfile.is_zipfile(path):
        if tarfile.is_tarfile(path):
            raise UnsupportedCheckpointError(
                f"'{path}' uses the tar-based format of early torch 0.1, which is unsupported; "
                "re-save it with a newer torch (torch.save(torch.load(p, weights_only=True), p)).")
        try:
            return _load_legacy(path, unknown_globals)
        except (UnsafeCheckpointError, UnsupportedCheckpointError):
            raise
        except Exception as e:  # malformed pickles surface as many exception types
            raise UnsupportedCheckpointError(f"could not decode '{path}': {e}") from e
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.split("/")[-1] == "data.pkl" and n.count("/") <= 1]
        if not pkl:
            kind = "a TorchScript archive" if any(n.endswith("constants.pkl") for n in names) \
                else "not a torch.save checkpoint"
            raise UnsupportedCheckpointError(f"'{path}' has no data.pkl ({kind}).")
        prefix = pkl[0][: -len("data.pkl")]
        order = b"little"
        if prefix + "byteorder" in names:
            order = zf.read(prefix + "byteorder").strip()
            if order not in (b"little", b"big"):
                raise UnsupportedCheckpointError(f"unknown byteorder record {order!r}")
        cache: Dict[str, np.ndarray] = {}

        def load_storage(key: str, dtype: np.dtype, numel: int) -> _Storage:
            if key not in cache:  # storages shared by several tensors are read once
                record = f"{prefix}data/{key}"
                if record not in names:
                    raise UnsupportedCheckpointError(f"missing storage record '{record}'")
                cache[key] = np.frombuffer(zf.read(record), dtype=np.uint8)
            raw = cache[key]
            nbytes = numel * dtype.itemsize
            if raw.size < nbytes:
                raise UnsupportedCheckpointError(
                    f"storage '{key}' holds {raw.size} bytes, expected {nbytes}")
            return _Storage(raw[:nbytes], dtype, order == b"little")

        unpickler = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), load_storage,
                                         unknown_globals)
        try:
            return unpickler.load()
        except (UnsafeCheckpointError, UnsupportedCheckpointError):
            raise
        except Exception as e:  # malformed pickles surface as many exception types
            raise UnsupportedCheckpointError(f"could not decode '{path}': {e}") from e


def load_torch_state_dict(path: PathLike, *, key: Optional[Union[str, Sequence[str]]] = None,
                          unknown_globals: str = "raise") -> Dict[str, np.ndarray]:
    """Load the state dict of a torch zip checkpoint as a flat ``{name: np.ndarray}``.

    Wrappers (Lightning ``{'state_dict': ...}``) are unwrapped via :func:`find_state_dict`
    (``key`` selects one explicitly), nested mappings are flattened with dotted keys and
    non-array leaves are dropped. Use :func:`load_torch_checkpoint` for the raw structure.
    """
    sd = find_state_dict(load_torch_checkpoint(path, unknown_globals=unknown_globals), key)
    return {k: v for k, v in flatten_state_dict(sd).items() if isinstance(v, np.ndarray)}


# --------------------------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length, JSON header, then raw little-endian bytes.
# --------------------------------------------------------------------------------------------

_ST_DTYPES: Dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "C64": np.dtype(np.complex64),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_ST_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit; guards against absurd lengths


def load_safetensors(path: PathLike) -> Dict[str, np.ndarray]:
    """Read a ``.safetensors`` file into ``{name: np.ndarray}`` (header order, writable copies)."""
    path = _check_file(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise UnsupportedCheckpointError(f"'{path}' is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > _ST_MAX_HEADER or 8 + n > size:
            raise UnsupportedCheckpointError(f"'{path}': invalid safetensors header length {n}")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UnsupportedCheckpointError(f"'{path}': corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise UnsupportedCheckpointError(f"'{path}': safetensors header is not an object")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    # Memory-map the payload so each tensor is copied once, without reading the file twice.
    payload = (np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(data_len,))
               if data_len else np.zeros((0,), np.uint8))
    out: Dict[str, np.ndarray] = {}
    for name, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise UnsupportedCheckpointError(f"'{path}': bad header entry {name!r}: {e}") from e
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= begin <= end <= data_len or end - begin != count * dtype.itemsize:
            raise UnsupportedCheckpointError(f"'{path}': inconsistent offsets for {name!r}")
        raw = np.array(payload[begin:end])  # copy out of the memmap
        out[name] = _native_from_bytes(raw, dtype, little_endian=True).reshape(shape)
    del payload
    return out


def save_safetensors(tensors: Mapping[str, Any], path: PathLike,
                     metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write ``{name: array}`` as a safetensors file (little-endian, 8-byte aligned header)."""
    header: Dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays, offset = [], 0
    for name, value in tensors.items():
        arr = np.asarray(value)  # not ascontiguousarray: it makes 0-d arrays 1-d (tobytes is C)
        if arr.dtype not in _ST_NAMES:
            raise ValueError(f"safetensors cannot store dtype {arr.dtype} (tensor {name!r})")
        if arr.dtype.itemsize > 1 and sys.byteorder != "little":
            arr = _native_from_bytes(arr.view(np.uint8).reshape(-1), arr.dtype, False)
        nbytes = arr.size * arr.dtype.itemsize
        header[str(name)] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                             "data_offsets": [offset, offset + nbytes]}
        arrays.append(arr)
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # pad so the payload starts 8-byte aligned
    with open(os.fspath(path), "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())


def load_npz(path: PathLike) -> Dict[str, np.ndarray]:
    """Read an ``.npz`` archive (``allow_pickle=False``) into ``{name: np.ndarray}``."""
    with np.load(_check_file(path), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def load_weights(path: PathLike, **torch_kwargs: Any) -> Dict[str, np.ndarray]:
    """Load a flat ``{name: np.ndarray}`` from safetensors, npz or a torch zip checkpoint.

    Dispatches on the suffix; unknown suffixes are sniffed from the file content.
    ``torch_kwargs`` (``key``, ``unknown_globals``) go to :func:`load_torch_state_dict`.
    """
    path = _check_file(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        return load_safetensors(path)
    if suffix == ".npz":
        return load_npz(path)
    if suffix in _TORCH_SUFFIXES:
        return load_torch_state_dict(path, **torch_kwargs)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            is_npz = all(n.endswith(".npy") for n in zf.namelist())
        return load_npz(path) if is_npz else load_torch_state_dict(path, **torch_kwargs)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return load_safetensors(path)
    raise UnsupportedCheckpointError(
        f"cannot tell the format of '{path}'; supported: .safetensors, .npz, torch zip "
        f"checkpoints ({', '.join(_TORCH_SUFFIXES)})")

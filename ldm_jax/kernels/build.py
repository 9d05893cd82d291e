"""Compile a kernel source into a shared library for this machine, once, and load it.

The libraries are built with the system C++ compiler (`CXX`, default `g++`) against the XLA FFI
headers that ship with jaxlib, with `-march=native`: the cache key covers the source, the
compiler, its flags, the jaxlib version and the CPU's feature flags, so a cache directory shared
between different machines never hands one a library built for another. The build writes to a
temporary file and renames it into place, so concurrent processes (several hosts, pytest
workers) never load a half-written library.

Cache directory: `$LDM_JAX_KERNEL_CACHE`, else `$XDG_CACHE_HOME/ldm_jax/kernels`, else
`~/.cache/ldm_jax/kernels`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jaxlib

FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC")


class KernelBuildError(RuntimeError):
    """The kernel could not be compiled or loaded (the message says why and what to do)."""


def cache_dir() -> str:
    root = os.environ.get("LDM_JAX_KERNEL_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "ldm_jax", "kernels")
    return root


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_path(source: str) -> str:
    """Where the library for `source` lives in the cache (built or not). The key covers the
    headers beside the source too (the kernels share `microkernels.h`)."""
    folder = os.path.dirname(os.path.abspath(source))
    text = b""
    for path in [source] + sorted(os.path.join(folder, n) for n in os.listdir(folder)
                                  if n.endswith(".h")):
        with open(path, "rb") as f:
            text += f.read() + b"\0"
    compiler = os.environ.get("CXX", "g++")
    key = hashlib.sha256(b"\0".join([
        text, compiler.encode(), " ".join(FLAGS).encode(), jaxlib.__version__.encode(),
        _cpu_features().encode()])).hexdigest()[:20]
    name = os.path.splitext(os.path.basename(source))[0]
    return os.path.join(cache_dir(), f"{name}-{key}.so")


def build(source: str) -> str:
    """Compile `source` if its library is not cached yet; returns the library's path."""
    path = library_path(source)
    if os.path.exists(path):
        return path
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise KernelBuildError(
            f"no C++ compiler '{compiler}' on PATH to build {os.path.basename(source)}: install "
            "g++ (or set CXX), or choose another implementation in the config")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    cmd = [compiler, *FLAGS, "-I", jax.ffi.include_dir(), source, "-o", tmp]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelBuildError(f"compiling {source} failed ({' '.join(cmd)}):\n"
                                   f"{result.stderr[-4000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load(source: str) -> ctypes.CDLL:
    """Build (if needed) and load the library compiled from `source`."""
    return ctypes.cdll.LoadLibrary(build(source))


_registered: dict = {}
_warned: set = set()
_log = logging.getLogger(__name__)
_register_lock = threading.Lock()


def register_targets(source: str, targets: dict) -> None:
    """Build/load `source` once per process and register its handlers with XLA:CPU:
    `targets` maps custom-call target names to the library's exported symbols. Raises
    `KernelBuildError` (with the reason, remembered for later calls) when that fails."""
    with _register_lock:
        state = _registered.get(source)
        if state is not None:
            if state is not True:
                raise KernelBuildError(state)
            return
        try:
            lib = load(source)
            handlers = {name: getattr(lib, symbol) for name, symbol in targets.items()}
        except (KernelBuildError, OSError, AttributeError) as e:
            _registered[source] = str(e)
            raise KernelBuildError(str(e)) from e
        for name, handler in handlers.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
        _registered[source] = True


def available(source: str, targets: dict) -> bool:
    """Whether `source`'s kernels can run in this process (built and registered on first
    use). A failure is logged once, with the compiler's message, so a run that falls back to
    XLA's paths says why."""
    try:
        register_targets(source, targets)
    except KernelBuildError as e:
        if source not in _warned:
            _warned.add(source)
            _log.warning("ldm_jax CPU kernel %s unavailable, using XLA's paths: %s",
                         os.path.basename(source), e)
        return False
    return True


def single_cpu_device() -> bool:
    """Whether the kernels may be picked by default: on CPU, with one device. They are custom
    calls, which XLA's partitioner cannot split over a mesh: with several devices every
    operand would be gathered onto every device (still correct, so an explicit choice runs)."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1

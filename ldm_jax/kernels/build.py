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
import os
import platform
import shutil
import subprocess
import tempfile

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
    """Where the library for `source` lives in the cache (built or not)."""
    with open(source, "rb") as f:
        text = f.read()
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

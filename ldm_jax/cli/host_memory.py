"""glibc malloc settings for XLA:CPU runs, applied by re-executing the command once.

Why: XLA:CPU allocates every execution's temporary buffer (1.9 GB for the f4_celebahq UNet
train step at width 64, batch 4) and its large outputs with malloc. glibc serves allocations
above 32 MB with a fresh mmap and unmaps them on free, so every step touches brand-new pages:
the kernel takes a page fault and zeroes 4 KiB for each one. That step took 947,000 page
faults (3.9 GB) per call, about a fifth of its time (bench/README.md, "Host memory").

The fix is three glibc tunables: keep everything in one arena (`arena_max=1`), serve large
blocks from the heap instead of mmap (`mmap_max=0`), and never give the heap back
(`trim_threshold`). Freed blocks are then reused by the next step with no page faults. The
process keeps its peak heap until it exits, which is what a training or sampling run wants.

glibc reads tunables only at process start, so `maybe_reexec` replaces the process with the same
command line and `GLIBC_TUNABLES` set (os.execve keeps the pid, so launchers and schedulers see
no difference). It does nothing when:
  * `LDM_JAX_HOST_MALLOC=system` (the opt-out),
  * the platform is not Linux with glibc,
  * the run may use an accelerator (`JAX_PLATFORMS` names something other than cpu, or no
    JAX_PLATFORMS and a GPU/TPU device node is present): there XLA allocates device memory with
    its own allocator, and host malloc is not on the step's path,
  * `GLIBC_TUNABLES` already sets any glibc.malloc tunable (the user's choice wins), or we
    already re-executed (the marker variable below).
"""

from __future__ import annotations

import glob
import os
import platform
import sys
from typing import Mapping, Optional

OPT_OUT_VARIABLE = "LDM_JAX_HOST_MALLOC"
MARKER_VARIABLE = "LDM_JAX_HOST_MALLOC_APPLIED"
MALLOC_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                   "glibc.malloc.trim_threshold=68719476736")

_ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def _is_glibc_linux() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _may_use_accelerator(env: Mapping[str, str]) -> bool:
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return any(p.strip() not in ("", "cpu") for p in platforms.split(","))
    return any(glob.glob(pattern) for pattern in _ACCELERATOR_NODES)


def tuned_environment(env: Mapping[str, str]) -> Optional[dict]:
    """The environment to re-execute with, or None when the current one should be kept."""
    if env.get(OPT_OUT_VARIABLE, "").strip().lower() == "system" or env.get(MARKER_VARIABLE):
        return None
    if not _is_glibc_linux() or _may_use_accelerator(env):
        return None
    existing = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in existing:
        return None
    new = dict(env)
    new["GLIBC_TUNABLES"] = ":".join([t for t in existing.split(":") if t] + list(MALLOC_TUNABLES))
    new[MARKER_VARIABLE] = "1"
    return new


def running_as_command() -> bool:
    """True when the process was started as `python -m ldm_jax...` (not when another program
    calls an entry point's main(), whose process must not be replaced)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return bool(spec and spec.name.split(".")[0].startswith("ldm_jax"))


def maybe_reexec() -> None:
    """Re-executes this process's command line with the malloc tunables, where they apply.
    Call it first thing in a command-line entry point (before jax is imported, so no device or
    thread is lost); it returns only when nothing needs to change."""
    env = tuned_environment(os.environ)
    if env is None:
        return
    argv = list(getattr(sys, "orig_argv", []) or [])
    if not argv or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + argv[1:], env)

"""Multi-host start-up: who the coordinator is, how many processes, which one this is.

Every command line entry point calls `initialize(...)` before it touches a device. The settings
are resolved, first match wins, from

 1. explicit flags: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`;
 2. the environment `launch/local_cluster.py` sets: `LDM_JAX_COORDINATOR`,
    `LDM_JAX_NUM_PROCESSES`, `LDM_JAX_PROCESS_ID`;
 3. a SLURM job step (`srun`): `SLURM_STEP_NUM_TASKS` (or `SLURM_NTASKS`), `SLURM_PROCID`, the
    first host of `SLURM_STEP_NODELIST` (or `SLURM_JOB_NODELIST`) as coordinator, port
    `JAX_COORDINATOR_PORT` or one derived from the job id (as jax's own SLURM detection does);
 4. a Cloud TPU VM (TPU chips on the PCI bus): `jax.distributed.initialize()` with no
    arguments, which reads the pod's worker list from the TPU metadata;
 5. Open MPI (`mpirun`), or `--jax_distributed` on any other cluster jax detects (K8s,
    mpi4py): `jax.distributed.initialize()` with no arguments;
 6. otherwise: one process, no distributed runtime.

`--num_processes=1` (or `LDM_JAX_NUM_PROCESSES=1`) forces a single process. Each source must be
complete: a process id without a process count is an error naming the missing setting, never a
silent single-process run (which would hang the other hosts at the first collective).

On CPU the cross-process collectives are gloo (jax's default, `jax_cpu_collectives_implementation`).
`resolve()` is pure (it takes the environment as a dict), so the rules are unit-tested without
starting a runtime.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import Callable, Mapping

from ldm_jax import UserError

ENV_COORDINATOR = "LDM_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "LDM_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "LDM_JAX_PROCESS_ID"
_OMPI_URI = "OMPI_MCA_orte_hnp_uri"  # set only under mpirun / mpiexec (as jax checks).


class DistributedConfigError(UserError, ValueError):
    """The multi-host settings are incomplete or inconsistent; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """How this process joins the job.

    source: 'flags', 'env', 'slurm', 'tpu', 'ompi', 'jax_auto' or 'single'.
    For 'tpu', 'ompi' and 'jax_auto' the other fields are None: jax detects them itself.
    """
    source: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    @property
    def multi_process(self) -> bool:
        return self.source != "single"


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Adds the multi-host flags every entry point shares."""
    group = parser.add_argument_group("multi-host (see docs/multihost.md)")
    group.add_argument("--coordinator_address", default=None,
                       help="HOST:PORT of process 0 (default: from the environment / SLURM / TPU)")
    group.add_argument("--num_processes", type=int, default=None,
                       help="number of processes in the job; 1 forces a single process")
    group.add_argument("--process_id", type=int, default=None, help="this process, 0..N-1")
    group.add_argument("--jax_distributed", action="store_true",
                       help="if nothing else is found, call jax.distributed.initialize() with no "
                            "arguments (jax's own cluster detection: K8s, mpi4py, ...)")


def _int(value, name: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise DistributedConfigError(f"{name}={value!r} is not an integer.") from None


def _complete(source: str, label: str, names: tuple[str, str, str], coordinator, count,
              pid) -> Settings:
    """Checks one source's (coordinator, count, id) triple; `names` are how the user set them
    and `label` names the source in errors."""
    given = {n: v for n, v in zip(names, (coordinator, count, pid)) if v not in (None, "")}
    count = None if count in (None, "") else _int(count, names[1])
    if count is not None and count < 1:
        raise DistributedConfigError(f"{names[1]}={count}: use a process count of at least 1.")
    if count == 1:
        if pid not in (None, "") and _int(pid, names[2]) != 0:
            raise DistributedConfigError(f"{names[2]}={pid} but {names[1]}=1: a single process "
                                         f"has id 0.")
        return Settings("single")
    missing = [n for n in names if n not in given]
    if missing:
        raise DistributedConfigError(
            f"incomplete multi-host settings from {label}: {', '.join(sorted(given))} given but "
            f"{', '.join(missing)} missing. Set all three ({', '.join(names)}), or none of them "
            f"for a single process.")
    pid = _int(pid, names[2])
    if not 0 <= pid < count:
        raise DistributedConfigError(f"{names[2]}={pid} is out of range for {names[1]}={count}: "
                                     f"use 0..{count - 1}.")
    coordinator = str(coordinator).strip()
    if not re.fullmatch(r"\S+:\d+", coordinator):
        raise DistributedConfigError(f"{names[0]}={coordinator!r}: use HOST:PORT, e.g. "
                                     f"10.0.0.1:12355.")
    return Settings(source, coordinator, count, pid)


def first_slurm_host(nodelist: str) -> str:
    """The first host name of a SLURM hostlist ('gpu[003-005,9],cpu1' -> 'gpu003')."""
    nodelist = nodelist.strip()
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist)
    if not nodelist or match is None or not (match.group(1) or match.group(2)):
        raise DistributedConfigError(f"SLURM node list {nodelist!r} has no host name.")
    prefix, ranges, suffix = match.groups()
    if ranges is None:
        return prefix + suffix
    first = ranges.split(",")[0].split("-")[0]  # zero padding is kept as written.
    return prefix + first + suffix


def _slurm_local_device_ids(env: Mapping[str, str]) -> tuple[int, ...] | None:
    """One GPU per task when several tasks share a node and each still sees every GPU.

    With `--ntasks-per-node=G` and no per-task GPU binding every task sees all G GPUs, so task
    SLURM_LOCALID takes GPU SLURM_LOCALID (jax's SLURM rule). If SLURM (--gpus-per-task,
    --gpu-bind) already restricted CUDA_VISIBLE_DEVICES to one GPU, or there is one task per
    node, the process uses every GPU it sees. JAX_LOCAL_DEVICE_IDS, when set, wins (jax reads it).
    """
    if env.get("JAX_LOCAL_DEVICE_IDS"):
        return None
    tasks_on_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    # Formats: '4', '4(x2)', '2,1': the first entry is enough to know if nodes are shared.
    leading = re.match(r"\d+", tasks_on_node.strip())
    per_node = int(leading.group(0)) if leading else 1
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if per_node <= 1 or (visible is not None and len([v for v in visible.split(",") if v]) <= 1):
        return None
    if "SLURM_LOCALID" not in env:
        return None
    return (_int(env["SLURM_LOCALID"], "SLURM_LOCALID"),)


def _from_slurm(env: Mapping[str, str]) -> Settings | None:
    # Only inside a job step (srun): the batch script itself also has SLURM_NTASKS but runs once.
    if "SLURM_JOB_ID" not in env or not (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_STEP_ID")):
        return None
    count = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if count is None or _int(count, "SLURM_NTASKS") <= 1:
        return None
    if "SLURM_PROCID" not in env:
        raise DistributedConfigError("SLURM job step without SLURM_PROCID: launch the command "
                                     "with srun inside the sbatch script.")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
    port = env.get("JAX_COORDINATOR_PORT") or str(
        _int(env["SLURM_JOB_ID"], "SLURM_JOB_ID") % 4096 + 61440)  # jax's ephemeral-range rule
    settings = _complete("slurm", "SLURM", ("SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID"),
                         f"{first_slurm_host(nodelist)}:{port}", count, env["SLURM_PROCID"])
    return dataclasses.replace(settings, local_device_ids=_slurm_local_device_ids(env))


def _tpu_chip_count() -> int:
    """TPU chips on this machine's PCI bus (0 off Cloud TPU); never starts a backend."""
    try:
        from jax._src import hardware_utils  # private, but what jax itself uses for this check.
        return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
    except (ImportError, AttributeError, OSError):
        return 0


def resolve(*, coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, jax_distributed: bool = False,
            environ: Mapping[str, str] | None = None,
            tpu_chip_count: Callable[[], int] = _tpu_chip_count) -> Settings:
    """The settings this process starts with (rules in the module docstring); starts nothing."""
    env = os.environ if environ is None else environ
    if any(v is not None for v in (coordinator_address, num_processes, process_id)):
        return _complete("flags", "flags", ("--coordinator_address", "--num_processes", "--process_id"),
                         coordinator_address, num_processes, process_id)
    names = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
    if any(env.get(n) for n in names):
        return _complete("env", "the environment", names, *(env.get(n) for n in names))
    slurm = _from_slurm(env)
    if slurm is not None:
        return slurm
    if tpu_chip_count() > 0:
        hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES")
        if hosts is not None and len([h for h in hosts.split(",") if h.strip()]) <= 1:
            return Settings("single")
        return Settings("tpu")
    if env.get(_OMPI_URI):
        return Settings("ompi")
    if jax_distributed:
        return Settings("jax_auto")
    return Settings("single")


def initialize(settings: Settings) -> Settings:
    """Starts the jax distributed runtime for `settings` (no-op for a single process or when
    already started). Must run before anything touches a device."""
    if not settings.multi_process:
        return settings
    import jax
    if jax.distributed.is_initialized():
        return settings
    kwargs = {}
    if settings.coordinator_address is not None:
        # 'deactivate': with everything known, jax must not re-detect the rest (inside a SLURM
        # allocation it would otherwise restrict each process to GPU SLURM_LOCALID).
        kwargs = dict(coordinator_address=settings.coordinator_address,
                      num_processes=settings.num_processes, process_id=settings.process_id,
                      cluster_detection_method="deactivate")
        if settings.local_device_ids is not None:
            kwargs["local_device_ids"] = list(settings.local_device_ids)
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        if "before" in str(e) or "already" in str(e):
            raise DistributedConfigError(
                f"jax.distributed.initialize failed ({e}); it must run before any JAX "
                f"computation or device query in the process.") from e
        raise
    return settings


def initialize_from_args(args: argparse.Namespace) -> Settings:
    """`resolve` + `initialize` from the flags `add_flags` defined (missing ones read as unset)."""
    settings = resolve(coordinator_address=getattr(args, "coordinator_address", None),
                       num_processes=getattr(args, "num_processes", None),
                       process_id=getattr(args, "process_id", None),
                       jax_distributed=bool(getattr(args, "jax_distributed", False)))
    return initialize(settings)


def barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Waits until every process reaches `barrier(name)`; a no-op for one process.

    Goes through the coordination service, not a device collective: on CPU the first gloo
    collective gives up if the other processes arrive more than ~30 s later (e.g. one process
    found the program in the persistent compilation cache and another compiles it), so the
    loops line processes up here after compiling, with a timeout long enough for any compile.
    """
    import jax
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the runtime's client (no public API)
    client = getattr(jax_distributed.global_state, "client", None)
    if client is None or not hasattr(client, "wait_at_barrier"):
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(f"ldm_jax:{name}", int(timeout_s * 1000))

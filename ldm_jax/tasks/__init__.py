"""Tasks the one train loop runs, chosen by `config.stage` (the interface: tasks/base.py).

To add a stage: write a class with the `Task` protocol's members next to autoencoder.py and
diffusion.py, add it to `TASKS`, and give it a defaults function in ldm_jax/config/defaults.py.
"""

from __future__ import annotations

from ldm_jax.config.loading import ConfigError

# config.stage -> "module:class", imported on demand (each pulls in its models).
TASKS = {
    "autoencoder": "ldm_jax.tasks.autoencoder:AutoencoderTask",
    "diffusion": "ldm_jax.tasks.diffusion:DiffusionTask",
}


def make_task(config):
    """Instantiates the task for `config.stage` with a clear error for unknown stages."""
    import importlib

    target = TASKS.get(config.stage)
    if target is None:
        raise ConfigError(f"config.stage={config.stage!r}: use one of {sorted(TASKS)}.")
    from ldm_jax.models import conv
    # Process-wide (read when the steps are traced); configs written before the key: auto.
    conv.set_default_weight_grad(conv.check_weight_grad(
        config.get("conv_weight_grad", "auto"), "config.conv_weight_grad", ConfigError))
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(config)

"""Tasks the one train loop runs, chosen by `config.stage`.

A task owns the model, losses and optimisers of one stage and exposes pure functions the loop
jits: `init_state`, `train_step(state, batch, phase)`, `eval_step`, `image_step`, plus
`phases()` / `phase_for_step(step)` (steps compiled once per phase before the loop) and
`summarise_eval`.
"""

from __future__ import annotations


def make_task(config):
    """Instantiates the task for `config.stage` with a clear error for unknown stages."""
    stage = config.stage
    if stage == "autoencoder":
        from ldm_jax.tasks.autoencoder import AutoencoderTask
        return AutoencoderTask(config)
    if stage == "diffusion":
        from ldm_jax.tasks.diffusion import DiffusionTask
        return DiffusionTask(config)
    raise ValueError(f"config.stage={stage!r}: use 'autoencoder' or 'diffusion'.")

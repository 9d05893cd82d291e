"""The task interface: what the one train loop (ldm_jax/training/trainer.py) calls on a stage.

A task owns the model, losses and optimisers of one stage. Its step functions are pure (the
loop jits them with shardings and donates the state); everything it needs besides the state
and the batch is in `constants()` (frozen weights such as LPIPS or the first stage), passed as
an argument rather than baked into the executable.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import ml_collections

from ldm_jax.training.train_state import TrainState


class Task(Protocol):
    """What `train_and_evaluate` needs from a stage (AutoencoderTask, DiffusionTask)."""

    name: str
    # The run's config with every field the task derives from its data filled in (latent
    # shape, class count, resolution...): what config.json records.
    config: ml_collections.ConfigDict
    # The batch entry the model consumes ('image', or the latents' 'moments' / 'latent');
    # its shape [B, ...] is passed to init_state.
    input_key: str

    def constants(self) -> dict:
        """Frozen inputs of every step (replicated over the mesh)."""

    def phase_for_step(self, step: int) -> str:
        """Which train-step variant runs at `step`; each variant is compiled once."""

    def init_state(self, rng: jax.Array, input_shape: tuple[int, ...]) -> TrainState:
        """Fresh state; the loop calls it under jit with the state's output shardings."""

    def train_step(self, state: TrainState, batch: dict, constants: dict,
                   phase: str) -> tuple[TrainState, dict]:
        """One optimisation step: (new state, scalar metrics incl. 'finite')."""

    def eval_step(self, state: TrainState, batch: dict, constants: dict) -> dict:
        """Sums over the valid rows (batch['mask']) of a held-out batch."""

    def summarise_eval(self, sums: dict) -> dict[str, float]:
        """The eval sums of the whole held-out pass -> reported metrics."""

    def image_step(self, state: TrainState, batch: dict, constants: dict) -> dict[str, Any]:
        """Named image sets in [-1, 1] for the PNG grids (one row each)."""

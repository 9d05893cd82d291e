"""Loading a trained first stage (autoencoder) from its run directory, with an identity.

Stage 2 encodes with it (precompute_latents) and decodes with it (sample grids, sampling); the
identity (model config hash, checkpoint step, parameter hash) is written into the latent data
set's metadata so training refuses latents that came from a different autoencoder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax import UserError
from ldm_jax.config import loading as config_lib
from ldm_jax.models import autoencoder as ae_models
from ldm_jax.storage import run_dir


class FirstStageError(UserError, ValueError):
    """The first-stage run directory is missing, incomplete or not an autoencoder run."""


@dataclasses.dataclass
class FirstStage:
    """A frozen autoencoder: model, parameters, its config and identity."""

    model: Any
    params: Any
    config: ml_collections.ConfigDict
    identity: dict

    @property
    def kind(self) -> str:
        return self.config.model.kind

    @property
    def downsampling_factor(self) -> int:
        return ae_models.downsampling_factor(self.config.model)

    @property
    def latent_channels(self) -> int:
        return ae_models.latent_channels(self.config.model)

    def encode_moments(self, params, images: jax.Array) -> jax.Array:
        """KL: posterior moments [B,h,w,2C] (mean, logvar); VQ: pre-quantisation latents [B,h,w,C]."""
        if self.kind == "kl":
            posterior = self.model.apply({"params": params}, images, method=self.model.encode)
            return jnp.concatenate([posterior.mean, posterior.logvar], axis=-1)
        return self.model.apply({"params": params}, images, method=self.model.encode)

    def decode(self, params, latents: jax.Array) -> jax.Array:
        """Unscaled latents -> images in [-1, 1] (VQ quantises inside decode)."""
        images = self.model.apply({"params": params}, latents, method=self.model.decode)
        return jnp.clip(images, -1.0, 1.0)


def params_hash(params) -> str:
    """Short sha256 of a parameter tree (paths and bytes), the identity of a set of weights."""
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda x: str(x[0])):
        digest.update(str(path).encode())
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()[:16]


# Model fields added after identities were first recorded, with the value that reproduces the
# older behaviour: left out of the hash at that value, so latents precomputed before a field
# existed still match their first stage.
_HASH_NEUTRAL = {"attn_type": "vanilla"}
# Fields that change how the model is computed, never what it computes: always left out.
_HASH_IGNORED = ("remat",)


def model_config_hash(model_cfg) -> str:
    fields = ml_collections.ConfigDict(model_cfg).to_dict()
    for key, value in _HASH_NEUTRAL.items():
        if fields.get(key) == value:
            del fields[key]
    for key in _HASH_IGNORED:
        fields.pop(key, None)
    text = json.dumps(fields, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_first_stage(workdir: str, step: int | None = None, dtype=jnp.float32, *,
                     flag: str = "--first_stage") -> FirstStage:
    """Loads the generator parameters of an autoencoder run (latest checkpoint by default)."""
    if not os.path.isfile(run_dir.config_path(workdir)) or not os.path.isdir(
            run_dir.checkpoint_dir(workdir)):
        raise FirstStageError(
            f"{flag}={workdir}: no first-stage run there (expected {run_dir.config_path(workdir)} "
            f"and {run_dir.checkpoint_dir(workdir)}/); train one with python -m ldm_jax.train "
            f"--config=configs/autoencoder_*.py --workdir={workdir}.")
    config = run_dir.read_config(workdir, flag=flag)
    if config.stage != "autoencoder":
        raise FirstStageError(f"{flag}={workdir} is a {config.stage!r} run, not an "
                              f"autoencoder run.")
    params, step = run_dir.first_stage_weights(workdir, step=step, flag=flag)
    params = jax.tree_util.tree_map(np.asarray, params)
    model_cfg = config.model
    model = ae_models.make_first_stage(model_cfg, dtype)
    identity = {"workdir": os.path.abspath(workdir), "step": int(step),
                "model_config_hash": model_config_hash(model_cfg), "params_hash": params_hash(params),
                "kind": model_cfg.kind}
    return FirstStage(model=model, params=params, config=config, identity=identity)


def save_first_stage_run(workdir: str, config, params) -> None:
    """Writes an autoencoder 'run' (config.json + checkpoint) holding only generator weights.

    For autoencoders that were not trained here (converted CompVis or diffusers weights): the
    folder can then serve as `--first_stage` for precompute_latents and stage-2 training, and
    `load_first_stage(workdir)` reads it like any trained run. It is not resumable as training
    (there is no optimiser state or discriminator).
    """
    if config.stage != "autoencoder":
        raise FirstStageError(f"save_first_stage_run: config.stage must be 'autoencoder', got "
                              f"{config.stage!r}.")
    if os.path.exists(os.path.join(workdir, "checkpoints")):
        raise FirstStageError(f"{workdir} already holds checkpoints; choose a new folder.")
    from ldm_jax.training import checkpointing  # the trainer's writer: resumable like any run
    os.makedirs(workdir, exist_ok=True)
    config_json = config_lib.to_json_dict(config)
    state = {"step": np.asarray(0, np.int32), "params": {"generator": {"model": params}}}
    checkpointer = checkpointing.Checkpointer(workdir, keep=1, async_save=False)
    try:
        checkpointer.save(0, state, checkpointing.make_meta(
            data_step=0, config_json=config_json, extra={"imported": True}))
        checkpointer.wait()
    finally:
        checkpointer.close()
    if jax.process_index() == 0:
        run_dir.write_config(workdir, config_json)

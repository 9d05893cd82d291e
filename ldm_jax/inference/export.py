"""Exporting a stage-2 training run as an inference bundle (`python -m ldm_jax.export`).

The bundle (see ldm_jax/storage/bundle.py) holds the UNet parameters (EMA weights unless --no_ema), the
frozen first stage (its config and generator parameters, from the run's latent data set or
`config.first_stage.workdir`), the stage-2 config (UNet, diffusion, conditioning, sampling,
latent shape) and the latent scale factor, as one orbax checkpoint plus bundle.json.
`python -m ldm_jax.sample --workdir=BUNDLE` samples from it on any number of devices.

The condition encoder: a jointly trained one (the class embedding `label_emb`, the
class_crossattn embedding, the 'bert' text transformer or the layout transformer) sits in the
stage-2 parameter tree, so it is exported with the UNet parameters; `config.conditioning` (kind,
tokenizer, null label, class names) travels in the stage-2 config. A text run's tokenizer files
(`conditioning.tokenizer_path`, e.g. the shipped vocab.txt) and a frozen encoder's folder
(`conditioning.encoder_path`) are copied into the bundle (storage/bundle.py), so the bundle
samples from `--prompt` with no other files. A layout run's tokenizer is built from the config.

A run trained on synthetic latents (the `smoke` configs) has no first stage: its bundle records
none, and samples are the latents shown as images, as in the run's own grids.
"""

from __future__ import annotations

import os

from ldm_jax import UserError
from ldm_jax.storage import run_dir


class ExportError(UserError, ValueError):
    """The run cannot be exported (not a stage-2 run, missing checkpoint, missing first stage)."""


def export(workdir: str, output: str, *, step: int | None = None, use_ema: bool = True,
           overwrite: bool = False) -> dict:
    """Writes the bundle of run `workdir` to `output`; returns its `source` record."""
    from ldm_jax.storage import bundle
    from ldm_jax.tasks.diffusion import LatentContext

    config = run_dir.read_stage_config(
        workdir, "diffusion", purpose="export needs a diffusion (stage 2) run; an autoencoder "
        "run is already usable as a first stage (--first_stage / config.first_stage.workdir).")
    unet_params, step = run_dir.diffusion_weights(workdir, step=step, use_ema=use_ema)
    # The first stage and scale factor exactly as training saw them (the latents' metadata, or
    # config.first_stage.workdir; the identity check against the latents runs here too).
    try:
        latents = LatentContext.from_config(config)
    except UserError as e:  # the data set or first-stage run moved or was deleted.
        raise ExportError(
            f"--workdir={workdir}: cannot find the run's first stage ({e}). The bundle needs it "
            f"to decode samples: restore the latents directory ({config.data.latents_dir!r}) or "
            f"set the autoencoder run with --config.first_stage.workdir in the training "
            f"config.") from e
    first_stage = latents.first_stage
    source = {"kind": "ldm_jax run", "workdir": os.path.abspath(workdir), "step": int(step),
              "weights": "ema" if use_ema else "raw",
              "first_stage": None if first_stage is None else first_stage.identity}
    bundle.save_bundle(
        output, config=config, unet_params=unet_params,
        first_stage_config=None if first_stage is None else first_stage.config,
        first_stage_params=None if first_stage is None else first_stage.params,
        scale_factor=latents.scale_factor, source=source, overwrite=overwrite)
    note = ("" if first_stage is not None else
            " It has no first stage (trained on synthetic latents): samples are the latents "
            "shown as images.")
    condition = {"text": ' --prompt="..."', "layout": ' --layout="0:0.1,0.1,0.5,0.5"',
                 "class": " --labels=0,1", "class_crossattn": " --labels=0,1"}
    hint = condition.get(config.conditioning.kind, "")
    print(f"Exported {source['weights']} weights of {workdir} at step {step} to {output}/.{note} "
          f"Sample with: python -m ldm_jax.sample --workdir={output}{hint} --out=SAMPLES",
          flush=True)
    return source

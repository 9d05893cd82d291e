"""Command line: export a stage-2 training run as an inference bundle.

  python -m ldm_jax.export --workdir=runs/ldm_digits --output=bundles/ldm_digits \
      [--step=K] [--no_ema] [--overwrite]

The bundle (see ldm_jax/bundle.py) holds the UNet parameters (EMA weights unless --no_ema), the
frozen first stage (its config and generator parameters, from the run's latent data set or
`config.first_stage.workdir`), the stage-2 config (UNet, diffusion, conditioning, sampling,
latent shape) and the latent scale factor, as one orbax checkpoint plus bundle.json.
`python -m ldm_jax.sample --workdir=BUNDLE` samples from it on any number of devices.

The condition encoder: ldm_jax conditions on class labels only, through an embedding inside the
UNet (`label_emb`), so it is exported with the UNet parameters, and `config.conditioning` (kind,
null label for guidance) travels in the stage-2 config. There is no separate encoder to save.

A run trained on synthetic latents (the `smoke` configs) has no first stage: its bundle records
none, and samples are the latents shown as images, as in the run's own grids.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import ml_collections

from ldm_jax import config_lib


class ExportError(ValueError):
    """The run cannot be exported (not a stage-2 run, missing checkpoint, missing first stage)."""


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The stage-2 config a run saved in `<workdir>/config.json`."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ExportError(f"--workdir={workdir}: no config.json there; give a stage-2 training run "
                          f"directory (python -m ldm_jax.train --config=configs/ldm_*.py).")
    with open(path) as f:
        config = config_lib.config_from_json(json.load(f))
    if config.get("stage") != "diffusion":
        raise ExportError(f"--workdir={workdir} is a {config.get('stage')!r} run; export needs a "
                          f"diffusion (stage 2) run. An autoencoder run is already usable as a "
                          f"first stage (--first_stage / config.first_stage.workdir).")
    return config


def export(workdir: str, output: str, *, step: int | None = None, use_ema: bool = True,
           overwrite: bool = False) -> dict:
    """Writes the bundle of run `workdir` to `output`; returns its `source` record."""
    from ldm_jax import bundle, checkpointing
    from ldm_jax.tasks.diffusion import LatentContext

    config = load_run_config(workdir)
    state, step = checkpointing.restore_raw_state(workdir, step)
    if use_ema and state.get("ema_params") is None:
        raise ExportError(f"--workdir={workdir}: checkpoint {step} holds no EMA weights; use "
                          f"--no_ema to export the raw weights.")
    unet_params = state["ema_params"] if use_ema else state["params"]["model"]

    # The first stage and scale factor exactly as training saw them (the latents' metadata, or
    # config.first_stage.workdir; the identity check against the latents runs here too).
    try:
        latents = LatentContext(config)
    except Exception as e:  # the data set or first-stage run moved or was deleted.
        raise ExportError(
            f"--workdir={workdir}: cannot find the run's first stage ({type(e).__name__}: {e}). "
            f"The bundle needs it to decode samples: restore the latents directory "
            f"({config.data.get('latents_dir')!r}) or set the autoencoder run with "
            f"--config.first_stage.workdir in the training config.") from e
    first_stage = latents.first_stage
    source = {"kind": "ldm_jax run", "workdir": os.path.abspath(workdir), "step": int(step),
              "weights": "ema" if use_ema else "raw",
              "first_stage": None if first_stage is None else first_stage.identity}
    bundle.save_bundle(
        output, config=config, unet_params=unet_params,
        first_stage_config=None if first_stage is None else first_stage.config,
        first_stage_params=None if first_stage is None else first_stage.params,
        scale_factor=latents.scale_factor, source=source, overwrite=overwrite)
    return source


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm_jax.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="stage-2 training run directory")
    parser.add_argument("--output", required=True, help="bundle directory to create")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--no_ema", action="store_true", help="export the raw (non-EMA) weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from ldm_jax import bundle, checkpointing
    try:
        source = export(args.workdir, args.output, step=args.step, use_ema=not args.no_ema,
                        overwrite=args.overwrite)
    except (ExportError, bundle.BundleError, checkpointing.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    note = ("" if source["first_stage"] is not None else
            " It has no first stage (trained on synthetic latents): samples are the latents "
            "shown as images.")
    print(f"Exported {source['weights']} weights of {args.workdir} at step {source['step']} to "
          f"{args.output}/.{note} Sample with: python -m ldm_jax.sample --workdir={args.output} "
          f"--out=SAMPLES", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

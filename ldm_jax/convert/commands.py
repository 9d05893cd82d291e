"""What `python -m ldm_jax.convert` does: CompVis / diffusers weights to an ldm_jax bundle or
first-stage run, and ldm_jax bundles / autoencoder runs back to diffusers folders."""

from __future__ import annotations

import os
from typing import List, Optional


def _log(msg: str) -> None:
    print(msg, flush=True)


def _drop_list(values: List[str]) -> List[str]:
    return [d.strip() for v in values for d in v.split(",") if d.strip()]


def convert_to_ldm_jax(args) -> str:
    """Runs an import; returns a one-line summary."""
    from ldm_jax.storage import bundle as bundle_lib
    from ldm_jax.storage import weights_io
    from ldm_jax.convert import compvis, diffusers_io, text_io
    from ldm_jax.convert.common import ConversionError

    src, drop = args.source, _drop_list(args.drop)
    if os.path.isfile(src):
        if not args.config:
            raise ConversionError(f"--source={src} is a checkpoint file: pass its CompVis YAML "
                                  f"with --config=x.yaml (the architecture is not in the file).")
        doc = compvis.load_yaml(args.config)
        target = str(doc["model"].get("target", ""))
        # "stub": pickled non-tensor objects (Lightning callbacks, hparams) become inert records.
        sd = weights_io.load_weights(src, unknown_globals="stub")
        if target.endswith(("LatentDiffusion", "DDPM")):
            kwargs = compvis.convert_ldm_checkpoint(sd, doc, drop=drop, use_ema=not args.no_ema,
                                                    log=_log,
                                                    tokenizer_path=args.tokenizer_path
                                                    or text_io.SHIPPED_WORDPIECE)
            if args.scale_factor is not None:
                kwargs["scale_factor"] = args.scale_factor
                kwargs["config"].latents.scale_factor = args.scale_factor
            kwargs["source"].update(checkpoint=os.path.abspath(src),
                                    yaml=os.path.abspath(args.config))
            bundle_lib.save_bundle(args.output, **kwargs)
            return f"wrote bundle {args.output}"
        config, params = compvis.convert_ae_checkpoint(sd, doc, drop=drop, log=_log)
        _save_run(args.output, config, params)
        return f"wrote first-stage run {args.output}"
    if not os.path.isdir(src):
        raise ConversionError(f"--source={src} does not exist.")
    if drop:
        raise ConversionError("--drop applies to CompVis checkpoints only.")
    if args.tokenizer_path:
        raise ConversionError("--tokenizer_path applies to CompVis checkpoints only (a diffusers "
                              "pipeline brings its tokenizer/ folder).")
    text_folder, pipeline = "", ""
    if diffusers_io.is_pipeline_folder(src):
        pipeline = diffusers_io.pipeline_class(src)
        unet_dir, vae_dir, sched = diffusers_io.pipeline_parts(src)
        sched = args.scheduler or sched
        text_folder = src if text_io.has_text_encoder(src) else ""
        skipped = diffusers_io.unconverted_parts(src)
        if skipped:
            _log(f"not converted (ldm_jax has no use for them): {', '.join(skipped)}.")
    elif diffusers_io.is_model_folder(src):
        cls = _class_name(src)
        if cls in ("AutoencoderKL", "VQModel"):
            config, params, _ = diffusers_io.convert_vae_folder(src)
            _save_run(args.output, config, params)
            return f"wrote first-stage run {args.output}"
        if not args.vae:
            raise ConversionError(f"--source={src} is a lone diffusers {cls} folder: pass the "
                                  f"autoencoder folder with --vae=FOLDER (and optionally "
                                  f"--scheduler=scheduler_config.json).")
        unet_dir, vae_dir, sched = src, args.vae, args.scheduler
    else:
        raise ConversionError(f"--source={src}: neither a diffusers model folder (config.json) "
                              f"nor a pipeline folder (unet/ + vae/ or vqvae/).")
    kwargs = diffusers_io.convert_to_bundle_kwargs(unet_dir, vae_dir, sched,
                                                   scale_factor=args.scale_factor,
                                                   text_folder=text_folder, pipeline=pipeline,
                                                   log=_log)
    bundle_lib.save_bundle(args.output, **kwargs)
    return f"wrote bundle {args.output}"


def _class_name(folder: str) -> Optional[str]:
    import json
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f).get("_class_name")


def _save_run(output: str, config, params) -> None:
    from ldm_jax.storage import first_stage
    from ldm_jax.convert.common import ConversionError
    if os.path.exists(output):
        raise ConversionError(f"--output={output} already exists; choose a new folder.")
    first_stage.save_first_stage_run(output, config, params)


def convert_to_diffusers(args) -> str:
    from ldm_jax.storage import bundle as bundle_lib
    from ldm_jax.storage import first_stage
    from ldm_jax.convert import diffusers_io
    from ldm_jax.convert.common import ConversionError
    if os.path.exists(args.output):
        raise ConversionError(f"--output={args.output} already exists; choose a new folder.")
    if bundle_lib.is_bundle(args.source):
        diffusers_io.export_bundle(args.output, bundle_lib.load_bundle(args.source), log=_log)
        return f"wrote diffusers folders under {args.output}"
    fs = first_stage.load_first_stage(args.source)
    scale = 1.0 if args.scale_factor is None else args.scale_factor
    if args.scale_factor is None:
        _log("an autoencoder run has no latent scale factor: writing scaling_factor=1.0 "
             "(set --scale_factor to change it).")
    diffusers_io.export_first_stage(args.output, fs.config, fs.params, scale)
    return f"wrote diffusers {'AutoencoderKL' if fs.kind == 'kl' else 'VQModel'} folder {args.output}"

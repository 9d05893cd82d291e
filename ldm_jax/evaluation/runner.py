"""Sample-quality metrics of a run, written to `<workdir>/eval/<step>.json` (the library half of
`python -m ldm_jax.evaluate`).

  python -m ldm_jax.evaluate --workdir=W [--num_samples=N] [--features=inception|digits]
      [--inception_weights=PATH] [--sampler=ddim] [--steps=50] [--eta=0] [--guidance_scale=G]
      [--step=K] [--batch_size=B] [--seed=0] [--no_ema] [--cache_dir=DIR]

Stage 2 (a diffusion run): samples N images (EMA weights unless --no_ema; class-conditional
runs cycle the labels 0, 1, ..., like `python -m ldm_jax.sample`), quantised to uint8 levels as
the saved PNGs are, and compares them with the held-out split of the images the first stage
encoded (`config.source_data`, split `eval_split`): FID against all held-out images, Inception
Score, precision/recall (k=3, Kynkaanniemi et al. 2019) against the first min(N, held-out)
held-out images and, with --features=digits on a class-conditional run, `class_accuracy` (the
fraction of samples the digit classifier assigns to their conditioning label).
Image-conditioned runs (super-resolution, inpainting, semantic synthesis) sample from the
held-out examples' own inputs and add `image_task`: PSNR / SSIM / LPIPS-or-feature distance
against the ground truth, plain bicubic up-sampling as the super-resolution baseline, and on the
digits the classifier's accuracy per task (ldm_jax/evaluation/image_tasks.py). The held-out
moments and features are cached in `W/eval/reference_<features>_<split>*.npz` and reused while
their metadata (feature network and its weights, data set, split, N) matches.

Stage 1 (an autoencoder run): reconstructs the first N held-out images of `config.data`
(posterior mode for KL, quantised latents for VQ; no uint8 rounding, as the training loop's
held-out metrics): PSNR, SSIM (images >= 11 px), LPIPS when the run's `loss.lpips_weights` is
set, and rFID (FID of the reconstructions against the same originals).

Features: `inception` is the FID Inception-v3 (`pt_inception-2015-12-05-6726825d.pth`, from
--inception_weights or `<cache_dir>/pt_inception-2015-12-05-6726825d.pth`); `digits` is a small
CNN trained on the embedded digits data (ldm_jax/evaluation/digits_features.py; trained once in
seconds on a CPU and cached), so the whole path runs without downloads. The default is
`inception`; when its weight file is missing the command stops with one line naming the file
and --features=digits. The cache dir is --cache_dir, else $LDM_JAX_CACHE, else ~/.cache/ldm_jax.
--num_samples defaults to the size of the held-out split (at most 50000).

Images and samples are processed in batches sharded over all devices (every host of a
multi-host job runs the command; hosts read their slice of each held-out batch); features are
gathered to the hosts for the statistics, FID moments are accumulated batch by batch (memory flat
in N). Only process 0 writes files and prints; every host reads the cached reference files, so
the run directory must be on a file system all hosts see (as the checkpoints already need).
The report:
  {"step", "stage", "features", "num_samples", "metrics": {...}, "sampler": {...}, "time_s",
   "workdir", "reference": {...}}
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ldm_jax import UserError
from ldm_jax.config import loading as config_lib
from ldm_jax.evaluation import digits_features, inception, statistics
from ldm_jax.parallel import sharding
from ldm_jax.storage import files, run_dir

MAX_DEFAULT_SAMPLES = 50_000
PR_K = 3


class EvaluationError(UserError, ValueError):
    """A mistake in the command's input (missing weights, wrong run); reported as one line."""


# ------------------------------------------------------------------------------- features


def load_features(kind: str, *, inception_weights: str | None = None,
                  cache_dir: str | None = None, data_dir: str | None = None
                  ) -> inception.FeatureExtractor:
    """The feature network: 'inception' (needs the FID weight file) or 'digits' (self-trained)."""
    cache_dir = cache_dir or digits_features.default_cache_dir()
    if kind == "digits":
        return digits_features.load_digits_extractor(cache_dir, data_dir)
    if kind != "inception":
        raise EvaluationError(f"--features={kind!r}: use 'inception' or 'digits'.")
    path = inception_weights or os.path.join(cache_dir, inception.FID_WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise EvaluationError(
            f"--features=inception needs the FID Inception weights {inception.FID_WEIGHTS_FILE} "
            f"(not found at {path}); download it from {inception.FID_WEIGHTS_URL} and pass "
            f"--inception_weights=PATH, or use --features=digits (a CPU-trained digits network) "
            f"for runs on the digits data.")
    return inception.load_inception_extractor(path)


def features_id(extractor) -> str:
    """What identifies the feature network's weights in the reference-statistics cache."""
    meta = getattr(extractor, "meta", None) or {}
    if "params_hash" in meta:
        return f"{extractor.name}:{meta['params_hash']}"
    from ldm_jax.storage.first_stage import params_hash
    return f"{extractor.name}:{params_hash(extractor.params)}"


def quantize(images: jax.Array) -> jax.Array:
    """[-1, 1] images rounded to the 256 levels of a saved uint8 PNG (still in [-1, 1])."""
    levels = jnp.clip(jnp.round((images + 1.0) * 127.5), 0.0, 255.0)
    return levels / 127.5 - 1.0


class FeatureSink:
    """Collects the gathered outputs of a feature network: streaming moments of "pool" (FID),
    the first `keep` pool rows (precision/recall) and, optionally, all logits (IS)."""

    def __init__(self, dim: int, *, keep: int = 0, keep_logits: bool = False):
        self.moments = statistics.FeatureMoments(dim)
        self.keep = int(keep)
        self.kept: list[np.ndarray] = []
        self.logits: list[np.ndarray] | None = [] if keep_logits else None

    def add(self, pool: np.ndarray, logits: np.ndarray | None = None) -> None:
        self.moments.update(pool)
        room = self.keep - sum(len(k) for k in self.kept)
        if room > 0:
            self.kept.append(np.asarray(pool[:room], np.float32))
        if self.logits is not None and logits is not None:
            self.logits.append(np.asarray(logits, np.float32))

    @property
    def features(self) -> np.ndarray:
        return np.concatenate(self.kept) if self.kept else np.zeros((0, self.moments.dim),
                                                                    np.float32)


def make_feature_fn(extractor, mesh, *, quantized: bool) -> Callable:
    """jit(images -> {"pool", "logits"}) with the batch sharded over the mesh."""
    batch = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)

    def fn(params, images):
        return extractor(params, quantize(images) if quantized else images)

    jitted = jax.jit(fn, in_shardings=(replicated, batch), out_shardings=batch)
    params = sharding.replicate(extractor.params, mesh)
    return lambda images: jitted(params, images)


# ------------------------------------------------------------------------------- held-out data


def held_out_batches(data_cfg, *, batch_size: int, mesh, num_examples: int | None
                     ) -> Iterator[tuple[jax.Array, np.ndarray]]:
    """(global image batch sharded over the mesh, valid-row mask) over the eval split; each host
    reads its own slice (ldm_jax.data.pipeline.make_eval_iterator)."""
    from ldm_jax.data import pipeline
    it = pipeline.make_eval_iterator(data_cfg, global_batch_size=batch_size,
                                     num_examples=num_examples)
    try:
        for local in it:
            arrays = sharding.global_batch({"image": local["image"], "mask": local["mask"]}, mesh)
            yield arrays["image"], sharding.to_host(arrays["mask"]).astype(bool)
    finally:
        it.close()


def held_out_conditions(config, task, num: int) -> dict | None:
    """Condition batch of `num` rows from the held-out latents (captions / layouts through the
    task's tokenizer, cycled when the split is smaller): text and layout models are evaluated
    on the conditions of held-out images, as text-to-image FIDs are. Every process reads the
    whole (small) set, so all hold the same conditions."""
    if getattr(task, "condition_fn", None) is None:
        return None
    from ldm_jax.data import pipeline
    it = pipeline.make_eval_iterator(config.data, global_batch_size=min(num, 256),
                                     num_examples=num, process_index=0, process_count=1,
                                     condition_fn=task.condition_fn)
    rows = {k: [] for k in task.condition.keys}
    try:
        for local in it:
            valid = np.asarray(local["mask"], bool)
            for k in rows:
                rows[k].append(np.asarray(local[k])[valid])
    finally:
        it.close()
    cond = {k: np.concatenate(v) for k, v in rows.items()}
    index = np.arange(num) % len(next(iter(cond.values())))
    return {k: v[index] for k, v in cond.items()}


def data_identity(data_cfg) -> dict:
    """The fields that decide which images a data config yields (reference-cache metadata)."""
    from ldm_jax.data import digits
    out = {k: data_cfg[k] for k in ("source", "name", "folder", "image_size", "image_key",
                                    "train_split", "eval_split", "holdout_percent")}
    data_dir = data_cfg.data_dir
    if data_cfg.source == "digits" and not data_dir:
        data_dir = digits.default_digits_data_dir()
    out["data_dir"] = os.path.abspath(os.path.expanduser(data_dir)) if data_dir else None
    return out


def num_held_out(data_cfg) -> int:
    from ldm_jax.data import registry
    split = data_cfg.eval_split
    if not split:
        raise EvaluationError("the run's data config has no eval_split: set the held-out split "
                              "(e.g. --config.data.eval_split=test when training).")
    return len(registry.make_source(data_cfg, split))


def reference_statistics(extractor, data_cfg, *, mesh, batch_size: int, keep: int,
                         cache_prefix: str | None) -> tuple[statistics.FeatureMoments, np.ndarray]:
    """(moments of the whole held-out split, its first `keep` pool features), cached under
    `cache_prefix` (`<prefix>.npz` via cached_reference_moments, `<prefix>_features.npz`)."""
    n = num_held_out(data_cfg)
    meta = {"features": features_id(extractor), "data": data_identity(data_cfg),
            "num_examples": n}
    feat_meta = dict(meta, keep=int(min(keep, n)))
    moments_path = features_path = None
    hit = False
    if cache_prefix is not None:
        moments_path, features_path = cache_prefix + ".npz", cache_prefix + "_features.npz"
        if jax.process_index() == 0:
            hit = (_stored_meta(moments_path, "meta") == _json(meta)
                   and _stored_meta(features_path, "meta") == _json(feat_meta))
        # Every host must take the same branch: the miss branch runs collectives.
        hit = bool(multihost_utils.broadcast_one_to_all(np.asarray(hit)))
    if hit:
        with np.load(features_path, allow_pickle=False) as z:
            kept = np.asarray(z["features"])
        moments = statistics.cached_reference_moments(moments_path, meta, _unreachable)
        return moments, kept
    sink = FeatureSink(extractor.dim, keep=keep)
    features = make_feature_fn(extractor, mesh, quantized=False)
    for images, mask in held_out_batches(data_cfg, batch_size=batch_size, mesh=mesh,
                                         num_examples=None):
        sink.add(sharding.to_host(features(images)["pool"])[mask])
    if cache_prefix is not None and jax.process_index() == 0:
        statistics.cached_reference_moments(moments_path, meta, lambda: sink.moments)
        files.write_npz(features_path, features=sink.features, meta=json.dumps(feat_meta, sort_keys=True))
    return sink.moments, sink.features


def _unreachable():
    raise RuntimeError("reference statistics vanished between the cache check and the load")


def _json(meta: dict) -> dict:
    return json.loads(json.dumps(meta, sort_keys=True))


def _stored_meta(path: str, key: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z[key])) if key in z.files else None
    except (ValueError, OSError) as e:  # damaged file: treat as a miss and rewrite it
        print(f"Ignoring unreadable {path} ({e}).", file=sys.stderr)
        return None


def _fid(a: statistics.FeatureMoments, b: statistics.FeatureMoments) -> float:
    return statistics.frechet_distance(a.mean, a.covariance, b.mean, b.covariance)


def _is_splits(n: int) -> int:
    """10 splits as the reference IS uses, fewer for small N (at least 100 samples a split)."""
    return max(1, min(10, n // 100))


# ------------------------------------------------------------------------------- stages


def evaluate_diffusion(workdir: str, args, extractor, mesh) -> tuple[dict, dict, dict, int, int]:
    """(metrics, sampler info, reference info, step, N) of a stage-2 run."""
    from ldm_jax.inference import sampling
    from ldm_jax.tasks.diffusion import make_sampler, resolved_eta

    config, task, params, step = sampling.load_params(workdir, step=args.step,
                                                      use_ema=not args.no_ema)
    data_cfg = config.source_data
    n_ref = num_held_out(data_cfg)
    num = args.num_samples or min(n_ref, MAX_DEFAULT_SAMPLES)
    batch_size = _batch_size(args.batch_size, num, mesh)
    keep = min(num, n_ref)
    ref_moments, ref_features = reference_statistics(
        extractor, data_cfg, mesh=mesh, batch_size=batch_size, keep=keep,
        cache_prefix=os.path.join(workdir, "eval", f"reference_{extractor.name}_"
                                                   f"{data_cfg.eval_split}"))
    labels = None
    if task.class_conditional:
        labels = np.arange(num, dtype=np.int32) % task.null_label
    cond = held_out_conditions(config, task, num) if labels is None else {"label": labels}
    sampler = make_sampler(config, task.schedule, name=args.sampler, num_steps=args.steps,
                           eta=args.eta)
    guidance = (config.sampling.guidance_scale if args.guidance_scale is None
                else args.guidance_scale)
    sink = FeatureSink(extractor.dim, keep=num, keep_logits=True)
    features = make_feature_fn(extractor, mesh, quantized=True)
    done = 0
    for images in sampling.sample_batches(task, params, task.constants(), num=num,
                                        batch_size=batch_size, seed=args.seed, sampler=sampler,
                                        guidance_scale=guidance, cond=cond, mesh=mesh):
        out = features(images)
        valid = min(batch_size, num - done)  # the last batch is padded
        sink.add(sharding.to_host(out["pool"])[:valid], sharding.to_host(out["logits"])[:valid])
        done += valid
    metrics = {"fid": _fid(sink.moments, ref_moments)}
    logits = np.concatenate(sink.logits)
    splits = _is_splits(num)
    metrics["inception_score"], metrics["inception_score_std"] = statistics.inception_score(
        logits, splits=splits)
    metrics["inception_score_splits"] = splits
    metrics.update(statistics.precision_recall(ref_features, sink.features, k=PR_K))
    metrics["precision_recall_k"] = PR_K
    metrics["num_reference"] = int(ref_moments.count)
    if (labels is not None and extractor.name == digits_features.VERSION
            and task.null_label == digits_features.NUM_CLASSES):
        metrics["class_accuracy"] = float(np.mean(np.argmax(logits, -1) == labels))
    from ldm_jax.evaluation import conditioned
    report = conditioned.condition_report(config, task, params, extractor, sampler=sampler,
                                          mesh=mesh, batch_size=batch_size, seed=args.seed)
    if report:
        metrics.update(report)
    from ldm_jax.evaluation import image_tasks
    first = task.latents.first_stage
    report = image_tasks.image_task_report(
        config, task, params, extractor, sampler=sampler, mesh=mesh, batch_size=batch_size,
        seed=args.seed, guidance=guidance,
        lpips_params=_lpips_params(first.config) if first is not None else None)
    if report:
        metrics["image_task"] = report
    sampler_info = {"name": args.sampler,
                    "steps": None if args.sampler == "ddpm" else (args.steps
                                                                  or config.sampling.num_steps),
                    "eta": resolved_eta(config, args.sampler, args.eta),
                    "guidance_scale": (float(guidance) if config.conditioning.kind != "none"
                                       else None),
                    "ema": not args.no_ema, "seed": args.seed, "batch_size": batch_size}
    if args.sampler == "dpmpp_2m":  # the one sampler with Karras noise levels
        sampler_info["karras_sigmas"] = bool(config.sampling.get("karras_sigmas", False))
    reference = {"data": data_identity(data_cfg), "num_examples": n_ref,
                 "num_precision_recall": int(len(ref_features))}
    return metrics, sampler_info, reference, step, num


def evaluate_autoencoder(workdir: str, args, extractor, mesh) -> tuple[dict, dict, dict, int, int]:
    """(metrics, {}, reference info, step, N) of a first-stage run."""
    from ldm_jax.evaluation import image_metrics as metrics_lib
    from ldm_jax.storage.first_stage import load_first_stage

    fs = load_first_stage(workdir, step=args.step, flag="--workdir")
    data_cfg = fs.config.data
    n_ref = num_held_out(data_cfg)
    num = min(args.num_samples or MAX_DEFAULT_SAMPLES, n_ref)
    batch_size = _batch_size(args.batch_size, num, mesh)
    lpips_params = _lpips_params(fs.config)
    replicated = sharding.replicated(mesh)
    batch = sharding.batch_sharding(mesh)

    def reconstruct_and_score(fs_params, lpips_p, feat_params, x):
        recon = reconstruct(fs, fs_params, x)
        out = {"psnr": metrics_lib.psnr(x, recon)}
        if x.shape[1] >= 11 and x.shape[2] >= 11:
            out["ssim"] = metrics_lib.ssim(x, recon)
        if lpips_p is not None:
            from ldm_jax.models.lpips import LPIPS
            out["lpips"] = LPIPS().apply({"params": lpips_p}, x, recon)
        out["pool_real"] = extractor(feat_params, x)["pool"]
        out["pool_recon"] = extractor(feat_params, recon)["pool"]
        return out

    fn = jax.jit(reconstruct_and_score, in_shardings=(replicated, replicated, replicated, batch),
                 out_shardings=batch)
    fs_params = sharding.replicate(fs.params, mesh)
    lpips_params = None if lpips_params is None else sharding.replicate(lpips_params, mesh)
    feat_params = sharding.replicate(extractor.params, mesh)
    real = FeatureSink(extractor.dim)
    recon = FeatureSink(extractor.dim)
    sums: dict[str, float] = {}
    count = 0
    for images, mask in held_out_batches(data_cfg, batch_size=batch_size, mesh=mesh,
                                         num_examples=num):
        out = {k: sharding.to_host(v)[mask] for k, v in fn(fs_params, lpips_params, feat_params,
                                                 images).items()}
        real.add(out.pop("pool_real"))
        recon.add(out.pop("pool_recon"))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(np.sum(v, dtype=np.float64))
        count += int(mask.sum())
    metrics = {k: v / count for k, v in sums.items()}
    metrics["rfid"] = _fid(recon.moments, real.moments)
    reference = {"data": data_identity(data_cfg), "num_examples": count}
    return metrics, {}, reference, int(fs.identity["step"]), count


def reconstruct(fs, params, x: jax.Array) -> jax.Array:
    """Deterministic reconstruction in [-1, 1]: KL decodes the posterior mean, VQ its
    quantised latents (FirstStage.decode quantises)."""
    z = fs.encode_moments(params, x)
    if fs.kind == "kl":
        z = z[..., :z.shape[-1] // 2]
    return fs.decode(params, z)


def _lpips_params(config):
    weights = config.loss.lpips_weights
    if not weights:
        return None
    from ldm_jax.models import lpips
    try:
        paths = lpips.require_lpips_weights(weights, "loss.lpips_weights")
    except UserError as e:
        raise EvaluationError(f"the run's config names LPIPS weights that cannot be used here: {e}")
    return lpips.load_lpips_params(*paths)


def _batch_size(requested: int, num: int, mesh) -> int:
    n_dev = mesh.devices.size
    size = requested or min(-(-num // n_dev) * n_dev, max(n_dev, 64 // n_dev * n_dev))
    sharding.check_batch_divides(size, mesh, field="batch_size (--batch_size)")
    return size


# ------------------------------------------------------------------------------- command


@dataclasses.dataclass
class EvalRequest:
    """What `python -m ldm_jax.evaluate` was asked (flag names; see its --help)."""

    workdir: str
    num_samples: int = 0
    features: str | None = None
    inception_weights: str | None = None
    cache_dir: str | None = None
    sampler: str = "ddim"
    steps: int | None = None
    eta: float | None = None
    guidance_scale: float | None = None
    step: int | None = None
    batch_size: int = 0
    seed: int = 0
    no_ema: bool = False
    overrides: tuple = ()  # --config.mesh.* / --config.sampling.*


def evaluate(args: EvalRequest) -> dict:
    """Runs the evaluation `args` describes; returns the report (written on process 0 to
    <workdir>/eval/<step>.json)."""
    start = time.time()
    if args.num_samples < 0:
        raise EvaluationError(f"--num_samples={args.num_samples} must be >= 0.")
    config_lib.check_inference_overrides(args.overrides)
    config = config_lib.apply_inference_overrides(run_dir.read_config(args.workdir),
                                                  args.overrides)
    stage = config.stage
    if stage not in ("diffusion", "autoencoder"):
        raise EvaluationError(f"--workdir={args.workdir}: config.stage={stage!r}; evaluate needs "
                              f"a 'diffusion' or 'autoencoder' run.")
    kind = args.features or "inception"
    extractor = load_features(kind, inception_weights=args.inception_weights,
                              cache_dir=args.cache_dir)
    mesh = sharding.make_mesh(config.mesh)
    run = evaluate_diffusion if stage == "diffusion" else evaluate_autoencoder
    metrics, sampler_info, reference, step, num = run(args.workdir, args, extractor, mesh)
    report = {"step": int(step), "stage": stage, "features": extractor.name,
              "num_samples": int(num),
              "metrics": {k: (float(v) if isinstance(v, (float, np.floating)) else v)
                          for k, v in metrics.items()},
              "sampler": sampler_info, "reference": reference,
              "workdir": os.path.abspath(args.workdir),
              "time_s": round(time.time() - start, 2)}
    if jax.process_index() == 0:
        path = os.path.join(args.workdir, "eval", f"{step}.json")
        files.write_json(path, report)
        print(format_table(report) + f"\nWrote {path}", flush=True)
    return report


def format_table(report: dict) -> str:
    """A short text table of a report."""
    lines = [f"{report['stage']} run, step {report['step']}, features {report['features']}, "
             f"N={report['num_samples']}, {report['time_s']:.1f} s"]
    def rows(items, prefix=""):
        for key, value in items:
            if isinstance(value, dict):  # nested reports (condition accuracies, image tasks)
                yield from rows(value.items(), f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    for key, value in rows(report["metrics"].items()):
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"  {key:<32} {shown:>12}")
    return "\n".join(lines)

"""Evaluation of image-conditioned models (super-resolution, inpainting, semantic synthesis).

`python -m ldm_jax.evaluate` adds `image_task` to the report of a 'concat' / 'hybrid' run. The
inputs are made from the first `num` held-out examples of the run's latents (their stored
images, given low-resolution images and label maps), as training makes them (evaluation
seeds degradations by the image, so every evaluation sees the same inputs):

* sr: PSNR / SSIM / LPIPS (when the first stage's run names LPIPS weights; else
  `feature_distance`, the mean L2 distance of the evaluation features of output and ground
  truth) of the outputs against the ground truth, and the same for plain bicubic up-sampling
  of the input (the baseline);
* inpaint: per evaluation mask (the left and the right half masked) the same metrics of the
  blended results (the visible half is the input's, so they measure the filled half);
* semantic: nothing to compare pixel-wise (the map allows many images).

LPIPS weights (`lpips_params`) come from the caller: the evaluation runner loads those the
first stage's run names.

With the digits features on the embedded digits data the digits classifier also reads the
outputs: `class_accuracy` (the ground-truth digit; for semantic synthesis the map's digit),
for semantic synthesis the IoU of the output's foreground (grey above FOREGROUND_THRESHOLD of
its brightest pixel, as the maps are made) with the map's, and for super-resolution
`mosaic`: 2x2 mosaics of four held-out low-resolution digits (twice the training input size
per side) super-resolved in one piece (convolutional sampling), each quadrant classified.
"""

from __future__ import annotations

import numpy as np

from ldm_jax.data import digits_image_tasks
from ldm_jax.evaluation import digits_features

# As digits_semantic's label maps: grey above 0.3 of the image's brightest pixel.
FOREGROUND_THRESHOLD = digits_image_tasks.FOREGROUND_THRESHOLD
EVAL_MASKS = ("left", "right")


def held_out_fields(config, num: int) -> list[dict]:
    """The canonical fields (image, low_res, segmentation, label) of the first `num` held-out
    latents records; [] when the run reads no latents (a bundle, synthetic latents)."""
    from ldm_jax.data import conditioning_fields
    from ldm_jax.data import latents as latents_lib
    if config.data.source != "latents" or not config.data.latents_dir:
        return []
    src = latents_lib.latents_source(config.data.latents_dir, config.data.eval_split)
    out = []
    for i in range(min(num, len(src))):
        rec = src[i]
        fields = conditioning_fields.condition_fields(rec, config.data.label_key)
        if "image" not in fields and "image" in rec:
            fields["image"] = np.asarray(rec["image"], np.uint8)
        out.append(fields)
    return out


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _pixel_metrics(outputs: np.ndarray, truth: np.ndarray, extractor, lpips_params) -> dict:
    """Mean PSNR, SSIM, LPIPS or feature distance of uint8 outputs against uint8 truth."""
    import jax.numpy as jnp

    from ldm_jax.evaluation import image_metrics
    x = jnp.asarray(outputs, jnp.float32) / 127.5 - 1.0
    y = jnp.asarray(truth, jnp.float32) / 127.5 - 1.0
    out = {"psnr": float(jnp.mean(image_metrics.psnr(x, y)))}
    if x.shape[1] >= 11 and x.shape[2] >= 11:
        out["ssim"] = float(jnp.mean(image_metrics.ssim(x, y)))
    if lpips_params is not None:
        from ldm_jax.models.lpips import LPIPS
        out["lpips"] = float(jnp.mean(LPIPS().apply({"params": lpips_params}, x, y)))
    fx = np.asarray(extractor(extractor.params, x)["pool"], np.float64)
    fy = np.asarray(extractor(extractor.params, y)["pool"], np.float64)
    out["feature_distance"] = float(np.mean(np.linalg.norm(fx - fy, axis=-1)))
    return out


def _classify(extractor, images: np.ndarray) -> np.ndarray:
    from ldm_jax.evaluation import conditioned
    classify = conditioned._classify  # pylint: disable=protected-access
    return classify(extractor, extractor.params, images)


def _digits(config, extractor) -> bool:
    return (extractor.name == digits_features.VERSION
            and config.source_data.source.startswith("digits"))


def image_task_report(config, task, params, extractor, *, sampler, mesh, batch_size: int,
                      seed: int = 0, num: int = 200, guidance: float = 1.0,
                      lpips_params=None) -> dict | None:
    """The report of an image-conditioned run (see the module docstring); None otherwise or
    when the run's held-out latents are not at hand."""
    if not getattr(task, "image_conditional", False):
        return None
    fields = held_out_fields(config, num)
    if not fields:
        return None
    from ldm_jax.inference import sampling
    cond_obj = task.condition
    levels = 2 ** (len(config.model.channel_mult) - 1)
    digits = _digits(config, extractor)

    def run(inputs, masks=None):
        cond = cond_obj.request(len(inputs), inputs=inputs, masks=masks, levels=levels)
        return sampling.generate(task, params, task.constants(), num=len(inputs),
                                 batch_size=batch_size, seed=seed, sampler=sampler,
                                 guidance_scale=guidance, cond=cond, mesh=mesh)

    labels = np.asarray([f.get("label", -1) for f in fields])
    report: dict = {"num_examples": len(fields), "task": cond_obj.task}
    if cond_obj.task == "sr":
        truth = np.stack([f["image"] for f in fields])
        inputs = np.stack([_to_uint8(cond_obj.condition_fn(f, None, False)["low_res"])
                           for f in fields])
        outputs = run(inputs)
        from ldm_jax.data.degradations import bicubic_upsample
        bicubic = np.stack([bicubic_upsample(x, truth.shape[1] // x.shape[0]) for x in inputs])
        report["model"] = _pixel_metrics(outputs, truth, extractor, lpips_params)
        report["bicubic"] = _pixel_metrics(bicubic, truth, extractor, lpips_params)
        if digits:
            report["model"]["class_accuracy"] = float(
                np.mean(_classify(extractor, outputs) == labels))
            report["bicubic"]["class_accuracy"] = float(
                np.mean(_classify(extractor, bicubic) == labels))
            report["mosaic"] = mosaic_accuracy(run, extractor, inputs, labels)
    elif cond_obj.task == "inpaint":
        from ldm_jax.data.masks import half_mask
        truth = np.stack([f["image"] for f in fields])
        h, w = truth.shape[1:3]
        for side in EVAL_MASKS:
            masks = np.repeat(half_mask(h, w, side)[None], len(truth), axis=0)
            outputs = run(truth, masks)
            outputs = np.where(masks[..., None].astype(bool), outputs, truth).astype(np.uint8)
            entry = _pixel_metrics(outputs, truth, extractor, lpips_params)
            if digits:
                entry["class_accuracy"] = float(np.mean(_classify(extractor, outputs) == labels))
            report[f"{side}_half"] = entry
        if digits:
            report["data_class_accuracy"] = float(np.mean(_classify(extractor, truth) == labels))
    else:
        segs = np.stack([np.asarray(f["segmentation"]) for f in fields])
        outputs = run(segs)
        if digits:
            # The map's digit: its most frequent foreground class, minus the background id.
            want = np.asarray([np.bincount(s[s > 0].ravel(), minlength=2).argmax() - 1
                               if (s > 0).any() else -1 for s in segs])
            report["class_accuracy"] = float(np.mean(_classify(extractor, outputs) == want))
            report["foreground_iou"] = float(np.mean(foreground_iou(outputs, segs > 0)))
    return report


def foreground_iou(images: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """IoU per image of its foreground (grey > FOREGROUND_THRESHOLD x the image's brightest
    grey, as the digits' label maps are made) with a boolean foreground [N, H, W]."""
    grey = images.astype(np.float32).mean(-1)
    peak = grey.reshape(len(grey), -1).max(axis=1)[:, None, None]
    pred = np.logical_and(grey > FOREGROUND_THRESHOLD * peak, peak > 0)
    inter = np.logical_and(pred, foreground).sum(axis=(1, 2))
    union = np.logical_or(pred, foreground).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def make_mosaics(inputs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2x2 mosaics of consecutive groups of four inputs [N, h, w, 3] -> ([N//4, 2h, 2w, 3],
    labels [N//4, 4] in reading order)."""
    n = len(inputs) // 4 * 4
    x = inputs[:n].reshape(n // 4, 2, 2, *inputs.shape[1:])
    mosaics = np.concatenate([np.concatenate([x[:, r, 0], x[:, r, 1]], axis=2) for r in (0, 1)],
                             axis=1)
    return mosaics, labels[:n].reshape(n // 4, 4)


def mosaic_accuracy(run, extractor, inputs: np.ndarray, labels: np.ndarray) -> dict:
    """Super-resolves 2x2 mosaics of inputs in one piece and classifies each output quadrant."""
    mosaics, want = make_mosaics(inputs, labels)
    if not len(mosaics):
        return {}
    outputs = run(mosaics)
    h, w = outputs.shape[1] // 2, outputs.shape[2] // 2
    quads = np.stack([outputs[:, r * h:(r + 1) * h, c * w:(c + 1) * w]
                      for r in (0, 1) for c in (0, 1)], axis=1).reshape(-1, h, w, 3)
    pred = _classify(extractor, quads)
    return {"num_mosaics": int(len(mosaics)), "input_size": list(mosaics.shape[1:3]),
            "output_size": list(outputs.shape[1:3]),
            "quadrant_accuracy": float(np.mean(pred == want.reshape(-1)))}


def write_example_inputs(workdir: str, out: str, num: int = 16) -> str:
    """Writes `out` (.npz) with sampling inputs from the first `num` held-out examples of a
    stage-2 image-task run: `images` (the low-resolution inputs for sr, the images for
    inpaint), `masks` (inpaint: left and right halves in turn) or `segmentations` (semantic),
    for `python -m ldm_jax.sample --input=OUT [--mask=OUT]`."""
    from ldm_jax.inference import sampling
    from ldm_jax.storage import files
    config, task = sampling.load_run(workdir)
    if not getattr(task, "image_conditional", False):
        raise sampling.SamplingError(f"--workdir={workdir} is not an image-conditioned run.")
    fields = held_out_fields(config, num)
    if not fields:
        raise sampling.SamplingError(f"--workdir={workdir}: its held-out latents "
                                     f"({config.data.latents_dir}) are not at hand.")
    condition = task.condition
    if condition.task == "sr":
        arrays = {"images": np.stack([_to_uint8(condition.condition_fn(f, None, False)["low_res"])
                                      for f in fields])}
    elif condition.task == "inpaint":
        from ldm_jax.data.masks import half_mask
        images = np.stack([f["image"] for f in fields])
        masks = np.stack([half_mask(*images.shape[1:3], EVAL_MASKS[i % 2])
                          for i in range(len(images))])
        arrays = {"images": images, "masks": masks}
    else:
        arrays = {"segmentations": np.stack([np.asarray(f["segmentation"], np.uint8)
                                             for f in fields])}
    files.write_npz(out, **arrays)
    return out


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(
        "python -m ldm_jax.evaluation.image_tasks",
        description="Writes sampling inputs (inputs.npz) from an image-task run's held-out data.")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True, help="the .npz to write")
    parser.add_argument("--num", type=int, default=16)
    cli = parser.parse_args()
    print(f"wrote {write_example_inputs(cli.workdir, cli.out, cli.num)}")

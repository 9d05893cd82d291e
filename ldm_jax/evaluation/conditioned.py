"""Does a conditioned model draw what it is asked for? Condition accuracies on the digits data.

The digits classifier of `digits_features` reads what was drawn:

* text (`digits_captions` data): for every digit d and every phrasing template, prompts that
  name d; the share of samples classified as d, per guidance scale and for the phrasings used
  in training and the held-out ones (never seen in training);
* layout (`digits_layout` data): layouts of the held-out canvases; each requested box is
  cropped from the sample, resized to the classifier's 32 px and classified; also the mean
  intensity outside every box, against the same number on the data (background should stay
  background).

`python -m ldm_jax.evaluate --features=digits` adds these to the report of such a run.
"""

from __future__ import annotations

import numpy as np

from ldm_jax.evaluation import digits_features

GUIDANCE_SCALES = (1.0, 2.0, 4.0)


def _classify(extractor, feat_params, images: np.ndarray) -> np.ndarray:
    """Predicted digits of uint8 images [N, 32, 32, 3]."""
    x = images.astype(np.float32) / 127.5 - 1.0
    logits = extractor(feat_params, x)["logits"]
    return np.argmax(np.asarray(logits), axis=-1)


def _sample(task, params, cond: dict, *, sampler, guidance: float, seed: int, mesh,
            batch_size: int) -> np.ndarray:
    from ldm_jax.inference import sampling
    num = len(next(iter(cond.values())))
    return sampling.generate(task, params, task.constants(), num=num, batch_size=batch_size,
                             seed=seed, sampler=sampler, guidance_scale=guidance, cond=cond,
                             mesh=mesh)


def text_prompt_accuracy(task, params, extractor, feat_params, *, sampler, mesh, batch_size: int,
                         per_digit: int = 20, seed: int = 0,
                         guidance_scales=GUIDANCE_SCALES) -> dict:
    """{'train_phrasings' | 'heldout_phrasings': {'g<scale>': accuracy}} over prompts naming
    each digit (`per_digit` samples per digit, the phrasings cycled)."""
    from ldm_jax.data import digits_conditioned as dc
    out = {}
    for name, templates in (("train_phrasings", dc.TRAIN_PHRASINGS),
                            ("heldout_phrasings", dc.HELDOUT_PHRASINGS)):
        prompts, digits = [], []
        for d in range(10):
            options = dc.captions_for(d, templates)
            prompts += [options[i % len(options)] for i in range(per_digit)]
            digits += [d] * per_digit
        cond = task.condition.request(len(prompts), prompts=prompts)
        out[name] = {}
        for g in guidance_scales:
            images = _sample(task, params, cond, sampler=sampler, guidance=g, seed=seed,
                             mesh=mesh, batch_size=batch_size)
            pred = _classify(extractor, feat_params, images)
            out[name][f"g{g:g}"] = float(np.mean(pred == np.asarray(digits)))
        out[name]["num_prompts"] = len(prompts)
        out[name]["example_prompts"] = sorted(set(prompts))[:5]
    return out


def crop_boxes(image: np.ndarray, boxes: np.ndarray, size: int = 32) -> np.ndarray:
    """uint8 crops [N, size, size, 3] of normalised xyxy boxes, resized bilinearly."""
    from PIL import Image
    h, w = image.shape[:2]
    crops = []
    for x0, y0, x1, y1 in np.asarray(boxes, np.float64):
        left, top = int(np.floor(x0 * w)), int(np.floor(y0 * h))
        right, bottom = max(int(np.ceil(x1 * w)), left + 1), max(int(np.ceil(y1 * h)), top + 1)
        crop = Image.fromarray(image[top:bottom, left:right]).resize((size, size), Image.BILINEAR)
        crops.append(np.asarray(crop))
    return np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)


def outside_mask(shape, boxes: np.ndarray) -> np.ndarray:
    """bool [H, W]: True outside every box (box pixels rounded outwards)."""
    h, w = shape
    mask = np.ones((h, w), bool)
    for x0, y0, x1, y1 in np.asarray(boxes, np.float64):
        mask[int(np.floor(y0 * h)):int(np.ceil(y1 * h)), int(np.floor(x0 * w)):int(np.ceil(x1 * w))] = False
    return mask


def layout_accuracy(task, params, extractor, feat_params, layouts, data_images, *, sampler,
                    mesh, batch_size: int, seed: int = 0,
                    guidance_scales=GUIDANCE_SCALES) -> dict:
    """Per-box accuracy and outside-box intensity for `layouts` [(labels, boxes), ...] whose
    data canvases are `data_images` uint8 [N, H, W, 3]."""
    cond = {"tokens": task.condition.tokenize(list(layouts))}
    def outside(images):
        values = [img.mean(-1)[outside_mask(img.shape[:2], boxes)] for img, (_, boxes)
                  in zip(images, layouts)]
        return float(np.mean(np.concatenate(values)) / 255.0)
    out = {"num_layouts": len(layouts), "num_boxes": int(sum(len(l) for l, _ in layouts)),
           "data_outside_intensity": outside(data_images)}
    for g in guidance_scales:
        images = _sample(task, params, cond, sampler=sampler, guidance=g, seed=seed, mesh=mesh,
                         batch_size=batch_size)
        crops = np.concatenate([crop_boxes(img, boxes) for img, (_, boxes) in zip(images, layouts)])
        truth = np.concatenate([np.asarray(labels) for labels, _ in layouts])
        pred = _classify(extractor, feat_params, crops)
        out[f"g{g:g}"] = {"box_accuracy": float(np.mean(pred == truth)),
                          "outside_intensity": outside(images)}
    # The classifier on the data's own crops: the ceiling the samples are measured against.
    crops = np.concatenate([crop_boxes(img, boxes) for img, (_, boxes) in zip(data_images, layouts)])
    truth = np.concatenate([np.asarray(labels) for labels, _ in layouts])
    out["data_box_accuracy"] = float(np.mean(_classify(extractor, feat_params, crops) == truth))
    return out


def condition_report(config, task, params, extractor, *, sampler, mesh, batch_size: int,
                     seed: int = 0, num_layouts: int = 200) -> dict | None:
    """The condition accuracies for a digits text / layout run; None for other runs."""
    if extractor.name != digits_features.VERSION:
        return None
    source = config.source_data.source
    feat_params = extractor.params
    if config.conditioning.kind == "text" and source == "digits_captions":
        return {"text_prompt_accuracy": text_prompt_accuracy(
            task, params, extractor, feat_params, sampler=sampler, mesh=mesh,
            batch_size=batch_size, seed=seed)}
    if config.conditioning.kind == "layout" and source == "digits_layout":
        from ldm_jax.data import registry
        src = registry.make_source(config.source_data, config.source_data.eval_split)
        layouts, images = [], []
        for i in range(min(num_layouts, len(src))):
            ex = src[i]
            layouts.append((np.asarray(ex["box_labels"]), np.asarray(ex["boxes"], np.float32)))
            images.append(np.asarray(ex["image"], np.uint8))
        return {"layout_accuracy": layout_accuracy(
            task, params, extractor, feat_params, layouts, np.stack(images),
            sampler=sampler, mesh=mesh, batch_size=batch_size, seed=seed)}
    return None



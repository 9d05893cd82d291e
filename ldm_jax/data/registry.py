"""`data.source` name -> source factory; `make_source` builds the source of a config's split.

The one module that knows every kind of source. It lives apart from `sources` because
`latents` and `folder` import `sources` (errors, TFDS helpers): dispatching from `sources`
itself made an import cycle.

Image sources come back with the canonical conditioning fields the config asks for
(`data.caption_key`, `data.boxes_key`, `data.segmentation_key`, `data.low_res_key`, ...:
`conditioning_fields.CanonicalFieldsSource`); the digits data sets with captions / layouts /
low-resolution images / label maps carry theirs without being asked.

Each factory reads its config fields directly (`data_cfg.label_key`, ...): every field has a
default in `ldm_jax.config.defaults.data_config`, so a missing one is a bug, not a choice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ldm_jax.data import conditioning_fields, folder, latents, sources, synthetic
from ldm_jax.data.conditioning_fields import FieldSpec
from ldm_jax.data.sources import DataConfigError, HoldoutPolicy


def _digits(data_cfg, split: str):
    return sources.digits_source(split, data_cfg.data_dir,
                                 holdout=HoldoutPolicy.from_config(data_cfg))


def _digits_captions(data_cfg, split: str):
    from ldm_jax.data import digits_conditioned

    return digits_conditioned.captions_source(split, data_cfg.data_dir,
                                              holdout=HoldoutPolicy.from_config(data_cfg),
                                              fields=FieldSpec.from_config(data_cfg))


def _digits_layout(data_cfg, split: str):
    from ldm_jax.data import digits_conditioned

    return digits_conditioned.layout_source(split, data_cfg.data_dir,
                                            holdout=HoldoutPolicy.from_config(data_cfg),
                                            fields=FieldSpec.from_config(data_cfg))


def _digits_sr(data_cfg, split: str):
    from ldm_jax.data import digits_image_tasks

    return digits_image_tasks.sr_source(split, data_cfg.data_dir,
                                        holdout=HoldoutPolicy.from_config(data_cfg),
                                        fields=FieldSpec.from_config(data_cfg))


def _digits_semantic(data_cfg, split: str):
    from ldm_jax.data import digits_image_tasks

    return digits_image_tasks.semantic_source(split, data_cfg.data_dir,
                                              holdout=HoldoutPolicy.from_config(data_cfg),
                                              fields=FieldSpec.from_config(data_cfg))


def _tfds(data_cfg, split: str):
    return sources.tfds_source(data_cfg.name, split, data_cfg.data_dir,
                               holdout=HoldoutPolicy.from_config(data_cfg))


def _folder(data_cfg, split: str):
    spec = FieldSpec.from_config(data_cfg)
    if spec.low_res_key:
        raise DataConfigError(
            f"data.low_res_key={spec.low_res_key!r}: image folders hold no low-resolution "
            "images; set data.low_res_key='' (super-resolution then degrades the image itself, "
            "conditioning.degradation 'bicubic' or 'bsr').")
    return folder.folder_source(
        data_cfg.folder, split,
        # An empty image_key means the default key, as in the pipeline's example fn.
        data_cfg.image_key or "image",
        label_key=data_cfg.label_key or None,
        # Folders keep captions in `<image stem>.txt` side files (any data.caption_key).
        captions=bool(spec.caption_keys),
        # ... and label maps in `<image stem>.seg.png` (any data.segmentation_key).
        segmentation=bool(spec.segmentation_key),
        holdout=HoldoutPolicy.from_config(data_cfg),
        max_unreadable_fraction=data_cfg.max_unreadable_fraction,
    )


def _latents(data_cfg, split: str):
    return latents.latents_source(data_cfg.latents_dir, split)


def _synthetic_latents(data_cfg, split: str):
    # The eval split is other noise on the same class patterns.
    spec = FieldSpec.from_config(data_cfg)
    return synthetic.SyntheticLatentsSource(
        data_cfg.latent_shape, data_cfg.num_classes,
        noise_seed=0 if split == data_cfg.train_split else 1,
        captions=bool(spec.caption_keys), layouts=bool(spec.boxes_key))


# `data.source` -> (data_cfg, split) -> random-access source.
SOURCES: dict[str, Callable[[Any, str], Any]] = {
    "digits": _digits,
    "tfds": _tfds,
    "folder": _folder,
    "latents": _latents,
    "synthetic_latents": _synthetic_latents,
    "digits_captions": _digits_captions,
    "digits_layout": _digits_layout,
    "digits_sr": _digits_sr,
    "digits_semantic": _digits_semantic,
}
# Image sources whose examples get the configured canonical fields here (the digits data sets
# with captions / layouts / image fields do it themselves, knowing their own field names).
_ADDS_CANONICAL_FIELDS = ("digits", "tfds", "folder")


def make_source(data_cfg, split: str):
    """Builds the random-access source of `split` from a `data` config.

    Dispatches on `data.source` (a key of `SOURCES`): 'digits' (embedded), 'digits_captions'
    / 'digits_layout' (embedded, with captions / layouts), 'digits_sr' / 'digits_semantic'
    (embedded, with low-resolution images / label maps: `digits_image_tasks`), 'tfds'
    (`data.name` in `data.data_dir`), 'folder' (`data.folder`), 'latents' (precomputed
    first-stage latents in `data.latents_dir`) or 'synthetic_latents'. Image sources hold
    out `data.holdout_percent`% of the train split as `data.eval_split` when the data has no
    such split (`sources.HoldoutPolicy`); their `holdout` attribute records it. Image
    sources also carry the canonical 'caption' / 'boxes' / 'box_labels' / 'segmentation' /
    'low_res' fields that `data.caption_key` / `data.boxes_key` / `data.box_labels_key` /
    `data.segmentation_key` / `data.low_res_key` select.

    Raises:
      DataConfigError: unknown `data.source`, or whatever the source's factory finds wrong.
    """
    kind = data_cfg.source
    factory = SOURCES.get(kind)
    if factory is None:
        raise DataConfigError(
            f"Unknown data.source={kind!r}; set it to one of {list(SOURCES)}.")
    source = factory(data_cfg, split)
    if kind in _ADDS_CANONICAL_FIELDS:
        spec = FieldSpec.from_config(data_cfg)
        if kind == "folder" and spec.caption_keys:  # read from side files as 'caption'
            spec = dataclasses.replace(spec, caption_keys=(conditioning_fields.CAPTION,))
        if kind == "folder" and spec.segmentation_key:  # <stem>.seg.png as 'segmentation'
            spec = dataclasses.replace(spec, segmentation_key=conditioning_fields.SEGMENTATION)
        if spec.active:
            source = conditioning_fields.CanonicalFieldsSource(source, spec)
    return source

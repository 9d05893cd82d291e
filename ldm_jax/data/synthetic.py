"""Synthetic latents for stage-2 smoke runs: no first stage and no precompute needed.

Each example is a fixed low-frequency pattern of its class (or of class 0 when unlabelled) plus
a little per-example noise, so a UNet has real structure to learn and its loss falls within a
few dozen steps. Deterministic from the example index, random access like every other source.
With `captions` each example also carries a caption naming its class (two phrasings), and with
`layouts` one box (a quadrant chosen by the class) labelled with the class: enough for the text
and layout smoke runs to exercise the whole conditioning path without a data set. Every
example also carries the image-conditioning fields: `image`, the latent seen as an image at
the latent size (uint8 of clip(z / 3), the convention of DiffusionTask.decode without a first
stage), and `segmentation`, a label map (class + 1 where the latent's first channel is
positive, 0 elsewhere), so the super-resolution, inpainting and semantic smoke runs need no data
set either.
"""

from __future__ import annotations

import numpy as np


class SyntheticLatentsSource:
    """`num_examples` latents of `latent_shape`; labels `index % num_classes` when num_classes>0."""

    def __init__(self, latent_shape, num_classes: int = 0, num_examples: int = 1024,
                 noise_seed: int = 0, captions: bool = False, layouts: bool = False):
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.num_classes = int(num_classes)
        self.num_examples = int(num_examples)
        h, w, c = self.latent_shape
        rng = np.random.default_rng(1234)  # the class patterns are the same in every split
        yy, xx = np.meshgrid(np.linspace(0, np.pi, h), np.linspace(0, np.pi, w), indexing="ij")
        patterns = []
        for _ in range(max(self.num_classes, 1)):
            fy, fx = rng.integers(1, 3, size=2)
            phase = rng.uniform(0, np.pi, size=c)
            patterns.append(np.stack([np.sin(fy * yy + p) * np.cos(fx * xx) for p in phase], -1))
        self._patterns = np.asarray(patterns, np.float32)
        self._seed = noise_seed
        self.captions, self.layouts = bool(captions), bool(layouts)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        label = index % self.num_classes if self.num_classes else 0
        noise = np.random.default_rng((self._seed, index)).normal(size=self.latent_shape)
        example = {"latent": (self._patterns[label] + 0.1 * noise).astype(np.float32),
                   "index": np.int64(index)}
        latent = example["latent"]
        example["image"] = np.round((np.clip(latent[..., :3] / 3.0, -1, 1) + 1) * 127.5
                                    ).astype(np.uint8)
        if latent.shape[-1] < 3:
            example["image"] = np.repeat(example["image"][..., :1], 3, axis=-1)
        example["segmentation"] = np.where(latent[..., 0] > 0, label + 1, 0).astype(np.uint8)
        if self.num_classes:
            example["label"] = np.int64(label)
        if self.captions:
            example["caption"] = [f"pattern number {label}", f"the pattern {label}"]
        if self.layouts:
            x0, y0 = 0.5 * (label % 2), 0.5 * (label // 2 % 2)
            example["boxes"] = np.asarray([[x0, y0, x0 + 0.5, y0 + 0.5]], np.float32)
            example["box_labels"] = np.asarray([label], np.int64)
        return example

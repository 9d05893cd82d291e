"""What a user reads during training: progress lines, metrics.jsonl, TensorBoard, PNG grids.

Only process 0 writes; every other process gets no-op writers, so multi-host runs do not
clobber each other's files.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping

import jax
import numpy as np


def _is_writer_process() -> bool:
    return jax.process_index() == 0


class MetricWriter:
    """Writes scalars to `<workdir>/metrics.jsonl` (one JSON object per call) and TensorBoard."""

    def __init__(self, workdir: str, filename: str = "metrics.jsonl", tensorboard: bool = True):
        self.active = _is_writer_process()
        self._tb = None
        self._file = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = open(os.path.join(workdir, filename), "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.active:
            return
        record = {"step": int(step)}
        for key, value in scalars.items():
            value = float(value)
            record[key] = value if math.isfinite(value) else str(value)
            if self._tb is not None:
                self._tb.add_scalar(key, value, int(step))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write_image(self, step: int, tag: str, image_uint8: np.ndarray) -> None:
        if self.active and self._tb is not None:
            self._tb.add_image(tag, image_uint8, int(step), dataformats="HWC")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class ProgressLogger:
    """Prints `step 120/2000 | loss 0.1234 | 640.1 img/s | 0.050 s/step | ETA 1m34s` lines."""

    def __init__(self, total_steps: int, global_batch_size: int, stream=sys.stdout):
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        self.stream = stream
        self._last_time = None
        self._last_step = None

    def start(self, step: int) -> None:
        self._last_time = time.perf_counter()
        self._last_step = step

    def log(self, step: int, scalars: Mapping[str, float]) -> dict:
        """Prints one line; returns the timing scalars (steps/s, images/s) for the writers."""
        now = time.perf_counter()
        elapsed = now - self._last_time
        steps = max(step - self._last_step, 1)
        step_time = elapsed / steps
        timing = {"steps_per_sec": 1.0 / step_time if step_time > 0 else float("nan"),
                  "images_per_sec": self.global_batch_size / step_time if step_time > 0 else float("nan")}
        self._last_time, self._last_step = now, step
        if _is_writer_process():
            shown = " | ".join(f"{k} {v:.4g}" for k, v in scalars.items()
                               if k in ("loss", "rec_loss", "nll", "kl", "vq_loss", "d_loss",
                                        "g_loss", "lr", "eval_psnr"))
            eta = _format_seconds((self.total_steps - step) * step_time)
            print(f"step {step}/{self.total_steps} | {shown} | "
                  f"{timing['images_per_sec']:.1f} img/s | {step_time:.3f} s/step | ETA {eta}",
                  file=self.stream, flush=True)
        return timing

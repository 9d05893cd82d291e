"""Helpers shared by the diffusers parity / conversion tests (randomised torch modules)."""

from __future__ import annotations

import numpy as np


def randomize(module, seed: int, std: float = 0.2) -> None:
    """Overwrite EVERY parameter (zero-initialised out convs, norm affines included) with
    N(0, std^2) so no layer is trivially the identity or zero."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    module.eval()


def state_dict_np(module) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def rel_err(a, b) -> float:
    """max|a - b| / max|b| (b is the reference)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def nchw_to_nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def nhwc_to_nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))

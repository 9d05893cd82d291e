"""Per-block rematerialisation (activation checkpointing) selected by `config.model.remat`.

Policies (what the forward pass of each wrapped block keeps for the backward pass):

* ``'nothing'``: no rematerialisation; every activation the backward pass needs is stored
  (fastest, most memory). The block class is used unwrapped.
* ``'dots'``: keep only the outputs of convolutions and of weight matmuls (Dense layers, the
  q/k/v/out projections, the GEGLU projections); recompute the cheap elementwise work between
  them (GroupNorm/LayerNorm, SiLU/GELU, residual adds, casts) and the attention core.
  This is `jax.checkpoint_policies.dots_with_no_batch_dims_saveable` plus convolutions:
  plain ``dots_saveable`` (= ``checkpoint_dots``) also keeps the *batched* matmuls of
  attention, whose [B, heads, L, L] score/probability tensors are the largest activations
  of a UNet at high resolution, and ``dots_with_no_batch_dims_saveable`` alone would not keep
  conv outputs (conv_general_dilated is not a dot_general), i.e. recompute every conv of a
  ResBlock. Keeping convs + weight matmuls and dropping the L x L attention tensors is the
  usual FLOPs-for-memory sweet spot.
* ``'full'``: keep nothing inside the block: only its inputs are stored and the whole block
  is recomputed in the backward pass (about one extra forward pass of compute).

Wrapping uses `flax.linen.remat`, which keeps the wrapped module's name, so parameter trees
(and converted checkpoints) are identical under every policy; gradients are identical up to
floating-point reassociation by XLA.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import flax.linen as nn

REMAT_POLICIES = ("nothing", "dots", "full")


def _save_convs_and_weight_matmuls(prim, *args, **params) -> bool:
    if prim.name == "conv_general_dilated":
        return True
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)


def check_remat(remat: str, owner: str = "remat", error: type = ValueError) -> str:
    """`remat` if it names a policy; otherwise `error` (a ValueError subclass, e.g. the config
    loader's ConfigError) naming `owner` and the allowed values."""
    if remat not in REMAT_POLICIES:
        raise error(f"{owner}={remat!r}: use one of {REMAT_POLICIES} ('nothing' = store "
                         f"every activation, 'dots' = store conv/matmul outputs only, 'full' = "
                         f"recompute each block in the backward pass).")
    return remat


def checkpoint_policy(remat: str):
    """The `jax.checkpoint` policy of a remat name ('nothing' has none: no checkpointing)."""
    check_remat(remat)
    return {"nothing": None, "dots": _save_convs_and_weight_matmuls, "full": None}[remat]


@functools.lru_cache(maxsize=None)
def _wrapped(cls, remat: str, static_argnums: tuple):
    return nn.remat(cls, policy=checkpoint_policy(remat), static_argnums=static_argnums)


def remat_block(cls, remat: str, static_argnums: Sequence[int] = ()):
    """`cls` wrapped in `nn.remat` with the policy `remat` ('nothing': `cls` itself).

    ``static_argnums`` index the positional arguments of ``__call__`` counting ``self`` as 0
    (flax's convention); Python flags such as ``train`` must be listed, and passed positionally.
    """
    if check_remat(remat) == "nothing":
        return cls
    return _wrapped(cls, remat, tuple(static_argnums))


def compiler_options(backend: str | None = None) -> dict:
    """XLA options under which rematerialisation takes effect on `backend` (default: JAX's).

    `jax.checkpoint` stops XLA from merging the recomputation with the forward pass (CSE) by
    routing the saved inputs through optimization barriers. XLA:CPU expands (removes) those
    barriers *before* its CSE pass ('cse_barrier_expander'), so on CPU every policy compiles
    to the 'nothing' program and memory is not reduced; the GPU/TPU pipelines keep them. On
    CPU this returns the option that skips that pass (for `.compile(compiler_options=...)`);
    elsewhere nothing. It does not change results, only whether recomputation survives.
    """
    backend = backend or jax.default_backend()
    return {"xla_disable_hlo_passes": "cse_barrier_expander"} if backend == "cpu" else {}

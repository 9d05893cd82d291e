"""FSDP equals data parallelism: the same run on mesh data=8 and on data=2 x fsdp=4 gives the
same losses and parameters (to float tolerance), while the per-device bytes of the parameters,
optimiser state and EMA fall to about 1/4. Both stages: stage 2 (ldm_digits smoke, synthetic
latents) and stage 1 (KL-f4 digits smoke, both the reconstruction and the GAN step)."""

import functools

import jax
import numpy as np
import pytest

from conftest import QUIET_RUN, read_metrics, smoke_config
from ldm_jax.storage import run_dir
from ldm_jax.training import checkpointing
from ldm_jax.config import loading as config_lib
from ldm_jax.parallel import sharding
from ldm_jax.tasks import make_task
from ldm_jax.training.trainer import train_and_evaluate
# Small enough that the tiny test models have most of their weights sharded (the default 2**14
# keeps arrays of these widths replicated: not worth a collective at that size).
MIN_SIZE = 256


def config_for(stage: str, mesh: str, steps: int):
    name = "ldm_digits.py" if stage == "diffusion" else "autoencoder_kl_f4_digits.py"
    data, fsdp = mesh.split("x")
    overrides = [f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"total_steps={steps}",
                 f"checkpoint_every_steps={steps}", "log_every_steps=1", *QUIET_RUN,
                 f"sharding.fsdp_min_size={MIN_SIZE}", "optimizer.eps=1e-4"]
    if stage == "autoencoder":
        overrides += ["loss.disc_start=2"]  # steps 0-1 'rec', then the GAN phase.
    return smoke_config(name, *overrides)


def read_losses(workdir):
    return {r["step"]: r for r in read_metrics(workdir) if "loss" in r}


def state_on_mesh(config, workdir, step):
    """The run's final checkpoint restored onto the config's mesh with the trainer's shardings."""
    mesh = sharding.make_mesh(config.mesh)
    task = make_task(config)
    size = config.data.image_size if config.stage == "autoencoder" else None
    shape = None if size is None else (config.batch_size, size, size, 3)
    abstract = jax.eval_shape(functools.partial(task.init_state, input_shape=shape),
                              jax.random.key(0))
    shardings = sharding.tree_shardings(abstract, mesh, config.sharding)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    ckpt = checkpointing.Checkpointer(workdir, async_save=False)
    try:
        state, _ = ckpt.restore(step, abstract, config_lib.to_json_dict(task.config))
    finally:
        ckpt.close()
    return state


def max_rel_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-6)))


@pytest.mark.parametrize("stage,steps", [("diffusion", 5),
                                         pytest.param("autoencoder", 4, marks=pytest.mark.slow)])
def test_fsdp_matches_data_parallel_and_shards_the_state(tmp_path, stage, steps):
    assert jax.device_count() == 8
    dp_cfg, fsdp_cfg = config_for(stage, "8x1", steps), config_for(stage, "2x4", steps)
    dp_dir, fsdp_dir = str(tmp_path / "dp"), str(tmp_path / "fsdp")
    train_and_evaluate(dp_cfg, dp_dir)
    train_and_evaluate(fsdp_cfg, fsdp_dir)

    # Same loss trajectory, step by step.
    dp_rows, fsdp_rows = read_losses(dp_dir), read_losses(fsdp_dir)
    assert sorted(dp_rows) == sorted(fsdp_rows) == list(range(1, steps + 1))
    loss_diff = max(max_rel_diff(fsdp_rows[s]["loss"], dp_rows[s]["loss"]) for s in dp_rows)
    print(f"[{stage}] max relative loss difference FSDP vs DP over {steps} steps: {loss_diff:.3g}")
    for s in dp_rows:
        np.testing.assert_allclose(fsdp_rows[s]["loss"], dp_rows[s]["loss"], rtol=1e-5)

    # Same final parameters, EMA and optimiser state. Some weights get a gradient that is zero
    # in exact arithmetic (attention key biases: softmax ignores a constant added to every logit
    # of a query; biases just before a GroupNorm with one channel per group), i.e. rounding noise
    # that differs between any two partitionings. Adam divides a gradient by its own RMS, so
    # with eps=1e-8 such noise moves a weight by a full learning rate per step in a random
    # direction. Both runs therefore use eps=1e-4 (the test's only change to the optimiser,
    # the same in both), which turns noise of ~1e-9 into negligible steps. Tolerance per array:
    # 1e-4 of its largest entry, floored at 1% of the furthest Adam can move a weight in these
    # steps (params, EMA) or at 1e-3 of the moment's largest entry in the whole tree (mu, nu).
    dp_state, _ = run_dir.restore_raw_state(dp_dir, steps)
    fsdp_state, _ = run_dir.restore_raw_state(fsdp_dir, steps)
    lr_sum = sum(r["lr"] for r in dp_rows.values())
    worst, mismatched = 0.0, []
    for key in ("params", "ema_params", "opt_state"):
        a_leaves = jax.tree_util.tree_leaves_with_path(dp_state[key] or {})
        b_leaves = jax.tree_util.tree_leaves(fsdp_state[key] or {})
        assert len(a_leaves) == len(b_leaves)
        group = lambda name: next((p for p in ("mu", "nu") if f"/{p}/" in name), "other")
        tree_max = {}
        for path, a in a_leaves:
            g = group(sharding._path_str(path))
            tree_max[g] = max(tree_max.get(g, 0.0), float(np.max(np.abs(a), initial=0)))
        for (path, a), b in zip(a_leaves, b_leaves):
            name = f"{key}/{sharding._path_str(path)}"
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            assert a.shape == b.shape, name
            if a.size == 0:
                continue
            floor = 100 * lr_sum if key != "opt_state" else 1e-3 * tree_max[group(name)]
            rel = float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), floor, 1e-30))
            worst = max(worst, rel)
            if rel > 1e-4:
                mismatched.append((name, rel))
    print(f"[{stage}] max per-array relative state difference FSDP vs DP: {worst:.3g}")
    assert not mismatched, mismatched

    # Per-device memory of params + opt state + EMA: about 1/fsdp of the replicated state.
    dp_placed = state_on_mesh(dp_cfg, dp_dir, steps)
    fsdp_placed = state_on_mesh(fsdp_cfg, fsdp_dir, steps)
    parts = lambda st: (st.params, st.opt_state, st.ema_params)
    dp_bytes = sharding.bytes_on_device(parts(dp_placed))
    fsdp_bytes = sharding.bytes_on_device(parts(fsdp_placed))
    ratio = fsdp_bytes / dp_bytes
    print(f"[{stage}] per-device state bytes: DP {dp_bytes}, FSDP(4) {fsdp_bytes}, ratio {ratio:.3f}")
    assert 0.25 <= ratio < 0.30, (dp_bytes, fsdp_bytes)
    # The restored FSDP state really is split: its largest array holds 1/4 on device 0.
    leaves = jax.tree_util.tree_leaves(fsdp_placed.params)
    biggest = max(leaves, key=lambda x: x.size)
    assert biggest.addressable_shards[0].data.size * 4 == biggest.size


def test_default_rules_shard_every_large_array_of_a_real_size_unet():
    """With the default rules and fsdp_min_size, each UNet array >= 2**14 elements of the full
    ldm_digits UNet (widths 32/64) is sharded over fsdp=4 (none is left replicated because no
    dimension divides)."""
    c = smoke_config("ldm_digits.py", "data.source=synthetic_latents", "data.num_classes=10",
                     "data.latent_shape=8,8,3", "mesh.data=2", "mesh.fsdp=4", variant=None)
    task = make_task(c)
    abstract = jax.eval_shape(task.init_state, jax.random.key(0))
    mesh = sharding.make_mesh(c.mesh)
    shardings = sharding.tree_shardings(abstract.params, mesh, c.sharding)
    sizes = jax.tree_util.tree_leaves_with_path(abstract.params)
    specs = jax.tree_util.tree_leaves(shardings)
    large = [(sharding._path_str(p), s.spec) for (p, a), s in zip(sizes, specs)
             if a.size >= c.sharding.fsdp_min_size]
    assert large, "the UNet should have arrays above fsdp_min_size"
    unsharded = [p for p, spec in large if "fsdp" not in tuple(spec)]
    assert not unsharded, unsharded

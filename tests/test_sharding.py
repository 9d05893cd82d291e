"""Mesh construction, parameter sharding rules and batch checks on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ldm_jax.parallel import sharding


def _mesh(data, fsdp):
    return sharding.make_mesh({"data": data, "fsdp": fsdp})


def test_mesh_fill_and_errors():
    assert jax.device_count() == 8
    assert dict(_mesh(-1, 1).shape) == {"data": 8, "fsdp": 1}
    assert dict(_mesh(2, -1).shape) == {"data": 2, "fsdp": 4}
    with pytest.raises(sharding.MeshError, match="does not divide the 8 available devices"):
        _mesh(3, -1)
    with pytest.raises(sharding.MeshError, match="uses 4 devices but 8"):
        _mesh(2, 2)


def test_batch_not_divisible_is_a_clear_error():
    with pytest.raises(sharding.MeshError, match=r"batch_size=12 does not divide over the 8 devices"):
        sharding.check_batch_divides(12, _mesh(-1, 1))
    sharding.check_batch_divides(16, _mesh(-1, 1))


def test_fsdp_rules_shard_largest_divisible_dim():
    cfg = ml_collections.ConfigDict({"param_rules": ((r"embedding", "replicate"), (".*", "fsdp")),
                                     "fsdp_min_size": 64})
    tree = {"conv": {"kernel": jnp.zeros((3, 3, 16, 32)), "bias": jnp.zeros((32,))},
            "embedding": jnp.zeros((256, 8)), "odd": jnp.zeros((7, 9, 5))}
    shard = sharding.tree_shardings(tree, _mesh(2, 4), cfg)
    assert shard["conv"]["kernel"].spec == P(None, None, None, "fsdp")
    assert shard["conv"]["bias"].spec == P()  # below fsdp_min_size
    assert shard["embedding"].spec == P()  # rule says replicate
    assert shard["odd"].spec == P()  # nothing divisible by 4
    placed = jax.device_put(tree["conv"]["kernel"], shard["conv"]["kernel"])
    assert placed.addressable_shards[0].data.shape == (3, 3, 16, 8)
    # Pure data parallelism replicates everything.
    dp = sharding.tree_shardings(tree, _mesh(-1, 1), cfg)
    assert all(s.spec == P() for s in jax.tree_util.tree_leaves(dp))


def test_global_batch_is_sharded_over_all_devices():
    mesh = _mesh(2, 4)
    batch = sharding.global_batch({"image": np.arange(16 * 2, dtype=np.float32).reshape(16, 2)}, mesh)
    assert batch["image"].shape == (16, 2)
    assert {s.data.shape for s in batch["image"].addressable_shards} == {(2, 2)}
    np.testing.assert_array_equal(np.asarray(batch["image"]), np.arange(32).reshape(16, 2))

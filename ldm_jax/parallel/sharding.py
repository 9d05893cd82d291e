"""Device mesh, sharding rules and global batch assembly.

One mesh with axes ('data', 'fsdp'). The batch is split over both axes (FSDP is data parallel
too); parameters, EMA and optimiser state are replicated, or sharded over 'fsdp' by the config's
path rules. Per-host batches become global arrays with `jax.make_array_from_process_local_data`,
so the same code runs on one CPU, one GPU, or many hosts.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax import UserError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


class MeshError(UserError, ValueError):
    """The mesh does not fit the devices, or the batch does not divide over the mesh."""


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int]:
    """Resolves the config's {'data': n, 'fsdp': m} (one may be -1) against the device count."""
    data, fsdp = int(mesh_cfg["data"]), int(mesh_cfg["fsdp"])
    if data == -1 and fsdp == -1:
        raise MeshError("config.mesh: only one of mesh.data / mesh.fsdp may be -1 (fill).")
    for name, size in (("data", data), ("fsdp", fsdp)):
        if size == 0 or size < -1:
            raise MeshError(f"config.mesh.{name}={size}: use a positive size or -1 (fill).")
    known = fsdp if data == -1 else data if fsdp == -1 else data * fsdp
    if num_devices % known:
        raise MeshError(f"config.mesh (data={data}, fsdp={fsdp}) does not divide the "
                        f"{num_devices} available devices; choose sizes whose product is "
                        f"{num_devices}.")
    if data == -1:
        data = num_devices // fsdp
    if fsdp == -1:
        fsdp = num_devices // data
    if data * fsdp != num_devices:
        raise MeshError(f"config.mesh (data={data}, fsdp={fsdp}) uses {data * fsdp} devices but "
                        f"{num_devices} are available; set mesh.data=-1 to fill.")
    return data, fsdp


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ('data', 'fsdp') mesh over all (or the given) devices."""
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = mesh_shape(mesh_cfg, len(devices))
    if devices and devices[0].platform != "cpu" and len(devices) == jax.device_count():
        # Topology-aware device order on accelerators (ICI rings on TPU).
        from jax.experimental import mesh_utils
        array = mesh_utils.create_device_mesh((data, fsdp), devices=devices)
    else:
        array = np.asarray(devices).reshape(data, fsdp)
    return Mesh(array, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_divides(global_batch_size: int, mesh: Mesh, field: str = "batch_size") -> None:
    """Clear error when the global batch cannot be split evenly over devices and hosts."""
    n = mesh.devices.size
    if global_batch_size % n:
        raise MeshError(
            f"config.{field}={global_batch_size} does not divide over the {n} devices of the mesh "
            f"(data={mesh.shape['data']}, fsdp={mesh.shape['fsdp']}); use a multiple of {n} "
            f"(e.g. --config.{field}={max(n, (global_batch_size // n) * n)}) or a smaller mesh.")
    if global_batch_size % jax.process_count():
        raise MeshError(f"config.{field}={global_batch_size} does not divide over "
                        f"{jax.process_count()} processes.")


def _path_str(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def spec_for(path: str, shape: Sequence[int], rules, fsdp_size: int, min_size: int) -> P:
    """PartitionSpec for one array from the (regex, action) rules; first matching rule wins."""
    if fsdp_size == 1 or not shape:
        return P()
    for pattern, action in rules:
        if not re.search(pattern, path):
            continue
        if action == "replicate":
            return P()
        if action == "fsdp":
            if int(np.prod(shape)) < min_size:
                return P()
            # Largest dimension divisible by the fsdp size; ties go to the last dimension,
            # which is the output-feature axis of flax kernels.
            best = None
            for dim in range(len(shape)):
                if shape[dim] % fsdp_size == 0 and (best is None or shape[dim] >= shape[best]):
                    best = dim
            if best is None:
                return P()
            spec = [None] * len(shape)
            spec[best] = "fsdp"
            return P(*spec)
        raise MeshError(f"config.sharding.param_rules: unknown action {action!r} for pattern "
                        f"{pattern!r}; use 'replicate' or 'fsdp'.")
    return P()


def tree_shardings(tree: Any, mesh: Mesh, sharding_cfg) -> Any:
    """NamedShardings for every leaf of a (possibly abstract) pytree of params/opt state."""
    rules = tuple(tuple(r) for r in sharding_cfg.param_rules)
    fsdp_size = mesh.shape["fsdp"]
    min_size = int(sharding_cfg.fsdp_min_size)

    def leaf_sharding(path, leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, spec_for(_path_str(path), shape, rules, fsdp_size, min_size))

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Assembles per-host numpy batches into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def abstract_batch(local_example_batch: dict, mesh: Mesh) -> dict:
    """ShapeDtypeStructs of the global batch for ahead-of-time compilation."""
    sharding = batch_sharding(mesh)
    n = jax.process_count()
    return {k: jax.ShapeDtypeStruct((v.shape[0] * n,) + tuple(v.shape[1:]), v.dtype,
                                    sharding=sharding)
            for k, v in local_example_batch.items()}


def bytes_on_device(tree: Any, device: jax.Device | None = None) -> int:
    """Bytes the arrays of `tree` hold on one device (default: the first local device).

    Sums the addressable shards that live on that device, so a parameter sharded N ways over
    'fsdp' counts 1/N of its size; the per-device memory a data-parallel or FSDP state takes.
    """
    device = jax.local_devices()[0] if device is None else device
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array):
            total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)
    return total


# ----------------------------------------------------------------------- host <-> global arrays


def to_host(tree: Any) -> Any:
    """Global arrays -> numpy, the whole array on every process (gathered across hosts where
    an array spans devices of other processes; a plain copy otherwise)."""
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree_util.tree_map(fetch, tree)


def put_global(tree: Any, sharding: NamedSharding) -> Any:
    """Host values that are the same on every process -> global arrays with `sharding`.
    Unlike jax.device_put, also valid for shardings spanning devices of other processes."""
    def put(value):
        value = np.asarray(jax.device_get(value))
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
    return jax.tree_util.tree_map(put, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """`put_global` replicated over the whole mesh (parameters for inference)."""
    return put_global(tree, replicated(mesh))

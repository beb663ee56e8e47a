"""Devices: the mesh a job runs on (docs/DESIGN.md section 12).

Parallelism is declared, not hand-rolled: a `Mesh` with one named axis, `data`, over the
devices JAX sees (every process's, in a cluster: tvq/distributed/cluster.py), and `NamedSharding`s
that split a batch over it or replicate an array on every device; `jax.jit` partitions
the computation from there. Arrays are built with `jax.make_array_from_callback`, so a
process only ever materialises the rows its own devices hold.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tvq.errors import InputError, is_int

DATA = "data"


def data_mesh(devices: int | None = None, *, local: bool = False) -> Mesh:
    """A one-axis mesh over the first `devices` devices of every process (None: all that
    JAX sees), or of this process alone with `local`."""
    processes = [jax.process_index()] if local else range(jax.process_count())
    per_process = [[d for d in jax.devices() if d.process_index == p] for p in processes]
    available = min(len(group) for group in per_process)
    count = available if devices is None else devices
    if not is_int(count) or not 1 <= count <= available:
        raise InputError(
            f"devices must be between 1 and {available} (the devices JAX sees"
            f"{' per process' if len(per_process) > 1 else ''}), got {devices!r}"
        )
    return Mesh(np.array([d for group in per_process for d in group[:count]]), (DATA,))


def rows_spec(mesh: Mesh, shape: tuple[int, ...], axis: int = 0) -> NamedSharding:
    if len(shape) <= axis:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, PartitionSpec(*[None] * axis, DATA))


def replicated(mesh: Mesh, tree: Any) -> Any:
    """Every array of `tree` (the same on every process) copied to every device."""
    return _place(tree, lambda shape: NamedSharding(mesh, PartitionSpec()))


def split_rows(mesh: Mesh, tree: Any, axis: int = 0) -> Any:
    """Every array of `tree` split along its batch axis (the first, or `axis`: 1 for a
    state stacked by sublayer, tvq/nn/state.py) over the mesh."""
    return _place(tree, lambda shape: rows_spec(mesh, shape, axis))


def rows_from(mesh: Mesh, shape: tuple[int, ...], rows: Callable[[slice], np.ndarray]):
    """A [B, ...] array split over the mesh by rows, where rows(slice) gives those rows:
    each process asks only for the rows its devices hold."""
    return jax.make_array_from_callback(shape, rows_spec(mesh, shape),
                                        lambda index: rows(index[0]))  # fmt: skip


def split_largest_axis(mesh: Mesh, tree: Any) -> Any:
    """Every array of `tree` split over the mesh along its largest axis that the device
    count divides (replicated if none does): parameters and optimiser state sharded
    FSDP-style, each device holding about 1/n of them; jit gathers what a step needs."""

    def sharding(shape: tuple[int, ...]) -> NamedSharding:
        axes = [i for i, size in enumerate(shape) if size >= mesh.size and size % mesh.size == 0]
        if not axes:
            return NamedSharding(mesh, PartitionSpec())
        axis = max(axes, key=lambda i: shape[i])
        return NamedSharding(mesh, PartitionSpec(*[DATA if i == axis else None
                                                   for i in range(len(shape))]))  # fmt: skip

    return _place(tree, sharding)


def _place(tree: Any, sharding: Callable[[tuple[int, ...]], NamedSharding]) -> Any:
    def put(x: Any) -> jax.Array:
        target = sharding(np.shape(x))
        if isinstance(x, jax.Array) and (target.is_fully_addressable or not x.is_fully_addressable):
            return jax.device_put(x, target)  # device to device (a no-op if already there)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, target, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree)


def mesh_for_rows(rows: int, devices: int | None = None) -> Mesh | None:
    """A mesh over the most local devices (at most `devices`) that split `rows` evenly;
    None when that is a single device."""
    count = data_mesh(devices, local=True).size
    while rows % count:
        count -= 1
    return data_mesh(count, local=True) if count > 1 else None


def to_host(mesh: Mesh, tree: Any) -> Any:
    """Every array of `tree` whole, as numpy, on every process (a gather where sharded)."""
    whole = _gather(mesh)(tree)
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), whole)


@functools.lru_cache(maxsize=16)
def _gather(mesh: Mesh) -> Callable[[Any], Any]:
    """The compiled gather onto every device of `mesh`, one per mesh: a fresh jit of a
    fresh function at every call would trace and compile again each time."""
    return jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, PartitionSpec()))


def describe() -> dict[str, Any]:
    """What JAX sees: backend, devices (kind and count) and processes."""
    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "devices": len(devices),
        "local_devices": jax.local_device_count(),
        "processes": jax.process_count(),
        "process_index": jax.process_index(),
        "kinds": sorted({d.device_kind for d in devices}),
    }

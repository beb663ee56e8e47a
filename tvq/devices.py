"""Devices: the mesh a job runs on (docs/DESIGN.md section 12).

Parallelism is declared, not hand-rolled: a `Mesh` with one named axis, `data`, over the
devices JAX sees, and `NamedSharding`s that split a batch over it or replicate an array
on every device; `jax.jit` partitions the computation from there.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tvq.errors import InputError

DATA = "data"


def data_mesh(devices: int | None = None) -> Mesh:
    """A one-axis mesh over the first `devices` devices (None: all that JAX sees)."""
    available = jax.devices()
    count = len(available) if devices is None else devices
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= len(available):
        raise InputError(
            f"devices must be between 1 and {len(available)} (the devices JAX sees), "
            f"got {devices!r}"
        )
    return Mesh(np.array(available[:count]), (DATA,))


def replicated(mesh: Mesh, tree: Any) -> Any:
    """Every array of `tree` copied to every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def split_rows(mesh: Mesh, tree: Any) -> Any:
    """Every array of `tree` split along its first (batch) axis over the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec(DATA)))


def split_largest_axis(mesh: Mesh, tree: Any) -> Any:
    """Every array of `tree` split over the mesh along its largest axis that the device
    count divides (replicated if none does): parameters and optimiser state sharded
    FSDP-style, each device holding about 1/n of them; jit gathers what a step needs."""

    def sharding(x: Any) -> NamedSharding:
        shape = np.shape(x)
        axes = [i for i, size in enumerate(shape) if size >= mesh.size and size % mesh.size == 0]
        if not axes:
            return NamedSharding(mesh, PartitionSpec())
        axis = max(axes, key=lambda i: shape[i])
        return NamedSharding(mesh, PartitionSpec(*[DATA if i == axis else None
                                                   for i in range(len(shape))]))  # fmt: skip

    return jax.device_put(tree, jax.tree_util.tree_map(sharding, tree))


def describe() -> dict[str, Any]:
    """What JAX sees: backend, devices (kind and count) and processes."""
    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "devices": len(devices),
        "local_devices": jax.local_device_count(),
        "processes": jax.process_count(),
        "kinds": sorted({d.device_kind for d in devices}),
    }

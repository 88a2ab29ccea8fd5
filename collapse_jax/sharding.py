"""Device meshes and logical-axis rules: the only module that names mesh axes.

Model code annotates parameters with logical names ("vocab", "embed", "heads", "head_dim", "mlp")
and activations with "batch"/"seq"; `DEFAULT_RULES` maps them onto the mesh axes
`("data", "fsdp", "tensor")` as in Flax lm1b / MaxText.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# (logical name, mesh axis or axes or None). Order matters: the first matching rule wins.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("trial", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("seq", None),
)


def make_mesh(
    shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Builds a `("data", "fsdp", "tensor")` mesh.

    Args:
      shape: axis sizes, e.g. `{"data": 2, "fsdp": 2, "tensor": 2}`; missing axes have size 1 and
        one axis may be -1 (inferred from the device count). None puts every device on "data".
      devices: devices to use (default: all of `jax.devices()`).

    Returns:
      A mesh with `AxisType.Auto` axes (sharding propagated by the compiler).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape or {"data": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid axes are {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive (or one -1), got {shape}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into mesh {shape}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        if math.prod(sizes) > len(devices):
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                             f"devices, only {len(devices)} available")
        devices = devices[: math.prod(sizes)]
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_spec() -> PartitionSpec:
    """Partition spec of a batch-leading array: batch over the data-parallel axes."""
    return PartitionSpec(("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """NamedSharding for arrays whose leading axis is the batch (or trial) axis."""
    return NamedSharding(mesh, batch_spec())


def replicated(mesh: Mesh) -> NamedSharding:
    """NamedSharding that replicates an array on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    """Number of shards a batch is split into (product of the data-parallel axes)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]

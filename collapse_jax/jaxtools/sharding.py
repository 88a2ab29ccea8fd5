"""Device meshes and logical-axis rules: the only module that names mesh axes.

Model code annotates parameters with logical names ("vocab", "embed", "heads", "kv_heads",
"head_dim", "mlp"; every model family of `lm.families` uses these)
and activations with "batch"/"seq"; `DEFAULT_RULES` maps them onto the mesh axes
`("data", "fsdp", "tensor")` as in Flax lm1b / MaxText.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from collapse_jax import config as config_lib
from collapse_jax.jaxtools import processes

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# (logical name, mesh axis or axes or None). Order matters: the first matching rule wins.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("trial", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),  # grouped-query attention's key/value heads (Llama family)
    ("mlp", "tensor"),
    ("head_dim", None),
    ("seq", None),
)


Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


# The config block `mesh:` (one class for configs and meshes; validated where configs are built).
MeshConfig = config_lib.MeshConfig


def make_mesh(
    shape: Mapping[str, int] | MeshConfig | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a `("data", "fsdp", "tensor")` mesh.

    With several processes (after `jax.distributed.initialize`) `jax.devices()` lists every
    process's devices, so the mesh is global; process-major device order keeps each process's
    devices contiguous along the leading (data) axis.

    Args:
      shape: axis sizes, e.g. `{"data": 2, "fsdp": 2, "tensor": 2}` or a `MeshConfig`; missing
        axes have size 1 and one axis may be -1 (inferred from the device count). None puts every
        device on "data".
      devices: devices to use (default: all of `jax.devices()`; this process's own inside
        `processes.local_devices_only()`).

    Returns:
      A mesh with `AxisType.Auto` axes (sharding propagated by the compiler).
    """
    given = devices
    if devices is None:
        devices = sorted(processes.mesh_devices(), key=lambda d: (d.process_index, d.id))
    devices = every = list(devices)
    if isinstance(shape, MeshConfig):
        shape = shape.shape()
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
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} "
                f"devices, only {len(devices)} available"
            )
        devices = devices[: math.prod(sizes)]
        left_out = {d.process_index for d in every} - {d.process_index for d in devices}
        if given is None and left_out:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} leaves out process(es) "
                f"{sorted(left_out)}: a multi-process run needs a mesh over every process's "
                f"devices ({len(every)}; e.g. mesh.data=-1)"
            )
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _mesh_axes(mesh: Mesh, axes: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """The mesh axes among `axes` that `mesh` has with size > 1 (size-1 axes may be left out)."""
    if axes is None:
        return ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)


def batch_spec(mesh: Mesh | None = None) -> PartitionSpec:
    """Partition spec of a batch-leading array: batch over the data-parallel axes.

    Args:
      mesh: if given, only the data-parallel axes this mesh has (with size > 1) are named, so the
        spec is valid on meshes that leave out size-1 axes.
    """
    if mesh is None:
        return PartitionSpec(("data", "fsdp"))
    axes = _mesh_axes(mesh, ("data", "fsdp"))
    return PartitionSpec(axes if axes else None)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """NamedSharding for arrays whose leading axis is the batch (or trial) axis."""
    return NamedSharding(mesh, batch_spec(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    """NamedSharding that replicates an array on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    """Number of shards a batch is split into (product of the data-parallel axes)."""
    return mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)


def validate_mesh(mesh: Mesh) -> None:
    """Raises ValueError unless every axis of `mesh` is one of `MESH_AXES`."""
    unknown = [a for a in mesh.axis_names if a not in MESH_AXES]
    if unknown:
        raise ValueError(f"mesh has unknown axes {unknown}; valid axes are {MESH_AXES}")


def with_auto_axes(mesh: Mesh) -> Mesh:
    """The same mesh with every axis `AxisType.Auto` (sharding propagated by the compiler).

    `jax.make_mesh` defaults to Explicit axes (sharding in types), under which our jitted steps,
    written with explicit in/out shardings, would need per-op annotations; this normalises a
    user's mesh so either kind works.
    """
    types = getattr(mesh, "axis_types", None)
    if types is not None and all(t == AxisType.Auto for t in types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def logical_to_spec(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> PartitionSpec:
    """Maps one array's logical axis names onto `mesh` with `rules`.

    Each logical name takes the mesh axes of the first rule naming it, minus axes the mesh lacks,
    axes of size 1 and axes an earlier dimension of the same array already uses (a mesh axis may
    shard only one dimension). A dimension whose size the mesh axes do not divide is replicated
    (e.g. OPT's 2050 position rows), so any model runs on any mesh.

    Args:
      names: one logical name (or None = replicated) per dimension.
      shape: the array's shape (same length as `names`).
      mesh: the target mesh.
      rules: (logical name, mesh axis | axes | None) pairs; the first match wins.

    Returns:
      The PartitionSpec, one entry per dimension.

    Raises:
      ValueError: a logical name no rule covers, or `names` and `shape` of different lengths.
    """
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match array shape {tuple(shape)}")
    table = {}
    for logical, axes in rules:
        table.setdefault(logical, axes)
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for name, size in zip(names, shape, strict=True):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(
                f"logical axis {name!r} has no sharding rule; rules cover {sorted(table)}"
            )
        axes = tuple(a for a in _mesh_axes(mesh, table[name]) if a not in used)
        if not axes or size % math.prod(mesh.shape[a] for a in axes):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def logical_names(variable: Any) -> tuple[str | None, ...] | None:
    """The logical axis names an `nnx.Variable` was annotated with (`nnx.with_partitioning`).

    Returns None for a variable without annotation.
    """
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    names = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
    return tuple(names) if names else None


def logical_to_sharding(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings for every array of an NNX state, from its logical-axis annotations.

    Args:
      state: an `nnx.State` (or any pytree) whose leaves are `nnx.Variable`s annotated with
        `nnx.with_partitioning`, or plain arrays / ShapeDtypeStructs. Unannotated leaves are
        replicated.
      mesh: the target mesh.
      rules: logical-to-mesh rules (default `DEFAULT_RULES`).

    Returns:
      A pytree of the same structure as `state` (Variables keep their metadata and hold a
      `NamedSharding` as value), usable as `jax.jit` in/out shardings and `jax.device_put` target.
    """

    def one(x: Any) -> Any:
        if isinstance(x, nnx.Variable):
            names = logical_names(x)
            shape = np.shape(x.get_value())
            if names is None:
                return x.replace(replicated(mesh))
            return x.replace(NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules)))
        return replicated(mesh)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def unmatched_logical_names(state: Any, rules: Rules = DEFAULT_RULES) -> dict[str, tuple]:
    """Paths of variables whose annotation is missing or names an axis no rule covers.

    An empty result means every parameter is placed by an explicit rule (no silent
    catch-all as in path-regex schemes).
    """
    covered = {logical for logical, _ in rules}
    bad: dict[str, tuple] = {}
    leaves = jax.tree_util.tree_leaves_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    for path, leaf in leaves:
        if not isinstance(leaf, nnx.Variable):
            continue
        names = logical_names(leaf)
        if names is None or any(n is not None and n not in covered for n in names):
            bad[jax.tree_util.keystr(path)] = names
    return bad

"""Placing OPT fine-tuning and evaluation on a mesh: what `lm.train` and `lm.evaluate` share.

- batch sizes: `padded_batch` rounds a batch up to a multiple of the data-parallel size (the
  extra rows are filler with zero loss weight) and `pad_rows` fills a batch's row indices;
- host <-> mesh: `to_global` places host arrays on (possibly multi-process) shardings as fresh
  buffers, `scalar` / `local_value` read replicated results back; `opt_state_shardings` shards
  an optax state like the parameters it follows;
- inputs and models: `check_blocks` validates token blocks, `split_model` splits an NNX model
  into graph definition, parameters and the rest;
- compiled programs: `cached` keeps the last few compiled steps, keyed by `shape_signature` of
  the parameters (among others), so the next generation's call skips compilation.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from collapse_jax.jaxtools import sharding


def default_mesh() -> Mesh:
    """All devices on "data" (all local devices on one host; the global devices after
    `jax.distributed.initialize`)."""
    return sharding.make_mesh({"data": -1})


def padded_batch(mesh: Mesh, batch_size: int, multiple: int = 1) -> int:
    """The batch size actually run: `batch_size` rounded up to a multiple of the mesh's
    data-parallel size (times `multiple`, the accumulation steps).

    The extra rows are filler with zero loss weight, so the step equals one on exactly
    `batch_size` blocks; any batch size runs on any number of devices.
    """
    sharding.validate_mesh(mesh)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    m = sharding.data_parallel_size(mesh) * multiple
    return -(-batch_size // m) * m


def pad_rows(rows: np.ndarray, size: int) -> np.ndarray:
    """Row indices [n] padded to [size] with -1 (a filler row of zero loss weight)."""
    return np.concatenate([rows, np.full(size - len(rows), -1, dtype=rows.dtype)])


def to_global(tree: Any, shardings: Any) -> Any:
    """Places host-visible arrays onto (possibly multi-process) shardings as fresh buffers.

    Goes through NumPy, so the caller's arrays are never aliased (they stay valid after the
    train step donates the state) and every process contributes only its addressable shards.
    """

    def put(x: Any, s: NamedSharding) -> jax.Array:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.jit(jnp.copy, out_shardings=s)(x)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree.map(put, tree, shardings)


def opt_state_shardings(opt_shape: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of an optax state: a leaf whose path ends with a parameter's path and has its
    shape (AdamW's mu / nu) is sharded like that parameter; everything else is replicated."""
    by_path = {}
    p_leaves = jax.tree_util.tree_leaves_with_path(params)
    s_leaves = jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), s in zip(p_leaves, s_leaves, strict=True):
        by_path[tuple(path)] = (np.shape(leaf), s)
    depths = sorted({len(p) for p in by_path}, reverse=True)

    def one(path: tuple, leaf: Any) -> NamedSharding:
        for d in depths:
            hit = by_path.get(tuple(path[-d:])) if len(path) >= d else None
            if hit is not None and hit[0] == tuple(np.shape(leaf)):
                return hit[1]
        return sharding.replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, opt_shape)


def scalar(x: jax.Array) -> float:
    """A replicated scalar as a Python float (works when the array spans several processes)."""
    return float(np.asarray(x.addressable_data(0)))


def local_value(x: jax.Array) -> np.ndarray:
    """A replicated array as NumPy, read from this process's first shard."""
    return np.asarray(x.addressable_data(0))


# Compiled steps are reused across calls with the same model structure, mesh and settings (e.g.
# every generation of the paper's loop), so only the first call pays for XLA compilation.
_COMPILED: collections.OrderedDict[Any, Any] = collections.OrderedDict()
_COMPILED_MAX = 8


def cached(key: Any, build: Callable[[], Any]) -> Any:
    """`build()`'s value, cached under `key` (the `_COMPILED_MAX` most recently used are kept)."""
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key]
    value = build()
    _COMPILED[key] = value
    while len(_COMPILED) > _COMPILED_MAX:
        _COMPILED.popitem(last=False)
    return value


def shape_signature(tree: Any) -> tuple:
    """(path, shape, dtype) of every leaf: a hashable key for a tree's structure."""
    return tuple(
        (jax.tree_util.keystr(p), tuple(np.shape(x)), str(x.dtype))
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
    )


def check_blocks(blocks: Any, name: str) -> np.ndarray:
    """`blocks` if it is an integer array [N, T] with N >= 1 and T >= 2, else a ValueError
    naming `name`."""
    if not hasattr(blocks, "shape") or len(blocks.shape) != 2:
        raise ValueError(f"{name} must be an int array [N, T], got shape {np.shape(blocks)}")
    if not np.issubdtype(blocks.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {blocks.dtype}")
    if blocks.shape[0] < 1 or blocks.shape[1] < 2:
        raise ValueError(f"{name} needs at least one block of >= 2 tokens, got {blocks.shape}")
    return blocks


def split_model(model: nnx.Module) -> tuple[Any, Any, Any]:
    """(graph definition, nnx.Param state, the rest of the state) of an NNX model."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest

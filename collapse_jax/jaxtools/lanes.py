"""Whole-batch functions: under `jax.vmap`, the function sees every lane of the batch at once.

A plain `vmap` turns a function of one lane into the same program at batch width: every branch
of a `cond` is computed and selected, and a rejection loop runs until the slowest lane accepts,
at full width. Some of our samplers want the opposite: to look at the whole batch and work on
the few lanes that need it (gather the rejected lanes and finish them in small blocks), or to
skip a costly branch when no lane needs it. `whole_batch(fn)` gives `fn` that view:

- `fn(*lanes, **static)` takes arrays `[L, *core]` (L lanes, each with its own `core` trailing
  shape: () for element-wise functions, (d, d) for a matrix per lane) and returns `[L, *out]`.
  Its result for a lane must depend on that lane's inputs only (never on the batch): that is
  what makes the batched call equal a loop over single calls, and the tests check it per use.
- Called directly, the arguments are broadcast against each other (on their lane axes),
  flattened into lanes, and the result is reshaped back.
- Under `vmap` (at any depth: generations around chains around states) the custom vmap rule
  broadcasts the unbatched arguments, moves the batch axis into the lane axes and re-enters,
  so the outermost call runs `fn` once over every lane of every vmap level.

Keyword arguments of the call are static (Python values: tuning constants, switches) and are
passed to `fn`; each distinct set builds its own `custom_vmap`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array


def whole_batch(
    fn: Callable[..., Array] | None = None, *, core_ndims: Sequence[int] | None = None
) -> Any:
    """`fn(*lanes [L, *core], **static) -> [L, *out]` as a function of arrays of any lane shape
    that `jax.vmap` hands the whole batch (module docstring). Use as `whole_batch(fn)` or
    `@whole_batch(core_ndims=(2,))`.

    Args:
      fn: the function of lanes.
      core_ndims: per positional argument, how many trailing axes belong to one lane (default:
        0 for every argument, an element-wise function).
    """
    if fn is None:
        return functools.partial(whole_batch, core_ndims=core_ndims)

    def cores(num: int) -> tuple[int, ...]:
        if core_ndims is None:
            return (0,) * num
        if len(core_ndims) != num:
            raise TypeError(f"{fn.__name__} takes {len(core_ndims)} arrays, got {num}")
        return tuple(core_ndims)

    @functools.cache
    def build(static_items: tuple[tuple[str, Any], ...]):
        static = dict(static_items)

        @jax.custom_batching.custom_vmap
        def batched(*args: Array) -> Array:
            return _on_lanes(fn, args, cores(len(args)), static)

        @batched.def_vmap
        def rule(axis_size: int, in_batched: list[bool], *args: Array) -> tuple[Array, bool]:
            if not any(in_batched):
                return batched(*args), False
            # Re-entered with the batch axis as a lane axis: an outer vmap reaches this rule
            # again, so the call at the top sees the lanes of every level.
            return batched(*_lift(args, in_batched, axis_size, cores(len(args)))), True

        return batched

    @functools.wraps(fn)
    def call(*args: Any, **static: Any) -> Array:
        return build(tuple(sorted(static.items())))(*(jnp.asarray(a) for a in args))

    return call


def _split(a: Array, core: int, lead: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(lane shape, core shape) of `a`, skipping `lead` leading (batch) axes."""
    cut = a.ndim - core
    return a.shape[lead:cut], a.shape[cut:]


def _on_lanes(fn, args: Sequence[Array], cores: Sequence[int], static: dict) -> Array:
    """`fn` on the arguments broadcast over their lane axes and flattened to `[L, *core]`."""
    lane = jnp.broadcast_shapes(*(_split(a, c)[0] for a, c in zip(args, cores)))
    size = math.prod(lane)
    flat = []
    for a, c in zip(args, cores):
        core = _split(a, c)[1]
        flat.append(jnp.broadcast_to(a, lane + core).reshape((size,) + core))
    if size == 0:  # no lanes: fn's output type from one lane
        one = [jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype) for x in flat]
        out = jax.eval_shape(functools.partial(fn, **static), *one)
        return jnp.zeros(lane + out.shape[1:], out.dtype)
    out = fn(*flat, **static)
    return out.reshape(lane + out.shape[1:])


def _lift(args: Sequence[Array], batched: Sequence[bool], axis_size: int, cores: Sequence[int]):
    """The arguments of a vmapped call, each `[axis_size, *lane, *core]`: batched ones aligned
    on their trailing lane axes (NumPy broadcasting within a lane), unbatched ones broadcast."""
    lane = jnp.broadcast_shapes(*(_split(a, c, int(b))[0] for a, b, c in zip(args, batched, cores)))
    out = []
    for a, b, c in zip(args, batched, cores):
        inner, core = _split(a, c, int(b))
        if b:  # [axis, *inner, *core] -> [axis, 1.., *inner, *core]
            a = a.reshape((axis_size,) + (1,) * (len(lane) - len(inner)) + inner + core)
        out.append(jnp.broadcast_to(a, (axis_size,) + lane + core))
    return out


__all__ = ["whole_batch"]

"""Reading a traced program: its equations, nested ones included, and the dtypes its matmuls
run in.

The bench records what its programs really computed in (`matmul_dtypes` of the jitted step), and
the tests read the same to check that `compute_dtype: bfloat16` gives bf16 matmuls (a model that
casts its inputs back up would otherwise go unnoticed: the loss still decreases).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax.extend import core as jex


def equations(jaxpr: Any) -> Iterator[Any]:
    """Every equation of a (closed) jaxpr, depth first, the bodies of jit, scan, while, cond,
    custom_vjp, shard_map, ... included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jex.jaxprs_in_params(eqn.params):
            yield from equations(sub)


def matmul_dtypes(jaxpr: Any) -> dict[str, int]:
    """How many `dot_general`s run on which dtypes: {"bfloat16 x bfloat16 -> float32": n}."""
    counts: collections.Counter[str] = collections.Counter()
    for eqn in equations(jaxpr):
        if eqn.primitive.name == "dot_general":
            lhs, rhs = (str(v.aval.dtype) for v in eqn.invars)
            counts[f"{lhs} x {rhs} -> {eqn.outvars[0].aval.dtype}"] += 1
    return dict(counts)


def traced_matmul_dtypes(fn: Callable[..., Any], *args: Any) -> dict[str, int]:
    """`matmul_dtypes` of `fn(*args)` traced with `jax.make_jaxpr` (nothing runs)."""
    return matmul_dtypes(jax.make_jaxpr(fn)(*args))


__all__ = ["equations", "matmul_dtypes", "traced_matmul_dtypes"]

"""Helpers the theory learners (`theory.gaussian`, `theory.discrete`) share."""

from __future__ import annotations

from typing import Any

import jax
from jax import Array


def with_impl(key: Array, impl: str) -> Array:
    """Re-reads a key's bits as a key of `impl` (deterministic; no-op for "default")."""
    if impl == "default" or str(jax.random.key_impl(key)) == impl:
        return key
    return jax.random.wrap_key_data(jax.random.key_data(key), impl=impl)


def data_count(n: Any) -> Any:
    """A data set's size from its (possibly traced) count."""
    return n if isinstance(n, jax.core.Tracer) else int(n)

"""Batched chains for the theory models' `simulate`: vmap over chains, lax.scan over generations,
chunked over chains so memory stays bounded (issue 2, item 4).

The per-chain work is done by a learner's methods (`real_data`, `sample`, `subset`, `draw_real`,
`concat`, `fit`), exactly as the generational loop uses them, so `simulate` and the loop run the
same process. Only what `record(params)` returns is kept per generation (never the data).

Index conventions: index 0 is the initial (true) distribution; index g >= 1 is the model fitted
to the training set of size `sizes[g - 1]` (the loop's generation g - 1). The training set of
index 1 is real data; later ones are built by the mixing policy from the previous model and data.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

# Generations per compiled scan of the traced-size (exact) path.
SCAN_BLOCK = 16


def step(learner: Any, key: Array, g: Array, params: Any, data: Any, n_a, n_b, n_c) -> tuple:
    """One generation of one chain: builds the training set by the policy, then fits.

    Args:
      learner: the (hashable) learner; `learner.generation.policy` picks the mixing policy.
      key: the chain's key; generation g uses `fold_in(key, g)`.
      g: the index being produced (>= 2).
      params: the previous model; data: the previous model's training set.
      n_a, n_b, n_c: synthetic, previous-data and real counts (ints, or traced int32 scalars
        for learners with `static_sample_size = False`).
    Returns:
      (params, data) of index g.
    """
    k_a, k_b, k_c, k_f = jax.random.split(jax.random.fold_in(key, g), 4)
    policy = learner.generation.policy
    static = learner.static_sample_size
    synth = learner.sample(k_a, params, n_a)
    if policy == "replace":
        new = synth
    elif policy == "accumulate":
        new = learner.concat([data, synth])
    else:
        parts = [synth]
        gen = learner.generation
        if (static and n_b > 0) or (not static and gen.beta > 0):
            parts.append(learner.subset(k_b, data, n_b))
        if (static and n_c > 0) or (not static and gen.gamma > 0):
            parts.append(learner.draw_real(k_c, n_c))
        new = learner.concat(parts)
    return learner.fit(k_f, new, params), new


def _needs_data(learner: Any) -> bool:
    """Whether the previous training set enters the next one (else it is not carried)."""
    gen = learner.generation
    return gen.policy == "accumulate" or (gen.policy == "mix" and gen.beta > 0)


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def _first(learner: Any, record: Callable, keys: Array, m0: int) -> tuple:
    m = m0 if learner.static_sample_size else jnp.int32(m0)

    def one(key):
        k_d, k_f = jax.random.split(jax.random.fold_in(key, 1))
        data = learner.draw_real(k_d, m)
        params = learner.fit(k_f, data, learner.init(key))
        return params, (data if _needs_data(learner) else None)

    params, data = jax.vmap(one)(keys)
    return (params, data), record(params)


@functools.partial(jax.jit, static_argnums=(0, 1, 5))
def _segment_static(learner, record, keys, params_data, gs, sizes) -> tuple:
    """Scans generations `gs` whose (n_a, n_b, n_c) = `sizes` are static and equal."""
    n_a, n_b, n_c = sizes

    def body(carry, g):
        params, data = carry
        params, data = jax.vmap(lambda k, p, d: step(learner, k, g, p, d, n_a, n_b, n_c))(
            keys, params, data
        )
        return (params, data if _needs_data(learner) else None), record(params)

    if gs.shape[0] == 1:  # the data may change shape: no scan
        carry, rec = body(params_data, gs[0])
        return carry, jax.tree.map(lambda x: x[None], rec)
    return jax.lax.scan(body, params_data, gs)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _segment_traced(learner, record, keys, params_data, xs) -> tuple:
    """Scans generations with traced sizes: xs = (g, n_a, n_b, n_c), each [G']."""

    def body(carry, x):
        g, n_a, n_b, n_c = x
        params, data = carry
        params, data = jax.vmap(lambda k, p, d: step(learner, k, g, p, d, n_a, n_b, n_c))(
            keys, params, data
        )
        return (params, data if _needs_data(learner) else None), record(params)

    return jax.lax.scan(body, params_data, xs)


def run(
    learner: Any,
    key: Array,
    *,
    chains: int,
    sizes: Sequence[int],
    record: Callable[[Any], Any],
    initial: Any,
    chunk_size: int,
) -> Any:
    """Runs `chains` independent chains for `len(sizes)` generations.

    Args:
      learner: a jittable learner (hashable; `learner.generation` holds the mixing policy).
      key: base key; chain i uses `split(key, chains)[i]`, so results do not depend on chunking.
      chains: number of chains R.
      sizes: [G] training-set sizes M of indices 1..G.
      record: params (batched over chains) -> pytree of arrays `[R, ...]` to keep per index;
        must be a hashable function (a module-level function or a `functools.partial`).
      initial: the recorded pytree of index 0 for one chain (broadcast to every chain).
      chunk_size: chains per batch.
    Returns:
      The recorded pytree with leaves `[G + 1, R, ...]` as NumPy arrays.
    """
    if chains < 1:
        raise ValueError(f"chains must be >= 1, got {chains}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    gens = len(sizes)
    if gens < 1:
        raise ValueError("generations must be >= 1")
    shares = [learner.generation.shares(int(m)) for m in sizes]
    all_keys = jax.random.split(key, chains)
    size = min(chunk_size, chains)
    out: Any = None
    for start in range(0, chains, size):
        keys = all_keys[start : start + size]
        r = keys.shape[0]
        if r < size:  # pad the last chunk (computed, then dropped): one compile for all chunks
            keys = jnp.concatenate([keys, all_keys[: size - r]])
        if not learner.static_sample_size:
            # Traced sizes: one scan over every generation. Index 1 is fitted to M_0 draws from
            # the original distribution, i.e. a "sample" of the initial model (all synthetic =
            # all real), starting from an empty data set.
            params0 = jax.vmap(learner.init)(keys)
            empty = jax.eval_shape(learner.sample, keys[0], learner.init(keys[0]), 0)
            data0 = jax.tree.map(lambda x: jnp.zeros((size, *x.shape), x.dtype), empty)
            counts = [(int(sizes[0]), 0, 0)] + shares[1:]
            # Scans of a fixed length (the last block padded by repeating its last generation,
            # then dropped), so runs with any number of generations share one compilation.
            rows = np.array([(g, *counts[g - 1]) for g in range(1, gens + 1)], np.int32)
            pad = -gens % SCAN_BLOCK
            rows = np.concatenate([rows, np.repeat(rows[-1:], pad, axis=0)])
            carry = (params0, data0 if _needs_data(learner) else None)
            recs = []
            for b in range(0, rows.shape[0], SCAN_BLOCK):
                xs = tuple(jnp.asarray(col) for col in rows[b : b + SCAN_BLOCK].T)
                carry, rec = _segment_traced(learner, record, keys, carry, xs)
                recs.append(rec)
            recs[-1] = jax.tree.map(lambda x, k=SCAN_BLOCK - pad: x[:k], recs[-1])
        else:
            carry, rec1 = _first(learner, record, keys, int(sizes[0]))
            recs = [jax.tree.map(lambda x: x[None], rec1)]
        g = 2
        while learner.static_sample_size and g <= gens:
            # One scan over a run of generations with equal sizes and a stable data shape;
            # with a growing data set (accumulate, or a new size) the run has length 1.
            end = g
            while end + 1 <= gens and shares[end] == shares[g - 1] and _stable(learner, shares, g):
                end += 1
            gs = jnp.arange(g, end + 1, dtype=jnp.int32)
            carry, rec = _segment_static(learner, record, keys, carry, gs, shares[g - 1])
            recs.append(rec)
            g = end + 1
        chunk = jax.tree.map(
            lambda *xs, r=r: np.concatenate([np.asarray(x) for x in xs])[:, :r], *recs
        )
        if out is None:
            out = jax.tree.map(
                lambda x, x0: np.empty((gens + 1, chains, *x.shape[2:]), x.dtype), chunk, initial
            )
            jax.tree.map(lambda o, x0: o.__setitem__(0, np.asarray(x0)), out, initial)
        rows = (slice(1, None), slice(start, start + r))
        jax.tree.map(lambda o, x, rows=rows: o.__setitem__(rows, x), out, chunk)
    return out


def _stable(learner: Any, shares: list, g: int) -> bool:
    """Whether the carried data keeps its shape through generation g (so a scan can continue)."""
    if not _needs_data(learner):
        return True
    return learner.generation.policy != "accumulate" and sum(shares[g - 1]) == sum(shares[g - 2])

"""Driving blocks of generations for a chunk of chains (shared by the run driver and
`simulate_chains`): the segmentation of generations into blocks, the shape check that decides
whether a block can be one `lax.scan`, and `advance` over a block.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.loop.core import block, one_generation
from collapse_jax.loop.keys import base_key, reference_key
from collapse_jax.loop.learner import AbstractLearner
from collapse_jax.loop.policy import Policy

# Generations per compiled scan of `simulate_chains` (traced sizes: one compile for any G).
SCAN_BLOCK = 16


def segments(start: int, stop: int, block_size: int, counts_of: Callable[[int], Any], static: bool):
    """Blocks of generations [a, b): generation 0 alone (its data are real), then blocks aligned
    to `block_size`, split where static counts change."""
    g = start
    while g < stop:
        if g == 0:
            yield 0, 1
            g = 1
            continue
        end = min((g // block_size + 1) * block_size, stop)
        if static:
            b = g + 1
            while b < end and counts_of(b) == counts_of(g):
                b += 1
            end = b
        yield g, end
        g = end


def shape_invariant(learner, policy, measure, key, chains, carry, reference, g, counts) -> bool:
    """Whether generation g maps the carry to arrays of the same shapes (so a scan can run).

    Decided by tracing one generation abstractly; memoised on the shapes involved, since the
    answer does not depend on the generation index."""
    if learner.fit_chains is not None:
        return False

    def spec(tree):
        leaves, treedef = jax.tree.flatten(tree)
        return treedef, tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves)

    c = tuple(int(v) for v in np.atleast_1d(np.asarray(counts)))
    return _shape_invariant_cached(
        learner, policy, measure, spec(key), spec(chains), spec(carry), spec(reference), c
    )


@functools.lru_cache(maxsize=256)
def _shape_invariant_cached(learner, policy, measure, key, chains, carry, reference, counts):
    static = learner.static_sample_size
    unspec = lambda s: jax.tree.unflatten(s[0], s[1])  # noqa: E731
    out, _ = jax.eval_shape(
        functools.partial(
            block,
            learner,
            policy,
            measure,
            counts=counts if static else None,
            scan=False,
            first=False,
        ),
        unspec(key),
        unspec(chains),
        jax.ShapeDtypeStruct((1,), jnp.int32),
        unspec(carry),
        unspec(reference),
        jax.ShapeDtypeStruct((1, len(counts)), jnp.int32),
    )
    same = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, out, unspec(carry))
    return all(jax.tree.leaves(same))


def advance(
    learner,
    policy,
    measure,
    key,
    chains,
    a: int,
    b: int,
    carry,
    reference,
    counts_of,
    *,
    scan: bool,
    pad_to: int | None = None,
    points: bool = False,
    knobs: Any = None,
):
    """Generations [a, b) of a chunk of chains; returns (carry, measured [b - a, R, ...]).

    `pad_to` (only where the caller discards the carry afterwards) pads a traced-count scan to a
    fixed length by repeating the last generation, so every block shares one compilation.
    `knobs`: traced values of the learner's `knob_fields` ({name: scalar}) or None.
    `points`: a sweep batch (`_advance_points`): `key`, `carry`, `reference` and `knobs` have a
    leading point axis P, `counts_of(g)` is a list over the points, and measured is
    [P, b - a, R, ...].
    """
    static = learner.static_sample_size
    first = a == 0
    if points:
        return _advance_points(
            learner,
            policy,
            measure,
            key,
            chains,
            a,
            b,
            carry,
            reference,
            counts_of,
            knobs,
            scan=scan,
        )
    if learner.fit_chains is not None or not scan:
        outs = []
        for g in range(a, b):
            carry, out = one_generation(
                learner,
                policy,
                key,
                chains,
                g,
                None if g == 0 else carry,
                counts_of(g),
                reference,
                measure,
                knobs,
            )
            outs.append(out)
        return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    gens = list(range(a, b))
    rows = [np.atleast_1d(np.asarray(counts_of(g), np.int32)) for g in gens]
    n = len(gens)
    if pad_to is not None and not static and n < pad_to:
        gens += [gens[-1]] * (pad_to - n)
        rows += [rows[-1]] * (pad_to - n)
    cnt = None
    if static:
        cnt = int(counts_of(a)) if first else tuple(int(c) for c in counts_of(a))
    carry, out = block(
        learner,
        policy,
        measure,
        key,
        chains,
        np.asarray(gens, np.int32),  # NumPy: jit's C++ path transfers it (jnp.asarray: ~2x)
        None if first else carry,
        reference,
        np.stack(rows),
        counts=cnt,
        scan=not first,
        first=first,
        knobs=knobs,
    )
    if len(gens) == n:  # (a slice is a dispatched op per leaf, ~0.2 ms each on CPU)
        return carry, out
    return carry, jax.tree.map(lambda x: x[:n], out)


def _advance_points(
    learner, policy, measure, keys, chains, a, b, carry, reference, counts_of, knobs, *, scan
):
    """`advance` for a sweep batch of P points (see there): each point runs `advance` itself,
    with its own key, carry, reference, counts and knobs, all traced. The points therefore share
    ONE compiled program per block (the static arguments are equal) and each gets exactly a
    separate run's numbers: a separate run executes the very same program. (Points inside one
    program, by `vmap` or `lax.map`, changed float32 results in the last bit: XLA fuses the
    extra loop's body differently, e.g. for the "mix" policy.)"""
    outs, carries = [], []
    for p in range(keys.shape[0]):
        at = lambda x, p=p: x[p]  # noqa: E731
        c, out = advance(
            learner,
            policy,
            measure,
            keys[p],
            chains,
            a,
            b,
            None if carry is None else jax.tree.map(at, carry),
            jax.tree.map(at, reference),
            lambda g, p=p: counts_of(g)[p],
            scan=scan,
            knobs=jax.tree.map(at, knobs),
        )
        carries.append(c)
        outs.append(out)
    stack = lambda *xs: jnp.stack(xs)  # noqa: E731
    return jax.tree.map(stack, *carries), jax.tree.map(stack, *outs)


def simulate_chains(
    learner: AbstractLearner,
    policy: Policy,
    key: jax.Array,
    *,
    chains: int,
    sizes: Sequence[int],
    measure: Callable,
    chunk_size: int,
    initial: Any = None,
) -> Any:
    """Runs `chains` chains for `len(sizes)` generations in memory (the `simulate` functions).

    Chain r and generation g draw exactly what `collapse-jax run` draws with the base key
    `key(seed)`: `simulate(key=jax.random.key(seed))` and the CLI agree chain by chain.

    Args:
      learner: a jittable learner; policy: the mixing policy.
      key: the base key; chains: R.
      sizes: [G] training-set sizes: sizes[0] real points, sizes[g] the size of generation g's
        training set (accumulate: the number of synthetic points added).
      measure: `measure(learner, key, params, reference)` -> pytree kept per generation (a
        hashable, module-level function).
      chunk_size: chains per batch (bounds memory).
      initial: None, or a pytree like one chain's measured values, stored as row 0 of every
        chain ahead of the G generations (the `simulate` functions' initial distribution;
        written in place, which saves concatenating [G, R, ...] arrays afterwards).
    Returns:
      The measured pytree with NumPy leaves [G, R, ...] ([G + 1, R, ...] with `initial`).
    """
    if chains < 1:
        raise ValueError(f"chains must be >= 1, got {chains}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    gens = len(sizes)
    if gens < 1:
        raise ValueError("generations must be >= 1")
    key = base_key(key)
    static = learner.static_sample_size

    def counts_of(g: int) -> Any:
        return int(sizes[0]) if g == 0 else policy.shares(int(sizes[g]))

    size = min(chunk_size, chains)
    reference = learner.reference(reference_key(key))
    out: Any = None
    for start in range(0, chains, size):
        # The last chunk is padded with further chain indices (computed, then dropped).
        idx = jnp.arange(start, start + size, dtype=jnp.uint32)
        carry, parts = None, []
        for a, b in segments(0, gens, SCAN_BLOCK, counts_of, static):
            scan = a > 0 and shape_invariant(
                learner, policy, measure, key, idx, carry, reference, a, counts_of(a)
            )
            carry, part = advance(
                learner,
                policy,
                measure,
                key,
                idx,
                a,
                b,
                carry,
                reference,
                counts_of,
                scan=scan,
                pad_to=SCAN_BLOCK if b == gens else None,
            )
            parts.append((a, part))
        # Each block's rows copied once, straight into place (fetched only now, so the device
        # ran ahead of this Python loop); the last chunk's padding chains are dropped.
        lead = 0 if initial is None else 1
        cols = slice(start, min(start + size, chains))
        for a, part in parts:
            leaves, tree = jax.tree.flatten(part)
            if out is None:
                shapes = [(lead + gens, chains, *x.shape[2:]) for x in leaves]
                out = [np.empty(sh, x.dtype) for sh, x in zip(shapes, leaves)]
                for o, v in zip(out, jax.tree.leaves(initial)):
                    o[0] = v
            for o, x in zip(out, leaves):
                x = np.asarray(x)
                o[lead + a : lead + a + x.shape[0], cols] = x[:, : cols.stop - cols.start]
    return jax.tree.unflatten(tree, out)


def pad_rows(x: np.ndarray, n: int) -> np.ndarray:
    """`x` padded to `n` rows along axis 0 by repeating its last row."""
    x = np.asarray(x)
    if x.shape[0] == n:
        return x
    pad = np.repeat(x[-1:], n - x.shape[0], axis=0)
    return np.concatenate([x, pad], axis=0)

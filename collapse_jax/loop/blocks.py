"""Driving blocks of generations for a chunk of chains: the segmentation of generations into
blocks, the shape check that decides whether a block can be one `lax.scan`, `advance` over a
block, and `iter_blocks`, which both `simulate_chains` (in memory) and the jittable run driver
(`loop.jittable`, which commits every block) consume.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.loop.core import block, one_generation
from collapse_jax.loop.keys import base_key, reference_key
from collapse_jax.loop.learner import AbstractLearner, BatchedFit
from collapse_jax.loop.schedule import Policy, Schedule

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
    if isinstance(learner, BatchedFit):
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
    knobs: Any = None,
):
    """Generations [a, b) of a chunk of chains; returns (carry, measured [b - a, R, ...]).

    `pad_to` (only where the caller discards the carry afterwards) pads a traced-count scan to a
    fixed length by repeating the last generation, so every block shares one compilation.
    `knobs`: traced values of the learner's `knob_fields` ({name: scalar}) or None.
    """
    static = learner.static_sample_size
    first = a == 0
    if isinstance(learner, BatchedFit) or not scan:
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
        np.asarray(gens, np.int32),  # NumPy: jit's C++ path transfers it (jnp.asarray: slower)
        None if first else carry,
        reference,
        np.stack(rows),
        counts=cnt,
        scan=not first,
        first=first,
        knobs=knobs,
    )
    if len(gens) == n:  # (a slice is a dispatched op per leaf)
        return carry, out
    return carry, jax.tree.map(lambda x: x[:n], out)


def iter_blocks(
    learner: AbstractLearner,
    policy: Policy,
    measure: Callable,
    key: jax.Array,
    chains: jax.Array,
    carry: Any,
    reference: Any,
    counts_of: Callable[[int], Any],
    *,
    start: int,
    stop: int,
    block_size: int,
    knobs: Any = None,
    put: Callable | None = None,
    keep: Callable | None = None,
    pad_last: int | None = None,
) -> Iterator[tuple[int, int, Any, Any]]:
    """Generations [start, stop) of one chunk of chains, a block at a time (`segments`; a
    block is one scan where the carry keeps its shapes, `shape_invariant`).

    Args:
      key: the run's base key; chains: [R] uint32 chain indices (a padded chunk).
      carry: generation start - 1's carry of these chains (None when start = 0).
      counts_of: g -> generation g's counts (`Schedule.counts`).
      knobs: traced values of the learner's `knob_fields` ({name: scalar}) or None.
      put: applied to every leaf of the carry before each block (e.g. placing it on a mesh).
      keep: applied to every leaf of the carry after each block (e.g. `np.asarray`: between
        blocks the carry waits on the host, so the device holds one chunk's at a time).
      pad_last: pad the last block's traced-count scan to this length (its carry is then
        garbage; for callers that discard the final carry).
    Yields:
      (a, b, carry, measured): generations [a, b), the carry after b - 1, and measured leaves
      [b - a, R, ...].
    """
    for a, b in segments(start, stop, block_size, counts_of, learner.static_sample_size):
        if put is not None and carry is not None:
            carry = jax.tree.map(put, carry)
        scan = a > 0 and shape_invariant(
            learner, policy, measure, key, chains, carry, reference, a, counts_of(a)
        )
        carry, measured = advance(
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
            scan=scan,
            pad_to=pad_last if b == stop else None,
            knobs=knobs,
        )
        if keep is not None:
            carry = jax.tree.map(keep, carry)
        yield a, b, carry, measured


def simulate_chains(
    learner: AbstractLearner,
    schedule: Schedule,
    key: jax.Array,
    *,
    chains: int,
    measure: Callable,
    chunk_size: int,
    initial: Any = None,
    timings: dict[str, float] | None = None,
) -> Any:
    """Runs `chains` chains for the schedule's G generations in memory (the `simulate` functions).

    Chain r and generation g draw exactly what `collapse-jax run` draws with the base key
    `key(seed)`: `simulate(key=jax.random.key(seed))` and the CLI agree chain by chain.

    Args:
      learner: a jittable learner; schedule: the policy and the G generations' sizes.
      key: the base key; chains: R.
      measure: `measure(learner, key, params, reference)` -> pytree kept per generation (a
        hashable, module-level function).
      chunk_size: chains per batch (bounds memory).
      initial: None, or a pytree like one chain's measured values, stored as row 0 of every
        chain ahead of the G generations (the `simulate` functions' initial distribution;
        written in place, which saves concatenating [G, R, ...] arrays afterwards).
      timings: None, or a dict that receives "kernel_s" (the device computing, waited for
        with `block_until_ready`) and "copy_s" (the device-to-host copies into the result),
        summed over chunks. Timed apart, a chunk's copy no longer overlaps the device's work.
    Returns:
      The measured pytree with NumPy leaves [G, R, ...] ([G + 1, R, ...] with `initial`).
    """
    if chains < 1:
        raise ValueError(f"chains must be >= 1, got {chains}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    gens = schedule.num_generations
    if gens < 1:
        raise ValueError("generations must be >= 1")
    key = base_key(key)
    policy, counts_of = schedule.policy, schedule.counts

    size = min(chunk_size, chains)
    reference = learner.reference(reference_key(key))
    out: Any = None
    for start in range(0, chains, size):
        # The last chunk is padded with further chain indices (computed, then dropped).
        idx = jnp.arange(start, start + size, dtype=jnp.uint32)
        blocks = iter_blocks(
            learner,
            policy,
            measure,
            key,
            idx,
            None,
            reference,
            counts_of,
            start=0,
            stop=gens,
            block_size=SCAN_BLOCK,
            pad_last=SCAN_BLOCK,
        )
        t0 = time.perf_counter()
        parts = [(a, part) for a, _, _, part in blocks]
        if timings is not None:
            jax.block_until_ready([part for _, part in parts])
            t1 = time.perf_counter()
            timings["kernel_s"] = timings.get("kernel_s", 0.0) + t1 - t0
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
        if timings is not None:
            timings["copy_s"] = timings.get("copy_s", 0.0) + time.perf_counter() - t1
    return jax.tree.unflatten(tree, out)


def pad_rows(x: np.ndarray, n: int) -> np.ndarray:
    """`x` padded to `n` rows along axis 0 by repeating its last row."""
    x = np.asarray(x)
    if x.shape[0] == n:
        return x
    pad = np.repeat(x[-1:], n - x.shape[0], axis=0)
    return np.concatenate([x, pad], axis=0)

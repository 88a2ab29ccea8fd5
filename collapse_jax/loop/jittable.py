"""The run-directory driver of jittable learners: vmap over chains, scan over a block of
generations, chunk over chains; each finished block is committed. Also runs a sweep batch
(`run_batch`): points of equal `batch_key` on one compiled program per block.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax import config as config_lib
from collapse_jax.jaxtools import sharding as sharding_lib
from collapse_jax.loop.blocks import iter_blocks, pad_rows, segments, shape_invariant
from collapse_jax.loop.commit import commit_generation, commit_state, prune_params
from collapse_jax.loop.core import block, evaluate, one_generation
from collapse_jax.loop.keys import base_key, reference_key
from collapse_jax.loop.learner import AbstractLearner, BatchedFit, Knobbed
from collapse_jax.loop.schedule import Policy, Schedule, requested_real_size
from collapse_jax.loop.summary import row_and_arrays
from collapse_jax.rundir import fileio, guard


def batch_key(cfg: config_lib.ExperimentConfig, learner: AbstractLearner) -> Any:
    """What must be equal for two runs to share one vmapped batch (`run_batch`), or None when the
    learner cannot be batched (not jittable, a batched `fit_chains`, or a device mesh). Runs
    may differ in the seed, the learner's `knob_fields` (e.g. `model.sampling_bias`: traced
    scalars) and, for learners with traced sample sizes, the sample sizes and the mix shares
    alpha / beta / gamma (they only set the parts' traced sizes; which parts exist, i.e. which
    shares are > 0, is part of the compiled program and of the key)."""
    if not learner.jittable or isinstance(learner, BatchedFit) or cfg.mesh is not None:
        return None
    # Which generation fields are compiled in, from the roles they declare (`config.batch_role`):
    # the schedule's static part (`Policy`) is in the key instead of the fields it reads; with
    # traced sizes the sizes and the shares are values.
    gcfg = cfg.generation
    free = {"policy"} if learner.static_sample_size else {"policy", "size"}
    fields = tuple(
        (name, getattr(gcfg, name))
        for name, role in config_lib.batch_roles(type(gcfg)).items()
        if role not in free
    )
    knob_fields = learner.knob_fields if isinstance(learner, Knobbed) else frozenset()
    model = tuple(
        (f.name, getattr(cfg.model, f.name))
        for f in dataclasses.fields(cfg.model)
        if f.name not in knob_fields
    )
    return (type(cfg.model), model, fields, Policy.of(gcfg))


def run_jittable(cfg, learner, run_dir, start, committed, stop_after) -> None:
    run_jittable_points([cfg], learner, [run_dir], start, [committed], stop_after)


def run_jittable_points(cfgs, learner, run_dirs, start, committed, stop_after) -> None:
    """Runs P = len(cfgs) experiments from generation `start`: one as `run_generations` does, or
    a sweep batch (`run_batch`: configs of equal `batch_key`). Each point and chunk of chains is
    one `iter_blocks` stream, all advanced block by block together; each point is committed to
    its own run directory after every block, exactly as a run of its own would be.

    The points share ONE compiled program per block: what differs between them (key, carry,
    reference, counts, knobs) is traced, so each gets exactly a separate run's numbers (a
    separate run executes the very same program). (Points inside one program, by `vmap` or
    `lax.map`, changed float32 results in the last bit: XLA fuses the extra loop's body
    differently, e.g. for the "mix" policy.)"""
    gcfg = cfgs[0].generation
    R, P = gcfg.num_trials, len(cfgs)
    keys = [base_key(c.seed) for c in cfgs]
    chunk = min(gcfg.chunk_size, R)
    n_chunks = -(-R // chunk)
    sharding = None
    if cfgs[0].mesh is not None and P == 1:
        mesh = sharding_lib.make_mesh(cfgs[0].mesh.shape())
        if chunk % sharding_lib.data_parallel_size(mesh) == 0:
            sharding = sharding_lib.batch_sharding(mesh)

    def put(x):
        return jax.device_put(x, sharding) if sharding is not None else jnp.asarray(x)

    references = [learner.reference(reference_key(k)) for k in keys]
    schedules = [
        Schedule.of(c.generation, learner.real_size(requested_real_size(c.generation)))
        for c in cfgs
    ]
    policy = schedules[0].policy  # equal for every point (`batch_key`)
    real_size = max(s.sizes[0] for s in schedules)
    _check_memory(learner, references[0], real_size, R * P, gcfg.block_size)
    # The learner's knobs (e.g. lambda) as traced float32 scalars, so that a separate run and a
    # batch's point execute the same program.
    knobs: list[Any] = [None] * P
    if isinstance(learner, Knobbed):
        points = [learner] if P == 1 else [type(learner)(c.model, c.mesh) for c in cfgs]
        knobs = [{k: jnp.float32(v) for k, v in pt.knobs().items()} or None for pt in points]
        # The jitted core's static arguments keep only what shapes the program: the learner
        # without its (traced) knobs and the schedule's `Policy` (which parts exist, not their
        # sizes), so runs that differ in lambda or, with traced sizes, in alpha share compiled
        # code.
        learner = learner.canonical()

    carries: list[Any] = [None] * P  # [R, ...] on the host; None before generation 0
    if start > 0:
        # The stored carry's tree structure (shapes may differ: only the structure is used).
        template = jax.eval_shape(
            lambda: one_generation(
                learner,
                policy,
                keys[0],
                jnp.zeros((1,), jnp.uint32),
                0,
                None,
                schedules[0].counts(0),
                references[0],
            )[0]
        )
        carries = [
            fileio.load_tree(d / "state" / "carry.npz", template, leading=R) for d in run_dirs
        ]
    rows = [slice(c * chunk, min((c + 1) * chunk, R)) for c in range(n_chunks)]

    def stream(p: int, c: int):
        # The last chunk is padded with extra chain indices (computed, then dropped): one compile.
        chains = put(np.arange(c * chunk, (c + 1) * chunk, dtype=np.uint32))
        carry = carries[p]
        if carry is not None:
            carry = jax.tree.map(lambda x: pad_rows(np.asarray(x)[rows[c]], chunk), carry)
        return iter_blocks(
            learner,
            policy,
            evaluate,
            keys[p],
            chains,
            carry,
            references[p],
            schedules[p].counts,
            start=start,
            stop=gcfg.num_generations,
            block_size=gcfg.block_size,
            knobs=knobs[p],
            put=put,
            keep=np.asarray,  # every block is committed from the host
        )

    streams = [[stream(p, c) for p in range(P)] for c in range(n_chunks)]
    real = [sl.stop - sl.start for sl in rows]  # real (not padding) chains per chunk
    done = 0
    while True:
        # [chunk][point] -> (a, b, carry, measured); None once every stream is exhausted
        blocks = [[next(s, None) for s in chunk_streams] for chunk_streams in streams]
        if blocks[0][0] is None:
            return
        a, b = blocks[0][0][:2]
        for p in range(P):
            parts = [blocks[c][p] for c in range(n_chunks)]
            assert all(part[:2] == (a, b) for part in parts)  # one segmentation for every stream
            carry = _real_chains([part[2] for part in parts], real, axis=0)
            metrics = _real_chains([part[3] for part in parts], real, axis=1)
            _commit_block(
                cfgs[p].generation,
                learner,
                run_dirs[p],
                a,
                b,
                schedules[p],
                carry,
                metrics,
                committed[p],
            )
        done += b - a
        if stop_after is not None and done >= stop_after:
            return


def block_programs(
    cfg: config_lib.ExperimentConfig, learner: AbstractLearner
) -> list[tuple[str, Callable[[], Any]]]:
    """The compiled programs a run of `cfg` executes on one chunk of chains, each as (name, a
    function that lowers it): generation 0's block and the scan over the next block of
    generations (when the carry keeps its shapes; a carry that grows runs generation by
    generation). Nothing is run: the carry is traced abstractly. Set up as `run_jittable` sets
    up a run (the chunk placed on the config's mesh, the knobs traced); for the memory plan of
    `collapse-jax run --dry-run`. A learner with a batched fit (`BatchedFit`) is stepped from
    Python through several programs, not a block: none is returned for it."""
    if isinstance(learner, BatchedFit):
        return []
    gcfg = cfg.generation
    chunk = min(gcfg.chunk_size, gcfg.num_trials)
    key = base_key(cfg.seed)
    sharding = None
    if cfg.mesh is not None:
        mesh = sharding_lib.make_mesh(cfg.mesh.shape())
        if chunk % sharding_lib.data_parallel_size(mesh) == 0:
            sharding = sharding_lib.batch_sharding(mesh)
    reference = learner.reference(reference_key(key))
    schedule = Schedule.of(gcfg, learner.real_size(requested_real_size(gcfg)))
    policy, counts_of = schedule.policy, schedule.counts
    knobs = None
    if isinstance(learner, Knobbed):
        knobs = {k: jnp.float32(v) for k, v in learner.knobs().items()} or None
        learner = learner.canonical()
    chains = np.arange(chunk, dtype=np.uint32)
    chains = jax.device_put(chains, sharding) if sharding is not None else jnp.asarray(chains)
    static = learner.static_sample_size

    def program(gens: list[int], carry: Any, scan: bool) -> tuple[Callable, tuple]:
        """(block with its static arguments bound, its traced arguments) for `gens`."""
        first = gens[0] == 0
        cnt = None
        if static:
            cnt = int(counts_of(0)) if first else tuple(int(c) for c in counts_of(gens[0]))
        rows = np.stack([np.atleast_1d(np.asarray(counts_of(g), np.int32)) for g in gens])
        kw = dict(counts=cnt, scan=scan, first=first, knobs=knobs)
        fn = functools.partial(block, learner, policy, evaluate, **kw)
        return fn, (key, chains, np.asarray(gens, np.int32), carry, reference, rows)

    def lowering(fn: Callable, args: tuple) -> Callable[[], Any]:
        static = (learner, policy, evaluate)
        return lambda: block.lower(*static, *args, **fn.keywords)

    chunk_note = f"{chunk} chains"
    fn0, args0 = program([0], None, scan=False)
    out = [(f"block: generation 0 ({chunk_note})", lowering(fn0, args0))]
    spans = list(segments(1, gcfg.num_generations, gcfg.block_size, counts_of, static))
    if spans:
        carry, _ = jax.eval_shape(fn0, *args0)
        if sharding is not None:
            carry = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), carry
            )
        a, b = spans[0]
        if shape_invariant(learner, policy, evaluate, key, chains, carry, reference, a,
                           counts_of(a)):  # fmt: skip
            fn, args = program(list(range(a, b)), carry, scan=True)
            name = f"block: generations {a}-{b - 1} scanned ({chunk_note})"
            out.append((name, lowering(fn, args)))
    return out


def _real_chains(chunks: list[Any], real: list[int], axis: int) -> Any:
    """The chunks' pytrees concatenated on the host along their chain `axis`, each cut to its
    `real` chains (the last chunk's padding dropped)."""

    def cat(*xs):
        cut = (slice(None),) * axis
        return np.concatenate([np.asarray(x)[(*cut, slice(0, k))] for x, k in zip(xs, real)], axis)

    return jax.tree.map(cat, *chunks)


def _commit_block(gcfg, learner, run_dir, a, b, schedule, carry, metrics, committed) -> None:
    """Commits generations [a, b) of one run: rows and arrays, kept params, then state/."""
    for i, g in enumerate(range(a, b)):
        per_chain = {k: v[i] for k, v in metrics.items()}
        guard.check_finite(g, per_chain, learner.infinite_metrics)  # before the commit
        row, arrays = row_and_arrays(schedule, g, per_chain, gcfg.record_trials)
        commit_generation(run_dir, g, row, arrays)
        if gcfg.keep_params != "last" and g == b - 1:
            # Only the block's last params exist on the host (use block_size: 1 for all).
            pdir = run_dir / "params" / f"gen_{g:05d}"
            with fileio.staged_dir(pdir) as tmp:
                fileio.save_tree(tmp / "params.npz", carry.params)
            prune_params(pdir.parent, gcfg.keep_params, g)

    def write(tmp, carry=carry):
        fileio.save_tree(tmp / "carry.npz", carry)

    commit_state(run_dir, b, write)
    for g in range(a, b):
        committed(g, json.loads((run_dir / "generations" / f"gen_{g:05d}.json").read_text()))


def _check_memory(learner, reference, real_size, chains: int, block: int) -> None:
    """Refuses up front (before any allocation) chain counts whose host state cannot fit.

    One chain's carry is estimated as its params plus its training set, and its metrics from
    `evaluate`, all by `jax.eval_shape` (nothing is computed, and fit is not traced)."""
    k = jax.random.key(0)
    params = jax.eval_shape(learner.init, k)
    data = jax.eval_shape(lambda: learner.real_data(k, real_size))
    measured = jax.eval_shape(lambda p: learner.evaluate(k, p, reference), params)
    # The carry: held, chunk outputs, concatenation, padding; the metrics of a block, twice.
    per_chain = 4 * guard.tree_bytes((params, data)) + 2 * block * guard.tree_bytes(measured)
    guard.check_memory(per_chain, chains, "generation.num_trials")

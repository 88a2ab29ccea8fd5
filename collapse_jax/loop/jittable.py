"""The run-directory driver of jittable learners: vmap over chains, scan over a block of
generations, chunk over chains; each finished block is committed. Also runs a sweep batch
(`run_batch`): points of equal `batch_key` on one compiled program per block.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax import config as config_lib
from collapse_jax.jaxtools import sharding as sharding_lib
from collapse_jax.loop.blocks import advance, pad_rows, segments, shape_invariant
from collapse_jax.loop.commit import commit_generation, commit_state, prune_params
from collapse_jax.loop.core import evaluate, one_generation
from collapse_jax.loop.keys import base_key, reference_key
from collapse_jax.loop.learner import AbstractLearner
from collapse_jax.loop.policy import Policy, requested_real_size
from collapse_jax.loop.summary import row_and_arrays
from collapse_jax.rundir import fileio, guard


def batch_key(cfg: config_lib.ExperimentConfig, learner: AbstractLearner) -> Any:
    """What must be equal for two runs to share one vmapped batch (`run_batch`), or None when the
    learner cannot be batched (not jittable, a batched `fit_chains`, or a device mesh). Runs
    may differ in the seed, the learner's `knob_fields` (e.g. `model.sampling_bias`: traced
    scalars) and, for learners with traced sample sizes, the sample sizes and the mix shares
    alpha / beta / gamma (they only set the parts' traced sizes; which parts exist, i.e. which
    shares are > 0, is part of the compiled program and of the key)."""
    if not learner.jittable or learner.fit_chains is not None or cfg.mesh is not None:
        return None
    free = {"samples_per_generation", "sample_schedule", "sample_growth", "alpha", "beta", "gamma"}
    if learner.static_sample_size:
        free = set()
    gcfg = cfg.generation
    fields = tuple(
        (f.name, getattr(gcfg, f.name)) for f in dataclasses.fields(gcfg) if f.name not in free
    )
    parts = (gcfg.alpha > 0, gcfg.beta > 0, gcfg.gamma > 0)
    model = tuple(
        (f.name, getattr(cfg.model, f.name))
        for f in dataclasses.fields(cfg.model)
        if f.name not in learner.knob_fields
    )
    return (type(cfg.model), model, fields, parts)


def run_jittable(cfg, learner, run_dir, start, committed, stop_after) -> None:
    run_jittable_points([cfg], learner, [run_dir], start, [committed], stop_after)


def run_jittable_points(cfgs, learner, run_dirs, start, committed, stop_after) -> None:
    """Runs P = len(cfgs) experiments from generation `start`: one as `run_generations` does, or
    a sweep batch (`run_batch`: configs of equal `batch_key`) through `_advance_points`, one
    compiled program for all points. Each point is committed to
    its own run directory exactly as a run of its own would be."""
    gcfg = cfgs[0].generation
    policy = Policy.of(gcfg)
    R, P = gcfg.num_trials, len(cfgs)
    batched = P > 1
    keys = [base_key(c.seed) for c in cfgs]
    chunk = min(gcfg.chunk_size, R)
    n_chunks = -(-R // chunk)
    sharding = None
    if cfgs[0].mesh is not None and not batched:
        mesh = sharding_lib.make_mesh(cfgs[0].mesh.shape())
        if chunk % sharding_lib.data_parallel_size(mesh) == 0:
            sharding = sharding_lib.batch_sharding(mesh)

    def chunk_chains(c: int) -> jax.Array:
        # The last chunk is padded with extra chain indices (computed, then dropped): one compile.
        return put(np.arange(c * chunk, (c + 1) * chunk, dtype=np.uint32))

    def put(x):
        return jax.device_put(x, sharding) if sharding is not None else jnp.asarray(x)

    references = [learner.reference(reference_key(k)) for k in keys]
    real_sizes = [learner.real_size(requested_real_size(c.generation)) for c in cfgs]
    static = learner.static_sample_size
    _check_memory(learner, references[0], max(real_sizes), R * P, gcfg.block_size)

    def counts_p(p: int, g: int) -> Any:
        c = cfgs[p].generation
        return real_sizes[p] if g == 0 else c.shares(c.sample_size(g, real_sizes[p]))

    def counts_of(g: int) -> Any:
        return [counts_p(p, g) for p in range(P)] if batched else counts_p(0, g)

    # The batch's point axis leads every array (axis 0); the chain axis follows it.
    ax = 1 if batched else 0
    key = jnp.stack(keys) if batched else keys[0]
    reference = jax.tree.map(lambda *xs: jnp.stack(xs), *references) if batched else references[0]
    # The learner's knobs (e.g. lambda) as traced float32 scalars ({name: [P]} for a batch), so
    # that a separate run and a batch's point execute the same program (`_advance_points`).
    if batched:
        values = [type(learner)(c.model, c.mesh).knobs() for c in cfgs]
        knobs = {k: jnp.asarray([v[k] for v in values], jnp.float32) for k in values[0]}
    else:
        knobs = {k: jnp.float32(v) for k, v in learner.knobs().items()}
    knobs = knobs or None
    # The jitted core's static arguments keep only what shapes the program: the learner without
    # its (traced) knobs and, with traced sizes, which mix shares are > 0 (the shares' values
    # only set traced part sizes), so runs that differ in lambda or alpha share compiled code.
    learner = learner.canonical()
    if not learner.static_sample_size:
        policy = dataclasses.replace(
            policy,
            alpha=float(policy.alpha > 0),
            beta=float(policy.beta > 0),
            gamma=float(policy.gamma > 0),
        )

    def chains_of(x, sl: slice) -> np.ndarray:  # rows `sl` of the chain axis, padded to chunk
        x = np.asarray(x)
        if not batched:
            return pad_rows(x[sl], chunk)
        return np.stack([pad_rows(xp[sl], chunk) for xp in x])

    carry = None  # [(P,) R, ...] on the host; None before generation 0
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
                counts_p(0, 0),
                references[0],
            )[0]
        )
        loaded = [
            fileio.load_tree(d / "state" / "carry.npz", template, leading=R) for d in run_dirs
        ]
        carry = jax.tree.map(lambda *xs: np.stack(xs), *loaded) if batched else loaded[0]
    done = 0
    blocks = segments(
        start, gcfg.num_generations, gcfg.block_size, lambda g: counts_p(0, g), static
    )
    for a, b in blocks:
        outs, carries = [], []
        for c in range(n_chunks):
            sl = slice(c * chunk, min((c + 1) * chunk, R))
            chains = chunk_chains(c)
            carry_c = (
                None
                if carry is None
                else jax.tree.map(lambda x, sl=sl: put(chains_of(x, sl)), carry)
            )
            one = (lambda x: x[0]) if batched else (lambda x: x)  # point 0's shapes
            scan = a > 0 and shape_invariant(
                learner,
                policy,
                evaluate,
                keys[0],
                chains,
                jax.tree.map(one, carry_c),
                references[0],
                a,
                counts_p(0, a),
            )
            new, m = advance(
                learner,
                policy,
                evaluate,
                key,
                chains,
                a,
                b,
                carry_c,
                reference,
                counts_of,
                scan=scan,
                points=batched,
                knobs=knobs,
            )
            n = sl.stop - sl.start
            cut = (slice(None),) * ax + (slice(0, n),)
            carries.append(jax.tree.map(lambda x, cut=cut: np.asarray(x)[cut], new))
            outs.append(jax.tree.map(lambda x, cut=cut: np.asarray(x)[(slice(None), *cut)], m))
        carry = jax.tree.map(lambda *xs: np.concatenate(xs, axis=ax), *carries)
        metrics = {k: np.concatenate([m[k] for m in outs], axis=ax + 1) for k in outs[0]}
        for p in range(P):
            at = (lambda x, p=p: x[p]) if batched else (lambda x: x)
            _commit_block(
                cfgs[p].generation,
                learner,
                run_dirs[p],
                a,
                b,
                real_sizes[p],
                jax.tree.map(at, carry),
                {k: at(v) for k, v in metrics.items()},
                committed[p],
            )
        done += b - a
        if stop_after is not None and done >= stop_after:
            return


def _commit_block(gcfg, learner, run_dir, a, b, real_size, carry, metrics, committed) -> None:
    """Commits generations [a, b) of one run: rows and arrays, kept params, then state/."""
    for i, g in enumerate(range(a, b)):
        per_chain = {k: v[i] for k, v in metrics.items()}
        guard.check_finite(g, per_chain, learner.infinite_metrics)  # before the commit
        row, arrays = row_and_arrays(gcfg, g, real_size, per_chain)
        commit_generation(run_dir, g, row, arrays)
        if gcfg.keep_params != "last" and g == b - 1:
            # Only the block's last params exist on the host (use block_size: 1 for all).
            pdir = run_dir / "params" / f"gen_{g:05d}"
            tmp = fileio.fresh_dir(pdir.parent, pdir.name)
            fileio.save_tree(tmp / "params.npz", carry.params)
            fileio.replace_dir(tmp, pdir)
            prune_params(pdir.parent, gcfg, g)

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

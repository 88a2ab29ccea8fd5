"""The loop core. One generation of one chain is

    pool = draw_pool(...)                     # real data, or generation g - 1's sample, mixed
    data, start = build_data(..., pool, ...)  # the training set and where the fit starts
    params = learner.fit(keys["fit"], data, start)
    carry, measured = finish(...)             # what g + 1 needs, and what is kept of g

(`chain_generation`). The jitted `block` runs it vmapped over a chunk of chains and scanned over
a block of generations; `one_generation` runs one generation of a chunk, with the learner's
batched fit where it has one (`prepare_chunk`, `fit_chains`, `finish_chunk`); `replay_data`
reruns one chain; the sequential driver (`loop.sequential`) calls the same four steps with its
persistence around each. The same key therefore gives the same per-chain numbers whichever
entry point ran them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax import config as config_lib
from collapse_jax.jaxtools import prng
from collapse_jax.loop.keys import chain_keys, generation_keys, vmapped_keys
from collapse_jax.loop.learner import AbstractLearner, BatchedFit
from collapse_jax.loop.policy import (
    Carry,
    carry_of,
    next_data,
    start_params,
    synthetic_noise,
    training_set,
)
from collapse_jax.loop.schedule import Policy, Schedule, requested_real_size


def evaluate(learner: AbstractLearner, key, params, reference, data) -> dict[str, Any]:
    """The default `measure` of a generation: the learner's metrics of its fitted model, then
    those of its training data (`data_metrics`)."""
    return {**learner.evaluate(key, params, reference), **learner.data_metrics(data)}


def nothing(learner, key, params, reference, data) -> tuple:
    """A `measure` that keeps nothing."""
    return ()


def draw_pool(
    learner: AbstractLearner,
    policy: Policy,
    ks: tuple[jax.Array, jax.Array, jax.Array],
    g: jax.Array | int,
    carry: Carry | None,
    counts: Any,
    noise: Any = None,
    **kw: Any,
) -> Any:
    """The data set generation `g` of one chain draws its training set from: for g = 0 (`carry`
    None) the chain's real data, later generation g - 1's sample mixed by the policy (the pool
    of all data so far for the accumulate policies).

    Args:
      ks: the chain's (k_real, k_base, k_gens) (`chain_keys`).
      carry: generation g - 1's `Carry`; None for generation 0.
      counts: generation 0: M_0, the number of real points; later: (synthetic, previous, real).
      noise: `synthetic_noise(learner, policy, k_gens, g - 1, counts[0])`, drawn ahead by the
        caller (`block`, for a block of generations at once); None: drawn here (the same
        numbers), and passed to `learner.sample`.
      kw: passed to `learner.sample` (the sequential driver: `workdir`).
    """
    k_real, _, k_gens = ks
    if carry is None:
        return learner.real_data(k_real, counts)
    # Generation g's data is generation g - 1's sample: drawn with ITS keys.
    prev_keys = generation_keys(k_gens, g - 1)
    if noise is None:
        noise = synthetic_noise(learner, policy, k_gens, g - 1, counts[0])
    if noise is not None:
        kw = {**kw, "noise": noise}
    return next_data(
        learner,
        policy,
        prev_keys,
        carry.data,
        carry.params,
        counts,
        real=carry.real,
        anchor=carry.anchor,
        **kw,
    )


def build_data(
    learner: AbstractLearner,
    policy: Policy,
    ks: tuple[jax.Array, jax.Array, jax.Array],
    g: jax.Array | int,
    keys: dict[str, jax.Array],
    carry: Carry | None,
    pool: Any,
    counts: Any,
) -> tuple[Any, Any]:
    """The first half of generation `g` of one chain, from its `draw_pool`: what it fits (the
    pool itself, or for accumulate_subsample a random subset of it) and where its fit starts.

    Args:
      keys: generation g's `generation_keys`; carry: generation g - 1's (None for g = 0).
      counts: as `draw_pool`'s.
    Returns:
      (data, start).
    """
    _, k_base, k_gens = ks
    if carry is None:
        data, previous = pool, None
    else:
        data = training_set(learner, policy, generation_keys(k_gens, g - 1), pool, counts[0])
        previous = carry.params
    return data, start_params(learner, policy, keys, k_base, previous)


def finish(
    learner: AbstractLearner,
    policy: Policy,
    keys: dict[str, jax.Array],
    carry: Carry | None,
    data: Any,
    pool: Any,
    params: Any,
    reference: Any = None,
    measure: Callable = evaluate,
) -> tuple[Carry, Any]:
    """The second half of generation g of one chain, after its fit: what it hands to g + 1 and
    what is kept of it.

    Args:
      keys: generation g's `generation_keys`; carry: generation g - 1's (None for g = 0).
      data, pool: what generation g fitted and its pool (`build_data`, `draw_pool`).
      params: the fitted model.
      measure: `measure(learner, key, params, reference, data)` -> pytree kept per generation.
    Returns:
      (carry, measured).
    """
    if carry is None:  # generation 0: its data are the chain's real data, its fit the anchor
        real, anchor = pool, None
    else:
        real, anchor = carry.real, carry.anchor
    out = measure(learner, keys["eval"], params, reference, data)
    return carry_of(policy, params, pool, real, anchor), out


def chain_generation(
    learner: AbstractLearner,
    policy: Policy,
    ks: tuple[jax.Array, jax.Array, jax.Array],
    g: jax.Array | int,
    carry: Carry | None,
    counts: Any,
    reference: Any = None,
    measure: Callable = evaluate,
    noise: Any = None,
) -> tuple[Any, Carry, Any]:
    """Generation `g` of one chain: `draw_pool`, `build_data`, fit, `finish` (arguments as
    there).

    Returns:
      (data, carry, measured): data is what generation g fits.
    """
    keys = generation_keys(ks[2], g)
    pool = draw_pool(learner, policy, ks, g, carry, counts, noise)
    data, start = build_data(learner, policy, ks, g, keys, carry, pool, counts)
    params = learner.fit(keys["fit"], data, start)
    carry, out = finish(learner, policy, keys, carry, data, pool, params, reference, measure)
    return data, carry, out


@functools.partial(
    jax.jit, static_argnames=("learner", "policy", "measure", "counts", "scan", "first")
)
def block(
    learner,
    policy,
    measure,
    key,
    chains,
    gens,
    carry,
    reference,
    counts_arr,
    *,
    counts,
    scan,
    first,
    knobs=None,
):
    """Generations `gens` of a chunk of chains (vmap over chains, scan over generations).

    Returns (carry, measured [len(gens), R, ...]). `counts` is static (a tuple, or M_0 for the
    first generation) or None: then row i of `counts_arr` holds generation gens[i]'s counts.
    `knobs`: traced values of the learner's `knob_fields` (a sweep batch's point), or None.
    """
    if knobs is not None:
        learner = learner.bind(knobs)

    def cnt_of(c):
        if counts is not None:
            return counts
        return c[0] if first else (c[0], c[1], c[2])

    def per_chain(chain_ks, carry, noise):
        def step(carry, xs):
            g, c, noise = xs
            _, carry, out = chain_generation(
                learner,
                policy,
                chain_ks,
                g,
                None if first else carry,
                cnt_of(c),
                reference,
                measure,
                noise=noise,
            )
            return carry, out

        if scan:
            return jax.lax.scan(step, carry, (gens, counts_arr, noise))
        # One generation whose carry changes shape (generation 0, or a growing data set).
        carry, out = step(carry, (gens[0], counts_arr[0], jax.tree.map(lambda x: x[0], noise)))
        return carry, jax.tree.map(lambda x: x[None], out)

    ks = vmapped_keys(key, chains)
    # [len(gens), R, ...]: generations outside, chains inside (this layout vectorised best)
    noise = None if first else _block_noise(learner, policy, ks[2], gens, counts_arr, cnt_of)
    return jax.vmap(per_chain, in_axes=(0, 0, 1), out_axes=(0, 1))(ks, carry, noise)


def _block_noise(learner, policy, k_gens, gens, counts_arr, cnt_of) -> Any:
    """The synthetic draws' randomness `[len(gens), R, ...]` of every generation of a block and
    chain (`k_gens [R]`), drawn ahead of the scan by `learner.sample_noise` (a learner whose
    `sample` splits into state-independent noise and a cheap transform of it), or None.

    Why: inside the scanned loop XLA recomputed each generation's key hashes in every fusion
    that consumed them (single-threaded, once per carry and output), whereas drawn for the whole
    block at once the draws vectorise over generations and chains and are computed once. Only
    without likelihood filtering: it draws extra candidates from the same key.
    """
    if synthetic_noise(learner, policy, k_gens[0], 0, cnt_of(counts_arr[0])[0]) is None:
        return None  # (this call's values are unused: XLA drops them)

    k_gens = prng.materialize(k_gens)  # else XLA re-hashed the chain keys for every generation

    def one(k, g, c):
        # generation g's synthetic data are generation g - 1's sample (`chain_generation`)
        return synthetic_noise(learner, policy, k, g - 1, cnt_of(c)[0])

    return jax.vmap(jax.vmap(one, in_axes=(0, None, None)), in_axes=(None, 0, 0))(
        k_gens, gens, counts_arr
    )


@functools.partial(jax.jit, static_argnames=("learner", "policy", "counts", "first"))
def prepare_chunk(learner, policy, key, chains, g, carry, counts_arr, *, counts, first):
    """`draw_pool` and `build_data` of generation g for a chunk of chains (learners with
    `fit_chains`): their (data, pool, start) and fit keys."""

    def one(chain_ks, carry):
        if counts is not None:
            cnt = counts
        else:
            cnt = counts_arr[0] if first else (counts_arr[0], counts_arr[1], counts_arr[2])
        keys = generation_keys(chain_ks[2], g)
        carry = None if first else carry
        pool = draw_pool(learner, policy, chain_ks, g, carry, cnt)
        data, start = build_data(learner, policy, chain_ks, g, keys, carry, pool, cnt)
        return (data, pool, start), keys["fit"]

    return jax.vmap(one)(vmapped_keys(key, chains), carry)


@functools.partial(jax.jit, static_argnames=("learner", "policy", "measure"))
def finish_chunk(learner, policy, measure, key, chains, g, carry, data, pool, params, reference):
    """`finish` of generation g for a chunk of chains (learners with `fit_chains`)."""

    def one(chain_ks, carry, data, pool, params):
        keys = generation_keys(chain_ks[2], g)
        return finish(learner, policy, keys, carry, data, pool, params, reference, measure)

    return jax.vmap(one)(vmapped_keys(key, chains), carry, data, pool, params)


def one_generation(
    learner: AbstractLearner,
    policy: Policy,
    key: jax.Array,
    chains: jax.Array,
    g: int,
    carry: Carry | None,
    counts: Any,
    reference: Any = None,
    measure: Callable = evaluate,
    knobs: Any = None,
) -> tuple[Carry, Any]:
    """The loop core: generation `g` of a batch of chains (a jittable learner).

    Builds every chain's training set by the policy, fits (with the learner's batched
    `fit_chains` when it has one, else a vmapped `fit`), and measures.

    Args:
      learner: a jittable learner; policy: the mixing policy.
      key: the run's base key (`base_key(seed)`); chains: [R] uint32 chain indices.
      g: generation index; carry: generation g - 1's batched `Carry` (None for g = 0).
      counts: M_0 for g = 0, else (synthetic, previous, real): ints, or int32 scalars when the
        learner's `static_sample_size` is False.
      reference: held-out real data (`learner.reference`); measure: what is kept per chain.
      knobs: traced values of the learner's `knob_fields` ({name: scalar}), or None for its
        config's constants.
    Returns:
      (carry, measured): measured has leaves [R, ...].
    """
    first = carry is None
    static = learner.static_sample_size
    c_arr = jnp.asarray(np.atleast_1d(np.asarray(counts, np.int32)))
    cnt = (int(counts) if first else tuple(int(c) for c in counts)) if static else None
    if not isinstance(learner, BatchedFit):
        carry, out = block(
            learner,
            policy,
            measure,
            key,
            chains,
            jnp.asarray([g], jnp.int32),
            carry,
            reference,
            c_arr[None],
            counts=cnt,
            scan=False,
            first=first,
            knobs=knobs,
        )
        return carry, jax.tree.map(lambda x: x[0], out)
    (data, pool, start), fit_keys = prepare_chunk(
        learner, policy, key, chains, jnp.int32(g), carry, c_arr, counts=cnt, first=first
    )
    params = learner.fit_chains(fit_keys, data, start)
    return finish_chunk(
        learner, policy, measure, key, chains, jnp.int32(g), carry, data, pool, params, reference
    )


def replay_data(
    learner: AbstractLearner,
    gcfg: config_lib.GenerationConfig,
    seed_or_key: int | jax.Array,
    generations: Sequence[int],
    chain: int = 0,
) -> dict[int, Any]:
    """The training data of one chain at the given generations, recomputed through the loop core
    (`chain_generation`) with the run's keys, for figures of runs that do not store every
    generation's data. Matches the run's chain up to float rounding of batched versus
    single-chain arithmetic (and of a learner's batched `fit_chains` versus its `fit`).

    Returns:
      {generation: data} with NumPy leaves.
    """
    ks = chain_keys(seed_or_key, chain)
    wanted = sorted(set(generations))
    real_size = learner.real_size(requested_real_size(gcfg))
    schedule = Schedule.of(gcfg, real_size, max(wanted, default=-1) + 1)
    policy = schedule.policy
    static = learner.static_sample_size

    @functools.partial(jax.jit, static_argnames=("counts",))
    def step(g, carry, counts_arr, *, counts):
        cnt = counts if static else counts_arr
        data, carry, _ = chain_generation(learner, policy, ks, g, carry, cnt, None, nothing)
        return data, carry

    out: dict[int, Any] = {}
    carry = None
    for g in range(schedule.num_generations):
        counts = schedule.counts(g)
        arr = jax.tree.map(jnp.int32, counts)
        data, carry = step(jnp.int32(g), carry, arr, counts=counts if static else None)
        if g in wanted:
            out[g] = jax.tree.map(np.asarray, data)
    return out

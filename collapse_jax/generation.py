"""The model-agnostic generational loop: mix -> fit -> evaluate, persisted and resumable.

```
data_0 = real data
for n in 0..G-1:
    data_n    = mix(synthetic=alpha, previous=beta, real=gamma) of model_{n-1}   (n >= 1)
    model_n   = fit(learner, data_n)
    metrics_n = evaluate(model_n, real reference)
```

There is ONE loop core, `one_generation` (per chain: `chain_generation`): the CLI
(`run_generations`), every `theory.*.simulate` (through `simulate_chains`) and the GMM figure
replay (`replay_data`) call it, so the same key gives the same per-chain numbers whichever entry
point ran them. The loop alone owns the schedule: the mixing policy (`Policy`), the sample sizes
and the keys; learners are told how many points to draw (see `collapse_jax.learner`).

Keys (one derivation everywhere). A run seeded with `s` has the base key `key(s)`; `simulate`
takes the base key directly. Chain `r` uses

    k_real, k_base, k_gens = split(fold_in(base, r), 3)

(`k_real` draws the real data of generation 0, `k_base` the learner's base init) and generation
`n` of that chain uses `fold_in(k_gens, n)`, split into named keys (`generation_keys`). The
training set of generation n >= 1 is drawn with generation n - 1's `sample` / `previous` /
`real` keys (it is "generation n - 1's sample"; a learner with `sample_noise` draws that
sample's noise from stream `NOISE_STREAM + n - 1` of `k_gens` instead of the `sample` key).
Results therefore depend neither on how many chains or generations were asked for, nor on
chunking, nor on resumption. Held-out reference data use `fold_in(base, 2**31 - 1)`, which no
chain index reaches.

Jittable learners run `R = num_trials` chains under `vmap`, `block_size` generations per
`lax.scan`, `chunk_size` chains at a time; each finished block is committed to the run directory.
A learner with a batched fit over chains (`fit_chains`, e.g. GMM's compaction of converged EM
chains) is stepped one generation at a time from Python instead, its fit called on the whole
chunk. Other learners (SGD, beam search) run their chains one after the other in Python, a
generation of every chain before the next generation, committing after every generation and
keeping each chain's fit and sample resumable inside `work/gen_XXXXX/[chain_XXXXX/]`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import pathlib
import re
import shutil
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax import config as config_lib
from collapse_jax import selection
from collapse_jax.jaxtools import prng
from collapse_jax.learner import AbstractLearner
from collapse_jax.rundir import fileio, guard, reader

log = logging.getLogger(__name__)

Callback = Callable[[int, dict[str, Any]], None]

# The reference (held-out) data's key: fold_in(base, REFERENCE_INDEX), beyond every chain index.
REFERENCE_INDEX = 2**31 - 1


# ----------------------------------------------------------------------------------------------
# Keys.


def base_key(seed_or_key: int | jax.Array) -> jax.Array:
    """The run's base key: `key(seed)` for an int seed, else the (typed) key itself."""
    if isinstance(seed_or_key, (int, np.integer)):
        return jax.random.key(int(seed_or_key))
    key = jnp.asarray(seed_or_key) if not isinstance(seed_or_key, jax.Array) else seed_or_key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a legacy uint32 PRNGKey
    return key


def chain_keys(
    seed_or_key: int | jax.Array, chain: jax.Array | int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(k_real, k_base, k_gens) of chain `chain` of a run with this seed (or base key)."""
    k_real, k_base, k_gens = prng.fold_in_split(base_key(seed_or_key), chain, 3)
    return k_real, k_base, k_gens


def generation_keys(k_gens: jax.Array, generation: jax.Array | int) -> dict[str, jax.Array]:
    """Named keys of one generation of one chain (`fit`, `eval`, and the draws of the NEXT
    generation's training set: `sample`, `previous`, `real`, plus `init` for fresh fits)."""
    # prng: the same keys as jax.random's fold_in/split, fused (and only the used ones computed).
    ks = prng.fold_in_split(k_gens, generation, 6)
    return dict(fit=ks[0], eval=ks[1], sample=ks[2], previous=ks[3], real=ks[4], init=ks[5])


# The word stream (`prng.word_source`) of a chain's k_gens that carries generation g's synthetic
# draw's noise is NOISE_STREAM + g (learners with `sample_noise`): one counter-mode hash per two
# words, no per-generation key derivation. The counters (1 + NOISE_STREAM + g, j) never meet
# `fold_in` / `split`'s (0, i), so the noise is independent of every key `generation_keys` makes.
NOISE_STREAM = 2**30


def synthetic_noise(learner: AbstractLearner, policy: Policy, k_gens, g, num) -> Any:
    """The noise of generation g's synthetic draw of `num` points of one chain (`k_gens`: the
    chain's generation key; `learner.sample_noise` from stream NOISE_STREAM + g), or None where
    the learner draws it itself (no `sample_noise`, or selection, which draws extra candidates
    from the sample key)."""
    sample_noise = getattr(learner, "sample_noise", None)
    if sample_noise is None or not (policy.selection is None or policy.selection.rho >= 1.0):
        return None
    stream = jnp.asarray(g, jnp.uint32) + jnp.uint32(NOISE_STREAM)
    return sample_noise(k_gens, num, stream)


def reference_key(seed_or_key: int | jax.Array) -> jax.Array:
    """The key of the held-out reference data shared by every chain."""
    return jax.random.fold_in(base_key(seed_or_key), REFERENCE_INDEX)


# ----------------------------------------------------------------------------------------------
# The policy: the static part of the schedule that one generation needs.


@dataclasses.dataclass(frozen=True)
class Policy:
    """How generation n's training set is built from generation n - 1 (hashable: a static
    argument of the jitted core, so runs that differ only in sizes share compiled code).

    Attributes:
      policy: "replace", "mix", "accumulate" or "accumulate_subsample" (`GenerationConfig`).
      alpha, beta, gamma: the "mix" shares (synthetic, previous data, real).
      init_from: where each fit starts: "base", "previous" or "scratch".
      selection: `generation.selection` (None: every synthetic point is kept).
      real_data: the gamma share is drawn "fresh" from the real distribution, or from the
        chain's "fixed" generation-0 real data.
    """

    policy: str = "replace"
    alpha: float = 1.0
    beta: float = 0.0
    gamma: float = 0.0
    init_from: str = "base"
    selection: Any = None  # config.SelectionConfig: keep the best-scored synthetic points
    real_data: str = "fresh"

    @classmethod
    def of(cls, gcfg: config_lib.GenerationConfig) -> Policy:
        return cls(
            gcfg.policy,
            gcfg.alpha,
            gcfg.beta,
            gcfg.gamma,
            gcfg.init_from,
            gcfg.selection,
            gcfg.real_data,
        )

    @property
    def keeps_real(self) -> bool:
        """Whether the chain's generation-0 real data are carried (a fixed real set)."""
        return self.policy == "mix" and self.gamma > 0 and self.real_data == "fixed"

    def shares(self, num: int) -> tuple[int, int, int]:
        """Splits `num` points into (synthetic, previous, real) counts (largest remainder)."""
        return config_lib.split_shares(num, self.policy, (self.alpha, self.beta, self.gamma))

    @property
    def keeps_anchor(self) -> bool:
        """Whether the chain's generation-0 fit is carried (the selection scorer
        "generation0" scores every later generation's candidates under it)."""
        sel = self.selection
        return sel is not None and sel.rho < 1.0 and sel.scorer == "generation0"

    @property
    def keeps_data(self) -> bool:
        """Whether generation n's training set enters generation n + 1's (else the loop does
        not carry it from one generation to the next)."""
        return self.policy in ("accumulate", "accumulate_subsample") or (
            self.policy == "mix" and self.beta > 0
        )


def requested_real_size(gcfg: config_lib.GenerationConfig) -> int | None:
    """The loop's M_0 (the schedule's first entry or samples_per_generation; None: unset), which
    `learner.real_size` turns into the number of real points of generation 0."""
    if gcfg.sample_schedule is not None:
        return int(gcfg.sample_schedule[0])
    return gcfg.samples_per_generation


class Carry(NamedTuple):
    """What one generation hands to the next, per chain: the fitted params; when the policy
    keeps data (`Policy.keeps_data`) the data set the next one is built from (the training set,
    or for accumulate_subsample the pool of all data so far), else None; with a fixed real set
    (`Policy.keeps_real`) the chain's generation-0 real data, else None; with the selection
    scorer "generation0" (`Policy.keeps_anchor`) the chain's generation-0 params, else None."""

    params: Any
    data: Any
    real: Any = None
    anchor: Any = None


def start_params(learner: AbstractLearner, policy: Policy, keys, k_base, previous):
    """Where generation n's fit starts (`init_from`); generation 0 starts from the base."""
    if policy.init_from == "previous" and previous is not None:
        return previous
    if policy.init_from == "scratch":
        return learner.init(keys["init"])
    return learner.init(k_base)


def next_data(
    learner: AbstractLearner,
    policy: Policy,
    keys,
    data,
    params,
    counts,
    real=None,
    anchor=None,
    **kw,
) -> Any:
    """The next generation's data set under the mixing policy (accumulate_subsample: the pool,
    which `training_set` subsamples).

    Args:
      keys: the CURRENT generation's keys (its `sample`, `previous` and `real` keys).
      data: the current data set (used by the accumulate policies and by mix with beta > 0).
      params: the current fitted model, which the synthetic share is sampled from.
      counts: (synthetic, previous, real) numbers of points; ints, or traced int32 scalars for
        learners with `static_sample_size = False`.
      real: the chain's generation-0 real data (needed with `real_data: fixed`).
      anchor: the chain's generation-0 params (the selection scorer "generation0").
      kw: passed to `learner.sample` (non-jittable learners: `workdir`).
    """
    n_syn, n_prev, n_real = counts
    synth = selection.sample(
        learner, policy.selection, keys["sample"], params, n_syn, anchor=anchor, **kw
    )
    if policy.policy == "replace":
        return synth
    if policy.policy in ("accumulate", "accumulate_subsample"):
        return learner.concat([data, synth])
    parts = [synth]
    if policy.beta > 0:
        parts.append(learner.subset(keys["previous"], data, n_prev))
    if policy.gamma > 0:
        if policy.real_data == "fixed":
            parts.append(learner.subset(keys["real"], real, n_real))
        else:
            parts.append(learner.draw_real(keys["real"], n_real))
    return learner.concat(parts)


def training_set(learner: AbstractLearner, policy: Policy, keys, pool, num) -> Any:
    """What generation n fits: the data set itself, or for accumulate_subsample a uniformly
    random subset of `num` (= M_n) points of the pool, drawn with generation n - 1's `previous`
    key (`keys`), which that policy uses for nothing else."""
    if policy.policy != "accumulate_subsample":
        return pool
    return learner.subset(keys["previous"], pool, num)


def evaluate(learner: AbstractLearner, key, params, reference) -> dict[str, Any]:
    """The default `measure` of a generation: the learner's metrics."""
    return learner.evaluate(key, params, reference)


# ----------------------------------------------------------------------------------------------
# The loop core: one generation of one chain, and of a batch of chains.


def chain_generation(
    learner: AbstractLearner,
    policy: Policy,
    ks: tuple[jax.Array, jax.Array, jax.Array],
    g: jax.Array | int,
    carry: Carry | None,
    counts: Any,
    reference: Any = None,
    measure: Callable = evaluate,
    fit: bool = True,
    noise: Any = None,
) -> tuple[Any, Carry, Any]:
    """Generation `g` of one chain: build its training set, fit, measure.

    Args:
      ks: the chain's (k_real, k_base, k_gens) (`chain_keys`).
      g: the generation index.
      carry: generation g - 1's `Carry`; None for generation 0 (whose data is real).
      counts: generation 0: M_0, the number of real points; later: (synthetic, previous, real).
      measure: `measure(learner, key, params, reference)` -> pytree kept per generation.
      fit: False stops after building the data and the fit's starting params (for learners
        whose fit runs batched over chains outside this function).
      noise: `synthetic_noise(learner, policy, k_gens, g - 1, counts[0])`, drawn ahead by the
        caller (`_block`, for a block of generations at once); None: drawn here (the same
        numbers), and passed to `learner.sample`.
    Returns:
      (data, carry, measured): data is what generation g fits; with `fit=False`,
      ((data, pool, real, anchor), start params, fit key) instead (anchor: None at g = 0).
    """
    k_real, k_base, k_gens = ks
    if carry is None:
        data = pool = real = learner.real_data(k_real, counts)
        previous = anchor = None
    else:
        # Generation g's data is generation g - 1's sample: drawn with ITS keys, so a run that
        # persists the next data at the end of g - 1 (the non-jittable path) draws the same.
        prev_keys = generation_keys(k_gens, g - 1)
        if noise is None:
            noise = synthetic_noise(learner, policy, k_gens, g - 1, counts[0])
        pool = next_data(
            learner,
            policy,
            prev_keys,
            carry.data,
            carry.params,
            counts,
            real=carry.real,
            anchor=carry.anchor,
            **({} if noise is None else {"noise": noise}),
        )
        data = training_set(learner, policy, prev_keys, pool, counts[0])
        previous, real, anchor = carry.params, carry.real, carry.anchor
    keys = generation_keys(k_gens, g)
    init = start_params(learner, policy, keys, k_base, previous)
    if not fit:
        return (data, pool, real, anchor), init, keys["fit"]
    params = learner.fit(keys["fit"], data, init)
    out = measure(learner, keys["eval"], params, reference)
    return data, _carry(policy, params, pool, real, anchor), out


def _carry(policy: Policy, params, pool, real, anchor) -> Carry:
    """What generation g keeps for g + 1 (anchor None: g = 0, whose fit becomes the anchor)."""
    return Carry(
        params,
        pool if policy.keeps_data else None,
        real if policy.keeps_real else None,
        (params if anchor is None else anchor) if policy.keeps_anchor else None,
    )


def _vmapped_keys(key, chains):
    return jax.vmap(lambda c: chain_keys(key, c))(chains)


@functools.partial(
    jax.jit, static_argnames=("learner", "policy", "measure", "counts", "scan", "first")
)
def _block(
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

    ks = _vmapped_keys(key, chains)
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
    without selection: selection draws extra candidates from the same key.
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
def _prepare(learner, policy, key, chains, g, carry, counts_arr, *, counts, first):
    """Data, fit starts and fit keys of generation g for a chunk (learners with `fit_chains`)."""

    def one(chain_ks, carry):
        if counts is not None:
            cnt = counts
        else:
            cnt = counts_arr[0] if first else (counts_arr[0], counts_arr[1], counts_arr[2])
        return chain_generation(
            learner, policy, chain_ks, g, None if first else carry, cnt, fit=False
        )

    return jax.vmap(one)(_vmapped_keys(key, chains), carry)


@functools.partial(jax.jit, static_argnames=("learner", "policy", "measure"))
def _finish(learner, policy, measure, key, chains, g, sets, params, reference):
    def one(chain_ks, sets, params):
        keys = generation_keys(chain_ks[2], g)
        out = measure(learner, keys["eval"], params, reference)
        _, pool, real, anchor = sets
        return _carry(policy, params, pool, real, anchor), out

    return jax.vmap(one)(_vmapped_keys(key, chains), sets, params)


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
    if learner.fit_chains is None:
        carry, out = _block(
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
    sets, init, fit_keys = _prepare(
        learner, policy, key, chains, jnp.int32(g), carry, c_arr, counts=cnt, first=first
    )
    params = learner.fit_chains(fit_keys, sets[0], init)
    return _finish(learner, policy, measure, key, chains, jnp.int32(g), sets, params, reference)


# ----------------------------------------------------------------------------------------------
# Driving blocks of generations for a chunk of chains (shared by the CLI and `simulate`).

# Generations per compiled scan of `simulate_chains` (traced sizes: one compile for any G).
SCAN_BLOCK = 16


def _segments(start: int, stop: int, block: int, counts_of: Callable[[int], Any], static: bool):
    """Blocks of generations [a, b): generation 0 alone (its data are real), then blocks aligned
    to `block`, split where static counts change."""
    g = start
    while g < stop:
        if g == 0:
            yield 0, 1
            g = 1
            continue
        end = min((g // block + 1) * block, stop)
        if static:
            b = g + 1
            while b < end and counts_of(b) == counts_of(g):
                b += 1
            end = b
        yield g, end
        g = end


def _shape_invariant(learner, policy, measure, key, chains, carry, reference, g, counts) -> bool:
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
            _block,
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


def _advance(
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
    carry, out = _block(
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
    """`_advance` for a sweep batch of P points (see there): each point runs `_advance` itself,
    with its own key, carry, reference, counts and knobs, all traced. The points therefore share
    ONE compiled program per block (the static arguments are equal) and each gets exactly a
    separate run's numbers: a separate run executes the very same program. (Points inside one
    program, by `vmap` or `lax.map`, changed float32 results in the last bit: XLA fuses the
    extra loop's body differently, e.g. for the "mix" policy.)"""
    outs, carries = [], []
    for p in range(keys.shape[0]):
        at = lambda x, p=p: x[p]  # noqa: E731
        c, out = _advance(
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
        for a, b in _segments(0, gens, SCAN_BLOCK, counts_of, static):
            scan = a > 0 and _shape_invariant(
                learner, policy, measure, key, idx, carry, reference, a, counts_of(a)
            )
            carry, part = _advance(
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
    policy = Policy.of(gcfg)
    ks = chain_keys(seed_or_key, chain)
    wanted = sorted(set(generations))
    real_size = learner.real_size(requested_real_size(gcfg))
    static = learner.static_sample_size

    @functools.partial(jax.jit, static_argnums=(2,))
    def step(g, carry, counts, counts_arr):
        cnt = counts if static else counts_arr
        data, carry, _ = chain_generation(learner, policy, ks, g, carry, cnt, None, _nothing)
        return data, carry

    out: dict[int, Any] = {}
    carry = None
    for g in range(max(wanted, default=-1) + 1):
        counts = real_size if g == 0 else gcfg.shares(gcfg.sample_size(g, real_size))
        arr = jax.tree.map(jnp.int32, counts)
        data, carry = step(jnp.int32(g), carry, counts if static else None, arr)
        if g in wanted:
            out[g] = jax.tree.map(np.asarray, data)
    return out


def _nothing(learner, key, params, reference) -> tuple:
    """A `measure` that keeps nothing."""
    return ()


# ----------------------------------------------------------------------------------------------
# Summaries of per-chain metrics.


def summarize(metrics: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Chain statistics of one generation's metrics.

    Args:
      metrics: {name: [R] or [R, ...]} per-chain values.
    Returns:
      (row, means): scalar metrics give `name` (chain mean) and, when R > 1, `name_se`,
      `name_std`, `name_q05`, `name_q50`, `name_q95`; vector metrics give their chain mean in
      `means`.
    """
    row: dict[str, float] = {}
    means: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", over="ignore"):  # -inf log-dets of collapsed chains
        for name, v in metrics.items():
            _summarize_one(name, np.asarray(v, dtype=np.float64), row, means)
    return row, means


def _summarize_one(name: str, v: np.ndarray, row: dict, means: dict) -> None:
    if v.ndim > 1:
        means[name] = v.mean(axis=0)
        return
    r = v.shape[0]
    row[name] = float(v.mean())
    if r > 1:
        std = float(v.std(ddof=1))
        row[f"{name}_se"] = std / math.sqrt(r)
        row[f"{name}_std"] = std
        q = np.quantile(v, [0.05, 0.5, 0.95])
        row[f"{name}_q05"], row[f"{name}_q50"], row[f"{name}_q95"] = map(float, q)


# ----------------------------------------------------------------------------------------------
# The driver.


@dataclasses.dataclass
class Result:
    """What `run_generations` returns: the summary rows and the run directory."""

    rows: list[dict[str, Any]]
    run_dir: pathlib.Path


def _env_info() -> dict[str, Any]:
    import importlib.metadata as md
    import platform
    import subprocess

    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        sha = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=pathlib.Path(__file__).parent,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {
        "python": platform.python_version(),
        "versions": versions,
        "devices": [str(d) for d in jax.devices()],
        "git_sha": sha,
    }


def prepare_run_dir(cfg: config_lib.ExperimentConfig, run_dir: pathlib.Path) -> int:
    """Creates or checks `run_dir` (with its lock held); returns the first generation still to
    run. A run directory may be resumed with the same config, or with more generations; see
    `collapse_jax.rundir.guard.prepare`."""
    return guard.prepare(cfg, run_dir, _env_info)


def make_learner(cfg: config_lib.ExperimentConfig) -> AbstractLearner:
    return config_lib.learner_class(cfg.kind)(cfg.model, cfg.mesh)


def run_generations(
    cfg: config_lib.ExperimentConfig,
    run_dir: str | pathlib.Path,
    *,
    learner: AbstractLearner | None = None,
    on_generation: Callback | None = None,
    progress: bool = False,
    stop_after: int | None = None,
) -> Result:
    """Runs (or resumes) an experiment in `run_dir`.

    Args:
      cfg: the resolved experiment config.
      run_dir: the experiment's run directory; resumed when it already holds generations.
      learner: the learner to use (default: the one `cfg.model.kind` names).
      on_generation: called as `on_generation(g, row)` after every committed generation.
      progress: show a progress bar over generations.
      stop_after: stop once this many generations are committed (simulates a killed run).

    Returns:
      The summary rows of all finished generations and the run directory.
    """
    run_dir = pathlib.Path(run_dir)
    learner = make_learner(cfg) if learner is None else learner
    with guard.RunLock(run_dir):  # one process per run directory, for the whole run
        return _run_locked(cfg, run_dir, learner, on_generation, progress, stop_after)


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


def run_batch(
    cfgs: Sequence[config_lib.ExperimentConfig],
    run_dirs: Sequence[str | pathlib.Path],
    *,
    learner: AbstractLearner | None = None,
) -> list[Result]:
    """Runs (or resumes) several experiments of equal `batch_key` on ONE compiled program per
    block of generations (a sweep's grid points that differ only in seed, knobs such as lambda,
    or traced sample sizes and mix shares), each committed to its own run directory with the
    numbers a run of its own gives (`_advance_points`). Falls back to one run after
    the other when they cannot be batched or stand at different generations (a resumed sweep).
    """
    run_dirs = [pathlib.Path(d) for d in run_dirs]
    learner = make_learner(cfgs[0]) if learner is None else learner
    key0 = batch_key(cfgs[0], learner)
    if len(cfgs) > 1 and key0 is not None and all(batch_key(c, learner) == key0 for c in cfgs):
        with contextlib.ExitStack() as locks:
            for d in run_dirs:
                locks.enter_context(guard.RunLock(d))
            starts = [prepare_run_dir(c, d) for c, d in zip(cfgs, run_dirs)]
            if len(set(starts)) == 1:
                for d in run_dirs:
                    learner.prepare(d)
                if starts[0] < cfgs[0].generation.num_generations:
                    noop = [lambda g, row: None] * len(cfgs)
                    _run_jittable_points(cfgs, learner, run_dirs, starts[0], noop, None)
                out = []
                for d in run_dirs:
                    rows = reader.Run(d).rows()
                    reader.write_tables(d, rows)
                    out.append(Result(rows=rows, run_dir=d))
                return out
    return [run_generations(c, d, learner=learner) for c, d in zip(cfgs, run_dirs)]


def _run_locked(cfg, run_dir, learner, on_generation, progress, stop_after) -> Result:
    gcfg = cfg.generation
    start = prepare_run_dir(cfg, run_dir)
    learner.prepare(run_dir)
    driver = _run_jittable if learner.jittable else _run_python
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=gcfg.num_generations, initial=start, desc=cfg.name, unit="gen")

    def committed(g: int, row: dict[str, Any]) -> None:
        if bar is not None:
            bar.update(1)
            shown = {k: v for k, v in row.items() if "_" not in k and isinstance(v, float)}
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(shown.items())[:3]}, refresh=False)
        if on_generation is not None:
            on_generation(g, row)

    try:
        if start < gcfg.num_generations:
            driver(cfg, learner, run_dir, start, committed, stop_after)
    finally:
        if bar is not None:
            bar.close()
    run = reader.Run(run_dir)
    rows = run.rows()
    reader.write_tables(run_dir, rows)
    return Result(rows=rows, run_dir=run_dir)


# ----------------------------------------------------------------------------------------------
# Committing a generation. The order matters for resume: a generation's row and arrays (and the
# non-jittable path's data and params) are written first, `state/` (what the next generation
# needs, with meta.json's next_generation) is replaced last and is the commit point. A run
# killed in between redoes the generation from the old state and rewrites the same files.


def _commit_generation(run_dir: pathlib.Path, g: int, row: dict, arrays: dict) -> None:
    """Writes generation g's per-chain arrays, then its summary row."""
    fileio.save_npz(run_dir / "arrays" / f"gen_{g:05d}.npz", arrays)
    fileio.atomic_write_json(run_dir / "generations" / f"gen_{g:05d}.json", row)


def _commit_state(run_dir: pathlib.Path, next_generation: int, write: Callable) -> None:
    """Replaces `state/` by a folder that `write(tmp)` fills, plus meta.json and the manifest of
    committed files (the commit; `rundir.guard.commit_state`)."""
    guard.commit_state(run_dir, next_generation, write)


def _row_and_arrays(gcfg, g: int, real_size: int, per_chain: dict) -> tuple[dict, dict]:
    """A generation's summary row and arrays from its per-chain metrics {name: [R, ...]}."""
    row, means = summarize(per_chain)
    row = {"generation": g, "sample_size": _size_of(gcfg, g, real_size), **row}
    arrays = {f"trials/{k}": np.asarray(v)[: gcfg.record_trials] for k, v in per_chain.items()}
    arrays.update({f"mean/{k}": v for k, v in means.items()})
    return row, arrays


def _size_of(gcfg, g: int, real_size: int) -> int:
    """Number of points generation g is fitted to (accumulate: all generations' data)."""
    if gcfg.policy == "accumulate":  # (accumulate_subsample fits M_n of the pool)
        return real_size + sum(gcfg.sample_size(k, real_size) for k in range(1, g + 1))
    return real_size if g == 0 else gcfg.sample_size(g, real_size)


# ----------------------------------------------------------------------------------------------
# Jittable learners: vmap over chains, scan over a block of generations, chunk over chains.


def _run_jittable(cfg, learner, run_dir, start, committed, stop_after) -> None:
    _run_jittable_points([cfg], learner, [run_dir], start, [committed], stop_after)


def _run_jittable_points(cfgs, learner, run_dirs, start, committed, stop_after) -> None:
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
        from collapse_jax.jaxtools import sharding as sharding_lib

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
            return _pad_rows(x[sl], chunk)
        return np.stack([_pad_rows(xp[sl], chunk) for xp in x])

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
    segments = _segments(
        start, gcfg.num_generations, gcfg.block_size, lambda g: counts_p(0, g), static
    )
    for a, b in segments:
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
            scan = a > 0 and _shape_invariant(
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
            new, m = _advance(
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
        row, arrays = _row_and_arrays(gcfg, g, real_size, per_chain)
        _commit_generation(run_dir, g, row, arrays)
        if gcfg.keep_params != "last" and g == b - 1:
            # Only the block's last params exist on the host (use block_size: 1 for all).
            pdir = run_dir / "params" / f"gen_{g:05d}"
            tmp = fileio.fresh_dir(pdir.parent, pdir.name)
            fileio.save_tree(tmp / "params.npz", carry.params)
            fileio.replace_dir(tmp, pdir)
            _prune_params(pdir.parent, gcfg, g)

    def write(tmp, carry=carry):
        fileio.save_tree(tmp / "carry.npz", carry)

    _commit_state(run_dir, b, write)
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


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
    x = np.asarray(x)
    if x.shape[0] == n:
        return x
    pad = np.repeat(x[-1:], n - x.shape[0], axis=0)
    return np.concatenate([x, pad], axis=0)


def _cat_chunks(parts: list[Any], R: int) -> Any:
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs])[:R], *parts)


# ----------------------------------------------------------------------------------------------
# Non-jittable learners: chains one after the other in Python, a generation of every chain before
# the next generation; every generation committed, each chain's fit and sample resumable.
#
# Chain r's files live in `_chain_dir(folder, r)`: the folder itself for chain 0 (the layout of a
# single-chain run) and `folder/chain_XXXXX` for the others. Per generation g and chain r:
#   work/gen_g[/chain_r]/train.npz  the training set (real data, or a subset of the pool)
#   work/gen_g[/chain_r]/fit/       the learner's own resumable fit state (checkpoints)
#   work/gen_g[/chain_r]/fitted/    the fitted params (DONE marks them complete)
#   work/gen_g[/chain_r]/metrics.npz
#   work/gen_g[/chain_r]/sample/    the learner's resumable sampling state
#   work/gen_g[/chain_r]/next.npz   the next data set (state/data.npz once committed): this
#                                   chain's generation is done
# Once every chain is done the generation is committed (data, params, row, arrays, then state/)
# and work/gen_g is removed.


def _chain_dir(folder: pathlib.Path, r: int) -> pathlib.Path:
    return folder if r == 0 else folder / f"chain_{r:05d}"


def _run_python(cfg, learner, run_dir, start, committed, stop_after) -> None:
    gcfg = cfg.generation
    policy = Policy.of(gcfg)
    if policy.keeps_anchor:  # refused before any fit, not at the end of generation 0
        raise ValueError(
            f"generation.selection.scorer: 'generation0' needs a jittable learner "
            f"({type(learner).__name__} is not)"
        )
    key, R = base_key(cfg.seed), gcfg.num_trials
    reference = learner.reference(reference_key(key))
    real_size = learner.real_size(requested_real_size(gcfg))
    ks = [chain_keys(key, r) for r in range(R)]
    template: list[Any] = [None] * R

    def params_template(r: int) -> Any:
        if template[r] is None:
            template[r] = learner.init(ks[r][1])
        return template[r]

    done = 0
    for g in range(start, gcfg.num_generations):
        work = run_dir / "work" / f"gen_{g:05d}"
        per_chain = []
        for r in range(R):
            k_real, k_base, k_gens = ks[r]
            state = _chain_dir(run_dir / "state", r)
            wdir = _chain_dir(work, r)
            wdir.mkdir(parents=True, exist_ok=True)
            # The training set passes through work/ (generation 0's real data too), so a resumed
            # run trains on exactly the bytes the committed data/gen_XXXXX holds.
            train_path = wdir / "train.npz"
            if g == 0:
                pool = None
                if not train_path.exists():
                    real = learner.real_data(k_real, real_size)
                    fileio.save_npz(train_path, _data_arrays(real))
            else:
                pool = _load_data(state / "data.npz")  # the data set next_data built
                if not train_path.exists():
                    m_g = gcfg.sample_size(g, real_size)
                    prev = generation_keys(k_gens, g - 1)
                    train = training_set(learner, policy, prev, pool, m_g)
                    fileio.save_npz(train_path, _data_arrays(train))
            data = _load_data(train_path)
            pool = data if pool is None else pool
            keys = generation_keys(k_gens, g)
            fitted_dir = wdir / "fitted"
            if (fitted_dir / "DONE").exists():
                params = learner.load_params(fitted_dir, params_template(r))
            else:
                previous = None
                if g > 0 and policy.init_from == "previous":
                    previous = learner.load_params(state / "params", params_template(r))
                init = start_params(learner, policy, keys, k_base, previous)
                params = learner.fit(keys["fit"], data, init, workdir=wdir / "fit")
                tmp = fileio.fresh_dir(wdir, "fitted")
                learner.save_params(tmp, params)
                (tmp / "DONE").write_text("ok\n")
                fileio.replace_dir(tmp, fitted_dir)
            metrics_path = wdir / "metrics.npz"
            if metrics_path.exists():
                m = fileio.load_npz(metrics_path)
            else:
                m = {
                    **learner.evaluate(keys["eval"], params, reference),
                    **learner.data_metrics(data),
                }
                m = {k: np.asarray(v) for k, v in m.items()}
                fileio.save_npz(metrics_path, m)
            per_chain.append(m)
            if not (wdir / "next.npz").exists():
                counts = gcfg.shares(gcfg.sample_size(g + 1, real_size))
                real = None
                if policy.keeps_real:  # the chain's fixed real set: its generation-0 data
                    real = (
                        data
                        if g == 0
                        else _load_data(_chain_dir(run_dir / "data", r) / "gen_00000.npz")
                    )
                new = next_data(
                    learner, policy, keys, pool, params, counts, real, workdir=wdir / "sample"
                )
                fileio.save_npz(wdir / "next.npz", _data_arrays(new))
            del data, pool, params
        # Every chain has finished generation g: commit it.
        for r in range(R):
            wdir = _chain_dir(work, r)
            dst = _chain_dir(run_dir / "data", r) / f"gen_{g:05d}.npz"
            fileio.save_npz(dst, fileio.load_npz(wdir / "train.npz"))
            if gcfg.keep_params != "last":
                pdir = _chain_dir(run_dir / "params", r) / f"gen_{g:05d}"
                tmp = fileio.fresh_dir(pdir.parent, pdir.name)
                shutil.copytree(wdir / "fitted", tmp, dirs_exist_ok=True)
                fileio.replace_dir(tmp, pdir)
                _prune_params(pdir.parent, gcfg, g)
        stacked = {k: np.stack([m[k] for m in per_chain]) for k in per_chain[0]}
        guard.check_finite(g, stacked, learner.infinite_metrics)  # before the commit
        row, arrays = _row_and_arrays(gcfg, g, real_size, stacked)
        _commit_generation(run_dir, g, row, arrays)

        def write(tmp, work=work):
            for r in range(R):
                wdir, sdir = _chain_dir(work, r), _chain_dir(tmp, r)
                sdir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(wdir / "next.npz", sdir / "data.npz")
                shutil.copytree(wdir / "fitted", sdir / "params")

        _commit_state(run_dir, g + 1, write)
        shutil.rmtree(work, ignore_errors=True)
        committed(g, row)
        done += 1
        if stop_after is not None and done >= stop_after:
            return


def _prune_params(folder: pathlib.Path, gcfg, newest: int) -> None:
    """`keep_params: first_last`: drop kept parameters other than the first kept generation's
    (generation 0; for jittable learners, whose parameters reach the host only at the end of a
    block, the first block's last) and the newest. Runs after the newest is committed, so a kill
    in between leaves one folder too many, never one too few."""
    if gcfg.keep_params != "first_last":
        return
    kept = []
    for p in folder.glob("gen_*"):
        m = re.fullmatch(r"gen_(\d+)", p.name)
        if m:
            kept.append((int(m.group(1)), p))
    kept.sort()
    for g, p in kept[1:]:
        if g != newest:
            shutil.rmtree(p, ignore_errors=True)


def _data_arrays(data: Any) -> dict[str, np.ndarray]:
    leaves = jax.tree.leaves(data)
    if len(leaves) != 1:
        raise TypeError("non-jittable learners' data must be a single array")
    return {"data": np.asarray(leaves[0])}


def _load_data(path: pathlib.Path) -> np.ndarray:
    return fileio.load_npz(path)["data"]

"""The mixing policy's steps: how generation n's training set is built from generation n - 1
(`next_data`, `training_set`), where its fit starts (`start_params`), and what one generation
hands to the next (`Carry`). Each works on one chain and takes the static `schedule.Policy`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

from collapse_jax.loop import filtering
from collapse_jax.loop.keys import NOISE_STREAM
from collapse_jax.loop.learner import AbstractLearner, PresampledNoise
from collapse_jax.loop.schedule import Policy


class Carry(NamedTuple):
    """What one generation hands to the next, per chain: the fitted params; when the policy
    keeps data (`Policy.keeps_data`) the data set the next one is built from (the training set,
    or for accumulate_subsample the pool of all data so far), else None; with a fixed real set
    (`Policy.keeps_real`) the chain's generation-0 real data, else None; with the likelihood
    filter's scorer "generation0" (`Policy.keeps_anchor`) the chain's generation-0 params, else
    None."""

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
      anchor: the chain's generation-0 params (the likelihood filter's scorer "generation0").
      kw: passed to `learner.sample` (non-jittable learners: `workdir`).
    """
    n_syn, n_prev, n_real = counts
    synth = filtering.sample(
        learner, policy.likelihood_filter, keys["sample"], params, n_syn, anchor=anchor, **kw
    )
    if policy.mode == "replace":
        return synth
    if policy.mode in ("accumulate", "accumulate_subsample"):
        return learner.concat([data, synth])
    parts = [synth]
    if policy.previous:
        parts.append(learner.subset(keys["previous"], data, n_prev))
    if policy.real:
        if policy.real_data == "fixed":
            parts.append(learner.subset(keys["real"], real, n_real))
        else:
            parts.append(learner.draw_real(keys["real"], n_real))
    return learner.concat(parts)


def training_set(learner: AbstractLearner, policy: Policy, keys, pool, num) -> Any:
    """What generation n fits: the data set itself, or for accumulate_subsample a uniformly
    random subset of `num` (= M_n) points of the pool, drawn with generation n - 1's `previous`
    key (`keys`), which that policy uses for nothing else."""
    if policy.mode != "accumulate_subsample":
        return pool
    return learner.subset(keys["previous"], pool, num)


def synthetic_noise(learner: AbstractLearner, policy: Policy, k_gens, g, num) -> Any:
    """The noise of generation g's synthetic draw of `num` points of one chain (`k_gens`: the
    chain's generation key; `learner.sample_noise` from stream NOISE_STREAM + g), or None where
    the learner draws it itself (no `sample_noise`, or likelihood filtering, which draws extra
    candidates from the sample key)."""
    if not isinstance(learner, PresampledNoise) or policy.filters:
        return None
    stream = jnp.asarray(g, jnp.uint32) + jnp.uint32(NOISE_STREAM)
    return learner.sample_noise(k_gens, num, stream)


def carry_of(policy: Policy, params, pool, real, anchor) -> Carry:
    """What generation g keeps for g + 1 (anchor None: g = 0, whose fit becomes the anchor)."""
    return Carry(
        params,
        pool if policy.keeps_data else None,
        real if policy.keeps_real else None,
        (params if anchor is None else anchor) if policy.keeps_anchor else None,
    )

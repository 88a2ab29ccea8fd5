"""The mixing policy: how generation n's training set is built from generation n - 1.

`Policy` is the static part of the schedule that one generation needs; `next_data`,
`training_set` and `start_params` are the per-chain steps the loop core composes, and `Carry` is
what one generation hands to the next.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp

from collapse_jax import config as config_lib
from collapse_jax.loop import selection
from collapse_jax.loop.keys import NOISE_STREAM
from collapse_jax.loop.learner import AbstractLearner


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


def carry_of(policy: Policy, params, pool, real, anchor) -> Carry:
    """What generation g keeps for g + 1 (anchor None: g = 0, whose fit becomes the anchor)."""
    return Carry(
        params,
        pool if policy.keeps_data else None,
        real if policy.keeps_real else None,
        (params if anchor is None else anchor) if policy.keeps_anchor else None,
    )

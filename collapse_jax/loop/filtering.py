"""Likelihood filtering of synthetic data: `generation.likelihood_filter: {rho, scorer}`.

Instead of training the next generation on M samples of the current model, draw ceil(M / rho)
candidates and keep the M that a scorer finds likeliest. The loop calls `sample` below wherever
it draws synthetic data, so filtering applies to every policy (replace, mix, accumulate, ...).

This is likelihood filtering, not verification in the sense of Feng et al. (2024, "Beyond model
collapse: scaling up with synthesized data requires verification"), whose verifier removes wrong
*labels* (`collapse_jax.theory.verification`). Keeping the likeliest samples trims the tails, a
sampling-bias effect (MAD's lambda_MAD < 1): it may narrow a density even as it removes the
model's errors (the KDE and linear-regression configs
`collapse_jax/configs/*_likelihood_filter.yaml` show both effects).

Scorers (a learner opts in by implementing `loop.learner.Scorable`):
- "truth": `learner.truth_log_prob(data) -> [N]`, the log-likelihood of each candidate under the
  real distribution (known for the theory learners: the Gaussian, the GMM, the KDE data sets,
  the linear model's w*).
- "generation0": `learner.log_prob(data, params) -> [N]` under the chain's generation-0 fitted
  model (the loop carries it: `loop.policy.Carry.anchor`), which needs no access to the real
  distribution beyond the first fit. It anchors every later generation to that fit: the drift
  away from it stops, but its own estimation error is kept
  (`collapse_jax/configs/gaussian_likelihood_filter.yaml` compares the two scorers).
"""

from __future__ import annotations

import math
from typing import Any

import jax

from collapse_jax.loop.learner import Scorable


def num_candidates(num: int, rho: float) -> int:
    """ceil(num / rho), guarded against float round-off (num / 0.5 is exactly 2 num)."""
    return max(num, math.ceil(num / rho - 1e-9))


def sample(
    learner: Any,
    likelihood_filter: Any,
    key: jax.Array,
    params: Any,
    num: Any,
    anchor: Any = None,
    **kw: Any,
) -> Any:
    """`num` synthetic points from `params`, filtered as `likelihood_filter` (a
    `LikelihoodFilterConfig` or None) says; without it exactly `learner.sample(key, params, num)`.

    Args:
      learner: the learner (`Scorable`: `truth_log_prob` for scorer "truth", `log_prob` for
        "generation0"; its `take(data, idx)` keeps the selected points).
      likelihood_filter: the experiment's `generation.likelihood_filter`.
      num: a static int (the candidates' count must be known at trace time).
      anchor: the chain's generation-0 params (scorer "generation0").
    """
    if likelihood_filter is None or likelihood_filter.rho >= 1.0:
        return learner.sample(key, params, num, **kw)
    name = type(learner).__name__
    if not isinstance(num, int):
        raise ValueError(
            f"generation.likelihood_filter: {name} draws traced sample sizes; "
            "filtering needs raw points (e.g. method: sample)"
        )
    if not isinstance(learner, Scorable):
        if likelihood_filter.scorer == "generation0":
            raise ValueError(
                f"generation.likelihood_filter.scorer: {name} has no 'log_prob' to score by"
            )
        raise ValueError(
            f"generation.likelihood_filter.scorer: {name} has no known real distribution to "
            "score by ('truth')"
        )
    if likelihood_filter.scorer == "generation0":
        if anchor is None:
            raise ValueError(
                f"generation.likelihood_filter.scorer: 'generation0' needs the loop to carry the "
                f"generation-0 fit, which only the jittable learners' loop does ({name} is not)"
            )

        def scorer(data):
            return learner.log_prob(data, anchor)
    else:
        scorer = learner.truth_log_prob
    candidates = learner.sample(key, params, num_candidates(num, likelihood_filter.rho), **kw)
    _, idx = jax.lax.top_k(scorer(candidates), num)  # the num best-scored, best first
    return learner.take(candidates, idx)

"""Selection of synthetic data (Feng et al. 2024, "Beyond model collapse: scaling up with
synthesized data requires verification"): `generation.selection: {rho, scorer}`.

Instead of training the next generation on M samples of the current model, draw ceil(M / rho)
candidates and keep the M that a scorer ranks best. The loop calls `sample` below wherever it
draws synthetic data, so selection applies to every policy (replace, mix, accumulate, ...).

Scorers (a learner opts in by implementing `loop.learner.Scorable`):
- "truth": `learner.truth_log_prob(data) -> [N]`, the log-likelihood of each candidate under the
  real distribution (known for the theory learners: the Gaussian, the GMM, the KDE data sets,
  the linear model's w*). It is the oracle verifier of Feng et al.; selecting by likelihood also
  trims the tails, so it may narrow a density even as it removes the model's errors (the KDE and
  linear-regression configs `collapse_jax/configs/*_selection.yaml` show both effects).
- "generation0": `learner.log_prob(data, params) -> [N]` under the chain's generation-0 fitted
  model (the loop carries it: `loop.policy.Carry.anchor`), the verifier that needs no access to
  the real distribution beyond the first fit. It anchors every later generation to that fit:
  the drift away from it stops, but its own estimation error is kept
  (`collapse_jax/configs/gaussian_selection.yaml` compares the two scorers).
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
    selection: Any,
    key: jax.Array,
    params: Any,
    num: Any,
    anchor: Any = None,
    **kw: Any,
) -> Any:
    """`num` synthetic points from `params`, selected as `selection` (a `SelectionConfig` or
    None) says; without selection exactly `learner.sample(key, params, num)`.

    Args:
      learner: the learner (`Scorable`: `truth_log_prob` for scorer "truth", `log_prob` for
        "generation0"; its `take(data, idx)` keeps the selected points).
      selection: the experiment's `generation.selection`.
      num: a static int (the candidates' count must be known at trace time).
      anchor: the chain's generation-0 params (scorer "generation0").
    """
    if selection is None or selection.rho >= 1.0:
        return learner.sample(key, params, num, **kw)
    name = type(learner).__name__
    if not isinstance(num, int):
        raise ValueError(
            f"generation.selection: {name} draws traced sample sizes; "
            "selection needs raw points (e.g. method: sample)"
        )
    if not isinstance(learner, Scorable):
        if selection.scorer == "generation0":
            raise ValueError(f"generation.selection.scorer: {name} has no 'log_prob' to score by")
        raise ValueError(
            f"generation.selection.scorer: {name} has no known real distribution to "
            "score by ('truth')"
        )
    if selection.scorer == "generation0":
        if anchor is None:
            raise ValueError(
                f"generation.selection.scorer: 'generation0' needs the loop to carry the "
                f"generation-0 fit, which only the jittable learners' loop does ({name} is not)"
            )

        def scorer(data):
            return learner.log_prob(data, anchor)
    else:
        scorer = learner.truth_log_prob
    candidates = learner.sample(key, params, num_candidates(num, selection.rho), **kw)
    _, idx = jax.lax.top_k(scorer(candidates), num)  # the num best-scored, best first
    return learner.take(candidates, idx)

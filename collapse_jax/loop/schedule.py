"""The generation schedule, built once per run from its `GenerationConfig` (or, for `simulate`,
from keyword arguments): `Schedule.policy` is its static part, which shapes the compiled program
and is a static argument of the jitted core; `Schedule.counts(g)` are its values, the numbers of
points each part of generation g's training set has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from collapse_jax import config as config_lib


@dataclasses.dataclass(frozen=True)
class Policy:
    """How generation n's training set is built from generation n - 1: which parts it has, not
    how large they are (hashable: a static argument of the jitted core, so runs that differ
    only in sizes or shares share compiled code).

    Attributes:
      mode: "replace", "mix", "accumulate" or "accumulate_subsample" (`generation.policy`).
      previous: "mix" only: the training set has a share of the previous one (beta > 0).
      real: "mix" only: the training set has a share of real data (gamma > 0).
      init_from: where each fit starts: "base", "previous" or "scratch".
      likelihood_filter: `generation.likelihood_filter` (None: every synthetic point is kept).
      real_data: the real share is drawn "fresh" from the real distribution, or from the
        chain's "fixed" generation-0 real data.
    """

    mode: str = "replace"
    previous: bool = False
    real: bool = False
    init_from: str = "base"
    likelihood_filter: Any = (
        None  # config.LikelihoodFilterConfig: keep the best-scored synthetic points
    )
    real_data: str = "fresh"

    @classmethod
    def of(cls, gcfg: config_lib.GenerationConfig) -> Policy:
        """The policy of a run's `generation:` block."""
        return cls.build(
            gcfg.policy,
            gcfg.alpha,
            gcfg.beta,
            gcfg.gamma,
            init_from=gcfg.init_from,
            likelihood_filter=gcfg.likelihood_filter,
            real_data=gcfg.real_data,
        )

    @classmethod
    def build(
        cls,
        mode: str,
        alpha: float,
        beta: float,
        gamma: float,
        *,
        init_from: str = "base",
        likelihood_filter: Any = None,
        real_data: str = "fresh",
    ) -> Policy:
        """The policy of mode `mode` whose "mix" shares are (alpha, beta, gamma)."""
        mix = mode == "mix"
        return cls(
            mode, mix and beta > 0, mix and gamma > 0, init_from, likelihood_filter, real_data
        )

    @property
    def filters(self) -> bool:
        """Whether synthetic data are filtered (drawn as extra candidates, the likeliest kept)."""
        return self.likelihood_filter is not None and self.likelihood_filter.rho < 1.0

    @property
    def keeps_real(self) -> bool:
        """Whether the chain's generation-0 real data are carried (a fixed real set)."""
        return self.real and self.real_data == "fixed"

    @property
    def keeps_anchor(self) -> bool:
        """Whether the chain's generation-0 fit is carried (the likelihood filter's scorer
        "generation0" scores every later generation's candidates under it)."""
        return self.filters and self.likelihood_filter.scorer == "generation0"

    @property
    def keeps_data(self) -> bool:
        """Whether generation n's training set enters generation n + 1's (else the loop does
        not carry it from one generation to the next)."""
        return self.mode in ("accumulate", "accumulate_subsample") or self.previous


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A run's schedule: the static `policy`, the "mix" `shares` and every generation's size.

    Attributes:
      policy: the static part (`Policy`).
      shares: (alpha, beta, gamma), the "mix" fractions of each training set ((1, 0, 0) else).
      sizes: [G] sizes[0] the number of real points of generation 0, sizes[g] M_g, the size of
        generation g's training set (accumulate: the number of synthetic points added).
    """

    policy: Policy
    shares: tuple[float, float, float]
    sizes: tuple[int, ...]

    @classmethod
    def of(
        cls,
        gcfg: config_lib.GenerationConfig,
        real_size: int,
        num_generations: int | None = None,
    ) -> Schedule:
        """The schedule of a run's `generation:` block whose generation 0 has `real_size` real
        points (`learner.real_size(requested_real_size(gcfg))`), for its `num_generations`
        generations (or as many as given)."""
        n = gcfg.num_generations if num_generations is None else num_generations
        sizes = tuple(
            int(real_size) if g == 0 else gcfg.sample_size(g, real_size) for g in range(n)
        )
        return cls(Policy.of(gcfg), (gcfg.alpha, gcfg.beta, gcfg.gamma), sizes)

    @classmethod
    def build(
        cls,
        sizes: Sequence[int],
        *,
        mode: str = "replace",
        alpha: float = 1.0,
        beta: float = 0.0,
        gamma: float = 0.0,
        init_from: str = "base",
        likelihood_filter: Any = None,
        real_data: str = "fresh",
    ) -> Schedule:
        """A schedule from its parts (the `simulate` functions); checks the policy as
        `GenerationConfig` does (`config.ConfigError` naming the field)."""
        config_lib.check_policy(mode, alpha, beta, gamma, real_data)
        policy = Policy.build(
            mode,
            alpha,
            beta,
            gamma,
            init_from=init_from,
            likelihood_filter=likelihood_filter,
            real_data=real_data,
        )
        return cls(policy, (alpha, beta, gamma), tuple(int(m) for m in sizes))

    @property
    def num_generations(self) -> int:
        return len(self.sizes)

    def counts(self, g: int) -> int | tuple[int, int, int]:
        """Generation 0: its number of real points; later: (synthetic, previous, real) counts of
        generation g's training set (largest remainder of its size by the shares)."""
        if g == 0:
            return self.sizes[0]
        return config_lib.split_shares(self.sizes[g], self.policy.mode, self.shares)

    def fitted_size(self, g: int) -> int:
        """Number of points generation g is fitted to (accumulate: all generations' data)."""
        if self.policy.mode == "accumulate":  # (accumulate_subsample fits M_n of the pool)
            return sum(self.sizes[: g + 1])
        return self.sizes[g]


def requested_real_size(gcfg: config_lib.GenerationConfig) -> int | None:
    """The loop's M_0 (the schedule's first entry or samples_per_generation; None: unset), which
    `learner.real_size` turns into the number of real points of generation 0."""
    if gcfg.sample_schedule is not None:
        return int(gcfg.sample_schedule[0])
    return gcfg.samples_per_generation

"""Recursive re-estimation of a K-state discrete distribution (Shumailov et al., Nature 2024,
Sec. 3.1, the discrete-distributions-with-exact-approximation case).

Each generation draws M samples from the current empirical distribution and re-estimates it
(frequencies). It is a Wright-Fisher process: a martingale, E[p_n] = p_0, that is absorbed in a
delta at state i with probability p_0(i); low-probability states are lost first (the tails vanish).

- `method="sample"` draws the M categorical samples (inverse CDF + bincount; data = labels [M]);
- `method="exact"` draws the multinomial counts directly by conditional binomials at a cost
  independent of M (data = counts [K]); subsets of counts (the policies that subsample) are
  multivariate hypergeometric draws, exact as well.

`simulate` runs many independent chains (vmap) over generations (lax.scan), chunked over chains;
`DiscreteLearner` is the same model for the model-agnostic loop in `collapse_jax.loop`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from collapse_jax import loop
from collapse_jax.config import ConfigError
from collapse_jax.loop.learner import AbstractLearner
from collapse_jax.theory import metrics, samplers
from collapse_jax.theory.common import data_count, with_impl
from collapse_jax.theory.gaussian import RngImpl, sample_size_schedule

_F = jnp.float32
# Per-chain distributions are reported as a metric (kept for `record_trials` chains) up to this K.
_MAX_RECORDED_STATES = 100


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DiscreteConfig:
    """The original K-state distribution and how each generation re-estimates it.

    Attributes:
      family: "zipf" (p_i proportional to i^-exponent, i = 1..K: a long tail), "uniform", or
        "explicit" (the `probs` field).
      num_states: K for the named families.
      exponent: the Zipf exponent (> 0).
      probs: the explicit distribution (K >= 2 non-negative values summing to 1).
      method: "exact" (multinomial counts by conditional binomials, cost independent of M) or
        "sample" (the M categorical draws).
      rng_impl: PRNG of the sample method's draws (and of the exact method's subsets):
        "philox4x32", "threefry2x32", or "default" (the key's own). The exact method's
        multinomial hashes the loop's own key (`jaxtools.prng`, fused threefry) whatever
        this is.
      truncation: top-k truncation of the sampler (None: off): synthetic data are drawn from
        the fit restricted to its k most probable states, renormalised (the tail cut-off of
        language-model decoding; Dohmatob et al. 2024, "A tale of tails"). Real data never are.
    """

    kind: ClassVar[str] = "discrete"

    family: Literal["zipf", "uniform", "explicit"] = "zipf"
    num_states: int = 10
    exponent: float = 1.0
    probs: tuple[float, ...] | None = None
    method: Literal["exact", "sample"] = "exact"
    rng_impl: RngImpl = "philox4x32"
    truncation: int | None = None

    def __post_init__(self):
        if self.family not in ("zipf", "uniform", "explicit"):
            raise ConfigError(f"model.family: {self.family!r} is not zipf, uniform or explicit")
        if self.family == "explicit":
            if self.probs is None:
                raise ConfigError("model.probs: required when family is 'explicit'")
            p = np.asarray(self.probs, np.float64)
            if p.ndim != 1 or p.size < 2:
                raise ConfigError("model.probs: needs at least 2 states")
            if not np.all(np.isfinite(p)) or np.any(p < 0):
                raise ConfigError("model.probs: probabilities must be finite and >= 0")
            if abs(p.sum() - 1.0) > 1e-6:
                raise ConfigError(f"model.probs: must sum to 1 (sum is {p.sum():.8g})")
        else:
            if self.probs is not None:
                raise ConfigError(
                    f"model.probs: only used with family 'explicit' (family is {self.family!r})"
                )
            if self.num_states < 2:
                raise ConfigError(f"model.num_states: must be >= 2 (got {self.num_states})")
            if not (np.isfinite(self.exponent) and self.exponent > 0):
                raise ConfigError(f"model.exponent: must be > 0 (got {self.exponent})")
        if self.method not in ("exact", "sample"):
            raise ConfigError(f"model.method: {self.method!r} is not 'exact' or 'sample'")
        if self.rng_impl not in ("default", "threefry2x32", "philox4x32"):
            raise ConfigError(f"model.rng_impl: {self.rng_impl!r} is not a supported PRNG")
        if self.truncation is not None:
            k = len(self.probs) if self.family == "explicit" else self.num_states
            if not 1 <= self.truncation <= k:
                raise ConfigError(
                    f"model.truncation: must lie in [1, {k}] (the number of states), got "
                    f"{self.truncation}"
                )

    def probs_array(self) -> np.ndarray:
        """The original distribution, float64 `[K]`."""
        if self.family == "explicit":
            p = np.asarray(self.probs, np.float64)
        elif self.family == "uniform":
            p = np.ones(self.num_states)
        else:
            p = np.arange(1, self.num_states + 1, dtype=np.float64) ** -self.exponent
        return p / p.sum()


def sample_labels(key: Array, probs: Array, num: int) -> Array:
    """`num` categorical draws `[num]` int32 from `probs [K]` (inverse CDF, branch-free)."""
    cdf = jnp.cumsum(probs)
    u = jax.random.uniform(key, (num,), _F) * cdf[-1]
    idx = jnp.searchsorted(cdf, u, side="right").astype(jnp.int32)
    # Round-off may push u past the last positive state: clip to it (never to a zero state).
    last = jnp.max(jnp.where(probs > 0, jnp.arange(probs.shape[0], dtype=jnp.int32), 0))
    return jnp.minimum(idx, last)


def top_k_mask(probs: Array, k: int) -> Array:
    """[K] bool: the k most probable states of `probs [K]` (ties: the lower index)."""
    _, idx = jax.lax.top_k(probs, k)
    return jnp.zeros(probs.shape, bool).at[idx].set(True)


class DiscreteLearner(AbstractLearner[Array, Array]):
    """The discrete model for the generational loop (one chain per call; final class).

    Params: probabilities `[K]` (float32). Data: labels `[n]` (method "sample") or counts `[K]`
    (method "exact", whose sample sizes may be traced: `static_sample_size` is False).
    """

    jittable: ClassVar[bool] = True

    def __init__(self, config: DiscreteConfig, mesh: Any = None):
        super().__init__(config, mesh)
        self.static_sample_size = config.method == "sample"
        self._p0 = config.probs_array()
        # Under a mesh the chains are sharded: the binomials' lanes then run masked at full
        # width (the same draws), not compacted across every chain (a gather from all devices).
        self._compact = None if mesh is None else False

    @property
    def num_states(self) -> int:
        return int(self._p0.shape[0])

    @property
    def truth(self) -> Array:
        return jnp.asarray(self._p0, _F)

    def _draw(self, key: Array, probs: Array, num: Any) -> Array:
        if self.config.method == "sample":
            return sample_labels(with_impl(key, self.config.rng_impl), probs, num)
        # The exact method draws words from the loop's own (threefry) key, hashed in fused code
        # (`jaxtools.prng`): wrapped for another impl, `jax.random` would hash it in its own
        # rolled threefry loop on CPU, far more slowly.
        return samplers.multinomial(key, num, probs, compact=self._compact)

    def draw_real(self, key: Array, num: int | Array) -> Array:
        return self._draw(key, self.truth, num)

    def init(self, key: Array) -> Array:
        return self.truth

    def fit(self, key: Array, data: Array, params: Array, **kwargs: Any) -> Array:
        if self.config.method == "sample":
            counts = jnp.bincount(data, length=self.num_states)
        else:
            counts = data
        return counts.astype(_F) / jnp.sum(counts).astype(_F)

    def sample(self, key: Array, params: Array, num: int | Array, **kwargs: Any) -> Array:
        """`num` synthetic draws from the fit (restricted to its top-k states with truncation)."""
        if self.config.truncation is not None:
            params = jnp.where(top_k_mask(params, self.config.truncation), params, 0.0)
            params = params / jnp.sum(params)
        return self._draw(key, params, num)

    def evaluate(self, key: Array, params: Array, reference: Any) -> dict[str, Array]:
        """Support size, lost tail mass, TV and KL(p_n || p_0), Gini-Simpson diversity, entropy,
        whether the chain is absorbed in a delta and where (one-hot [K]), and the distribution
        itself `[K]` when K <= 100 (its chain mean is the martingale E[p_n] = p_0)."""
        p0 = self.truth
        at = metrics.absorbed_state(params)
        extra = {"probs": params} if self.num_states <= _MAX_RECORDED_STATES else {}
        if self.config.truncation is not None:
            # Original mass of the states the truncated sampler cannot draw from this fit: the
            # next generation loses at least this much tail mass.
            keep = top_k_mask(params, self.config.truncation)
            extra["truncated_mass"] = jnp.sum(jnp.where(keep, 0.0, p0))
        return {
            **extra,
            "support_size": metrics.support_size(params).astype(_F),
            "lost_tail_mass": metrics.lost_tail_mass(p0, params),
            "total_variation": metrics.total_variation(params, p0),
            "kl_to_original": metrics.kl_divergence(params, p0),
            "gini_simpson": metrics.gini_simpson(params),
            "entropy": metrics.entropy(params),
            "absorbed": jnp.sum(at),
            "absorbed_at": at,
        }

    def concat(self, parts: list[Array]) -> Array:
        if self.config.method == "exact":
            out = parts[0]
            for p in parts[1:]:
                out = out + p
            return out
        return super().concat(parts)

    def subset(self, key: Array, data: Array, num: int | Array) -> Array:
        """A uniformly random subset of `num` points; for method "exact" (data = counts [K]) the
        subset's counts are one exact multivariate hypergeometric draw, so the policies that
        subsample (`accumulate_subsample`, `mix` with beta > 0 or a fixed real set) stay exact."""
        if self.config.method == "exact":
            key = with_impl(key, self.config.rng_impl)
            return samplers.multivariate_hypergeometric(key, data, num)
        return super().subset(key, data, num)

    def num_samples(self, data: Array) -> Any:
        if self.config.method == "exact":
            return data_count(jnp.sum(data))
        return super().num_samples(data)


@dataclasses.dataclass(frozen=True)
class DiscreteSimulation:
    """Result of `simulate`.

    Attributes:
      probs: [G + 1, R, K] empirical distributions; index 0 is the original distribution.
      sample_sizes: [G] the training-set size of indices 1..G.
    """

    probs: np.ndarray
    sample_sizes: np.ndarray


def measure_params(learner: Any, key: Array, params: Array, reference: Any, data: Any) -> Array:
    """What `simulate` keeps per generation, the fitted probabilities (a `loop.simulate_chains`
    measure)."""
    return params


def simulate(
    key: Array,
    *,
    probs: Sequence[float],
    chains: int,
    generations: int,
    sample_size: int | Sequence[int],
    method: Literal["exact", "sample"] = "exact",
    policy: Literal["replace", "mix", "accumulate", "accumulate_subsample"] = "replace",
    alpha: float = 1.0,
    beta: float = 0.0,
    gamma: float = 0.0,
    chunk_size: int = 65536,
    rng_impl: RngImpl = "philox4x32",
    timings: dict[str, float] | None = None,
) -> DiscreteSimulation:
    """Simulates `chains` independent chains of recursive discrete re-estimation.

    Args:
      key: the base PRNG key; chains draw with the generational loop's keys, so
        `simulate(jax.random.key(s), ...)` matches `collapse-jax run` with seed s chain by chain.
      probs: [K] the original distribution (non-negative, summing to 1).
      chains: R; generations: G; sample_size: M, an int or a sequence of G ints.
      method: "exact" (multinomial counts directly) or "sample" (M categorical draws).
      policy, alpha, beta, gamma: mixing policy as in `gaussian.simulate`.
      chunk_size: chains per batch; rng_impl: PRNG of the draws (`DiscreteConfig.rng_impl`).
      timings: None, or a dict that receives the device time ("kernel_s") and the
        device-to-host copy time ("copy_s"), measured apart (`loop.simulate_chains`).
    Returns:
      DiscreteSimulation with `.probs [G + 1, R, K]`.
    """
    sizes = sample_size_schedule(sample_size, generations)
    try:
        cfg = DiscreteConfig(
            family="explicit",
            probs=tuple(float(p) for p in np.asarray(probs, np.float64).reshape(-1)),
            method=method,
            rng_impl=rng_impl,
        )
        schedule = loop.Schedule.build(sizes, mode=policy, alpha=alpha, beta=beta, gamma=gamma)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    learner = DiscreteLearner(cfg)
    p = loop.simulate_chains(
        learner,
        schedule,
        key,
        chains=chains,
        measure=measure_params,
        chunk_size=chunk_size,
        timings=timings,
        initial=np.asarray(learner.truth),  # index 0: the original distribution
    )
    return DiscreteSimulation(probs=p, sample_sizes=np.asarray(sizes))


__all__ = ["DiscreteConfig", "DiscreteLearner", "DiscreteSimulation", "simulate"]

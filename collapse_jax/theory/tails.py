"""Tail cutting and scaling laws: the memorising ("Hutter") learner on Zipf data (Dohmatob, Feng,
Yang, Charton, Kempe 2024, "A Tale of Tails: Model Collapse as a Change of Scaling Laws").

The data are tokens i = 1..N drawn from the Zipf law truncated at N,

    p_i = i^-beta / H_{N,beta},    H_{N,beta} = sum_{j=1}^N j^-beta,    beta > 1,

each with a deterministic label (so the label plays no part). The learner memorises its T
training tokens and answers a test token correctly iff it saw it, so its test error is the true
mass of the tokens it never saw (the missing mass), `test_error = sum_i p_i 1[i unseen]`.

Each generation trains a fresh learner on data drawn by the loop's policy from real tokens and
from a *generator*:
- `generator: truth`: the true law restricted to its `top_k` most probable tokens, renormalised
  (the paper's tail cutting; without `top_k`, the true law itself: clean data). It does not
  depend on the chains' fits, so every generation >= 1 has the same law;
- `generator: fit`: the last generation's fit, i.e. the empirical distribution of its T training
  tokens (a finite-sample model; `top_k` cuts it to its k most frequent tokens, ties to the more
  probable one), refitted every generation (the paper's iterated setting, tail narrowing).
Generation 0 is the clean law on `samples_per_generation` real tokens; a `mix` policy with
`gamma = pi` mixes a fraction pi of fresh real tokens into every later generation ("grokking").

Params are the counts `[N]` of the memorised tokens (int32); data are token indices `[T]`
(0-based: index i - 1 is token i). Real and truth-generator tokens are drawn by an exact
two-level inverse CDF (`ZipfTable`): a block of sqrt(N) tokens, then a token in it, each against
float32 suffix sums of the float64 probabilities, so a tail token's probability is off by a
relative ~1e-5 at most (a one-level float32 CDF would give the last tokens of N = 10^5 errors
of 1 %, and a 24-bit uniform could not reach them at all). A fit's samples are drawn exactly
with integer arithmetic (a uniform index into its T memorised tokens). The counts are the true
multinomial counts (not independent per-token presences), so the joint law of the seen set, and
with it the variance of the test error over chains, is exact.

The closed forms are in `theory.tails_laws`; the figures in `theory.tails_figures`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from collapse_jax import loop
from collapse_jax.config import ConfigError
from collapse_jax.loop.learner import AbstractLearner
from collapse_jax.theory.discrete import top_k_mask

_F = jnp.float32


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TailsConfig:
    """The Zipf law, the generator of the synthetic data, and its tail cut.

    Attributes:
      exponent: beta > 1 of p_i proportional to i^-beta (i = 1..N).
      num_tokens: N, the support (>= 2).
      generator: "truth" (the true law, cut to its `top_k` tokens) or "fit" (the last
        generation's empirical distribution, cut to its `top_k` most frequent tokens).
      top_k: the tail cut k (None: no cut).
    """

    kind: ClassVar[str] = "tails"

    exponent: float = 1.5
    num_tokens: int = 100_000
    generator: Literal["truth", "fit"] = "truth"
    top_k: int | None = None

    def __post_init__(self):
        if not (np.isfinite(self.exponent) and self.exponent > 1):
            raise ConfigError(f"model.exponent: must be > 1 (got {self.exponent})")
        if not 2 <= self.num_tokens <= 2**30:
            raise ConfigError(f"model.num_tokens: must lie in [2, 2^30] (got {self.num_tokens})")
        if self.generator not in ("truth", "fit"):
            raise ConfigError(f"model.generator: {self.generator!r} is not 'truth' or 'fit'")
        if self.top_k is not None and not 1 <= self.top_k <= self.num_tokens:
            raise ConfigError(
                f"model.top_k: must lie in [1, {self.num_tokens}] (num_tokens), got {self.top_k}"
            )

    def probs_array(self) -> np.ndarray:
        """The true law p, float64 `[N]`."""
        return zipf_probs(self.exponent, self.num_tokens)


def zipf_probs(exponent: float, num_tokens: int, top_k: int | None = None) -> np.ndarray:
    """Zipf(beta) truncated at N, float64 `[N]`: p_i = i^-beta / sum_{j<=N} j^-beta; with `top_k`,
    the law restricted to tokens 1..k and renormalised (zeros beyond)."""
    p = np.arange(1, num_tokens + 1, dtype=np.float64) ** -float(exponent)
    if top_k is not None:
        p[top_k:] = 0.0
    return p / p.sum()


@dataclasses.dataclass(frozen=True)
class ZipfTable:
    """Two-level inverse-CDF tables of a law `probs [n]` (n > 0 of them positive, first).

    Attributes:
      block: B = ceil(sqrt(n)) tokens per block.
      outer: float32 `[nb]` suffix sums of the block masses (outer[0] = 1).
      inner: float32 `[nb * B]` suffix sums within each block, normalised by the block's mass
        (inner[b * B] = 1; 0 for padding and zero-probability tokens).
    """

    block: int
    outer: np.ndarray
    inner: np.ndarray

    @classmethod
    def of(cls, probs: np.ndarray) -> ZipfTable:
        p = np.asarray(probs, np.float64)
        n = int(np.max(np.nonzero(p > 0)[0])) + 1  # the support ends at the last positive token
        block = int(np.ceil(np.sqrt(n)))
        nb = -(-n // block)
        padded = np.zeros(nb * block)
        padded[:n] = p[:n]
        rows = padded.reshape(nb, block)
        mass = rows.sum(1)
        outer = np.cumsum(mass[::-1])[::-1] / mass.sum()
        inner = np.cumsum(rows[:, ::-1], axis=1)[:, ::-1] / mass[:, None]
        return cls(block, outer.astype(np.float32), inner.reshape(-1).astype(np.float32))

    def probs(self) -> np.ndarray:
        """float64 `[nb * B]`: the law the float32 tables actually draw (for tests)."""
        o = self.outer.astype(np.float64)
        mass = o - np.append(o[1:], 0.0)
        rows = self.inner.astype(np.float64).reshape(-1, self.block)
        within = rows - np.concatenate([rows[:, 1:], np.zeros((rows.shape[0], 1))], axis=1)
        return (mass[:, None] * within).reshape(-1)

    def draw(self, key: Array, num: int) -> Array:
        """`num` token indices int32 `[num]` (exact up to the tables' float32 rounding)."""
        bits = jax.random.bits(key, (4, num), jnp.uint32)
        b = _descending_search(
            jnp.asarray(self.outer), 0, self.outer.size, _fine_uniform(*bits[:2])
        )
        t = _descending_search(
            jnp.asarray(self.inner), b * self.block, self.block, _fine_uniform(*bits[2:])
        )
        return b * self.block + t


def _fine_uniform(hi: Array, lo: Array) -> Array:
    """A float32 uniform on (0, 1] from two 32-bit words: its relative resolution is float32's
    everywhere (2^-24), down to 2^-64 near 0, so the smallest suffix sums (the tail's tokens) are
    resolved (a 24-bit uniform's absolute step, 6e-8, exceeds a tail token's probability)."""
    scale = _F(2.0**-32)
    return (hi.astype(_F) + (lo.astype(_F) + _F(0.5)) * scale) * scale


def _descending_search(table: Array, base: Array | int, size: int, u: Array) -> Array:
    """max{j < size : table[base + j] >= u} for a non-increasing row with table[base] = 1 >= u
    (a fixed number of bisection steps; the token j is drawn with probability row[j] - row[j+1])."""
    # Scalars until the first comparison: a first probe at a constant index of a constant table
    # would otherwise be folded by XLA into a [num] constant at compile time.
    lo = jnp.zeros((), jnp.int32)
    hi = jnp.full((), size, jnp.int32)  # row[size] is taken as 0 < u
    for _ in range(int(np.ceil(np.log2(max(size, 2)))) + 1):
        mid = (lo + hi) // 2
        ok = (table[base + jnp.minimum(mid, size - 1)] >= u) & (mid < size)
        lo, hi = jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)
    return lo


def memorised_counts(data: Array, num_tokens: int) -> Array:
    """int32 `[N]` counts of the token indices `data [T]`."""
    return jnp.zeros(num_tokens, jnp.int32).at[data].add(1)


def sample_counts(key: Array, counts: Array, num: int) -> Array:
    """`num` token indices drawn exactly from the empirical law counts / sum(counts): a uniform
    integer index into the memorised tokens, located by an integer cumulative sum."""
    cdf = jnp.cumsum(counts)
    u = jax.random.randint(key, (num,), 0, cdf[-1], dtype=jnp.int32)
    return jnp.searchsorted(cdf, u, side="right").astype(jnp.int32)


class TailsLearner(AbstractLearner[Array, Array]):
    """The memorising learner for the generational loop (one chain per call; final class).

    Params: int32 counts `[N]` of the tokens it memorised. Data: int32 token indices `[T]`.
    Metrics: `test_error` (the true mass of the unseen tokens) and `seen_tokens`.
    """

    jittable: ClassVar[bool] = True

    def __init__(self, config: TailsConfig, mesh: Any = None):
        super().__init__(config, mesh)
        self._p = config.probs_array()
        self._real = ZipfTable.of(self._p)
        self._cut = ZipfTable.of(zipf_probs(config.exponent, config.num_tokens, config.top_k))

    def draw_real(self, key: Array, num: int) -> Array:
        return self._real.draw(key, num)

    def init(self, key: Array) -> Array:
        return jnp.zeros(self.config.num_tokens, jnp.int32)

    def fit(self, key: Array, data: Array, params: Array, **kwargs: Any) -> Array:
        return memorised_counts(data, self.config.num_tokens)

    def sample(self, key: Array, params: Array, num: int, **kwargs: Any) -> Array:
        """`num` synthetic tokens from the generator (the cut truth, or the cut fit)."""
        if self.config.generator == "truth":
            return self._cut.draw(key, num)
        counts = params
        if self.config.top_k is not None:
            # The fit's k most frequent tokens (ties: the lower index, the more probable token).
            counts = jnp.where(top_k_mask(counts.astype(_F), self.config.top_k), counts, 0)
        return sample_counts(key, counts, num)

    def evaluate(self, key: Array, params: Array, reference: Any) -> dict[str, Array]:
        """`test_error`: sum of p_i over the unseen tokens (summed over the small terms, so it is
        accurate where 1 - seen mass would cancel); `seen_tokens`: how many distinct tokens."""
        seen = params > 0
        return {
            "test_error": jnp.sum(jnp.where(seen, _F(0.0), jnp.asarray(self._p, _F))),
            "seen_tokens": jnp.sum(seen).astype(_F),
        }


def measure_error(learner: Any, key: Array, params: Array, reference: Any, data: Any) -> Array:
    """What `simulate` keeps per generation: the test error (a `loop.simulate_chains` measure)."""
    return learner.evaluate(key, params, reference)["test_error"]


def simulate(
    key: Array,
    *,
    chains: int,
    generations: int,
    sample_size: int | list[int],
    exponent: float = 1.5,
    num_tokens: int = 100_000,
    generator: Literal["truth", "fit"] = "truth",
    top_k: int | None = None,
    real_fraction: float = 0.0,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Test errors `[G, R]` of `chains` chains over `generations` generations (the loop's keys:
    `simulate(jax.random.key(s), ...)` matches `collapse-jax run` with seed s chain by chain).

    Generation 0 trains on `sample_size` real tokens; later generations on tokens of the
    generator, a fraction `real_fraction` of them fresh real tokens (`mix` with gamma = pi,
    beta = 0; `replace` when it is 0).
    """
    try:
        cfg = TailsConfig(
            exponent=exponent, num_tokens=num_tokens, generator=generator, top_k=top_k
        )
        sizes = [sample_size] * generations if isinstance(sample_size, int) else sample_size
        if real_fraction > 0:
            schedule = loop.Schedule.build(
                sizes, mode="mix", alpha=1.0 - real_fraction, beta=0.0, gamma=real_fraction
            )
        else:
            schedule = loop.Schedule.build(sizes, mode="replace")
    except ConfigError as e:
        raise ValueError(str(e)) from None
    return loop.simulate_chains(
        TailsLearner(cfg),
        schedule,
        key,
        chains=chains,
        measure=measure_error,
        chunk_size=chunk_size,
    )


__all__ = ["TailsConfig", "TailsLearner", "ZipfTable", "simulate", "zipf_probs"]

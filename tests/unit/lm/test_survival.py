"""Transition survival (Suresh et al. 2024; collapse_jax/lm/survival.py): the Wright-Fisher
survival S_k(c) (exact, a matrix power) and its Galton-Watson limit 1 - (1 - q_k)^c against
Monte Carlo at 10^4 chains, and the JAX bigram counts against lm.tables.

Each Monte Carlo comparison is a z-test at 4.5 standard errors (two-sided false-failure
probability 6.8e-6 each; 12 comparisons: < 1e-4 for the file), fixed seeds."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.lm import survival, tables

CHAINS = 10_000


def _wright_fisher_mc(key, n: int, c: int, generations: int) -> np.ndarray:
    """[generations, CHAINS] alive indicators of one category resampled Binomial(n, X / n)."""

    def chain(k):
        def step(x, kk):
            nxt = jax.random.binomial(kk, n, x / n).astype(jnp.float32)
            return nxt, x > 0

        _, alive = jax.lax.scan(step, jnp.float32(c), jax.random.split(k, generations))
        return alive

    return np.asarray(jax.jit(jax.vmap(chain))(jax.random.split(key, CHAINS))).T


def _close(alive: np.ndarray, want: float, what: str) -> None:
    p = alive.mean()
    se = math.sqrt(max(want * (1 - want), 1e-12) / alive.size)
    assert abs(p - want) <= 4.5 * se, (what, p, want, se)


def test_wright_fisher_survival_matches_monte_carlo():
    n, gens = 60, 12
    want = survival.wright_fisher_survival(n, [1, 3, 10], gens)
    for j, c in enumerate([1, 3, 10]):
        alive = _wright_fisher_mc(jax.random.key(c), n, c, gens)
        for k in (2, 11):
            _close(alive[k], want[k, j], f"n={n} c={c} k={k}")


def test_galton_watson_rate_is_the_large_sample_limit():
    """At n = 20000 the exact survival is within 4.5 s.e. of 1 - (1 - q_k)^c, and both match
    Monte Carlo; q_k ~ 2 / k."""
    gens = 12
    gw = survival.galton_watson_survival(np.array([1, 4, 16]), gens)
    for j, c in enumerate([1, 4, 16]):
        alive = _wright_fisher_mc(jax.random.key(100 + c), 20_000, c, gens)
        for k in (4, 11):
            _close(alive[k], gw[k, j], f"c={c} k={k}")
    q = survival.galton_watson_survival(np.array([1]), 2000)[:, 0]
    assert 1.9 < q[1999] * 1999 < 2.1  # q_k k -> 2 (Kolmogorov), slowly (log k / k terms)


def test_bigram_counts_match_the_tables_counts():
    blocks = np.asarray(jax.random.randint(jax.random.key(0), (9, 13), 0, 7), np.int32)
    pairs, tokens = survival.bigram_counts(jnp.asarray(blocks), 7)
    np.testing.assert_array_equal(np.asarray(pairs), tables.transition_counts(blocks, 1, 7))
    np.testing.assert_array_equal(np.asarray(tokens), np.bincount(blocks.reshape(-1), minlength=7))


def test_a_lost_transition_never_returns():
    pairs = jnp.zeros((3, 3), jnp.int32).at[0, 1].set(5).at[1, 0].set(5).at[2, 2].set(1)
    tokens = jnp.array([5, 5, 0], jnp.int32)
    blocks = survival.sample_table(jax.random.key(1), pairs, tokens, (50, 20))
    new, _ = survival.bigram_counts(blocks, 3)
    assert int(new[0, 0]) == 0 and int(new[1, 1]) == 0 and int(new[0, 2]) == 0

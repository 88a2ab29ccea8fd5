"""Exact (multivariate) hypergeometric subsets, and the discrete exact method's subsampling
policies built on them.

Goodness-of-fit tests against SciPy reject at p < 1e-4 (false-failure probability 1e-4 per
assertion); mean and covariance checks use |estimate - expected| < 5 SE (5.7e-7 per check). Over
the file a correct implementation fails with probability below 2e-3; the keys are fixed, so a
run is deterministic.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from collapse_jax.theory import discrete, samplers
from tests.unit.theory.test_discrete import P0, _check_mean
from tests.unit.theory.test_samplers import P_MIN, _chi2_discrete

DRAWS = 20000

# (good, bad, sample): inversion (small means), HRUA, both symmetries, a large population.
CASES = [
    (5, 7, 4),  # inversion, full support
    (3, 99_997, 50_000),  # inversion at a large population (mean 1.5)
    (30, 70, 20),  # inversion, mean 6
    (60, 140, 40),  # HRUA, mean 12
    (700, 300, 100),  # HRUA after the good > bad flip
    (20, 80, 90),  # the sample > N / 2 complement, inversion
    (300, 700, 800),  # the complement and HRUA
    (40_000, 60_000, 30_000),  # HRUA at N = 10^5 (needs the accurate acceptance test)
]


EDGE = [(0, 10, 5, 0), (10, 0, 5, 5), (10, 10, 20, 10), (7, 3, 0, 0), (0, 0, 0, 0)]
EDGE += [(5, 5, 10, 5), (2**23, 2**23 - 1, 2**24 - 1, 2**23)]
POPULATION = np.array([400, 0, 250, 3, 1, 346], np.int32)  # the multivariate case
NUM = 300


@pytest.fixture(scope="module")
def draws():
    """Every lane of the file's sampler checks in ONE compiled call (sizes are traced): the
    univariate cases as the first state of a 6-state population [good, 0, bad, 0, 0, 0] (its
    draw is Hypergeometric(good, bad, sample) by construction), then `POPULATION`."""
    cases = [(g, b, s) for g, b, s in CASES for _ in range(DRAWS)]
    cases += [e[:3] for e in EDGE]
    counts = np.array([[g, 0, b, 0, 0, 0] for g, b, _ in cases], np.int32)
    nums = np.array([s for _, _, s in cases], np.int32)
    # then the whole population, an empty subset, and DRAWS subsets of NUM
    counts = np.concatenate([counts, np.broadcast_to(POPULATION, (DRAWS + 2, 6))])
    nums = np.concatenate([nums, [POPULATION.sum(), 0], np.full(DRAWS, NUM, np.int32)])
    keys = jax.random.split(jax.random.key(5), nums.size)
    draw = jax.jit(jax.vmap(samplers.multivariate_hypergeometric))
    c = np.asarray(draw(keys, jnp.asarray(counts), jnp.asarray(nums)))
    assert c.dtype == np.int32
    np.testing.assert_array_equal(c.sum(1), nums)
    assert np.all(c <= counts) and np.all(c >= 0)
    n, e = len(CASES) * DRAWS, len(EDGE)
    return c[:n, 0], c[n : n + e, 0], c[n + e : n + e + 2], c[n + e + 2 :]


def test_hypergeometric_matches_scipy_and_edge_cases(draws):
    """Chi-square against SciPy's pmf over the support within 1e-9 quantiles; degenerate cases
    exactly."""
    x, edge = draws[:2]
    np.testing.assert_array_equal(edge, [e[3] for e in EDGE])
    for i, (good, bad, sample) in enumerate(CASES):
        xi = x[i * DRAWS : (i + 1) * DRAWS]
        dist = scipy.stats.hypergeom(good + bad, good, sample)
        lo, hi = int(dist.ppf(1e-9)), int(dist.isf(1e-9))
        assert xi.min() >= lo and xi.max() <= hi, (good, bad, sample, xi.min(), xi.max())
        pmf = dist.pmf(np.arange(lo, hi + 1))
        p = _chi2_discrete(xi - lo, pmf / pmf.sum())
        assert p > P_MIN, (good, bad, sample, p)


def test_multivariate_hypergeometric_matches_scipy(draws):
    """Every marginal is SciPy's hypergeometric (chi-square); the covariances match
    `multivariate_hypergeom`'s within 5 SE; empty states get nothing; a subset of the whole
    population is the population, an empty one is empty."""
    whole, empty = draws[2]
    np.testing.assert_array_equal(whole, POPULATION)
    np.testing.assert_array_equal(empty, 0)
    c, counts = draws[3], POPULATION
    assert np.all(c[:, 1] == 0)
    ref = scipy.stats.multivariate_hypergeom(m=counts, n=NUM)
    for i in (0, 2, 3, 5):
        dist = scipy.stats.hypergeom(counts.sum(), counts[i], NUM)
        lo, hi = int(dist.ppf(1e-9)), int(dist.isf(1e-9))
        pmf = dist.pmf(np.arange(lo, hi + 1))
        assert _chi2_discrete(c[:, i] - lo, pmf / pmf.sum()) > P_MIN, i
    cov, mean = ref.cov(), ref.mean()
    for i, j in ((0, 2), (0, 5), (2, 3)):
        prod = (c[:, i] - mean[i]) * (c[:, j] - mean[j])
        se = prod.std(ddof=1) / np.sqrt(prod.size)
        assert abs(prod.mean() - cov[i, j]) < 5 * se, (i, j, prod.mean(), cov[i, j])


def accumulate_subsample_drift(p0: np.ndarray, m: int, generations: int) -> np.ndarray:
    """E||p_n - p_0||^2 of the fits n = 0..G-1 under accumulate_subsample (derivation).

    With pool pi_n of N_n = (n + 1) M points and fit p_n (the frequencies of a random M-subset
    of the pool), H0 = 1 - sum p0^2, A = E||pi - p0||^2, B = E||p - p0||^2, C = E<pi - p0, p - p0>:
    - the pool grows by S ~ Mult(M, p_{n-1}):
      N_n^2 A_n = N_{n-1}^2 A_{n-1} + 2 N_{n-1} M C_{n-1} + M^2 B_{n-1} + M (H0 - B_{n-1})
      (E[sum S_i(1 - S_i / M) ...]: the multinomial adds M E[1 - sum p_{n-1}^2] = M (H0 - B));
    - the subset is unbiased given the pool with variance H(pi) (N - M) / (M (N - 1)):
      B_n = A_n + (N_n - M) / (M (N_n - 1)) (H0 - A_n), C_n = A_n;
    - generation 0 fits its M real points: A_0 = B_0 = C_0 = H0 / M.
    (E H(q) = H0 - E||q - p0||^2 because every q here has mean p0.)
    """
    h0 = 1.0 - (p0**2).sum()
    a = b = c = h0 / m
    out = [b]
    for n in range(1, generations):
        n_prev, n_now = n * m, (n + 1) * m
        a = (n_prev**2 * a + 2 * n_prev * m * c + m * m * b + m * (h0 - b)) / n_now**2
        b = a + (n_now - m) / (m * (n_now - 1)) * (h0 - a)
        c = a
        out.append(b)
    return np.array(out)


@pytest.mark.slow  # a large Monte Carlo: the integration tier (CI's -m '')
def test_discrete_exact_accumulate_subsample():
    """Exact method (hypergeometric subsets of the pool's counts): E||p_n - p_0||^2 matches the
    derivation above, and lies strictly between replace's closed form
    H0 (1 - (1 - 1/M)^(n+1)) and accumulate's (the pool's own recursion
    A_n = A_{n-1} + M (H0 - A_{n-1}) / N_n^2). 10^4 chains, 6 generations of M = 10; every check
    at 4.5 SE (false-failure probability < 2e-5 in all)."""
    m, gens = 10, 6
    r = discrete.simulate(
        jax.random.key(43),
        probs=P0,
        chains=10000,
        generations=gens,
        sample_size=m,
        method="exact",
        policy="accumulate_subsample",
    )
    assert np.all(np.rint(r.probs[1:] * m).sum(-1) == m)  # every fit is on M points
    drift = ((r.probs[1:].astype(np.float64) - P0) ** 2).sum(-1)  # [G, R]
    want = accumulate_subsample_drift(P0, m, gens)
    h0 = 1.0 - (P0**2).sum()
    replace = h0 * (1 - (1 - 1 / m) ** np.arange(1, gens + 1))
    acc = [h0 / m]
    for n in range(1, gens):
        acc.append(acc[-1] + m * (h0 - acc[-1]) / ((n + 1) * m) ** 2)
    for n in range(gens):
        _check_mean(drift[n], want[n], f"accumulate_subsample drift at {n}")
    x = drift[-1]
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert acc[-1] + 4.5 * se < x.mean() < replace[-1] - 4.5 * se, (acc[-1], x.mean(), replace)

"""The multivariate (d > 1) Gaussian learner on singular and collapsed covariances.

M <= d points give a singular fit (rank M - 1), and a chain whose spread falls below float32's
resolution has a numerically singular covariance: both must sample with the right law instead of
LAPACK's NaN Cholesky (issue 13). Statistical checks use fixed keys and 10^4 draws; each compares
a Monte Carlo mean with its expectation within 5 standard errors per entry (false-failure
probability < 6e-7 per entry, < 1e-4 per test with its Bonferroni count of entries).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_jax.theory import gaussian

Z = 5.0
DRAWS = 10000


def _check_mean(x: np.ndarray, want: np.ndarray, what: str) -> None:
    """Entries of E[x] (x: [draws, ...]) equal `want` within Z standard errors."""
    x = np.asarray(x, np.float64)
    se = x.std(axis=0, ddof=1) / np.sqrt(x.shape[0])
    err = np.abs(x.mean(axis=0) - want)
    assert np.all(err <= Z * se + 1e-6 * np.abs(want).max()), (what, err.max(), se.max())


def _check_rank(x: np.ndarray, rank: int, min_fraction: float = 0.99) -> None:
    """Matrices x [draws, d, d] have rank `rank`: singular values beyond it at float32's rounding
    level (all draws), the rank-th one well above it (all but a few: it has a continuous law
    with mass near 0, so a per-draw bound would fail by chance)."""
    s = np.linalg.svd(x, compute_uv=False)  # [draws, d], descending
    scale = np.maximum(s[:, 0], 1e-30)
    if rank < x.shape[-1]:
        assert np.all(s[:, rank] <= 1e-5 * scale), np.max(s[:, rank] / scale)
    assert np.mean(s[:, rank - 1] > 1e-5 * scale) > min_fraction


def _psd(d: int, rank: int, seed: int) -> np.ndarray:
    """A [d, d] PSD matrix of the given rank (float32-representable), correlated entries."""
    g = np.random.default_rng(seed).standard_normal((d, rank))
    return (g @ g.T).astype(np.float32)


def test_psd_cholesky_factors_singular_and_zero_matrices():
    """L L^T = a, L lower triangular, rank(L) = rank(a), for a full-rank, a rank-2 and the zero
    matrix; LAPACK's result where LAPACK succeeds (`robust_cholesky` under vmap), chosen per
    matrix."""
    full, low = _psd(5, 5, 0), _psd(5, 2, 1)
    for a, rank in ((full, 5), (low, 2), (np.zeros((5, 5), np.float32), 0)):
        ell = np.asarray(jax.jit(gaussian.psd_cholesky)(jnp.asarray(a)))
        assert np.all(np.isfinite(ell)) and np.all(np.triu(ell, 1) == 0)
        assert np.sum(np.diagonal(ell) > 0) == rank
        np.testing.assert_allclose(ell @ ell.T, a, atol=2e-5 * max(1.0, np.abs(a).max()))
    batched = jax.jit(jax.vmap(gaussian.robust_cholesky))
    both = np.asarray(batched(jnp.asarray(np.stack([full, low]))))
    alone = np.asarray(batched(jnp.asarray(np.stack([full, full]))))
    assert np.all(np.isfinite(both))
    np.testing.assert_array_equal(both[0], alone[0])  # a chain's factor ignores its batch
    np.testing.assert_array_equal(both[0], np.asarray(jnp.linalg.cholesky(full)))
    np.testing.assert_allclose(both[1] @ both[1].T, low, atol=2e-5 * np.abs(low).max())


D, M = 4, 4  # the draws' sizes (one compile per method, shared by the tests below)


def _draws(method: str):
    def draw(key, params):
        if method == "exact":
            return gaussian.sample_stats(key, params, M)
        return gaussian.stats_of_points(gaussian.sample_points(key, params, M))

    return jax.jit(jax.vmap(draw, in_axes=(0, None)))


DRAW = {m: _draws(m) for m in ("exact", "sample")}
KEYS = jax.random.split(jax.random.key(4), DRAWS)


@pytest.mark.parametrize("method", ["exact", "sample"])
def test_fewer_points_than_dimensions(method):
    """M = 4 points in d = 4 (a singular fit, rank 3) and from a rank-2 covariance (rank 2):
    finite statistics with E[scatter] = (M - 1) Sigma, E[(mean - mu)(...)^T] = Sigma / M, rank
    min(M - 1, rank Sigma), and the mean on the covariance's support (10 + 10 entries per case).
    """
    mu = jnp.asarray([1.0, -2.0, 0.5, 3.0], jnp.float32)
    for cov, rank in ((_psd(D, D, 2), 3), (_psd(D, 2, 3), 2)):
        stats = DRAW[method](KEYS, gaussian.GaussianParams(mu, jnp.asarray(cov)))
        scatter = np.asarray(stats.scatter, np.float64)
        dev = np.asarray(stats.mean, np.float64) - np.asarray(mu)
        assert np.all(np.isfinite(scatter)) and np.all(np.isfinite(dev))
        iu = np.triu_indices(D)
        _check_mean(scatter[:, iu[0], iu[1]], (M - 1) * cov[iu], "E scatter")
        outer = (dev[:, :, None] * dev[:, None, :])[:, iu[0], iu[1]]
        _check_mean(outer, cov[iu] / M, "E dev dev^T")
        _check_rank(scatter, rank)
        # Support: the deviation has no component outside the column space of cov.
        u, sv, _ = np.linalg.svd(cov.astype(np.float64))
        off = u[:, sv < 1e-6 * sv[0]]
        if off.shape[1]:
            assert np.abs(dev @ off).max() < 1e-4 * np.sqrt(sv[0])


def test_collapsed_covariance_stays_finite():
    """A collapsed chain (covariance exactly 0, or of rank 1 at a 1e-15 spread) samples
    without NaN: cov = 0 gives the mean itself and a zero scatter; the metrics are finite but
    for logdet_cov = -inf."""
    learner = gaussian.GaussianLearner(gaussian.GaussianConfig(dim=D))
    mu = jnp.asarray([0.5, -1.0, 2.0, 0.0], jnp.float32)
    metrics = jax.jit(lambda p: learner.evaluate(jax.random.key(2), p, None))
    log_prob = jax.jit(gaussian.gaussian_log_prob)
    for cov in (jnp.zeros((D, D), jnp.float32), 1e-30 * jnp.asarray(_psd(D, 1, 5))):
        params = gaussian.GaussianParams(mu, cov)
        stats = DRAW["exact"](KEYS, params)
        assert np.all(np.isfinite(np.asarray(stats.scatter)))
        assert np.all(np.isfinite(np.asarray(stats.mean)))
        if not np.any(cov):
            np.testing.assert_array_equal(stats.mean, np.broadcast_to(mu, stats.mean.shape))
            np.testing.assert_array_equal(stats.scatter, 0.0)
        for name, v in metrics(params).items():
            if name == "logdet_cov":
                assert float(v) == -np.inf
            else:
                assert np.all(np.isfinite(np.asarray(v))), name
        points = mu[None, :] + jnp.asarray(
            np.random.default_rng(0).standard_normal((3, D)), jnp.float32
        )
        assert not np.any(np.isnan(np.asarray(log_prob(points, params))))


def test_subset_of_a_singular_pool():
    """A random k-subset of a fixed pool of n = 5 points in d = 6 (scatter of rank 4): over
    random subsets, E[scatter_A] = (k - 1)/(n - 1) S and E[(mean_A - mean)(...)^T] =
    (n - k)/(n k (n - 1)) S hold for ANY fixed pool (sampling without replacement), so the
    conditional draw must match them; the subset stays in the pool's span (21 + 21 entries)."""
    d, n, k = 6, 5, 3
    x = np.random.default_rng(6).standard_normal((n, d)).astype(np.float32)
    pool = gaussian.stats_of_points(jnp.asarray(x))
    s = np.asarray(pool.scatter, np.float64)
    keys = jax.random.split(jax.random.key(7), DRAWS)
    sub = jax.jit(jax.vmap(lambda key: gaussian.subset_stats(key, pool, k)))(keys)
    scatter = np.asarray(sub.scatter, np.float64)
    dev = np.asarray(sub.mean, np.float64) - np.asarray(pool.mean, np.float64)
    assert np.all(np.isfinite(scatter)) and np.all(np.isfinite(dev))
    iu = np.triu_indices(d)
    _check_mean(scatter[:, iu[0], iu[1]], (k - 1) / (n - 1) * s[iu], "E scatter_A")
    outer = (dev[:, :, None] * dev[:, None, :])[:, iu[0], iu[1]]
    _check_mean(outer, (n - k) / (n * k * (n - 1)) * s[iu], "E dev dev^T")
    _check_rank(scatter, k - 1)
    u, sv, _ = np.linalg.svd(s)
    off = u[:, sv < 1e-5 * sv[0]]  # the 2 directions the pool does not span
    assert off.shape[1] == d - (n - 1)
    assert np.abs(dev @ off).max() < 1e-4


def test_singular_chains_in_the_loop():
    """M = 4 <= d = 4 through `simulate` (exact, 3 generations, 10^4 chains): every fit has
    rank M - 1 = 3 and E[Sigma_n] = Sigma_0 (unbiased refit: E[W] = (M - 1) I also for a
    singular Wishart), log det = -inf; 10 entries x 3 generations."""
    cov0 = _psd(4, 4, 8).astype(np.float64)
    r = gaussian.simulate(
        jax.random.key(10), chains=DRAWS, generations=3, sample_size=4, cov=cov0.tolist()
    )
    assert np.all(np.isfinite(r.cov)) and np.all(np.isfinite(r.mean))
    iu = np.triu_indices(4)
    for g in (1, 2, 3):
        c = r.cov[g].astype(np.float64)
        _check_mean(c[:, iu[0], iu[1]], cov0[iu], f"E Sigma_{g}")
        _check_rank(c, 3, 0.99 if g == 1 else 0.5)  # products of Wisharts: ill-conditioned

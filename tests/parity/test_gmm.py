"""EM for Gaussian mixtures against scikit-learn from the same start, and the L2 distance
against numerical integrals (SciPy)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from collapse_jax import gmm
from tests.unit.test_gmm import DATASETS

sklearn_mixture = pytest.importorskip("sklearn.mixture")


def _start(x, c, seed):
    """A deterministic, deliberately poor starting point shared with scikit-learn."""
    rng = np.random.default_rng(seed)
    d = x.shape[1]
    means = x[rng.choice(len(x), c, replace=False)]
    covs = np.stack([np.cov(x.T).reshape(d, d) * (1 + i) for i in range(c)]).astype(np.float32)
    weights = np.full(c, 1.0 / c, np.float32)
    return weights, means.astype(np.float32), covs


def _sklearn_fit(x, c, w0, m0, c0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning
        return sklearn_mixture.GaussianMixture(
            c,
            tol=1e-5,
            max_iter=300,
            weights_init=w0,
            means_init=m0,
            precisions_init=np.linalg.inv(c0.astype(np.float64)).astype(x.dtype),
        ).fit(x)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_matches_sklearn_from_the_same_start(name):
    """Same data, same starting parameters, float64 on both sides: the lower bound of every
    iteration (sklearn's lower_bounds_), the iteration count and the parameters agree."""
    x, c = DATASETS[name]
    _, m0, c0 = (a.astype(np.float64) for a in _start(x, c, seed=5))
    w0 = np.full(c, 1.0 / c)  # sklearn checks that float64 weights sum to 1 exactly
    x = x.astype(np.float64)
    with jax.enable_x64(True):
        res = gmm.fit_em(
            x, n_components=c, init=gmm.GMMParams(w0, m0, c0), tol=1e-5, max_iter=300, trace=True
        )
        res = jax.tree.map(np.asarray, res)
    assert res.trace.dtype == np.float64
    sk = _sklearn_fit(x, c, w0, m0, c0)
    n = int(res.n_iter)
    assert n == sk.n_iter_ and bool(res.converged) == sk.converged_
    np.testing.assert_allclose(res.trace[:n], sk.lower_bounds_, rtol=1e-9)
    assert np.all(np.isnan(res.trace[n:]))
    np.testing.assert_allclose(float(res.lower_bound), sk.lower_bound_, rtol=1e-9)
    np.testing.assert_allclose(res.params.weights, sk.weights_, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(res.params.means, sk.means_, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(res.params.covs, sk.covariances_, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("name", ["2d_two_blobs", "3d_three_blobs"])
def test_matches_sklearn_in_float32(name):
    """The default float32 path against scikit-learn fitted in float32: the lower-bound traces
    agree to float32 rounding; the stop may differ by one iteration when a change is ~tol."""
    x, c = DATASETS[name]
    w0, m0, c0 = _start(x, c, seed=5)
    res = gmm.fit_em(
        x, n_components=c, init=gmm.GMMParams(w0, m0, c0), tol=1e-5, max_iter=300, trace=True
    )
    sk = _sklearn_fit(x, c, w0, m0, c0)
    n = min(int(res.n_iter), sk.n_iter_)
    assert abs(int(res.n_iter) - sk.n_iter_) <= 1
    np.testing.assert_allclose(np.asarray(res.trace)[:n], sk.lower_bounds_[:n], rtol=2e-6)
    np.testing.assert_allclose(res.params.means, sk.means_, atol=2e-3)


def _mix_1d(w, m, s):
    return gmm.GMMParams(jnp.array(w), jnp.array(m)[:, None], jnp.array(s)[:, None, None] ** 2)


def test_l2_distance_matches_numerical_integrals():
    p = _mix_1d([0.3, 0.7], [-1.0, 2.0], [0.5, 1.2])
    q = _mix_1d([0.5, 0.2, 0.3], [0.0, 1.0, 4.0], [1.0, 0.3, 0.8])

    def dens(mix, t):
        return sum(
            w * stats.norm.pdf(t, m[0], np.sqrt(c[0, 0])) for w, m, c in zip(*map(np.asarray, mix))
        )

    num, _ = integrate.quad(lambda t: (dens(p, t) - dens(q, t)) ** 2, -15, 15, limit=200)
    np.testing.assert_allclose(float(gmm.l2_distance(p, q)), num, rtol=1e-5)
    # 2-D, correlated components, on a fine grid (trapezoid error ~1e-6 here).
    p2 = gmm.GMMParams(
        jnp.array([0.6, 0.4]),
        jnp.array([[0.0, 0.0], [2.0, 1.0]]),
        jnp.array([[[1.0, 0.5], [0.5, 1.0]], [[0.3, 0.0], [0.0, 0.6]]]),
    )
    q2 = gmm.GMMParams(
        jnp.array([1.0]), jnp.array([[0.5, 0.5]]), jnp.array([[[1.5, 0.2], [0.2, 1.0]]])
    )
    t = np.linspace(-7, 9, 401)
    grid = np.stack(np.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)

    def dens2(mix):
        return sum(
            w * stats.multivariate_normal(m, c).pdf(grid) for w, m, c in zip(*map(np.asarray, mix))
        ).reshape(401, 401)

    dp, dq = dens2(p2), dens2(q2)
    num2 = np.trapezoid(np.trapezoid((dp - dq) ** 2, t, axis=1), t)
    np.testing.assert_allclose(float(gmm.l2_distance(p2, q2)), num2, rtol=1e-3)

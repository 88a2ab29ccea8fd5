"""EM for Gaussian mixtures: scikit-learn parity, monotonicity, recovery, L2 distance, sampling."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from collapse_jax import gmm

sklearn_mixture = pytest.importorskip("sklearn.mixture")


def _blobs(seed, sizes, means, scales, d):
    rng = np.random.default_rng(seed)
    parts = [
        rng.normal(size=(n, d)) @ (s * np.eye(d) + 0.3 * s * np.tri(d, k=-1)) + m
        for n, m, s in zip(sizes, means, scales)
    ]
    x = np.concatenate(parts).astype(np.float32)
    return x[rng.permutation(len(x))]


DATASETS = {
    # name: (x, n_components, starting weights, means, covs)
    "2d_two_blobs": (_blobs(0, [300, 200], [[0, 0], [3, 3]], [1.0, 0.5], 2), 2),
    "3d_three_blobs": (
        _blobs(1, [150, 250, 100], [[0, 0, 0], [4, 0, 1], [0, 5, -2]], [1.0, 0.7, 1.3], 3),
        3,
    ),
    "1d_overlapping": (_blobs(2, [400, 400], [[0.0], [1.5]], [1.0, 0.6], 1), 2),
    "8d_dense_path": (_blobs(3, [200, 200], [np.zeros(8), np.full(8, 2.0)], [1.0, 0.8], 8), 2),
}


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


@pytest.mark.parametrize("method", gmm.INIT_METHODS)
def test_lower_bound_never_decreases(method):
    """EM's monotonicity over 32 chains of every kind of start. In float64 it holds to rounding
    even with 3 components on 2 blobs (near-singular components appear); float32, where a
    near-singular covariance loses its low digits, is checked on well-conditioned fits."""
    x, _ = DATASETS["2d_two_blobs"]
    rng = np.random.default_rng(9)
    xs = np.stack([x[rng.permutation(len(x))[:250]] for _ in range(12)])
    with jax.enable_x64(True):
        res = gmm.fit_em(
            xs.astype(np.float64),
            n_components=3,
            key=jax.random.key(1),
            init_method=method,
            max_iter=120,
            tol=0.0,
            trace=True,
        )
        tr = np.asarray(res.trace)
    assert np.all(np.asarray(res.n_iter) == 120) and np.all(np.isfinite(tr))
    # reg_covar makes the M-step inexact on near-singular components: ~1e-12 slack.
    assert np.diff(tr, axis=1).min() >= -1e-10 * np.abs(tr).max()
    np.testing.assert_array_equal(tr[:, -1], np.asarray(res.lower_bound))
    if method == "kmeans":
        res = gmm.fit_em(
            xs, n_components=2, key=jax.random.key(1), max_iter=120, tol=0.0, trace=True
        )
        tr = np.asarray(res.trace)
        assert np.diff(tr, axis=1).min() >= -2e-6 * np.abs(tr).max()


def test_recovers_known_parameters(key):
    """N = 20000 points of a known 2-component mixture: estimates within 5 standard errors
    (per-coordinate false-failure probability ~6e-7; a few dozen coordinates in all)."""
    true = gmm.GMMParams(
        jnp.array([0.7, 0.3]),
        jnp.array([[0.0, 0.0], [5.0, 3.0]]),
        jnp.array([[[1.0, 0.4], [0.4, 0.8]], [[0.5, -0.2], [-0.2, 1.5]]]),
    )
    n = 20000
    x = gmm.sample(key, true, n)
    fit = gmm.fit(x, n_components=2, key=jax.random.key(3))
    order = jnp.argsort(fit.means[:, 0])
    w, m, s = fit.weights[order], fit.means[order], fit.covs[order]
    se_w = np.sqrt(true.weights * (1 - true.weights) / n)
    assert np.all(np.abs(w - true.weights) < 5 * se_w)
    nk = np.asarray(true.weights) * n
    var = np.diagonal(np.asarray(true.covs), axis1=1, axis2=2)
    assert np.all(np.abs(m - true.means) < 5 * np.sqrt(var / nk[:, None]))
    # Var of a sample covariance entry: (S_ii S_jj + S_ij^2) / n_k.
    t = np.asarray(true.covs)
    se_s = np.sqrt((var[:, :, None] * var[:, None, :] + t**2) / nk[:, None, None])
    assert np.all(np.abs(s - t) < 5 * se_s)


def test_batched_chains_are_independent_and_compaction_is_exact():
    """36 chains of different difficulty, with leading axes [2, 18]: each equals its own fit
    alone, and the compacted host loop equals one jitted while_loop over all chains (float64,
    so that no change of the lower bound lands within rounding of tol)."""
    rng = np.random.default_rng(4)
    sep = np.linspace(0.5, 6.0, 36)
    xs = np.stack(
        [
            np.concatenate([rng.normal(size=(90, 2)), rng.normal(size=(60, 2)) * 0.7 + s])
            for s in sep
        ]
    ).reshape(2, 18, 150, 2)
    keys = jax.random.split(jax.random.key(2), 36).reshape(2, 18)
    with jax.enable_x64(True):
        res = gmm.fit_em(xs, n_components=2, key=keys, max_iter=300)
        assert res.params.covs.shape == (2, 18, 2, 2, 2) and res.n_iter.shape == (2, 18)
        assert len(set(np.asarray(res.n_iter).ravel().tolist())) > 5  # compaction had work
        single = jax.jit(lambda x, k: gmm.fit_em(x, n_components=2, key=k, max_iter=300))
        whole = single(jnp.asarray(xs), keys)  # traced: one while_loop, no compaction
        alone = gmm.fit_em(xs[1, 7], n_components=2, key=keys[1, 7], max_iter=300)
    np.testing.assert_array_equal(res.n_iter, whole.n_iter)
    np.testing.assert_allclose(res.params.means, whole.params.means, rtol=1e-12, atol=1e-12)
    assert int(alone.n_iter) == int(res.n_iter[1, 7])
    np.testing.assert_allclose(alone.params.covs, res.params.covs[1, 7], rtol=1e-12)


def test_kmeans_init_separates_blobs():
    x = _blobs(6, [300, 300], [[0, 0], [8, 8]], [1.0, 1.0], 2)
    fit = gmm.fit(x, n_components=2, key=jax.random.key(0), init_method="kmeans")
    np.testing.assert_allclose(np.sort(np.asarray(fit.weights)), [0.5, 0.5], atol=1e-3)


def test_bad_inputs_raise():
    x = np.zeros((10, 2), np.float32)
    with pytest.raises(ValueError, match="n_components"):
        gmm.fit(x, n_components=11)
    with pytest.raises(ValueError, match="shape"):
        gmm.fit(np.zeros(5), n_components=1)
    with pytest.raises(ValueError, match="init_method"):
        gmm.fit(x, n_components=2, init_method="spectral")
    with pytest.raises(ValueError, match="init.means"):
        gmm.fit(
            x,
            n_components=2,
            init=gmm.GMMParams(np.ones(2) / 2, np.zeros((3, 2)), np.stack([np.eye(2)] * 2)),
        )
    p = gmm.GMMParams(jnp.ones(1), jnp.zeros((1, 2)), jnp.eye(2)[None])
    q = gmm.GMMParams(jnp.ones(1), jnp.zeros((1, 3)), jnp.eye(3)[None])
    with pytest.raises(ValueError, match="dimension"):
        gmm.l2_distance(p, q)


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


def test_l2_distance_zero_for_identical_and_batched():
    p = gmm.GMMParams(
        jnp.array([[0.6, 0.4]] * 3),
        jnp.zeros((3, 2, 2)).at[:, 1].set(1.0),
        jnp.broadcast_to(jnp.eye(2), (3, 2, 2, 2)),
    )
    np.testing.assert_array_equal(gmm.l2_distance(p, p), np.zeros(3))
    one = gmm.GMMParams(jnp.ones(1), jnp.zeros((1, 2)), jnp.eye(2)[None])
    d = gmm.l2_distance(p, one)  # [3] against an unbatched mixture
    assert d.shape == (3,) and np.all(np.asarray(d) > 0)
    # Same density written with a split component: distance 0 up to rounding.
    split = gmm.GMMParams(
        jnp.array([0.5, 0.5]), jnp.zeros((2, 2)), jnp.broadcast_to(jnp.eye(2), (2, 2, 2))
    )
    assert float(gmm.l2_distance(split, one)) < 1e-7


def test_sample_moments(key):
    """Sample mean/covariance of 200k draws within 5 SE of the mixture's moments (false-failure
    probability < 1e-5 over the 6 checks)."""
    p = gmm.GMMParams(
        jnp.array([0.2, 0.8]),
        jnp.array([[-3.0, 1.0], [1.0, 0.0]]),
        jnp.array([[[0.5, 0.1], [0.1, 0.3]], [[1.0, -0.4], [-0.4, 2.0]]]),
    )
    n = 200_000
    x = np.asarray(gmm.sample(key, p, n), np.float64)
    mean, cov = map(np.asarray, gmm.moments(p))
    assert np.all(np.abs(x.mean(0) - mean) < 5 * np.sqrt(np.diag(cov) / n))
    c = x - mean
    se = np.sqrt(np.var(c[:, :, None] * c[:, None, :], axis=0) / n)
    assert np.all(np.abs(np.cov(x.T) - cov) < 5 * se)

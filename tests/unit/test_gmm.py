"""EM for Gaussian mixtures: monotonicity, recovery, batched chains and lane compaction, L2
distance, sampling (scikit-learn and numerical-integral references: tests/parity/test_gmm.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_jax import gmm


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


# k-means initialisation (Lloyd's loop compiled in) in the integration tier (CI's -m '');
# test_kmeans_init_separates_blobs keeps it in the default tier.
@pytest.mark.parametrize(
    "method",
    [pytest.param(m, marks=pytest.mark.slow) if m == "kmeans" else m for m in gmm.INIT_METHODS],
)
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


@pytest.mark.slow  # EM over many chains, three ways: the integration tier (CI's -m '')
def test_batched_chains_are_independent_and_compaction_is_exact():
    """12 chains of different difficulty, with leading axes [2, 6]: each equals its own fit
    alone, and the compacted host loop equals one jitted while_loop over all chains (float64,
    so that no change of the lower bound lands within rounding of tol)."""
    rng = np.random.default_rng(4)
    sep = np.linspace(0.5, 6.0, 12)
    xs = np.stack(
        [
            np.concatenate([rng.normal(size=(90, 2)), rng.normal(size=(60, 2)) * 0.7 + s])
            for s in sep
        ]
    ).reshape(2, 6, 150, 2)
    keys = jax.random.split(jax.random.key(2), 12).reshape(2, 6)
    with jax.enable_x64(True):
        res = gmm.fit_em(xs, n_components=2, key=keys, max_iter=300)
        assert res.params.covs.shape == (2, 6, 2, 2, 2) and res.n_iter.shape == (2, 6)
        assert len(set(np.asarray(res.n_iter).ravel().tolist())) > 5  # compaction had work (8 here)
        single = jax.jit(lambda x, k: gmm.fit_em(x, n_components=2, key=k, max_iter=300))
        whole = single(jnp.asarray(xs), keys)  # traced: one while_loop, no compaction
        alone = gmm.fit_em(xs[0, 3], n_components=2, key=keys[0, 3], max_iter=300)
    np.testing.assert_array_equal(res.n_iter, whole.n_iter)
    np.testing.assert_allclose(res.params.means, whole.params.means, rtol=1e-12, atol=1e-12)
    assert int(alone.n_iter) == int(res.n_iter[0, 3])
    np.testing.assert_allclose(alone.params.covs, res.params.covs[0, 3], rtol=1e-12)


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

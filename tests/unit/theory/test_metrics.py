"""Metric functions against independent float64 NumPy/SciPy computations."""

import numpy as np
import pytest
import scipy.linalg

from collapse_jax.theory import metrics


def _w2sq_reference(m1, c1, m2, c2):
    r2 = scipy.linalg.sqrtm(c2)
    cross = scipy.linalg.sqrtm(r2 @ c1 @ r2)
    return float(np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * np.real(cross)))


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.3 * np.eye(d)


@pytest.mark.parametrize("d", [2, 3, 5])
def test_gaussian_w2_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    c1, c2 = _random_spd(rng, d), _random_spd(rng, d)
    got = float(metrics.gaussian_w2_squared(m1, c1, m2, c2))
    np.testing.assert_allclose(got, _w2sq_reference(m1, c1, m2, c2), rtol=2e-4, atol=1e-4)
    # symmetric, and zero between a distribution and itself
    np.testing.assert_allclose(
        float(metrics.gaussian_w2_squared(m2, c2, m1, c1)), got, rtol=2e-4, atol=1e-4
    )
    assert float(metrics.gaussian_w2(m1, c1, m1, c1)) < 1e-2


def test_gaussian_w2_1d_and_batched():
    mean = np.array([[0.0], [1.0], [-2.0]])
    var = np.array([[[1.0]], [[4.0]], [[0.25]]])
    got = np.asarray(metrics.gaussian_w2(mean, var, np.zeros(1), np.ones((1, 1))))
    want = np.sqrt(mean[:, 0] ** 2 + (np.sqrt(var[:, 0, 0]) - 1.0) ** 2)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # commuting (diagonal) covariances: W2^2 = |dm|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    a, b = np.diag([1.0, 9.0]), np.diag([4.0, 1.0])
    got = float(metrics.gaussian_w2_squared(np.zeros(2), a, np.ones(2), b))
    np.testing.assert_allclose(got, 2.0 + 1.0 + 4.0, rtol=1e-5)


def test_gaussian_w2_rejects_mismatched_dims():
    with pytest.raises(ValueError, match="dims differ"):
        metrics.gaussian_w2(np.zeros(2), np.eye(3), np.zeros(3), np.eye(3))


def test_gaussian_kl_and_logdet():
    rng = np.random.default_rng(0)
    d = 3
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    c1, c2 = _random_spd(rng, d), _random_spd(rng, d)
    inv2 = np.linalg.inv(c2)
    want = 0.5 * (
        np.trace(inv2 @ c1)
        + (m2 - m1) @ inv2 @ (m2 - m1)
        - d
        + np.linalg.slogdet(c2)[1]
        - np.linalg.slogdet(c1)[1]
    )
    np.testing.assert_allclose(float(metrics.gaussian_kl(m1, c1, m2, c2)), want, rtol=1e-4)
    np.testing.assert_allclose(float(metrics.log_det(c1)), np.linalg.slogdet(c1)[1], rtol=1e-5)
    assert float(metrics.log_det(np.zeros((2, 2)))) == -np.inf


def test_discrete_metrics():
    p0 = np.array([0.5, 0.3, 0.15, 0.05])
    p = np.array([0.6, 0.4, 0.0, 0.0])
    assert int(metrics.support_size(p)) == 2
    np.testing.assert_allclose(float(metrics.lost_tail_mass(p0, p)), 0.2, rtol=1e-6)
    np.testing.assert_allclose(float(metrics.total_variation(p, p0)), 0.2, rtol=1e-6)
    want_kl = 0.6 * np.log(0.6 / 0.5) + 0.4 * np.log(0.4 / 0.3)
    np.testing.assert_allclose(float(metrics.kl_divergence(p, p0)), want_kl, rtol=1e-5)
    assert float(metrics.kl_divergence(p0, p)) == np.inf  # lost support
    np.testing.assert_allclose(float(metrics.gini_simpson(p)), 1 - 0.36 - 0.16, rtol=1e-6)
    np.testing.assert_allclose(
        float(metrics.entropy(p)), -(0.6 * np.log(0.6) + 0.4 * np.log(0.4)), rtol=1e-6
    )
    batch = np.array([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(
        np.asarray(metrics.absorbed_state(batch)), [[0, 1, 0], [0, 0, 0], [1, 0, 0]]
    )
    np.testing.assert_allclose(float(metrics.perplexity(np.log(20.0))), 20.0, rtol=1e-6)
    with pytest.raises(ValueError, match="states"):
        metrics.total_variation(np.ones(3) / 3, np.ones(4) / 4)

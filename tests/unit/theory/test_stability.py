"""Bertrand et al.'s stability on a fixed real set: the Gaussian MLE recursion of
collapse_jax/theory/stability.py against 10^4 Monte Carlo chains (exact in distribution).

Each comparison is a z-test at 4.5 standard errors (two-sided false-failure probability
6.8e-6 each; 24 comparisons: < 1.7e-4 for the file), fixed seeds."""

import math

import jax
import numpy as np
import pytest

from collapse_jax.theory import stability

CHAINS = 10_000


@pytest.mark.parametrize("ratio", [0.25, 1.0, 4.0, math.inf])
def test_expected_errors_match_monte_carlo(ratio):
    n, gens = 10, 12
    want = stability.expected_errors(ratio, n, gens)
    got = stability.simulate(jax.random.key(int(min(ratio, 99) * 4)), ratio, n, gens, CHAINS)
    for name in ("var", "mean_dist2"):
        for g in (1, 4, 11):
            x = got[name][g]
            se = x.std(ddof=1) / math.sqrt(CHAINS)
            assert abs(x.mean() - want[name][g]) <= 4.5 * se, (ratio, name, g, x.mean(), se)


@pytest.mark.parametrize("ratio, n", [(0.2, 10), (1.0, 20), (9.0, 3), (100.0, 50)])
def test_every_finite_ratio_is_stable_with_rate_lambda_over_one_plus_lambda(ratio, n):
    a_mat, a = stability.transition(ratio, n)
    eig = np.sort(np.abs(np.linalg.eigvals(a_mat)))
    np.testing.assert_allclose(eig, np.sort(np.abs([a, a * a * (1 - 1 / (ratio * n))])), rtol=1e-12)
    assert stability.spectral_radius(ratio, n) == pytest.approx(a) and a < 1
    e = stability.expected_errors(ratio, n, 5000)
    fp = stability.fixed_point(ratio, n)
    assert e["var"][-1] == pytest.approx(fp["var"]) and e["mean_dist2"][-1] == pytest.approx(
        fp["mean_dist2"]
    )
    # E v_t + E (m_t - mu_0)^2 = sigma^2 at every generation (the MLE keeps E[m^2 + v]).
    np.testing.assert_allclose(e["var"] + e["mean_dist2"], 1.0, rtol=1e-12)


def test_the_fully_synthetic_loop_collapses():
    assert stability.spectral_radius(math.inf, 10) == pytest.approx(1.0)
    e = stability.expected_errors(math.inf, 10, 200)
    np.testing.assert_allclose(e["var"], 0.9 * 0.9 ** np.arange(200), rtol=1e-12)
    assert e["mean_dist2"][-1] == pytest.approx(1.0, abs=1e-8)


def test_a_warm_start_that_would_be_ignored_is_refused():
    from collapse_jax import config as config_lib

    path = config_lib.find_config("gmm_cpu")
    with pytest.raises(config_lib.ConfigError, match="'previous' would be ignored"):
        config_lib.load_config(path, ["generation.init_from=previous"])
    cfg = config_lib.load_config(path, ["generation.init_from=previous", "model.warm_start=true"])
    assert cfg.generation.init_from == "previous"
    stab = config_lib.load_config(config_lib.find_config("theory/gaussian_stability"))
    assert stab.generation.init_from == "previous"
    assert stab.generation.alpha / stab.generation.gamma == 1.0  # lambda_B, the ratio

"""Linear regression learner: closed forms of replace and accumulate through the loop (Monte
Carlo, >= 10^4 chains), ridge against NumPy, the world carried through mixed data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from collapse_jax import config as config_lib
from collapse_jax import loop, plots
from collapse_jax.linreg.learner import (
    LinearRegressionConfig,
    LinearRegressionLearner,
    expected_param_error,
)

Z = 4.5  # two-sided normal tail 6.8e-6 per comparison


def _run(tmp_path, policy, gens, **model):
    raw = {
        "name": "lr",
        "seed": 3,
        "model": {
            "kind": "linear_regression",
            "dim": 3,
            "num_points": 20,
            "test_points": 8,
            **model,
        },
        "generation": {
            "num_generations": gens,
            "samples_per_generation": None,
            "policy": policy,
            "num_trials": 10_000,
        },
    }
    cfg = config_lib.from_dict(raw)
    return cfg, loop.run_generations(cfg, tmp_path / policy).rows


@pytest.mark.slow  # whole runs: the integration tier (CI's -m '')
@pytest.mark.parametrize("policy,gens,lam", [("replace", 4, 0.5), ("accumulate", 3, 1.0)])
def test_param_error_matches_closed_form(tmp_path, policy, gens, lam):
    """E||w_n - w*||^2: (n+1) s^2 d/(T-d-1) (replace), s^2 d/(T-d-1) sum_{k<=n+1} 1/k^2
    (accumulate); with sampling bias lambda (replace) (1 + n lambda) s^2 d/(T-d-1); over 10^4
    chains (each its own w* and design), generation 0 fitted to real data.
    |mean - closed form| < 4.5 SE per generation: false-failure probability < 3e-5 per test."""
    cfg, rows = _run(tmp_path, policy, gens, noise_std=0.7, sampling_bias=lam)
    want = expected_param_error(
        policy, gens, dim=3, num_points=20, noise_std=0.7, sampling_bias=lam
    )
    for row, w in zip(rows, want):
        assert abs(row["param_error"] - w) < Z * row["param_error_se"], (row["generation"], w)
        # test MSE on fresh inputs = param error + sigma^2 in expectation (8 test points/chain)
        assert abs(row["test_mse"] - w - 0.49) < Z * row["test_mse_se"]
    curves = plots.expected_curves(cfg, np.array([r["sample_size"] for r in rows]))
    np.testing.assert_allclose(curves["param_error"], want)
    assert policy != "accumulate" or rows[-1]["sample_size"] == 3 * 20


def test_ridge_and_ols_match_numpy(key):
    cfg = LinearRegressionConfig(dim=4, num_points=9, ridge=0.5)
    learner = LinearRegressionLearner(cfg)
    data = learner.real_data(key, 9)
    params = jax.jit(learner.fit)(key, data, learner.init(key))
    x, y = map(np.asarray, learner.labelled(data))
    want = np.linalg.solve(x.T @ x + 0.5 * np.eye(4), x.T @ y)
    np.testing.assert_allclose(params.w, want, rtol=2e-4, atol=1e-5)
    # real labels are X w* + noise of the configured scale
    resid = y - x @ np.asarray(data.w_star)
    assert 0.2 < resid.std() < 3.0


def test_world_survives_mixing_with_fresh_real_data(key):
    """draw_real's parts carry no world: the pool takes the chain's, whatever the order, and
    real points are labelled by w* (a near-noiseless fit of only real rows recovers w*)."""
    learner = LinearRegressionLearner(LinearRegressionConfig(dim=3, num_points=12, noise_std=1e-3))
    k1, k2, k3 = jax.random.split(key, 3)
    params = learner.fit(k1, learner.real_data(k1, 12), learner.init(k1))
    synth = learner.sample(k2, params, 5)
    real = learner.draw_real(k3, 7)
    for parts in ([synth, real], [real, synth]):
        pool = learner.concat(parts)
        assert bool(pool.has_world) and learner.num_samples(pool) == 12
        np.testing.assert_array_equal(pool.design_key, params.design_key)
        # rows: synthetic share first rows, real share the last ones -> the whole design
        assert sorted(np.asarray(pool.row).tolist()) == list(range(12))
        refit = learner.fit(k1, pool, params)
        np.testing.assert_allclose(refit.w, params.w_star, atol=0.05)
    only_real = learner.concat([learner.draw_real(k3, 6), learner.draw_real(k2, 2)])
    assert not bool(only_real.has_world)


@pytest.mark.slow  # a whole run: the integration tier (CI's -m '')
def test_mixed_policy_runs_and_stays_bounded(tmp_path):
    """alpha = gamma = 1/2 (half the rows refreshed with real labels each generation) keeps the
    error bounded well below replace's linear growth (the mean over 2000 chains is within a
    few % of its limit, far below half of replace's)."""
    raw = {
        "name": "lr",
        "model": {"kind": "linear_regression", "dim": 3, "num_points": 20, "test_points": 4},
        "generation": {
            "num_generations": 6,
            "samples_per_generation": None,
            "policy": "mix",
            "alpha": 0.5,
            "gamma": 0.5,
            "num_trials": 2000,
        },
    }
    rows = loop.run_generations(config_lib.from_dict(raw), tmp_path).rows
    replace = expected_param_error("replace", 6, dim=3, num_points=20, noise_std=1.0)
    assert rows[-1]["param_error"] < 0.5 * replace[-1]
    cfg = config_lib.from_dict(raw)
    assert plots.expected_curves(cfg, np.full(6, 20)) == {}


def test_config_errors_name_the_key():
    with pytest.raises(config_lib.ConfigError, match="model.num_points"):
        LinearRegressionConfig(dim=10, num_points=5)
    with pytest.raises(config_lib.ConfigError, match="model.noise_std"):
        LinearRegressionConfig(noise_std=0.0)
    LinearRegressionConfig(dim=10, num_points=5, ridge=1.0)  # ridge handles d > T


def test_truth_log_prob_is_the_gaussian_likelihood(key):
    learner = LinearRegressionLearner(LinearRegressionConfig(dim=2, num_points=10, noise_std=0.5))
    data = learner.real_data(key, 10)
    params = learner.fit(key, data, learner.init(key))
    x, y = map(np.asarray, learner.labelled(data))
    want = stats.norm.logpdf(y, x @ np.asarray(data.w_star), 0.5)
    np.testing.assert_allclose(learner.truth_log_prob(data), want, rtol=1e-5, atol=1e-5)
    far = params._replace(w=params.w + 3.0)
    assert float(jnp.mean(learner.truth_log_prob(data))) > float(
        jnp.mean(learner.log_prob(data, far))
    )

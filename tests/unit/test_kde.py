"""KDE learner: densities against SciPy's gaussian_kde, the variance closed form, the refit
recursion through the loop (Monte Carlo over 10^4 chains), the true densities' normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from collapse_jax import config as config_lib
from collapse_jax import loop, plots
from collapse_jax.kde.learner import (
    KDEConfig,
    KDELearner,
    draw_truth,
    expected_variance,
    fit_kde,
    kde_log_prob,
    kde_variance,
    truth_log_prob,
)
from collapse_jax.rundir import reader

Z = 4.5  # two-sided normal tail 6.8e-6 per comparison


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("rule", ["scott", "silverman"])
def test_log_prob_matches_scipy(dim, rule):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, dim)) @ (np.eye(dim) + 0.3 * np.tri(dim, dim, -1))
    q = rng.normal(size=(40, dim)) * 1.5
    ref = stats.gaussian_kde(x.T, bw_method=rule)
    params = fit_kde(jnp.asarray(x, jnp.float32), rule)
    np.testing.assert_allclose(params.chol @ params.chol.T, ref.covariance, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(kde_log_prob(params, jnp.asarray(q)), ref.logpdf(q.T), atol=2e-4)


def test_fixed_bandwidth_matches_scipy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 1))
    h = 0.3
    ref = stats.gaussian_kde(x.T, bw_method=h / x[:, 0].std(ddof=1))  # scipy: factor * std
    q = np.linspace(-3, 3, 25)[:, None]
    params = fit_kde(jnp.asarray(x, jnp.float32), h)
    np.testing.assert_allclose(kde_log_prob(params, jnp.asarray(q)), ref.logpdf(q.T), atol=2e-4)


@pytest.mark.parametrize("bandwidth", [0.4, "scott"])
def test_variance_closed_form_and_sampler(key, bandwidth):
    """Var of the KDE = biased sample variance + h^2, checked against SciPy's kernel covariance
    and against 2*10^5 draws of `sample` (|var - closed form| < 4.5 SE of the sample variance:
    false-failure probability 7e-6)."""
    x = jax.random.normal(key, (60, 1)) * 2.0 + 1.0
    learner = KDELearner(KDEConfig(bandwidth=bandwidth, num_points=60))
    params = learner.fit(key, x, learner.init(key))
    v = float(kde_variance(params)[0, 0])
    xn = np.asarray(x, np.float64)
    ref = stats.gaussian_kde(
        xn.T,
        bw_method=bandwidth if isinstance(bandwidth, str) else bandwidth / xn[:, 0].std(ddof=1),
    )
    np.testing.assert_allclose(v, xn.var() + ref.covariance[0, 0], rtol=1e-4)
    s = np.asarray(learner.sample(jax.random.key(5), params, 200_000), np.float64)[:, 0]
    m4 = np.mean((s - s.mean()) ** 4)
    se = np.sqrt((m4 - s.var() ** 2) / s.size)
    assert abs(s.var() - v) < Z * se


@pytest.mark.slow  # whole runs: the integration tier (CI's -m '')
@pytest.mark.parametrize("bandwidth", [0.5, "silverman"])
def test_variance_recursion_through_the_loop(tmp_path, bandwidth):
    """E Var_n of the refitted 1-D KDE (`expected_variance`), 10^4 chains of N = 16 points,
    4 generations, replace: |mean - closed form| < 4.5 SE per generation (false-failure
    probability < 3e-5)."""
    raw = {
        "name": "kde",
        "seed": 2,
        "model": {
            "kind": "kde",
            "dataset": "gaussian",
            "bandwidth": bandwidth,
            "num_points": 16,
            "heldout_points": 4,
        },
        "generation": {"num_generations": 4, "samples_per_generation": None, "num_trials": 10_000},
    }
    cfg = config_lib.from_dict(raw)
    rows = loop.run_generations(cfg, tmp_path).rows
    want = expected_variance(4, num_points=16, bandwidth=bandwidth)
    for row, w in zip(rows, want):
        assert abs(row["variance"] - w) < Z * row["variance_se"], (row["generation"], w)
    curves = plots.expected_curves(cfg, np.full(4, 16))
    np.testing.assert_allclose(curves["variance"], want)
    assert rows[-1]["heldout_nll"] > 0 and np.isfinite(rows[-1]["heldout_nll"])
    if bandwidth == 0.5:  # the figures (closed form overlaid on `variance`; the density)
        files = plots.make_figures(reader.Run(tmp_path), loop.make_learner(cfg))
        assert {"variance.png", "kde_density.png"} <= {f.name for f in files}


@pytest.mark.parametrize("dataset", ["two_moons", "circles"])
def test_true_densities_are_normalised_and_fit_their_draws(key, dataset):
    g = np.linspace(-3.0, 3.5, 200)  # spacing 0.3 noise sd: the Riemann sum is exact to ~1e-6
    xy = jnp.asarray(np.stack(np.meshgrid(g, g), -1).reshape(-1, 2), jnp.float32)
    lp = jax.jit(lambda q: truth_log_prob(q, dataset, 0.1))
    p = np.concatenate([np.exp(np.asarray(lp(c))) for c in jnp.split(xy, 8)])
    assert abs(p.sum() * (g[1] - g[0]) ** 2 - 1.0) < 1e-3
    # draws are where the density is: their mean log density beats that of a shifted copy
    x = draw_truth(key, dataset, 2000, 2, 0.1)
    assert float(jnp.mean(lp(x))) > float(jnp.mean(lp(x + 0.3))) + 0.5


def test_two_d_metrics_and_config_errors(key):
    learner = KDELearner(KDEConfig(dataset="circles", bandwidth=0.1, num_points=50))
    data = learner.real_data(key, 50)
    params = learner.fit(key, data, learner.init(key))
    m = learner.evaluate(key, params, learner.reference(key))
    assert set(m) == {"heldout_nll", "bandwidth", "total_variance"}
    assert float(m["heldout_nll"]) > learner.truth_nll(key)  # the truth is the floor (in mean)
    np.testing.assert_allclose(m["bandwidth"], 0.1, rtol=1e-4)
    with pytest.raises(config_lib.ConfigError, match="model.dim"):
        KDEConfig(dataset="two_moons", dim=1)
    with pytest.raises(config_lib.ConfigError, match="model.bandwidth"):
        KDEConfig(bandwidth="wide")
    with pytest.raises(config_lib.ConfigError, match="model.bandwidth"):
        config_lib.from_dict({"name": "k", "model": {"kind": "kde", "bandwidth": -1}})

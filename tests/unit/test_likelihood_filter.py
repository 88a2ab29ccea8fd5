"""Likelihood filtering of synthetic data (generation.likelihood_filter): keeps the likeliest
candidates, goes through the one loop for every policy, and changes the collapse; the old key
`generation.selection` is refused with one line naming the new one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_jax import config as config_lib
from collapse_jax import loop
from collapse_jax.config import LikelihoodFilterConfig
from collapse_jax.kde.learner import KDEConfig, KDELearner
from collapse_jax.loop import filtering


def test_keeps_the_best_scored_candidates(key):
    learner = KDELearner(KDEConfig(bandwidth=0.3, num_points=40))
    params = learner.fit(key, learner.real_data(key, 40), learner.init(key))
    k = jax.random.key(3)
    got = filtering.sample(learner, LikelihoodFilterConfig(rho=0.4), k, params, 20)
    cand = learner.sample(k, params, filtering.num_candidates(20, 0.4))
    assert cand.shape[0] == 50
    best = np.sort(np.asarray(learner.truth_log_prob(cand)))[::-1][:20]
    np.testing.assert_allclose(np.sort(np.asarray(learner.truth_log_prob(got)))[::-1], best)
    # rho = 1 (or no block) is exactly the learner's sampler
    plain = learner.sample(k, params, 20)
    np.testing.assert_array_equal(
        filtering.sample(learner, LikelihoodFilterConfig(), k, params, 20), plain
    )
    np.testing.assert_array_equal(filtering.sample(learner, None, k, params, 20), plain)


def _linreg(rho, policy="replace"):
    return config_lib.from_dict(
        {
            "name": "sel",
            "model": {"kind": "linear_regression", "dim": 3, "num_points": 20, "test_points": 4},
            "generation": {
                "num_generations": 4,
                "samples_per_generation": None,
                "policy": policy,
                "num_trials": 2000,
                "likelihood_filter": {"rho": rho},
            },
        }
    )


@pytest.mark.slow  # whole runs of 2000 chains: the integration tier (CI's -m '')
def test_selection_by_the_truth_slows_linear_regression_collapse(tmp_path):
    """Keeping the half of 2T relabelled rows most likely under w* pulls every refit towards w*:
    the last generation's mean error is far below replace without selection (whose mean over
    2000 chains is within ~3 % of 4 x gen 0)."""
    plain = loop.run_generations(_linreg(1.0), tmp_path / "a").rows
    sel = loop.run_generations(_linreg(0.5), tmp_path / "b").rows
    assert plain[0]["param_error"] == sel[0]["param_error"]  # same real data, same first fit
    assert sel[-1]["param_error"] < 0.5 * plain[-1]["param_error"]


def test_config_and_learner_errors():
    with pytest.raises(config_lib.ConfigError, match="generation.likelihood_filter.rho"):
        _linreg(0.0)
    cfg = config_lib.from_dict(
        {
            "name": "g",
            "model": {"kind": "discrete", "method": "sample"},
            "generation": {"likelihood_filter": {"rho": 0.5}},
        }
    )
    learner = loop.make_learner(cfg)  # no likelihood of labels to score by
    params = learner.init(jax.random.key(0))
    with pytest.raises(ValueError, match="scorer"):
        filtering.sample(learner, cfg.generation.likelihood_filter, jax.random.key(0), params, 10)
    assert jnp.isfinite(params).all()


def test_log_probs_of_the_gaussian_and_gmm_learners(key):
    """`log_prob` / `truth_log_prob` (the scorers' likelihoods) equal SciPy's densities."""
    import scipy.stats

    from collapse_jax.gmm.learner import GMMConfig, GMMLearner
    from collapse_jax.theory.gaussian import GaussianConfig, GaussianLearner, GaussianParams

    cov = np.array([[2.0, 0.3], [0.3, 0.5]])
    g = GaussianLearner(GaussianConfig(dim=2, mean=(1.0, -1.0), cov=cov.tolist(), method="sample"))
    x = np.asarray(g.draw_real(key, 50))
    want = scipy.stats.multivariate_normal([1.0, -1.0], cov).logpdf(x)
    np.testing.assert_allclose(g.truth_log_prob(x), want, rtol=1e-5, atol=1e-5)
    p = GaussianParams(jnp.array([0.5, 0.0]), jnp.array([[1.0, 0.0], [0.0, 3.0]]))
    want = scipy.stats.multivariate_normal([0.5, 0.0], np.diag([1.0, 3.0])).logpdf(x)
    np.testing.assert_allclose(g.log_prob(x, p), want, rtol=1e-5, atol=1e-5)

    m = GMMLearner(GMMConfig())
    true = m.config.true_mixture()
    y = np.asarray(m.draw_real(key, 40))
    dens = sum(
        float(w) * scipy.stats.multivariate_normal(np.asarray(mu), np.asarray(c)).pdf(y)
        for w, mu, c in zip(true.weights, true.means, true.covs)
    )
    np.testing.assert_allclose(m.truth_log_prob(y), np.log(dens), rtol=1e-4, atol=1e-4)
    start = m.init(key).params  # some other mixture: means drawn from the real one
    dens = sum(
        float(w) * scipy.stats.multivariate_normal(np.asarray(mu), np.asarray(c)).pdf(y)
        for w, mu, c in zip(start.weights, start.means, start.covs)
    )
    np.testing.assert_allclose(m.log_prob(y, m.init(key)), np.log(dens), rtol=1e-4, atol=1e-4)


def _gaussian_chains(scorer, rho, chains=4000, gens=5, m=20):
    """Per-chain fitted (mean [G, R], variance [G, R]) of 1-D Gaussian chains under replace."""
    from collapse_jax.theory import gaussian

    learner = gaussian.GaussianLearner(gaussian.GaussianConfig(method="sample"))
    schedule = loop.Schedule.build(
        [m] * gens, likelihood_filter=LikelihoodFilterConfig(rho=rho, scorer=scorer)
    )
    mean, cov = loop.simulate_chains(
        learner,
        schedule,
        jax.random.key(7),
        chains=chains,
        measure=gaussian.measure_params,
        chunk_size=chains,
    )
    return mean[..., 0].astype(np.float64), cov[..., 0, 0].astype(np.float64)


def _below(x: np.ndarray, bound: float, what: str) -> None:
    """mean(x) < bound by more than 4.5 SE (a correct direction fails with probability < 4e-6)."""
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert x.mean() < bound - 4.5 * se, f"{what}: {x.mean():.4g} vs {bound:.4g} (se {se:.2g})"


def test_selection_changes_the_gaussian_collapse_in_the_expected_direction():
    """1-D Gaussian, M = 20, replace, 4000 chains, 5 generations. Without selection the unbiased
    refit keeps E sigma^2 = 1 and the mean random-walks: E (mu_n - mu_0)^2 = (n + 1) / M and
    E (mu_n - mu_hat_0)^2 = n / M (n = 0 is the fit to real data). Keeping the better-scored half
    of 2M candidates:
    - "truth" (likelihood under N(0, 1)) keeps the central points: the variance collapses faster
      and the mean is pulled back towards mu_0 (a smaller drift from the truth);
    - "generation0" (likelihood under the chain's generation-0 fit) does the same around that
      fit: a smaller drift from the generation-0 mean and a faster variance collapse, but it
      cannot remove generation 0's own error, so its drift from the truth exceeds "truth"'s."""
    m, gens = 20, 5
    mu_t, var_t = _gaussian_chains("truth", 0.5, gens=gens, m=m)
    mu_g, var_g = _gaussian_chains("generation0", 0.5, gens=gens, m=m)
    np.testing.assert_array_equal(mu_g[0], mu_t[0])  # same real data and first fit
    n = gens - 1
    _below(var_t[-1], 1.0, "truth: variance")
    _below(mu_t[-1] ** 2, (n + 1) / m, "truth: drift from mu_0")
    _below(var_g[-1], 1.0, "generation0: variance")
    _below((mu_g[-1] - mu_g[0]) ** 2, n / m, "generation0: drift from generation 0")
    diff = mu_t[-1] ** 2 - mu_g[-1] ** 2  # paired: the same chains' real data
    _below(diff, 0.0, "truth vs generation0: drift from mu_0")


def test_generation0_scorer_uses_the_anchor(key):
    """The generation0 scorer keeps the candidates most likely under the anchor it is given, and
    refuses to run without one (non-jittable learners' loop) or without `log_prob`."""
    learner = KDELearner(KDEConfig(bandwidth=0.3, num_points=40))
    anchor = learner.fit(key, learner.real_data(key, 40), learner.init(key))
    params = learner.fit(key, learner.real_data(jax.random.key(9), 40), learner.init(key))
    sel = LikelihoodFilterConfig(rho=0.5, scorer="generation0")
    k = jax.random.key(3)
    got = filtering.sample(learner, sel, k, params, 20, anchor=anchor)
    cand = learner.sample(k, params, 40)
    best = np.sort(np.asarray(learner.log_prob(cand, anchor)))[::-1][:20]
    np.testing.assert_allclose(np.sort(np.asarray(learner.log_prob(got, anchor)))[::-1], best)
    with pytest.raises(ValueError, match="generation0"):
        filtering.sample(learner, sel, k, params, 20)
    with pytest.raises(config_lib.ConfigError, match="generation.likelihood_filter.scorer"):
        config_lib.from_dict(
            {
                "name": "x",
                "model": {"kind": "kde"},
                "generation": {"likelihood_filter": {"scorer": "x"}},
            }
        )


def test_the_old_selection_key_is_refused_naming_the_new_one():
    with pytest.raises(
        config_lib.ConfigError, match="generation.selection: renamed generation.likelihood_filter"
    ):
        config_lib.from_dict(
            {"name": "x", "model": {"kind": "kde"}, "generation": {"selection": {"rho": 0.5}}}
        )

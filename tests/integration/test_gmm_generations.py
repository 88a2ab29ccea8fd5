"""The GMM learner in the generational loop: collapse as in the paper, config validation."""

import jax
import numpy as np
import pytest

from collapse_jax import gmm, loop
from collapse_jax.config import ConfigError, ExperimentConfig, GenerationConfig
from collapse_jax.gmm import figures as gmm_figures
from collapse_jax.rundir import reader


def test_variance_shrinks_and_l2_grows_over_generations(tmp_path):
    """256 chains, M = 50 points per generation, 12 generations of fresh 2-component fits.

    Every M-step matches the mixture's overall covariance to its training data's, so the chain
    mean of the fitted covariance trace must follow E[T_g] = (M-1)/M E[T_{g-1}] + reg*d exactly;
    checked per generation within 5 standard errors (false-failure probability < 1e-5 for the
    12 generations). The L2 distance to the real distribution must grow and the variance must
    shrink from generation 0 to 11 (5 SE of the difference).
    """
    cfg = ExperimentConfig(
        name="gmm_collapse",
        seed=3,
        model=gmm.GMMConfig(
            n_components=2,
            true_weights=(1.0,),
            true_means=((1.0, -1.0),),
            true_covs=(((1.0, 0.3), (0.3, 0.5)),),
            max_iter=100,
            heldout_size=500,
        ),
        generation=GenerationConfig(
            num_generations=12,
            samples_per_generation=50,
            num_trials=256,
            block_size=12,
            init_from="scratch",
        ),
    )
    res = loop.run_generations(cfg, tmp_path / "run")
    run = reader.Run(res.run_dir)
    trace = run.trial_series("cov_trace")  # [G, R]
    assert trace.shape == (12, 256)
    learner = loop.make_learner(cfg)
    sizes = np.array([r["sample_size"] for r in res.rows])
    expected = gmm_figures.expected_curves(learner.config, "replace", sizes)
    se = trace.std(axis=1, ddof=1) / np.sqrt(trace.shape[1])
    assert np.all(np.abs(trace.mean(axis=1) - expected["cov_trace"]) < 5 * se)
    assert trace.mean(axis=1)[-1] < trace.mean(axis=1)[0]
    # Squared L2 is heavy-tailed (a near-singular component has a huge peak): a sign test.
    # Under "no growth" P(l2_11 > l2_0) <= 1/2; 5 binomial SE above it.
    l2 = run.trial_series("l2")
    grew = np.mean(l2[-1] > l2[0])
    assert grew > 0.5 + 5 * 0.5 / np.sqrt(l2.shape[1]), grew
    drop = trace[0] - trace[-1]
    assert drop.mean() > 5 * drop.std(ddof=1) / np.sqrt(len(drop))
    # Metrics of a single chain are sane.
    row = res.rows[0]
    assert 0.5 < row["converged"] <= 1 and 0 < row["min_weight"] <= 0.5
    w = run.arrays(0)["trials/weights"]
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)
    assert np.all(w[:, 0] >= w[:, 1])
    # The figure replay reproduces chain 0's data (same keys as the loop).
    replay = gmm_figures.replay_chain(learner, cfg.seed, [0, 3], cfg.generation)
    k_real, _, _ = loop.chain_keys(cfg.seed, 0)
    np.testing.assert_allclose(replay[0], learner.real_data(k_real, 50))
    assert replay[3].shape == (50, 2)
    files = gmm_figures.figures(learner, run, tmp_path / "figs")
    assert {f.name for f in files} == {"gmm_l2.png", "gmm_scatter.png"}


def test_tail_component_weight_metric():
    """true_component_weight assigns fitted mass to the nearest real component."""
    cfg = gmm.GMMConfig(
        n_components=3,
        true_weights=(0.6, 0.3, 0.1),
        true_means=((0.0, 0.0), (8.0, 0.0), (0.0, 8.0)),
        true_covs=(((1.0, 0.0), (0.0, 1.0)),) * 3,
        max_iter=200,
        heldout_size=100,
    )
    learner = gmm.GMMLearner(cfg)
    key = jax.random.key(0)
    data = learner.real_data(key, learner.real_size(4000))
    params = learner.fit(jax.random.key(1), data, learner.init(key))
    m = learner.evaluate(key, params, learner.reference(key))
    np.testing.assert_allclose(m["true_component_weight"], [0.6, 0.3, 0.1], atol=0.03)
    assert float(m["l2"]) < 1e-3 and bool(m["converged"])
    # A fit that lost the rare component gives it no mass.
    lost = gmm.EMResult(
        gmm.GMMParams(
            np.array([0.7, 0.3, 1e-9], np.float32),
            np.array([[0.0, 0], [8, 0], [8, 0.1]], np.float32),
            np.stack([np.eye(2, dtype=np.float32)] * 3),
        ),
        np.float32(0.0),
        np.int32(1),
        np.bool_(True),
    )
    m = learner.evaluate(key, lost, None)
    assert float(m["true_component_weight"][2]) < 1e-6 and "log_lik" not in m


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(true_weights=(0.5, 0.4)), "true_weights"),
        (dict(true_means=((0.0, 0.0), (1.0, 1.0))), "true_means"),
        (dict(true_covs=(((1.0, 2.0), (2.0, 1.0)),)), "positive definite"),
        (dict(true_covs=(((1.0, 0.0), (0.1, 1.0)),)), "symmetric"),
        (dict(n_components=0), "n_components"),
        (dict(max_iter=0), "max_iter"),
        (dict(tol=-1.0), "tol"),
    ],
)
def test_config_validation(bad, match):
    with pytest.raises(ConfigError, match=f"model\\..*{match}|{match}"):
        gmm.GMMConfig(**bad)

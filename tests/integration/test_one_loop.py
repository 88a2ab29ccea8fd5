"""One loop core: `simulate(key=...)` and `collapse-jax run` with the same seed give the same
per-chain numbers; the GMM run takes the learner's batched fit."""

import jax
import numpy as np
import pytest

from collapse_jax import gmm, loop
from collapse_jax.config import ExperimentConfig, GenerationConfig
from collapse_jax.gmm import figures as gmm_figures
from collapse_jax.rundir import reader
from collapse_jax.theory import discrete, gaussian


def _run(tmp_path, model, **gen):
    g = GenerationConfig(record_trials=1000, **gen)
    cfg = ExperimentConfig(name="same", seed=11, model=model, generation=g)
    res = loop.run_generations(cfg, tmp_path)
    return reader.Run(res.run_dir)


@pytest.mark.parametrize(
    "method, policy",
    [("exact", {}), ("sample", dict(policy="mix", alpha=0.5, beta=0.25, gamma=0.25))],
)
def test_gaussian_simulate_equals_cli_chain_by_chain(tmp_path, method, policy):
    R, G, M = 24, 5, 7
    sim = gaussian.simulate(
        jax.random.key(11),
        chains=R,
        generations=G,
        sample_size=M,
        mean=[0.5, -1.0],
        cov=[[1.0, 0.3], [0.3, 2.0]],
        method=method,
        chunk_size=10,
        **policy,
    )
    model = gaussian.GaussianConfig(
        dim=2, mean=(0.5, -1.0), cov=((1.0, 0.3), (0.3, 2.0)), method=method
    )
    run = _run(
        tmp_path,
        model,
        num_generations=G,
        samples_per_generation=M,
        num_trials=R,
        block_size=3,
        **policy,
    )
    # The CLI records fitted means and standard deviations per chain; simulate index g + 1 is
    # generation g's fit.
    np.testing.assert_allclose(run.trial_series("fitted_mean"), sim.mean[1:], rtol=2e-5, atol=1e-6)
    sd = np.sqrt(np.diagonal(sim.cov[1:], axis1=-2, axis2=-1))
    np.testing.assert_allclose(run.trial_series("fitted_std"), sd, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["exact", "sample"])
def test_discrete_simulate_equals_cli_chain_by_chain(tmp_path, method):
    R, G, M = 30, 6, 9
    p0 = (0.5, 0.3, 0.15, 0.05)
    sim = discrete.simulate(
        jax.random.key(11), probs=p0, chains=R, generations=G, sample_size=M, method=method
    )
    model = discrete.DiscreteConfig(family="explicit", probs=p0, method=method)
    run = _run(tmp_path, model, num_generations=G, samples_per_generation=M, num_trials=R)
    # Frequencies of integer counts: identical, not merely close.
    np.testing.assert_array_equal(run.trial_series("probs"), sim.probs[1:])


def test_gmm_run_uses_the_batched_fit(tmp_path, monkeypatch):
    """`collapse-jax run` of a GMM config fits through `GMMLearner.fit_chains` (gmm.fit_em with
    compaction of converged chains), never the per-chain `fit`; the figure replay, which runs
    one chain through the per-chain core, reproduces the run's chain 0 (same keys)."""
    calls = {"chains": 0}
    batched = gmm.GMMLearner.fit_chains

    def counting(self, keys, data, params):
        if isinstance(data, jax.core.Tracer):  # the run's up-front memory check (eval_shape)
            return batched(self, keys, data, params)
        calls["chains"] += 1
        assert data.shape[0] == keys.shape[0] == 40  # the whole chunk at once
        return batched(self, keys, data, params)

    def per_chain(self, *a, **k):
        raise AssertionError("the per-chain fit was used")

    model = gmm.GMMConfig(max_iter=50, heldout_size=50)
    gen = dict(num_generations=3, samples_per_generation=30, num_trials=40, init_from="scratch")
    with monkeypatch.context() as m:
        m.setattr(gmm.GMMLearner, "fit_chains", counting)
        m.setattr(gmm.GMMLearner, "fit", per_chain)
        run = _run(tmp_path / "a", model, **gen)
    assert calls["chains"] == 3
    learner = gmm.GMMLearner(model)
    replay = gmm_figures.replay_chain(learner, 11, [0, 1], run.config.generation)
    k_real, _, k_gens = loop.chain_keys(11, 0)
    np.testing.assert_array_equal(replay[0], learner.real_data(k_real, 30))
    # Refitting chain 0's replayed generation-1 data with the per-chain fit and the loop's key
    # gives the batched run's fit (up to float rounding of batched EM).
    fit_key = loop.generation_keys(k_gens, 1)["fit"]
    p1 = learner.fit(fit_key, replay[1], learner.init(k_real))
    m1 = learner.evaluate(None, p1, None)
    np.testing.assert_allclose(m1["weights"], run.arrays(1)["trials/weights"][0], atol=1e-3)
    np.testing.assert_allclose(m1["cov_trace"], run.arrays(1)["trials/cov_trace"][0], rtol=1e-3)

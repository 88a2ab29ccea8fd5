"""The two run drivers agree: a NumPy learner through the sequential driver (chains one after the
other in Python, every step persisted in work/) and its jittable twin through the jittable
driver (vmapped chains, scanned blocks of generations) give the same numbers chain by chain."""

import numpy as np
import pytest

from collapse_jax import loop
from collapse_jax.config import ExperimentConfig, GenerationConfig
from collapse_jax.rundir import reader
from tests.helpers import ToyConfig, ToyGaussianLearner, ToyNumpyLearner

POLICIES = {
    "replace": {},
    "mix_fixed_real": dict(policy="mix", alpha=0.5, beta=0.25, gamma=0.25, real_data="fixed"),
    "accumulate_subsample_previous": dict(policy="accumulate_subsample", init_from="previous"),
}


# "replace" in the default tier; the other policies in the integration tier (CI's -m '').
@pytest.mark.parametrize(
    "policy", [p if p == "replace" else pytest.param(p, marks=pytest.mark.slow) for p in POLICIES]
)
def test_sequential_driver_equals_jittable_driver_chain_by_chain(tmp_path, policy):
    gen = GenerationConfig(
        num_generations=5, samples_per_generation=16, num_trials=3, block_size=2, **POLICIES[policy]
    )
    cfg = ExperimentConfig(name="toy", seed=3, model=ToyConfig(), generation=gen)
    runs = {}
    for name, cls in (("sequential", ToyNumpyLearner), ("jittable", ToyGaussianLearner)):
        learner = cls(cfg.model)
        assert learner.jittable == (name == "jittable")
        res = loop.run_generations(cfg, tmp_path / name, learner=learner)
        runs[name] = (res.rows, reader.Run(res.run_dir))
    (rows_s, run_s), (rows_j, run_j) = runs["sequential"], runs["jittable"]
    assert [r["sample_size"] for r in rows_s] == [r["sample_size"] for r in rows_j]
    for metric in ("mu", "var"):
        seq, jit = run_s.trial_series(metric), run_j.trial_series(metric)  # [G, R]
        assert seq.shape == jit.shape == (5, 3)
        # float32 either way; NumPy and XLA round sums differently in the last bits
        np.testing.assert_allclose(seq, jit, rtol=2e-5, atol=1e-6, err_msg=metric)
    # and the chains are not all alike (the comparison has teeth)
    assert np.ptp(run_s.trial_series("var")[-1]) > 1e-3


class _NanOnceLearner(ToyNumpyLearner):
    """ToyNumpyLearner whose measure of generation >= 1 is NaN while `broken` is set."""

    broken = True

    def evaluate(self, key, params, reference):
        m = super().evaluate(key, params, reference)
        if _NanOnceLearner.broken and float(params["var"]) != 1.0:
            m["var"] = np.float32(np.nan)
        return m


def test_a_nan_metric_is_not_cached_so_a_resume_measures_again(tmp_path):
    from collapse_jax.rundir import guard

    gen = GenerationConfig(num_generations=3, samples_per_generation=16, num_trials=1)
    cfg = ExperimentConfig(name="toy", seed=3, model=ToyConfig(), generation=gen)
    _NanOnceLearner.broken = True
    with pytest.raises(guard.NonFiniteMetric, match="generation 0: metric var is NaN"):
        loop.run_generations(cfg, tmp_path / "run", learner=_NanOnceLearner(cfg.model))
    _NanOnceLearner.broken = False  # the cause fixed, the run resumed
    res = loop.run_generations(cfg, tmp_path / "run", learner=_NanOnceLearner(cfg.model))
    assert len(res.rows) == 3
    assert np.isfinite(reader.Run(res.run_dir).trial_series("var")).all()

"""Learners declare their optional capabilities by implementing the small protocols of
`collapse_jax.loop.learner`, which the loop tests with `isinstance`."""

import jax.numpy as jnp
import pytest

from collapse_jax import gmm, loop
from collapse_jax.config import LikelihoodFilterConfig
from collapse_jax.kde.learner import KDEConfig, KDELearner
from collapse_jax.linreg.learner import LinearRegressionConfig, LinearRegressionLearner
from collapse_jax.lm.experiment import OPTExperimentConfig, OPTLearner
from collapse_jax.loop import filtering
from collapse_jax.theory.discrete import DiscreteConfig, DiscreteLearner
from collapse_jax.theory.gaussian import GaussianConfig, GaussianLearner
from tests.helpers import ToyConfig, ToyGaussianLearner, ToyNumpyLearner

CAPABILITIES = (
    loop.BatchedFit,
    loop.PresampledNoise,
    loop.Scorable,
    loop.Plannable,
    loop.Knobbed,
)
EXPECTED = {
    GaussianLearner(GaussianConfig()): {loop.PresampledNoise, loop.Scorable, loop.Knobbed},
    DiscreteLearner(DiscreteConfig()): set(),
    gmm.GMMLearner(gmm.GMMConfig()): {loop.BatchedFit, loop.Scorable},
    KDELearner(KDEConfig()): {loop.Scorable, loop.Knobbed},
    LinearRegressionLearner(LinearRegressionConfig()): {loop.Scorable, loop.Knobbed},
    OPTLearner(OPTExperimentConfig()): {loop.Plannable},
    ToyGaussianLearner(ToyConfig()): set(),
    ToyNumpyLearner(ToyConfig()): set(),
}


@pytest.mark.parametrize("learner", list(EXPECTED), ids=lambda x: type(x).__name__)
def test_learners_declare_their_capabilities(learner):
    assert {p for p in CAPABILITIES if isinstance(learner, p)} == EXPECTED[learner]


def test_selection_refuses_a_learner_without_scores():
    learner = ToyGaussianLearner(ToyConfig())
    params = learner.init(None)
    with pytest.raises(ValueError, match="no known real distribution"):
        filtering.sample(learner, LikelihoodFilterConfig(rho=0.5), None, params, 4)
    with pytest.raises(ValueError, match="no 'log_prob'"):
        filtering.sample(
            learner,
            LikelihoodFilterConfig(rho=0.5, scorer="generation0"),
            None,
            params,
            4,
            anchor=params,
        )


def test_take_is_core_data_algebra():
    learner = ToyGaussianLearner(ToyConfig())
    x = jnp.arange(5.0)
    assert learner.take(x, jnp.asarray([4, 0])).tolist() == [4.0, 0.0]

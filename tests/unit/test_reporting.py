"""Reporting lives outside the learners: every model kind's figures and closed-form curves come
from the reporting module its `MODEL_REGISTRY` entry names (`config.reporting_module`), which
`plots` calls; learners neither draw nor know the closed forms, and importing every learner
imports no matplotlib."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from collapse_jax import config as config_lib
from collapse_jax import plots
from collapse_jax.kde.learner import KDEConfig, expected_variance

KINDS = sorted(config_lib.MODEL_REGISTRY)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_a_reporting_module_and_its_learner_no_reporting_hooks(kind):
    reporting = config_lib.reporting_module(kind)
    assert callable(reporting.figures) and callable(reporting.expected_curves)
    learner = config_lib.learner_class(kind)
    assert not hasattr(learner, "figures") and not hasattr(learner, "expected_curves")


def test_a_kind_without_reporting_module_and_an_unknown_kind(monkeypatch):
    monkeypatch.setitem(
        config_lib.MODEL_REGISTRY,
        "toy",
        ("tests.helpers:ToyConfig", "tests.helpers:ToyGaussianLearner"),
    )
    assert config_lib.reporting_module("toy") is None
    with pytest.raises(config_lib.ConfigError, match="unknown model kind 'nope'"):
        config_lib.reporting_module("nope")


def test_learners_import_no_matplotlib():
    code = (
        "import sys\n"
        "from collapse_jax import config\n"
        "for kind in config.MODEL_REGISTRY:\n"
        "    config.learner_class(kind), config.model_config_class(kind)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _kde(policy: str, selection: dict | None = None) -> config_lib.ExperimentConfig:
    generation = {"num_generations": 3, "samples_per_generation": None, "policy": policy}
    if selection is not None:
        generation["likelihood_filter"] = selection
    return config_lib.from_dict(
        {
            "name": "k",
            "model": {"kind": "kde", "dataset": "gaussian", "bandwidth": 0.5, "num_points": 16},
            "generation": generation,
        }
    )


def test_expected_curves_follow_the_policy_mode_and_the_selection():
    """`plots.expected_curves` hands the reporting module the policy's mode and whether the
    run selects, and the module decides which closed forms hold."""
    sizes = np.full(3, 16)
    want = expected_variance(3, num_points=16, bandwidth=0.5)
    np.testing.assert_allclose(plots.expected_curves(_kde("replace"), sizes)["variance"], want)
    assert plots.expected_curves(_kde("accumulate_subsample"), sizes) == {}
    assert plots.expected_curves(_kde("replace", {"rho": 0.5}), sizes) == {}
    kde = config_lib.reporting_module("kde")
    assert kde.expected_curves(KDEConfig(bandwidth=0.5, num_points=16), "mix", sizes) == {}

"""Feng et al.'s verification (`kind: verification`): the closed forms of
collapse_jax/verification/learner.py against Monte Carlo over 10^4 vmapped chains.

Every comparison is a z-test at 4.5 standard errors of the Monte Carlo mean (two-sided
false-failure probability 6.8e-6 each; 16 comparisons in this file: < 1.1e-4 together), with
fixed seeds."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_jax import config as config_lib
from collapse_jax.verification import figures
from collapse_jax.verification.learner import (
    VerificationConfig,
    VerificationLearner,
    expected_error_noisy,
    keep_probability,
    population_step,
    selected_error,
)

CHAINS = 10_000


def _one_generation(cfg: VerificationConfig, num: int, seed: int, w=None) -> dict:
    learner = VerificationLearner(cfg)
    params = learner.init(jax.random.key(0))
    if w is not None:
        params = params._replace(w=jnp.asarray(w, jnp.float32))

    def chain(k):
        return learner.evaluate(k, learner.fit(k, learner.sample(k, params, num), params), None)

    out = jax.jit(jax.vmap(chain))(jax.random.split(jax.random.key(seed), CHAINS))
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def _close(samples: np.ndarray, want: float, what: str) -> None:
    se = samples.std(ddof=1) / math.sqrt(samples.size)
    assert abs(samples.mean() - want) <= 4.5 * se + 1e-12, (what, samples.mean(), want, se)


@pytest.mark.parametrize(
    "flip, q_correct, q_wrong, num",
    [(0.6, 1.0, 0.7, 200), (0.6, 1.0, 0.2, 200), (0.3, 0.8, 0.5, 20), (0.55, 0.9, 0.25, 60)],
)
def test_selected_label_error_and_test_error_match_the_closed_forms(flip, q_correct, q_wrong, num):
    cfg = VerificationConfig(flip=flip, q_correct=q_correct, q_wrong=q_wrong)
    got = _one_generation(cfg, num, seed=int(100 * flip + 10 * q_wrong))
    p_sel = selected_error(flip, q_correct, q_wrong)
    p_keep = keep_probability(flip, q_correct, q_wrong)
    _close(got["kept_fraction"], p_keep, "kept_fraction")
    _close(got["label_error"], p_sel * (1 - (1 - p_keep) ** num), "label_error")
    _close(got["test_error"], expected_error_noisy(num, 1.0, p_sel, p_keep), "test_error")


def test_the_phase_transition_sits_at_half_the_selected_error():
    """Large samples: p' < 1/2 reaches the Bayes error, p' > 1/2 the mirror image."""
    lo, hi = math.erfc(1 / math.sqrt(2)) / 2, 1 - math.erfc(1 / math.sqrt(2)) / 2
    assert expected_error_noisy(4000, 1.0, 0.4, 1.0) == pytest.approx(lo, abs=1e-6)
    assert expected_error_noisy(4000, 1.0, 0.6, 1.0) == pytest.approx(hi, abs=1e-6)
    assert expected_error_noisy(4001, 1.0, 0.5, 1.0) == pytest.approx(0.5, abs=1e-6)
    # p' crosses 1/2 exactly where p (1 - q_wrong) = (1 - p) q_correct
    assert selected_error(0.6, 1.0, 1 / 3) == pytest.approx(0.5)


def test_the_self_labelled_moment_matches_formula_three():
    """`labeller: model`: E[y' x 1{kept}] = P_K (1 - 2 p') mu + (q_correct + 1 - q_wrong)
    phi(t) u, with e = Phi(-t) the current classifier's error, tested per coordinate in d = 2
    on one point per chain (the moment is exact for every sample)."""
    cfg = VerificationConfig(dim=2, labeller="model", q_correct=0.9, q_wrong=0.6)
    theta = 1.0
    u = np.array([math.cos(theta), math.sin(theta)])
    learner = VerificationLearner(cfg)
    params = learner.init(jax.random.key(0))._replace(w=jnp.asarray(u, jnp.float32))

    def chain(k):
        d = learner.sample(k, params, 1)
        return (d.kept * d.y)[:, None] * d.x

    got = np.asarray(
        jax.jit(jax.vmap(chain))(jax.random.split(jax.random.key(7), CHAINS)), np.float64
    )[:, 0, :]
    t = u[0]
    e = 0.5 * math.erfc(t / math.sqrt(2))
    a = keep_probability(e, 0.9, 0.6) * (1 - 2 * selected_error(e, 0.9, 0.6))
    b = (0.9 + 1 - 0.6) * math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    want = a * np.array([1.0, 0.0]) + b * u
    for i in range(2):
        _close(got[:, i], want[i], f"coordinate {i}")


def test_population_step_turns_towards_mu_only_below_half():
    good = VerificationConfig(labeller="model", q_correct=1.0, q_wrong=0.9)
    assert population_step(1.2, good) < 1.2
    # A verifier that keeps wrong labels and discards right ones pushes p' above 1/2.
    bad = VerificationConfig(labeller="model", q_correct=0.1, q_wrong=0.0)
    assert population_step(1.2, bad) > 1.2


def test_expected_curves_only_where_the_closed_form_holds():
    cfg = VerificationConfig(flip=0.6, q_correct=1.0, q_wrong=0.7)
    curves = figures.expected_curves(cfg, "replace", np.array([50, 50, 50]))
    assert set(curves) == {"label_error", "kept_fraction", "test_error"}
    assert curves["label_error"][0] == 0 and curves["kept_fraction"][0] == 1
    assert figures.expected_curves(cfg, "mix", np.array([50, 50])) == {}
    own = VerificationConfig(labeller="model")
    assert figures.expected_curves(own, "replace", np.array([50, 50])) == {}


def test_bad_verifier_settings_are_refused():
    with pytest.raises(config_lib.ConfigError, match="model.q_wrong"):
        VerificationConfig(q_wrong=1.5)
    with pytest.raises(config_lib.ConfigError, match="discards every point"):
        VerificationConfig(q_correct=0.0, q_wrong=1.0)

"""The closed forms of the non-replace policies (`analytic.gaussian_policy_moments`,
`analytic.discrete_policy_gini_simpson`; derivation in analytic.py) against Monte Carlo.

10^4 chains per case, 8 generations, every generation checked: |chain mean - closed form| <=
4.5 standard errors. The chain means of 10^4 chains are close to normal, so each comparison
fails by chance with probability ~6.8e-6; the 7 cases make at most 8 x 2 comparisons each (112
in all), so a false failure of this file has probability < 1e-3 (Bonferroni).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from collapse_jax import config as config_lib
from collapse_jax import loop
from collapse_jax.theory import analytic, discrete, figures, gaussian

Z = 4.5
CHAINS = 10_000
GENS = 8
M = 10


def _counts(mode: str, shares=(1.0, 0.0, 0.0)) -> list:
    sched = loop.Schedule.build(
        [M] * GENS, mode=mode, alpha=shares[0], beta=shares[1], gamma=shares[2]
    )
    return [sched.counts(g) for g in range(GENS)]


def _check(x: np.ndarray, want: np.ndarray, what: str) -> None:
    """x: [G, chains] per-chain values; want: [G] closed-form means."""
    x = np.asarray(x, np.float64)
    se = x.std(axis=1, ddof=1) / np.sqrt(x.shape[1])
    err = np.abs(x.mean(axis=1) - want)
    assert np.all(err <= Z * se), (what, err / se, x.mean(axis=1), want)


GAUSSIAN_CASES = [  # (mode, shares, dim, estimator, sampling bias)
    ("accumulate", (1.0, 0.0, 0.0), 1, "unbiased", 1.0),
    ("accumulate_subsample", (1.0, 0.0, 0.0), 1, "unbiased", 1.0),
    ("mix", (0.5, 0.3, 0.2), 1, "unbiased", 1.0),  # previous data and fresh real data
    ("mix", (0.6, 0.0, 0.4), 2, "mle", 0.8),  # MAD's fresh-data loop, with a sampling bias
]


@pytest.mark.parametrize("mode,shares,dim,estimator,lam", GAUSSIAN_CASES)
def test_gaussian_policy_closed_forms_match_monte_carlo(mode, shares, dim, estimator, lam):
    sim = gaussian.simulate(
        jax.random.key(23),
        chains=CHAINS,
        generations=GENS,
        sample_size=M,
        cov=np.eye(dim) if dim > 1 else 1.0,
        estimator=estimator,
        policy=mode,
        alpha=shares[0],
        beta=shares[1],
        gamma=shares[2],
        sampling_bias=lam,
    )
    mom = analytic.gaussian_policy_moments(mode, _counts(mode, shares), estimator, lam)
    trace = np.trace(sim.cov[1:], axis1=-2, axis2=-1)  # [G, chains]
    dist2 = np.sum(np.square(sim.mean[1:]), axis=-1)
    _check(trace, dim * mom["cov"], f"{mode} trace")
    _check(dist2, dim * mom["mean"], f"{mode} mean_dist2")


@pytest.mark.parametrize(
    "mode,shares",
    [
        ("accumulate", (1.0, 0.0, 0.0)),
        ("accumulate_subsample", (1.0, 0.0, 0.0)),
        ("mix", (0.5, 0.3, 0.2)),
    ],
)
def test_discrete_gini_simpson_closed_forms_match_monte_carlo(mode, shares):
    p0 = np.array([0.5, 0.25, 0.15, 0.1])
    sim = discrete.simulate(
        jax.random.key(23),
        probs=p0,
        chains=CHAINS,
        generations=GENS,
        sample_size=M,
        policy=mode,
        alpha=shares[0],
        beta=shares[1],
        gamma=shares[2],
    )
    gs = 1.0 - np.sum(np.square(np.asarray(sim.probs[1:], np.float64)), axis=-1)
    _check(gs, analytic.discrete_policy_gini_simpson(p0, mode, _counts(mode, shares)), mode)


def test_replace_is_the_special_case_and_figures_read_the_rows():
    """The general recursion reduces to the replace closed forms; `expected_curves` turns the
    summary rows' sizes (cumulative under accumulate) into the schedule's counts, and draws no
    curve where the run breaks an assumption (likelihood filtering, a fixed real set)."""
    cnt = _counts("replace")
    for est in ("unbiased", "mle"):
        mom = analytic.gaussian_policy_moments("replace", cnt, est, 0.9)
        want = analytic.gaussian_expectations([M] * GENS, np.zeros(1), np.eye(1), est, 0.9)
        np.testing.assert_allclose(mom["cov"], want["trace_cov"])
        np.testing.assert_allclose(mom["mean"], want["mean_dist2"])
    p0 = np.array([0.5, 0.3, 0.2])
    np.testing.assert_allclose(
        analytic.discrete_policy_gini_simpson(p0, "replace", cnt),
        analytic.discrete_expectations(p0, [M] * GENS)["gini_simpson"],
    )
    # MLE under accumulate: E sigma_n^2 = sigma_0^2 (1 - 1/M) prod_{k=2}^{n+1} (1 - 1/(M k^2))
    n = np.arange(1, GENS + 1)
    prod = (1 - 1 / M) * np.cumprod(np.r_[1.0, 1 - 1 / (M * n[1:] ** 2)])
    mom = analytic.gaussian_policy_moments("accumulate", _counts("accumulate"), "mle")
    np.testing.assert_allclose(mom["cov"], prod)

    cfg = gaussian.GaussianConfig(dim=1)
    gen = config_lib.GenerationConfig(policy="accumulate", samples_per_generation=M)
    rows_sizes = M * n  # the rows record the pool's size
    got = figures.expected_curves(cfg, "accumulate", rows_sizes, generation=gen)
    want = analytic.gaussian_policy_moments("accumulate", _counts("accumulate"), "unbiased")
    np.testing.assert_allclose(got["var"], want["cov"])
    assert figures.expected_curves(cfg, "replace", [M] * GENS, filtered=True) == {}
    fixed = config_lib.GenerationConfig(
        policy="mix", alpha=0.8, gamma=0.2, real_data="fixed", samples_per_generation=M
    )
    assert figures.expected_curves(cfg, "mix", [M] * GENS, generation=fixed) == {}

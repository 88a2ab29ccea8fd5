"""The memorising (Hutter) learner on Zipf data (`theory.tails`) against its closed forms
(`theory.tails_laws`, derived there).

Monte-Carlo checks: 10^4 chains, |estimate - closed form| < Z * SE with Z = 4.5 (false-failure
probability 6.8e-6 per check, two-sided normal; 11 checks: below 1e-4 for the file). The
chi-square check of the sampler rejects at p < 1e-4. Keys are fixed: runs are deterministic.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from collapse_jax import config as config_lib
from collapse_jax import plots
from collapse_jax.config import ConfigError
from collapse_jax.theory import tails, tails_figures, tails_laws

Z = 4.5
R = 10_000


def _check_mean(x: np.ndarray, expected: float, what: str) -> None:
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert abs(x.mean() - expected) < Z * se, (
        f"{what}: {x.mean():.6g} vs {expected:.6g} (se {se:.2g})"
    )


def test_tables_draw_the_zipf_law_to_1e_4_even_in_the_tail():
    # The float32 two-level tables: every token's probability, the last of 10^5 included.
    for beta, n, k in [(1.5, 100_000, None), (3.0, 100_000, None), (1.2, 100_000, 1000)]:
        p = tails.zipf_probs(beta, n, k)
        table = tails.ZipfTable.of(p).probs()  # the support (k tokens with a cut), padded
        got = np.zeros(n)
        got[: min(n, table.size)] = table[:n]
        assert np.all(table[n:] == 0)
        pos = p > 0
        assert np.all(got[~pos] == 0)
        assert np.max(np.abs(got[pos] / p[pos] - 1)) < 1e-4, (beta, k)


def test_real_draws_are_zipf_distributed():
    learner = tails.TailsLearner(tails.TailsConfig(exponent=1.3, num_tokens=40))
    draws = np.asarray(learner.draw_real(jax.random.key(3), 400_000))
    counts = np.bincount(draws, minlength=40)
    assert counts.size == 40
    p = scipy.stats.chisquare(counts, 400_000 * learner.config.probs_array()).pvalue
    assert p > 1e-4, f"chi-square p-value {p:.2g}"


def test_tail_tokens_are_drawn_with_their_probability():
    # Tokens 10^4..10^5 of Zipf(1.5): a mass of 2.5e-3 split over 9e4 tokens (each below 1e-6,
    # where a 24-bit uniform's step 6e-8 would be a large fraction of a token's probability).
    learner = tails.TailsLearner(tails.TailsConfig(exponent=1.5, num_tokens=100_000))
    draws = np.asarray(learner.draw_real(jax.random.key(4), 4_000_000))
    p = learner.config.probs_array()
    for lo, hi in [(10_000, 100_000), (50_000, 100_000), (99_000, 100_000)]:
        mass = p[lo:hi].sum()
        hits = np.count_nonzero((draws >= lo) & (draws < hi))
        se = math.sqrt(draws.size * mass * (1 - mass))
        assert abs(hits - draws.size * mass) < Z * se, (lo, hi, hits, draws.size * mass)


def test_clean_and_cut_errors_match_the_closed_form_with_real_data_mixed_in():
    # Generation 0: clean law on T = 300 tokens; generation 1: 240 tokens of the top-50 cut of
    # the truth and 60 fresh real tokens (pi = 0.2).
    beta, n, t, k, pi = 1.5, 2000, 300, 50, 0.2
    err = tails.simulate(
        jax.random.key(5),
        chains=R,
        generations=2,
        sample_size=t,
        exponent=beta,
        num_tokens=n,
        top_k=k,
        real_fraction=pi,
    )
    p = tails.zipf_probs(beta, n)
    _check_mean(err[0], tails_laws.expected_error(p, None, t, 0), "clean")
    q = tails.zipf_probs(beta, n, k)
    _check_mean(err[1], tails_laws.expected_error(p, q, 60, 240), "cut + 20 % real")


def test_the_error_variance_is_the_multinomial_one_not_independent_presences():
    # Var of the test error over chains against (2); per-token independent presences would give
    # `independent_variance`, 34 % larger here (about 24 standard errors away).
    beta, n, t = 1.2, 50, 30
    err = tails.simulate(
        jax.random.key(6), chains=R, generations=1, sample_size=t, exponent=beta, num_tokens=n
    )[0].astype(np.float64)
    p = tails.zipf_probs(beta, n)
    want = tails_laws.error_variance(p, None, t, 0)
    d = err - err.mean()
    var = np.mean(d**2) * R / (R - 1)
    se = math.sqrt((np.mean(d**4) - np.mean(d**2) ** 2) / R)
    assert abs(var - want) < Z * se, f"variance {var:.5g} vs {want:.5g} (se {se:.2g})"
    assert abs(tails_laws.independent_variance(p, None, t, 0) - want) > 3 * Z * se


def test_iterated_fits_follow_the_wright_fisher_closed_form():
    beta, n, sizes = 1.5, 2000, [150] * 5
    err = tails.simulate(
        jax.random.key(7),
        chains=R,
        generations=len(sizes),
        sample_size=sizes,
        exponent=beta,
        num_tokens=n,
        generator="fit",
    )
    want = tails_laws.iterated_fit_errors(tails.zipf_probs(beta, n), sizes)
    for g in (1, 2, 4):
        _check_mean(err[g], want[g], f"generation {g}")


def test_finite_sample_generator_closed_forms_agree():
    # Two derivations of one generation on a T0-token fit: the binomial sum and Wright-Fisher.
    p = tails.zipf_probs(1.5, 3000)
    for t0, t in [(100, 400), (500, 50)]:
        a = tails_laws.fit_generator_error(p, t0, 0, t)
        b = tails_laws.iterated_fit_errors(p, [t0, t])[1]
        assert a == pytest.approx(b, rel=1e-10)
    # T -> infinity: the learner knows the fit's support, whose missing mass is E_clean(T0).
    big = tails_laws.fit_generator_error(p, 100, 0, 10**7)
    assert big == pytest.approx(tails_laws.expected_error(p, None, 100, 0), rel=1e-9)


def test_top_k_fit_generator_draws_only_the_fits_k_most_frequent_tokens():
    cfg = tails.TailsConfig(exponent=1.5, num_tokens=10, generator="fit", top_k=2)
    learner = tails.TailsLearner(cfg)
    counts = jnp.array([0, 5, 1, 5, 3, 0, 0, 0, 0, 7], jnp.int32)  # top 2: tokens 9 and 1 (tie)
    draws = np.asarray(learner.sample(jax.random.key(8), counts, 120_000))
    freq = np.bincount(draws, minlength=10) / draws.size
    assert set(np.nonzero(freq)[0]) == {1, 9}
    assert abs(freq[9] - 7 / 12) < Z * math.sqrt(7 / 12 * 5 / 12 / draws.size)


def test_asymptotic_constants():
    # (3): E_clean(T) T^(1 - 1/beta) -> Gamma(1 - 1/beta) / (beta zeta^(1/beta)) and the plateau
    # sum_{i>k} p_i -> k^-(beta-1) / ((beta-1) zeta). N = 10^7 leaves a negligible tail for
    # beta >= 2 (for beta = 1.5 the missing (N/k)^(1-beta) is 1 % at k = 1000: not checked here).
    assert tails_laws.clean_constant(2.0) == pytest.approx(
        math.gamma(0.5) / (2 * math.sqrt(math.pi**2 / 6)), rel=1e-9
    )
    k = 1000
    for beta in (2.0, 3.0):
        p = tails.zipf_probs(beta, 10_000_000)
        c, e = tails_laws.clean_constant(beta), 1 - 1 / beta
        for t in (10**4, 10**6):
            assert tails_laws.expected_error(p, None, t, 0) * t**e / c == pytest.approx(1, abs=1e-3)
        d = tails_laws.plateau_constant(beta) * k ** (1 - beta)
        assert p[k:].sum() == pytest.approx(d, rel=2e-3)
        # The cut's plateau: with no real data the error tends to the mass the cut removed.
        q = tails.zipf_probs(beta, 10_000_000, k)
        assert tails_laws.expected_error(p, q, 0, 10**13) == pytest.approx(p[k:].sum(), rel=1e-9)


def test_real_data_lift_the_plateau_towards_the_clean_law():
    # With n_r = pi T real tokens the error lies between the clean law at T and at pi T, and far
    # above the plateau it has reached the clean law at pi T ("grokking").
    p = tails.zipf_probs(1.5, 100_000)
    q = tails.zipf_probs(1.5, 100_000, 10)
    for t in (10**3, 10**5, 10**7):
        mixed = tails_laws.expected_error(p, q, t // 10, t - t // 10)
        assert tails_laws.expected_error(p, None, t, 0) <= mixed
        assert mixed <= tails_laws.expected_error(p, None, t // 10, 0)
    assert mixed == pytest.approx(tails_laws.expected_error(p, None, t // 10, 0), rel=1e-3)
    assert mixed < 0.1 * p[10:].sum()


def test_expected_curves_only_where_a_closed_form_holds():
    def cfg(model, **gen):
        return config_lib.from_dict(
            {
                "name": "t",
                "model": {"kind": "tails", "num_tokens": 100, **model},
                "generation": {"num_generations": 3, "samples_per_generation": 20, **gen},
            }
        )

    sizes = np.array([20, 20, 20])
    assert "test_error" in plots.expected_curves(cfg({"top_k": 5}), sizes)
    assert "test_error" in plots.expected_curves(cfg({"generator": "fit"}), sizes)
    mix = {"policy": "mix", "alpha": 0.9, "gamma": 0.1}
    assert "test_error" in plots.expected_curves(cfg({"top_k": 5}, **mix), sizes)
    assert plots.expected_curves(cfg({"generator": "fit", "top_k": 5}), sizes) == {}
    assert plots.expected_curves(cfg({}, policy="accumulate"), np.array([20, 40, 60])) == {}
    assert config_lib.reporting_module("tails") is tails_figures


@pytest.mark.parametrize(
    "model, message",
    [
        ({"exponent": 1.0}, "model.exponent: must be > 1"),
        ({"num_tokens": 1}, "model.num_tokens"),
        ({"generator": "model"}, "model.generator"),
        ({"top_k": 0}, "model.top_k: must lie in [1, 100]"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(model, message):
    with pytest.raises(ConfigError, match=None) as e:
        config_lib.from_dict({"name": "t", "model": {"kind": "tails", "num_tokens": 100, **model}})
    assert message in str(e.value) and "\n" not in str(e.value)

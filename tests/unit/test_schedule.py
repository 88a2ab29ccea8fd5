"""The loop's Schedule: built once from a GenerationConfig (or from keyword arguments for
`simulate`), its static Policy the compile key, its counts the values."""

import pytest

from collapse_jax import loop
from collapse_jax.config import ConfigError, GenerationConfig, SelectionConfig


def test_schedule_of_a_config_counts_and_fitted_sizes():
    gcfg = GenerationConfig(
        num_generations=4,
        samples_per_generation=10,
        sample_growth=1.0,
        policy="mix",
        alpha=0.5,
        beta=0.3,
        gamma=0.2,
    )
    s = loop.Schedule.of(gcfg, real_size=7)
    assert s.sizes == (7, 20, 30, 40) and s.num_generations == 4
    assert s.counts(0) == 7
    for g in range(1, 4):
        assert s.counts(g) == gcfg.shares(gcfg.sample_size(g, 7))
    assert [s.fitted_size(g) for g in range(4)] == [7, 20, 30, 40]
    acc = loop.Schedule.of(GenerationConfig(num_generations=3, policy="accumulate"), 5)
    assert [acc.fitted_size(g) for g in range(3)] == [5, 105, 205]
    assert acc.counts(2) == (100, 0, 0)
    assert loop.Schedule.of(gcfg, 7, num_generations=0).sizes == ()


def test_policy_keeps_only_what_shapes_the_program():
    a = loop.Policy.of(GenerationConfig(policy="mix", alpha=0.5, beta=0.3, gamma=0.2))
    b = loop.Policy.of(GenerationConfig(policy="mix", alpha=0.6, beta=0.2, gamma=0.2))
    assert a == b and hash(a) == hash(b)  # shares are values, not part of the compile key
    assert (a.mode, a.previous, a.real) == ("mix", True, True)
    no_real = loop.Policy.of(GenerationConfig(policy="mix", alpha=0.7, beta=0.3))
    assert no_real != a and not no_real.real and no_real.keeps_data
    fixed = loop.Policy.of(GenerationConfig(policy="mix", alpha=0.8, gamma=0.2, real_data="fixed"))
    assert fixed.keeps_real and not fixed.keeps_data
    # beta given with accumulate is ignored, as by the policy itself
    acc = loop.Policy.of(GenerationConfig(policy="accumulate", beta=0.5))
    assert not acc.previous and acc.keeps_data
    anchored = loop.Policy.of(
        GenerationConfig(selection=SelectionConfig(rho=0.5, scorer="generation0"))
    )
    assert anchored.selects and anchored.keeps_anchor


def test_schedule_build_checks_the_policy_as_the_config_does():
    s = loop.Schedule.build([4, 5, 6], mode="mix", alpha=0.5, beta=0.5)
    assert s.sizes == (4, 5, 6) and s.counts(2) == (3, 3, 0)
    with pytest.raises(ConfigError, match="generation.alpha/beta/gamma"):
        loop.Schedule.build([4, 5], mode="mix", alpha=0.5, beta=0.2)
    with pytest.raises(ConfigError, match="generation.policy"):
        loop.Schedule.build([4, 5], mode="replace", gamma=0.5)
    with pytest.raises(ConfigError, match="generation.policy"):
        loop.Schedule.build([4, 5], mode="keep")

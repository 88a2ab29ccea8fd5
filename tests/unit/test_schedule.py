"""The loop's Schedule: built once from a GenerationConfig (or from keyword arguments for
`simulate`), its static Policy the compile key, its counts the values."""

import dataclasses

import pytest

from collapse_jax import config as config_lib
from collapse_jax import loop
from collapse_jax.config import (
    ConfigError,
    ExperimentConfig,
    GenerationConfig,
    LikelihoodFilterConfig,
    MeshConfig,
)
from collapse_jax.theory.gaussian import GaussianConfig


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
        GenerationConfig(likelihood_filter=LikelihoodFilterConfig(rho=0.5, scorer="generation0"))
    )
    assert anchored.filters and anchored.keeps_anchor


def test_schedule_build_checks_the_policy_as_the_config_does():
    s = loop.Schedule.build([4, 5, 6], mode="mix", alpha=0.5, beta=0.5)
    assert s.sizes == (4, 5, 6) and s.counts(2) == (3, 3, 0)
    with pytest.raises(ConfigError, match="generation.alpha/beta/gamma"):
        loop.Schedule.build([4, 5], mode="mix", alpha=0.5, beta=0.2)
    with pytest.raises(ConfigError, match="generation.policy"):
        loop.Schedule.build([4, 5], mode="replace", gamma=0.5)
    with pytest.raises(ConfigError, match="generation.policy"):
        loop.Schedule.build([4, 5], mode="keep")


def _gaussian_run(method: str, **generation) -> tuple[ExperimentConfig, loop.AbstractLearner]:
    mix = {"policy": "mix", "alpha": 0.5, "beta": 0.3, "gamma": 0.2}
    cfg = ExperimentConfig(
        name="k",
        model=GaussianConfig(method=method),
        generation=GenerationConfig(**{**mix, **generation}),
    )
    return cfg, loop.make_learner(cfg)


# A value per field that differs from the base run's; the shares move in pairs (they sum to 1).
OTHER_VALUES = {
    "num_generations": 3,
    "samples_per_generation": 40,
    "sample_growth": 1.0,
    "sample_schedule": (30,) * 10,
    "policy": {"policy": "accumulate", "alpha": 1.0, "beta": 0.0, "gamma": 0.0},
    "real_data": "fixed",
    "alpha": {"alpha": 0.6, "beta": 0.2},
    "beta": {"beta": 0.2, "gamma": 0.3},
    "gamma": {"gamma": 0.1, "alpha": 0.6},
    "num_trials": 4,
    "chunk_size": 2,
    "block_size": 3,
    "init_from": "previous",
    "record_trials": 1,
    "keep_params": "all",
    "likelihood_filter": LikelihoodFilterConfig(rho=0.5),
}


def test_every_generation_field_declares_its_batch_role():
    """`batch_key` reads the roles, so a new field without one fails here (and in batch_key)."""
    roles = config_lib.batch_roles(GenerationConfig)
    assert set(roles.values()) <= set(config_lib.BATCH_ROLES)
    assert set(OTHER_VALUES) == set(roles), "give the new field a value in OTHER_VALUES"
    planted = dataclasses.make_dataclass(
        "Planted", [("new_field", int, dataclasses.field(default=0))]
    )
    with pytest.raises(TypeError, match="Planted fields without a batch role.*new_field"):
        config_lib.batch_roles(planted)
    with pytest.raises(ValueError, match="batch role must be one of"):
        config_lib.batch_role("traced", 0)


@pytest.mark.parametrize("method", ["sample", "exact"])
def test_batch_key_follows_the_declared_roles(method):
    """Runs differing in one generation field share a batch exactly when the field is not
    compiled in: "policy" fields only through the `Policy` (replace -> accumulate changes it, a
    share's value does not), "size" fields only for learners with static sample sizes (the
    sample method); the seed and the traced knob (sampling_bias) never."""
    base_cfg, learner = _gaussian_run(method)
    base = loop.batch_key(base_cfg, learner)
    roles = config_lib.batch_roles(GenerationConfig)
    for name, value in OTHER_VALUES.items():
        cfg = _gaussian_run(method, **(value if isinstance(value, dict) else {name: value}))[0]
        policy_changes = loop.Policy.of(cfg.generation) != loop.Policy.of(base_cfg.generation)
        if roles[name] != "compiled":  # the Policy reads every "policy" field, no "size" one
            assert policy_changes == (roles[name] == "policy"), name
        if roles[name] == "compiled":
            same = False
        elif roles[name] == "policy":
            same = False  # the Policy changed
        else:
            same = not learner.static_sample_size
        assert (loop.batch_key(cfg, learner) == base) == same, (name, roles[name])
    other = dataclasses.replace(
        base_cfg, seed=7, model=dataclasses.replace(base_cfg.model, sampling_bias=0.5)
    )
    assert loop.batch_key(other, learner) == base
    mesh = dataclasses.replace(base_cfg, mesh=MeshConfig())
    assert loop.batch_key(mesh, learner) is None

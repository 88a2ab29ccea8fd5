"""Config loading, overrides and validation."""

import pathlib

import pytest

from collapse_jax import config as config_lib
from collapse_jax import loop, plots
from collapse_jax.config import ConfigError, GenerationConfig

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def toy_kind(monkeypatch):
    monkeypatch.setitem(
        config_lib.MODEL_REGISTRY,
        "toy",
        ("tests.helpers:ToyConfig", "tests.helpers:ToyGaussianLearner"),
    )


def _raw():
    return {
        "name": "t",
        "seed": 3,
        "model": {"kind": "toy", "mean": 1.0},
        "generation": {"num_generations": 4, "samples_per_generation": 10},
    }


def test_build_and_roundtrip(toy_kind, tmp_path):
    cfg = config_lib.from_dict(_raw())
    assert cfg.model.mean == 1.0 and cfg.generation.num_generations == 4 and cfg.seed == 3
    p = tmp_path / "c.yaml"
    p.write_text(config_lib.dump(cfg))
    assert config_lib.load_config(p) == cfg


def test_overrides_are_coerced(toy_kind):
    cfg = config_lib.from_dict(
        _raw(), ["generation.num_generations=7", "model.std=2", "generation.policy=accumulate"]
    )
    assert cfg.generation.num_generations == 7
    assert cfg.model.std == 2.0 and isinstance(cfg.model.std, float)
    assert cfg.generation.policy == "accumulate"


def test_override_twice_is_an_error(toy_kind):
    with pytest.raises(ConfigError, match="overridden twice"):
        config_lib.from_dict(_raw(), ["seed=1", "seed=2"])


def test_unknown_key_names_key_and_valid_ones(toy_kind):
    raw = _raw()
    raw["generation"]["num_generatons"] = 3
    with pytest.raises(ConfigError) as e:
        config_lib.from_dict(raw)
    assert "generation.num_generatons" in str(e.value) and "num_generations" in str(e.value)
    with pytest.raises(ConfigError, match="model.colour"):
        config_lib.from_dict(_raw(), ["model.colour=3"])


def test_unknown_kind():
    raw = _raw()
    raw["model"]["kind"] = "nope"
    with pytest.raises(ConfigError, match="unknown model kind 'nope'"):
        config_lib.from_dict(raw)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["generation.policy=mix", "generation.alpha=0.5", "generation.gamma=0.1"], "sum to 1"),
        (["generation.samples_per_generation=1"], ">= 2"),
        (["generation.gamma=-0.1"], r"\[0, 1\]"),
        (["generation.num_generations=0"], ">= 1"),
        (["generation.num_trials=2.5"], "integer"),
        (["generation.policy=merge"], "not one of"),
        (["seed=abc"], "integer"),
        (["name=a/b"], "plain file name"),
    ],
)
def test_validation_errors(toy_kind, overrides, match):
    with pytest.raises(ConfigError, match=match):
        config_lib.from_dict(_raw(), overrides)


def test_shares_and_schedule():
    g = GenerationConfig(policy="mix", alpha=0.9, beta=0.0, gamma=0.1)
    assert g.shares(100) == (90, 0, 10)
    assert sum(g.shares(7)) == 7
    g = GenerationConfig(policy="mix", alpha=1 / 3, beta=1 / 3, gamma=1 / 3)
    assert sorted(g.shares(10)) == [3, 3, 4]
    g = GenerationConfig(samples_per_generation=10, sample_growth=2.0)
    assert [g.sample_size(n, 0) for n in range(4)] == [10, 40, 90, 160]
    g = GenerationConfig(num_generations=2, sample_schedule=(5, 6, 7))
    assert g.sample_size(1, 0) == 6
    with pytest.raises(ConfigError, match="sample_schedule"):
        GenerationConfig(num_generations=4, sample_schedule=(5, 6))


def test_env_expansion(toy_kind, monkeypatch):
    monkeypatch.setenv("CJ_TEST_NAME", "fromenv")
    raw = _raw()
    raw["name"] = "${CJ_TEST_NAME}"
    assert config_lib.from_dict(raw).name == "fromenv"
    raw["name"] = "${CJ_UNSET_VAR:-fallback}"
    assert config_lib.from_dict(raw).name == "fallback"
    raw["name"] = "${CJ_UNSET_VAR}"
    with pytest.raises(ConfigError, match="CJ_UNSET_VAR"):
        config_lib.from_dict(raw)


def test_suite_overrides_apply_to_every_experiment(toy_kind):
    raw = {"name": "s", "experiments": [_raw(), {**_raw(), "name": "u"}]}
    cfg = config_lib.from_dict(raw, ["generation.num_generations=2"])
    assert [e.generation.num_generations for e in cfg.experiments] == [2, 2]


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="config file not found"):
        config_lib.load_config("/nonexistent/x.yaml")


SHIPPED = sorted((REPO / "collapse_jax" / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = config_lib.load_config(path)
    exps = cfg.experiments if isinstance(cfg, config_lib.SuiteConfig) else (cfg,)
    for e in exps:
        assert config_lib.learner_class(e.kind) is not None


def test_kinds_with_a_real_data_set_default_to_its_size():
    """Issue 23 item 8: a linear-regression or KDE config that sets no sample size trains every
    generation on as many points as its real data set (not the class default 100, which would
    relabel 100 rows of a 50-row design each generation, or fit 200 real points at generation 0
    and 100 afterwards); kinds without one keep 100; an explicit size is kept, and the linear
    model's closed form is then not drawn (it assumes the whole design relabelled once)."""
    lin = {"kind": "linear_regression", "dim": 3, "num_points": 50, "test_points": 4}
    kde = {"kind": "kde", "dataset": "gaussian", "num_points": 200}
    for model, n in ((lin, 50), (kde, 200)):
        for gen in ({}, {"num_generations": 3}):
            raw = {"name": "x", "model": model, **({"generation": gen} if gen else {})}
            cfg = config_lib.from_dict(raw)
            assert cfg.generation.samples_per_generation is None
            learner = loop.make_learner(cfg)
            sched = loop.Schedule.of(cfg.generation, learner.real_size(None))
            assert set(sched.sizes) == {n}
    gauss = config_lib.from_dict({"name": "x", "model": {"kind": "gaussian"}})
    assert gauss.generation.samples_per_generation == 100
    explicit = config_lib.from_dict(
        {"name": "x", "model": lin, "generation": {"samples_per_generation": 100}}
    )
    assert explicit.generation.samples_per_generation == 100
    assert plots.expected_curves(explicit, [50, 100, 100]) == {}
    assert "param_error" in plots.expected_curves(explicit, [50, 50, 50])


def test_shipped_configs_by_name_old_path_or_file(tmp_path, monkeypatch):
    """`find_config`: names relative to the package's configs/ (with or without .yaml), the old
    repository paths `configs/...` from any directory, and a file in the working directory first."""
    root = config_lib.shipped_config_dir()
    assert root == REPO / "collapse_jax" / "configs" and SHIPPED  # this checkout's package
    assert not (REPO / "configs").exists(), "configs live in collapse_jax/configs/ (package data)"
    monkeypatch.chdir(tmp_path)
    want = root / "lm" / "truth_markov_beam.yaml"
    for name in ("lm/truth_markov_beam", "lm/truth_markov_beam.yaml",
                 "configs/lm/truth_markov_beam.yaml"):  # fmt: skip
        assert config_lib.find_config(name) == want
    assert config_lib.find_config("quickstart") == root / "quickstart.yaml"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "quickstart.yaml").write_text("name: mine\n")
    assert config_lib.find_config("configs/quickstart.yaml") == pathlib.Path(
        "configs/quickstart.yaml"
    )
    for bad in ("nope", "../configs/quickstart", "/abs/quickstart.yaml", "configs"):
        with pytest.raises(config_lib.ConfigFileNotFound, match="config file not found"):
            config_lib.find_config(bad)

"""The command line end to end on a toy learner (the theory/LM configs have their own tests)."""

import json

import pytest
import yaml

from collapse_jax import cli
from collapse_jax import config as config_lib


@pytest.fixture
def toy_config(monkeypatch, tmp_path):
    monkeypatch.setitem(
        config_lib.MODEL_REGISTRY,
        "toy",
        ("tests.helpers:ToyConfig", "tests.helpers:ToyGaussianLearner"),
    )
    path = tmp_path / "toy.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "toy",
                "seed": 1,
                "model": {"kind": "toy"},
                "generation": {
                    "num_generations": 5,
                    "samples_per_generation": 10,
                    "num_trials": 64,
                    "block_size": 2,
                },
            }
        )
    )
    return path


def test_run_writes_metrics_figures_and_resumes(toy_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", str(toy_config), "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["generation"] for r in rows] == list(range(5))
    assert (out / "metrics.csv").read_text().startswith("generation,sample_size,")
    assert (out / "figures" / "var.png").stat().st_size > 1000
    assert "gen" in (out / "summary.txt").read_text()
    first = (out / "metrics.json").read_bytes()
    # Running again is a no-op resume with the same result; more generations extend the run.
    assert cli.main(["run", str(toy_config), "--out", str(out), "--no-progress"]) == 0
    assert (out / "metrics.json").read_bytes() == first
    assert (
        cli.main(
            [
                "run",
                str(toy_config),
                "generation.num_generations=6",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert len(json.loads((out / "metrics.json").read_text())) == 6
    assert "== toy" in capsys.readouterr().out


def test_overrides_dry_run_and_show_config(toy_config, capsys):
    assert cli.main(["show-config", str(toy_config), "generation.num_trials=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["generation"]["num_trials"] == 3 and shown["model"]["kind"] == "toy"
    assert cli.main(["run", str(toy_config), "--dry-run"]) == 0
    assert "would run in runs/toy-" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "/no/such.yaml"], "config file not found"),
        (["run", "TOY", "generation.alpha=2"], "generation.alpha"),
        (["run", "TOY", "model.nope=1"], "unknown config key model.nope"),
        (["run", "TOY", "seed"], "not of the form key=value"),
    ],
)
def test_bad_input_exits_2_with_a_message(toy_config, capsys, argv, message):
    argv = [str(toy_config) if a == "TOY" else a for a in argv]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_resume_with_different_config_is_refused(toy_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", str(toy_config), "--out", str(out), "--no-progress"]) == 0
    assert cli.main(["run", str(toy_config), "seed=2", "--out", str(out), "--no-progress"]) == 2
    assert "different config (seed: 1 -> 2)" in capsys.readouterr().err

"""The parts of `collapse-jax compare` / `report` that need no run: labels from the config
difference, the axis scale, the headline order, the step records of metrics.jsonl, and the
operational `report:` block (whole runs: tests/integration/test_report.py)."""

import json

import numpy as np
import pytest

from collapse_jax import config as config_lib
from collapse_jax import plots
from collapse_jax.report import compare, headline, runs, steps
from collapse_jax.rundir import commits, events


def test_label_keys_are_the_fewest_differing_keys_policy_first():
    a = {"name": "a", "seed": 0, "model.dim": 1, "generation.policy": "replace", "x.y": 1}
    b = {"name": "b", "seed": 0, "model.dim": 1, "generation.policy": "mix", "x.y": 2}
    assert runs.differing_keys([a, b]) == ["generation.policy", "x.y", "name"]
    assert runs.label_keys([a, b]) == ["generation.policy"]
    # no single key tells the four apart: two are needed, in priority order
    grid = [
        {"model.dim": d, "generation.samples_per_generation": m} for d in (1, 3) for m in (10, 100)
    ]
    assert runs.label_keys(grid) == ["model.dim", "generation.samples_per_generation"]
    # equal configs: nothing differs
    assert runs.label_keys([a, dict(a)]) == []


def test_operational_blocks_neither_label_runs_nor_block_a_resume():
    a = {"seed": 0, "report": {"enabled": True}}
    b = {"seed": 0, "report": {"enabled": False}}
    assert runs.differing_keys([runs.flatten(a), runs.flatten(b)]) == []
    assert commits.config_diff(a, b) == ""
    assert commits.config_diff({**a, "seed": 1}, b) == "seed: 1 -> 0"


def test_report_block_is_validated():
    raw = {"name": "g", "model": {"kind": "gaussian"}}
    assert config_lib.from_dict(raw).report.enabled is True
    assert config_lib.from_dict(raw, ["report.enabled=false"]).report.enabled is False
    with pytest.raises(config_lib.ConfigError, match="report"):
        config_lib.from_dict(raw, ["report.enabled=maybe"])
    with pytest.raises(config_lib.ConfigError, match="report"):
        config_lib.from_dict(raw, ["report.pages=2"])


def test_log_scale_only_for_positive_data_spanning_two_decades():
    assert compare.log_scale([np.array([0.01, 0.5]), np.array([1.0, np.nan])])
    assert not compare.log_scale([np.array([0.1, 5.0])])  # 1.7 decades
    assert not compare.log_scale([np.array([0.0, 0.01, 5.0])])  # a zero
    assert not compare.log_scale([np.array([-1.0, 500.0])])
    assert not compare.log_scale([np.array([np.nan])])


def test_headline_metrics_lead_and_only_those_recorded():
    names = ["ppl", "unigram_ppl", "seq_ppl_median", "tail_retention", "kl_to_truth", "fit_seconds"]
    assert headline.lead_with_headline("opt", names) == [
        "kl_to_truth",
        "tail_retention",
        "ppl",
        "unigram_ppl",
        "seq_ppl_median",
        "fit_seconds",
    ]
    assert headline.headline("no_such_kind", names) == []
    # every model kind declares its headline metrics, and only kinds that exist
    missing = sorted(set(config_lib.MODEL_REGISTRY) - set(headline.HEADLINE_METRICS))
    assert missing == [], f"add {missing} to collapse_jax/report/headline.py HEADLINE_METRICS"
    assert set(headline.HEADLINE_METRICS) <= set(config_lib.MODEL_REGISTRY)


def test_console_table_leads_with_headline_metrics():
    rows = [
        {"generation": 0, "sample_size": 10, "a": 1.0, "b": 2.0, "w2": 3.0, "w2_se": 0.1},
        {"generation": 1, "sample_size": 10, "a": 1.5, "b": 2.5, "w2": 3.5, "w2_se": 0.1},
    ]
    header = plots.summary_table(rows, kind="gaussian").splitlines()[0].split()
    assert header == ["gen", "M", "w2", "a", "b"]
    assert plots.summary_table(rows).splitlines()[0].split() == ["gen", "M", "a", "b", "w2"]


def _step(gen, step, loss, **kw):
    return {
        "kind": "step",
        "generation": gen,
        "run": 0,
        "epoch": 0,
        "step": step,
        "loss": loss,
        "learning_rate": 1e-3,
        "grad_norm": 0.5 + step,
        "tokens_per_second": 1000.0,
        "time": 10.0 + step,
        **kw,
    }


def test_step_records_skip_a_torn_last_line_and_form_curves(tmp_path):
    assert events.read_metrics(tmp_path) == []  # no file: no curves
    lines = [
        json.dumps(_step(0, 0, 3.0)),
        json.dumps(_step(0, 1, 2.5, val_loss=2.7)),
        json.dumps({"kind": "generation", "generation": 0, "ppl": 12.0}),
        json.dumps(_step(1, 0, 2.9)),
        json.dumps({"kind": "eval", "generation": 1, "run": 0, "step": 0, "val_loss": 2.8}),
        '{"kind": "step", "generation": 1, "ste',  # killed while writing
    ]
    (tmp_path / events.METRICS_NAME).write_text("\n".join(lines))
    recs = events.read_metrics(tmp_path)
    assert len(recs) == 5
    curves = steps.step_curves(recs)
    assert set(curves) == {"loss", "learning_rate", "grad_norm", "tokens_per_second", "val_loss"}
    np.testing.assert_array_equal(curves["loss"]["x"], [0, 1, 2])
    np.testing.assert_array_equal(curves["loss"]["y"], [3.0, 2.5, 2.9])
    np.testing.assert_array_equal(curves["loss"]["generation"], [0, 0, 1])
    np.testing.assert_array_equal(curves["val_loss"]["x"], [1, 2])  # at the step before
    np.testing.assert_array_equal(curves["val_loss"]["y"], [2.7, 2.8])
    assert steps.step_curves([]) == {}

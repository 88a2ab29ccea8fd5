"""`collapse-jax bench`'s real measurements on a shrunk suite: every benchmark runs, the JSON
report and the table have the documented format, and every number is positive and finite
(issue 12; the format with injected measurements: tests/unit/test_bench.py).

Speeds are never asserted (benchmarks, not tests)."""

import json

import pytest

from collapse_jax.bench import harness, suites
from tests.unit.test_bench import TINY, check_rows

ROWS = {
    "train_step",
    "decode_beam",
    "paper_generation",
    "gaussian_exact",
    "gaussian_sample",
    "discrete_exact",
    "discrete_sample",
    "gmm_em",
    "vae_train",
}


def test_real_measurements_on_a_tiny_suite(tmp_path):
    out = tmp_path / "bench.json"
    report = suites.run(TINY, out=out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == ROWS and len(report["rows"]) == len(ROWS)
    assert report["seconds"] > 0
    check_rows(report)
    assert 0 < rows["train_step"]["mfu"] and rows["train_step"]["config"]["peak_flops"] > 0
    assert rows["decode_beam"]["regenerate_37k_s"] > 0
    # What the programs computed in: the train step's matmuls, read from its program, are bf16
    # (but the two attention-score gradients per layer); the decoder's dtype is decode.dtype's
    # auto (float32 on this CPU).
    train_cfg, decode_cfg = rows["train_step"]["config"], rows["decode_beam"]["config"]
    dots = train_cfg["matmul_dtypes"]
    assert sum(n for k, n in dots.items() if k.startswith("bfloat16 x bfloat16")) > sum(
        n for k, n in dots.items() if not k.startswith("bfloat16 x bfloat16")
    ), dots
    assert train_cfg["matmul_precision"] == decode_cfg["matmul_precision"] == "default"
    assert decode_cfg["compute_dtype"] == decode_cfg["kv_cache_dtype"] == "float32"
    gen = rows["paper_generation"]
    assert gen["value"] == pytest.approx(gen["train_s"] + gen["eval_s"] + gen["regenerate_s"])
    assert "extrapolated" in gen["note"]
    table = harness.format_table(report)
    for name in ROWS:
        assert name in table
    assert "6 N + 12 L D T" in table and "MFU" in table

"""`collapse-jax bench` on a shrunk suite: every benchmark runs, the JSON report and the table
have the documented format, and every number is positive and finite (issue 12).

Speeds are never asserted (benchmarks, not tests)."""

import json
import math

import pytest

from collapse_jax import bench, cli

TINY = bench.Suite(
    name="tiny",
    opt_layers=1,
    opt_width="tiny",
    train_batch=2,
    train_steps=1,
    decode_batch=1,
    decode_new=2,
    eval_batch=2,
    theory_chains=32,
    theory_generations=1,  # one generation compiles no scan: ~2.5x faster to compile
    numpy_chains=32,
    gmm_chains=2,
    gmm_points=40,
    sklearn_chains=1,
    vae_images=8,
    vae_batch=8,
    repeats=1,
)
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


def _numbers(obj):
    """Every int/float leaf of a JSON object (booleans excluded)."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    rep = bench.run(TINY, out=out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(rep))
    return rep


def test_report_format_and_numbers(report):
    assert report["suite"] == "tiny" and report["settings"]["opt_width"] == "tiny"
    assert report["device"]["platform"] and report["device"]["device_kind"]
    assert report["versions"]["jax"] and report["seconds"] > 0
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == ROWS and len(report["rows"]) == len(ROWS)
    for r in report["rows"]:
        assert r["unit"] and isinstance(r["config"], dict)
        assert r["value"] > 0 and r["median_ms"] > 0 and r["compile_s"] >= 0, r
        if r["baseline_value"] is not None:
            assert r["baseline"] and r["ratio"] == pytest.approx(r["value"] / r["baseline_value"])
        nums = list(_numbers(r))
        assert all(math.isfinite(x) for x in nums), r
        # compile_s may be 0 (no compile in a loop of cached calls); ids etc. are >= 0
        assert all(x >= 0 for x in nums), r
    assert 0 < rows["train_step"]["mfu"] and rows["train_step"]["config"]["peak_flops"] > 0
    assert rows["decode_beam"]["regenerate_37k_s"] > 0
    gen = rows["paper_generation"]
    assert gen["value"] == pytest.approx(gen["train_s"] + gen["eval_s"] + gen["regenerate_s"])
    assert "extrapolated" in gen["note"]


def test_table_names_every_row(report):
    table = bench.format_table(report)
    for name in ROWS:
        assert name in table
    assert "6 N + 12 L D T" in table and "MFU" in table


def test_peak_table_and_unknown_names():
    class Dev:
        platform = "gpu"
        device_kind = "NVIDIA H100 PCIe"

    assert bench.device_peak_flops(Dev())[0] == 756e12
    Dev.device_kind = "NVIDIA A100-SXM4-80GB"  # not matched by "a10"
    assert bench.device_peak_flops(Dev())[0] == 312e12
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        bench.run(TINY, only=["nope"])


def test_cli_bench_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.SUITES, "quick", TINY)
    out = tmp_path / "b.json"
    assert cli.main(["bench", "--only", "gmm,gaussian_exact", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "gmm_em" in text and "gaussian_exact" in text and str(out) in text
    names = [r["name"] for r in json.loads(out.read_text())["rows"]]
    assert names == ["gaussian_exact", "gmm_em"]
    assert cli.main(["bench", "--only", "nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err

"""`collapse-jax bench`: the report's format and table with injected measurements (the real
measurements on a shrunk suite: tests/integration/test_bench.py): the JSON report and the table
have the documented format, and every number is positive and finite (issue 12).

Speeds are never asserted (benchmarks, not tests)."""

import importlib.util
import json
import math
import os

import jax
import pytest

from collapse_jax import cli
from collapse_jax.bench import harness, suites

TINY = harness.Suite(
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


def check_rows(report):
    for r in report["rows"]:
        assert r["unit"] and isinstance(r["config"], dict)
        assert r["value"] > 0 and r["median_ms"] > 0 and r["compile_s"] >= 0, r
        if r["baseline_value"] is not None:
            assert r["baseline"] and r["ratio"] == pytest.approx(r["value"] / r["baseline_value"])
        nums = list(_numbers(r))
        assert all(math.isfinite(x) for x in nums), r
        # compile_s may be 0 (no compile in a loop of cached calls); ids etc. are >= 0
        assert all(x >= 0 for x in nums), r


def _fake_train(suite, ctx):
    peak, source = 2e12, "given"
    config = dict(flop_formula="6 N + 12 L D T", peak_flops=peak, peak_source=source)
    ctx["train_seconds_per_token"] = 1e-5
    return [
        harness.row("train_step", 1e5, "tokens/s", compile_s=1.5, median_s=0.01, config=config,
                    baseline="transformers", base_value=5e4, mfu=0.25)
    ]  # fmt: skip


def _fake_theory(suite, ctx):
    names = sorted(ctx["only_theory"] or suites.THEORY_ROWS)
    return [
        harness.row(n, 1e6, "chain-generations/s", compile_s=0.2, median_s=0.002, config={})
        for n in names
    ]


def _fake_generation(suite, ctx):
    return [
        harness.row("paper_generation", 3.0, "s (extrapolated)", compile_s=0.0, median_s=0.5,
                    config={}, note="extrapolated from slices", train_s=1.0, eval_s=0.5,
                    regenerate_s=1.5)
    ]  # fmt: skip


FAKES = {"train": _fake_train, "theory": _fake_theory, "paper_generation": _fake_generation}


def test_report_json_and_table_with_injected_measurements(tmp_path):
    out = tmp_path / "bench.json"
    seen = []
    rep = suites.run(TINY, out=out, benches=FAKES, progress=seen.append)
    assert json.loads(out.read_text()) == json.loads(json.dumps(rep))
    assert rep["suite"] == "tiny" and rep["settings"]["opt_width"] == "tiny"
    assert rep["device"]["platform"] and rep["device"]["device_kind"]
    assert rep["versions"]["jax"] and rep["seconds"] >= 0 and rep["started"]
    assert [r["name"] for r in rep["rows"]] == ["train_step", *sorted(suites.THEORY_ROWS),
                                                "paper_generation"]  # fmt: skip
    assert seen == [f"bench {n} (tiny) ..." for n in FAKES]
    check_rows(rep)
    assert rep["rows"][0]["ratio"] == pytest.approx(2.0)
    table = harness.format_table(rep)
    for r in rep["rows"]:
        assert r["name"] in table
    assert "MFU 25.0%" in table and "6 N + 12 L D T" in table and "2.00x" in table
    assert "train 1 s, eval 0.5 s, regen 1.5 s" in table
    assert "paper_generation: extrapolated from slices" in table
    assert rep["flop_convention"] == harness.FLOP_CONVENTION
    aims = {t["name"]: t for t in rep["targets"]}
    assert aims["train_mfu"]["measured"] == 0.25 and aims["train_mfu"]["met"] is False
    assert aims["paper_generation_s"]["met"] is True  # 3 s < 60 s, at this tiny suite's size
    assert not any(t["comparable"] for t in rep["targets"])  # TINY is not the aims' size
    assert "aim train_mfu: 0.25 >= 0.3 MISSED (extrapolated" in table


def test_only_selects_measurements_and_theory_rows():
    rep = suites.run(TINY, only=["gaussian_exact", "paper_generation"], benches=FAKES)
    assert [r["name"] for r in rep["rows"]] == ["gaussian_exact", "paper_generation"]
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        suites.run(TINY, only=["nope"], benches=FAKES)
    with pytest.raises(ValueError, match="unknown suite 'huge'"):
        suites.run("huge")


def test_peak_table_and_unknown_names():
    class Dev:
        platform = "gpu"
        device_kind = "NVIDIA H100 PCIe"

    assert harness.device_peak_flops(Dev())[0] == 756e12
    Dev.device_kind = "NVIDIA A100-SXM4-80GB"  # not matched by "a10"
    assert harness.device_peak_flops(Dev())[0] == 312e12
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        suites.run(TINY, only=["nope"])


def test_cli_bench_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(suites.SUITES, "quick", TINY)
    monkeypatch.setattr(suites, "BENCHES", FAKES)
    out = tmp_path / "b.json"
    assert cli.main(["bench", "--only", "train,gaussian_exact", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "train_step" in text and "gaussian_exact" in text and str(out) in text
    names = [r["name"] for r in json.loads(out.read_text())["rows"]]
    assert names == ["train_step", "gaussian_exact"]
    assert cli.main(["bench", "--only", "nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_targets_compare_measurements_with_the_aims_at_their_sizes():
    full = {**vars(TINY), "opt_layers": 12, "opt_width": "125m", "train_batch": 128}
    full.update(decode_new=64, theory_chains=10**6, theory_generations=100)
    rows = [
        dict(name="train_step", mfu=0.35),
        dict(name="decode_beam", regenerate_37k_s=25.0),
        dict(name="gaussian_exact", kernel_s=0.5, config=dict(chains=10**5, generations=10)),
    ]
    aims = {t["name"]: t for t in harness.targets(rows, full)}
    assert aims["train_mfu"] | dict(measured=0.35, met=True, comparable=True) == aims["train_mfu"]
    assert (aims["regenerate_37k_s"]["met"], aims["regenerate_37k_s"]["comparable"]) == (
        False,
        True,
    )
    assert (
        aims["paper_generation_s"]["measured"] is None and aims["paper_generation_s"]["met"] is None
    )
    # 0.5 s of kernel for 10^6 chain-generations: 50 s for 10^8, linearly.
    assert aims["theory_kernel_1e6x100_s"]["measured"] == pytest.approx(50.0)
    assert aims["theory_kernel_1e6x100_s"]["met"] is False


def test_jax_takes_less_of_the_gpu_when_torch_baselines_share_it(monkeypatch):
    env = harness.MEM_FRACTION_ENV
    monkeypatch.delenv(env, raising=False)
    assert harness.share_gpu_with_torch(False) is None and env not in os.environ
    torch_here = importlib.util.find_spec("torch") is not None
    assert harness.share_gpu_with_torch(True) == ("0.5" if torch_here else None)
    monkeypatch.setenv(env, "0.3")  # the user's own setting is kept
    assert harness.share_gpu_with_torch(True) == "0.3"


def test_the_compile_cache_comes_from_the_flag_or_the_environment(tmp_path, monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.delenv(cli.COMPILE_CACHE_ENV, raising=False)
        assert cli.use_compile_cache(None) is None
        assert jax.config.jax_compilation_cache_dir == before
        monkeypatch.setenv(cli.COMPILE_CACHE_ENV, str(tmp_path / "env"))
        assert cli.use_compile_cache(None) == tmp_path / "env"
        assert cli.use_compile_cache(tmp_path / "flag") == tmp_path / "flag"  # the flag wins
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "flag")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


@pytest.mark.parametrize("first", [True, False])
def test_a_command_takes_the_compile_cache_flag_before_or_after_its_name(first, tmp_path, capsys):
    before = jax.config.jax_compilation_cache_dir
    flag = ["--compile-cache", str(tmp_path / "c")]
    argv = (
        [*flag, "show-config", "theory_gaussian"]
        if first
        else ["show-config", "theory_gaussian", *flag]
    )
    try:
        assert cli.main(argv) == 0
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    assert "theory_gaussian" in capsys.readouterr().out

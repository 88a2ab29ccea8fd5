"""Sweeps: a grid in one directory gives the same per-point results as separate runs, resumes,
validates every point first, and draws curves and heatmaps."""

import json

import numpy as np
import pytest

from collapse_jax import cli, loop, plots, sweep
from collapse_jax import config as config_lib
from collapse_jax.loop import core
from collapse_jax.rundir import reader
from tests.conftest import REPO

CONFIG = REPO / "collapse_jax" / "configs" / "theory_gaussian.yaml"
FIXED = ["generation.num_generations=3", "generation.num_trials=16", "generation.block_size=2"]


def test_parse_axes_respects_brackets():
    axes = sweep.parse_axes(["model.mean=[0,1],[2,3]", "generation.alpha=0.5,1", "seed=4"])
    assert axes == [("model.mean", [[0, 1], [2, 3]]), ("generation.alpha", [0.5, 1]), ("seed", [4])]
    with pytest.raises(config_lib.ConfigError, match="repeated"):
        sweep.parse_axes(["seed=1,1"])
    with pytest.raises(config_lib.ConfigError, match="given twice"):
        sweep.parse_axes(["seed=1", "seed=2"])


def test_sweep_equals_separate_runs_and_resumes(tmp_path):
    axes = ["seed=0,5", "generation.samples_per_generation=10,40", *FIXED]
    out = tmp_path / "sw"
    compiled = core.block._cache_size()
    # seeds and (traced) sample sizes differ only in traced values: one batch of all 4 points
    assert sweep.batches(sweep.Sweep(CONFIG, sweep.parse_axes(axes), out)) == [[0, 1, 2, 3]]
    assert cli.main(["sweep", str(CONFIG), *axes, "--out", str(out), "--no-progress"]) == 0
    spec = json.loads((out / "sweep.json").read_text())
    assert len(spec["points"]) == 4
    # the batch runs as one compiled call per block: generation 0's, the later generations'
    # (block_size 2) and the shorter last block's
    assert core.block._cache_size() - compiled <= 3
    for p in spec["points"]:
        o = p["overrides"]
        sep = tmp_path / f"sep{p['index']}"
        args = [
            f"seed={o['seed']}",
            f"generation.samples_per_generation={o['generation.samples_per_generation']}",
            *FIXED,
        ]
        assert cli.main(["run", str(CONFIG), *args, "--out", str(sep), "--no-progress"]) == 0
        got = (out / p["dir"] / "metrics.json").read_bytes()
        assert got == (sep / "metrics.json").read_bytes(), p["dir"]
        assert (out / p["dir"] / "config.yaml").read_text() == (sep / "config.yaml").read_text()
    figs = {f.name for f in (out / "figures").iterdir()}
    assert {"w2_curves.png", "w2_heatmap.png"} <= figs
    table = (out / "sweep.csv").read_text().splitlines()
    assert len(table) == 5 and table[0].startswith("point,seed,generation.samples_per_generation")

    # A killed sweep: point 1 stopped after one block, point 2 never started; resuming completes
    # both with the same numbers.
    s = sweep.Sweep(CONFIG, sweep.parse_axes(axes), tmp_path / "killed")
    s.prepare()
    loop.run_generations(s.configs[0], s.point_dir(0))
    loop.run_generations(s.configs[1], s.point_dir(1), stop_after=2)
    assert len(reader.Run(s.point_dir(1)).rows()) == 2
    sweep.run_sweep(CONFIG, axes, tmp_path / "killed", figures=False)
    for p in spec["points"]:
        a = (out / p["dir"] / "metrics.json").read_bytes()
        assert (tmp_path / "killed" / p["dir"] / "metrics.json").read_bytes() == a


def test_bad_point_fails_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "bad"
    rc = cli.main(
        [
            "sweep",
            str(CONFIG),
            "generation.samples_per_generation=10,1",
            *FIXED,
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "samples_per_generation" in err[0] and "p001" in err[0]
    assert not (out / "points").exists()
    # a different grid in an existing sweep directory is refused
    sweep.Sweep(CONFIG, sweep.parse_axes(["seed=1,2", *FIXED]), out).prepare()
    with pytest.raises(ValueError, match="different grid"):
        sweep.Sweep(CONFIG, sweep.parse_axes(["seed=1,3", *FIXED]), out).prepare()


def test_lambda_and_mix_shares_batch_with_separate_run_results(tmp_path):
    """Points that differ in lambda (`model.sampling_bias`, a traced knob) and in the mix shares
    alpha / gamma (traced part sizes of the exact method) form one batch, one compiled call per
    block, and each point's metrics equal a separate run's byte for byte. Which parts exist is
    static: a point without real data (gamma = 0) cannot join them."""
    base = [*FIXED, "generation.policy=mix", "generation.samples_per_generation=20"]
    points = [
        ["seed=0", "model.sampling_bias=1.0", "generation.alpha=0.5", "generation.gamma=0.5"],
        ["seed=3", "model.sampling_bias=0.6", "generation.alpha=0.8", "generation.gamma=0.2"],
    ]
    cfgs = [config_lib.load_config(CONFIG, [*base, *p]) for p in points]
    learner = loop.make_learner(cfgs[0])
    assert loop.batch_key(cfgs[0], learner) == loop.batch_key(cfgs[1], learner)
    no_real = config_lib.load_config(
        CONFIG, [*base, "generation.alpha=0.6", "generation.beta=0.4", "generation.gamma=0"]
    )
    assert loop.batch_key(no_real, learner) != loop.batch_key(cfgs[0], learner)
    compiled = core.block._cache_size()
    dirs = [tmp_path / f"b{i}" for i in range(len(cfgs))]
    loop.run_batch(cfgs, dirs)
    assert core.block._cache_size() - compiled <= 3
    compiled = core.block._cache_size()
    for i, cfg in enumerate(cfgs):
        sep = loop.run_generations(cfg, tmp_path / f"s{i}").run_dir
        assert (dirs[i] / "metrics.json").read_bytes() == (sep / "metrics.json").read_bytes(), i
    # separate runs differing in lambda and alpha reuse the batch's programs (traced knobs)
    assert core.block._cache_size() == compiled


def test_logdet_heatmap_matches_the_closed_form(tmp_path):
    """Issue 23 item 6: the multivariate log-determinant is carried in log space, so no cell of
    the heatmap is -inf where the closed form is finite (float32 made (d, M) = (3, 10) and
    (3, 32) -inf after 100 generations), and the finite cells equal the closed-form mean within
    4.5 standard errors (the chain mean of 100 chains of a sum of 100 independent log chi-square
    terms is close to normal: false-failure probability ~7e-6 per cell, < 3e-5 for the 4 finite
    cells); the structurally singular cells (M <= d) are -inf, as the closed form."""
    axes = [
        "model.dim=3,10",
        "generation.samples_per_generation=4,10,32",
        "generation.num_generations=100",
        "generation.num_trials=100",
        "generation.block_size=100",
        "model.mean=null",
    ]
    out = tmp_path / "sw"
    sw = sweep.run_sweep(CONFIG, axes, out, figures=False)
    rows = sweep.point_rows(sw)
    expected = [
        plots.expected_curves(c, [x["sample_size"] for x in r]) for c, r in zip(sw.configs, rows)
    ]
    (grid,) = sweep.heatmap_grid(sw, rows, expected, "logdet_cov").values()
    value, se, closed = grid["value"], grid["se"], grid["closed"]
    assert np.array_equal(np.isfinite(value), np.isfinite(closed)), (value, closed)
    assert np.sum(np.isfinite(closed)) == 4 and np.all(closed[~np.isfinite(closed)] == -np.inf)
    assert np.all(value[~np.isfinite(value)] == -np.inf)
    ok = np.isfinite(closed)
    assert np.all(np.abs(value[ok] - closed[ok]) <= 4.5 * se[ok]), (value, closed, se)
    files = sweep.sweep_figures(sw)
    assert out / "figures" / "logdet_cov_heatmap.png" in files

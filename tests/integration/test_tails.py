"""The shipped tails configs, shrunk, through the command line: a sweep of the top-k config over
T and the real fraction, and the iterated config; their rows against the closed forms, and the
scaling-law figures drawn from the sweep directories.

Mean checks: |chain mean - closed form| < Z * SE with Z = 4.5 (false-failure probability 6.8e-6
per check, under 1e-4 for the file's 12 checks). Seeds are fixed: runs are deterministic.
"""

import numpy as np

from collapse_jax import cli, plots
from collapse_jax.rundir import reader
from collapse_jax.theory import tails_figures
from tests.conftest import REPO

CONFIGS = REPO / "collapse_jax" / "configs" / "theory"
Z = 4.5
SHRINK = ["model.num_tokens=5000", "generation.num_trials=400", "generation.chunk_size=400"]


def _check_rows(run_dir) -> int:
    run = reader.Run(run_dir)
    rows = run.rows()
    want = plots.expected_curves(run.config, np.array([r["sample_size"] for r in rows]))
    assert "test_error" in want
    for r, w in zip(rows, want["test_error"]):
        assert abs(r["test_error"] - w) < Z * max(r["test_error_se"], 1e-7), (run_dir, r, w)
    return len(rows)


def test_tails_sweep_and_iterated_runs_match_closed_forms_and_draw(tmp_path):
    sizes = "generation.samples_per_generation=100,1000"
    cut = tmp_path / "cut"
    args = ["sweep", str(CONFIGS / "tails_topk.yaml"), sizes, "model.top_k=10,100", *SHRINK]
    assert cli.main([*args, "--out", str(cut), "--no-progress"]) == 0
    mix = tmp_path / "mix"
    real = ["generation.policy=mix", "generation.alpha=0.9", "generation.gamma=0.1"]
    args = ["sweep", str(CONFIGS / "tails_topk.yaml"), sizes, "model.top_k=10", *real, *SHRINK]
    assert cli.main([*args, "--out", str(mix), "--no-progress"]) == 0
    points = sorted((cut / "points").iterdir()) + sorted((mix / "points").iterdir())
    assert len(points) == 6
    assert sum(_check_rows(p) for p in points) == 12

    it = tmp_path / "iterated"
    args = ["run", str(CONFIGS / "tails_iterated.yaml"), "generation.num_generations=4", *SHRINK]
    assert cli.main([*args, "generation.samples_per_generation=200", "--out", str(it)]) == 0
    assert _check_rows(it) == 4
    rows = reader.Run(it).rows()
    assert rows[-1]["test_error"] > rows[0]["test_error"]  # tokens once missed stay missed

    files = tails_figures.scaling_figures([cut, mix], tmp_path / "fig")
    files.append(tails_figures.iterated_figure([it], tmp_path / "fig"))
    assert sorted(f.name for f in files) == [
        "tails_grokking.png",
        "tails_iterated.png",
        "tails_scaling.png",
    ]
    assert all(f.stat().st_size > 10_000 for f in files)

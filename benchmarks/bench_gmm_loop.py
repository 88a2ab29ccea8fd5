"""Before/after: wall time of a GMM `collapse-jax run` with the loop's batched fit (issue 9).

Runs the same shrunk `collapse_jax/configs/gmm_cpu.yaml` with two checkouts of the package,
alternating, in
fresh processes on the same machine: OLD (a tree where the CLI vmapped the per-chain EM inside
the scan) and NEW (this tree: `GMMLearner.fit_chains`, EM compacted to unconverged chains).
Reported: total wall time (compilation included, as a user sees it) and the steady time per
generation once compiled (what a long run such as the paper's 2000 generations is made of).

    python benchmarks/bench_gmm_loop.py --old /path/to/old/tree [--generations 30] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


_SNIPPET = """
import json, sys, tempfile, time
from collapse_jax import config, loop
cfg = config.load_config(sys.argv[1], sys.argv[2:])
ts = [time.perf_counter()]
loop.run_generations(cfg, tempfile.mkdtemp(), on_generation=lambda g, r: ts.append(
    time.perf_counter()))
print(json.dumps(ts))
"""


def _run(tree: pathlib.Path, overrides: list[str]) -> dict:
    """One run in a fresh process with `tree` first on the path: total wall time and the steady
    per-generation time (over the second half of the generations, long after compilation)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [
        sys.executable,
        "-c",
        _SNIPPET,
        str(ROOT / "collapse_jax/configs/gmm_cpu.yaml"),
        *overrides,
    ]
    out = subprocess.run(env=env, args=cmd, check=True, capture_output=True, text=True, cwd=tree)
    ts = json.loads(out.stdout.strip().splitlines()[-1])
    total = ts[-1] - ts[0]
    half = (len(ts) - 1) // 2  # the second half of the generations (blocks of 10, compiled)
    steady = (ts[-1] - ts[half]) / (len(ts) - 1 - half)
    return {"total_s": total, "steady_s_per_gen": steady}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--old", required=True, type=pathlib.Path)
    p.add_argument("--generations", type=int, default=40)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    overrides = [f"generation.num_generations={args.generations}", "generation.block_size=10"]
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for _ in range(args.repeats):
        for name, tree in (("old", args.old), ("new", ROOT)):
            runs[name].append(_run(tree, overrides))
    best = {
        k: {m: min(r[m] for r in v) for m in ("total_s", "steady_s_per_gen")}
        for k, v in runs.items()
    }
    res = {
        "name": "gmm_cli_run",
        "config": "gmm_cpu",
        "overrides": overrides,
        "runs": runs,
        "best": best,
        "steady_speedup": best["old"]["steady_s_per_gen"] / best["new"]["steady_s_per_gen"],
        "total_speedup": best["old"]["total_s"] / best["new"]["total_s"],
    }
    print(json.dumps(res))
    out = ROOT / "benchmarks" / "results" / "bench_gmm_loop.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

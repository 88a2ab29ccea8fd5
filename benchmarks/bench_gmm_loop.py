"""Before/after: wall time of a GMM `collapse-jax run` with the loop's batched fit (issue 9).

Runs the same shrunk `configs/gmm_cpu.yaml` with two checkouts of the package, alternating, in
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
from collapse_jax import config, generation
cfg = config.load_config(sys.argv[1], sys.argv[2:])
ts = [time.perf_counter()]
generation.run_generations(cfg, tempfile.mkdtemp(), on_generation=lambda g, r: ts.append(
    time.perf_counter()))
print(json.dumps(ts))
"""


def _run(tree: pathlib.Path, overrides: list[str]) -> dict:
    """One run in a fresh process with `tree` first on the path: total wall time and the steady
    per-generation time (commits after the first two blocks, which hold the compilations)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-c", _SNIPPET, str(ROOT / "configs/gmm_cpu.yaml"), *overrides]
    out = subprocess.run(env=env, args=cmd, check=True, capture_output=True, text=True, cwd=tree)
    ts = json.loads(out.stdout.strip().splitlines()[-1])
    total = ts[-1] - ts[0]
    steady = (ts[-1] - ts[9]) / (len(ts) - 10)  # after generation 8 (blocks of 4)
    return {"total_s": total, "steady_s_per_gen": steady}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--old", required=True, type=pathlib.Path)
    p.add_argument("--generations", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    overrides = [f"generation.num_generations={args.generations}", "generation.block_size=10"]
    times: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(args.repeats):
        for name, tree in (("old", args.old), ("new", ROOT)):
            times[name].append(_run(tree, overrides))
    old, new = min(times["old"]), min(times["new"])
    res = {
        "name": "gmm_cli_run",
        "config": "gmm_cpu",
        "overrides": overrides,
        "times_s": times,
        "old_s": old,
        "new_s": new,
        "speedup": old / new,
    }
    print(json.dumps(res))
    out = ROOT / "benchmarks" / "results" / "bench_gmm_loop.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

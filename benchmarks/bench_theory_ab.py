"""Before/after of the theory models' exact methods in ONE process, interleaved: this tree against
an older revision of the package (issue 12), each against NumPy's exact path in the same rounds.

The old revision is exported with `git archive` into a temporary folder and imported as
`collapse_jax_old` (its imports rewritten), so both run side by side and see the same load.

Usage: python benchmarks/bench_theory_ab.py --rev REV [--rounds 3] [--generations 200]
  [--only gaussian_exact,gaussian_sample,discrete_exact]
Writes benchmarks/results/theory-ab-<platform>.json (rows of measurements not re-run are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile

import jax
import numpy as np

from collapse_jax.bench import baselines, harness
from collapse_jax.theory import discrete, gaussian

ROOT = pathlib.Path(__file__).resolve().parent.parent


def import_old(rev: str, into: pathlib.Path):
    """The package at `rev` as module `collapse_jax_old` (imports rewritten)."""
    tar = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "collapse_jax"], check=True, capture_output=True
    ).stdout
    tmp = into / "tar"
    tmp.mkdir()
    (tmp / "a.tar").write_bytes(tar)
    with tarfile.open(tmp / "a.tar") as t:
        t.extractall(into, filter="data")
    pkg = into / "collapse_jax_old"
    (into / "collapse_jax").rename(pkg)
    for f in pkg.rglob("*.py"):
        f.write_text(re.sub(r"\bcollapse_jax\b", "collapse_jax_old", f.read_text()))
    sys.path.insert(0, str(into))
    from collapse_jax_old.theory import discrete as old_discrete
    from collapse_jax_old.theory import gaussian as old_gaussian

    return old_gaussian, old_discrete


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="the old revision (git rev of this repository)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chains", type=int, default=10_000)
    ap.add_argument("--generations", type=int, default=200)
    ap.add_argument("--only", default="gaussian_exact,discrete_exact")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    c, g = args.chains, args.generations
    key = jax.random.key(0)
    rng = np.random.default_rng(0)
    probs = baselines.zipf_probs(10)
    with tempfile.TemporaryDirectory() as tmp:
        old_g, old_d = import_old(args.rev, pathlib.Path(tmp))
        cases = {
            "gaussian_exact": dict(
                M=1000,
                new=lambda: gaussian.simulate(key, chains=c, generations=g, sample_size=1000),
                old=lambda: old_g.simulate(key, chains=c, generations=g, sample_size=1000),
                numpy=lambda: baselines.numpy_gaussian_exact(rng, c, g, 1000),
            ),
            "gaussian_sample": dict(
                M=100,
                new=lambda: gaussian.simulate(
                    key, chains=c, generations=g, sample_size=100, method="sample"
                ),
                old=lambda: old_g.simulate(
                    key, chains=c, generations=g, sample_size=100, method="sample"
                ),
                numpy=lambda: baselines.numpy_gaussian_sample(rng, c, g, 100),
            ),
            "discrete_exact": dict(
                M=1000,
                new=lambda: discrete.simulate(
                    key, probs=probs, chains=c, generations=g, sample_size=1000
                ),
                old=lambda: old_d.simulate(
                    key, probs=probs, chains=c, generations=g, sample_size=1000
                ),
                numpy=lambda: baselines.numpy_discrete_exact(rng, probs, c, g, 1000),
            ),
        }
        rows = []
        for name in args.only.split(","):
            case = cases[name]
            runs = {k: case[k] for k in ("old", "new", "numpy")}
            compile_s, med = harness.interleaved(runs, args.rounds)  # all see the same load
            row = dict(
                name=name,
                config=dict(chains=c, generations=g, M=case["M"]),
                rev_old=args.rev,
                median_ms={k: round(1e3 * v, 1) for k, v in med.items()},
                compile_s={k: round(v, 2) for k, v in compile_s.items()},
                speedup_new_vs_old=med["old"] / med["new"],
                ratio_vs_numpy_new=med["numpy"] / med["new"],
                ratio_vs_numpy_old=med["numpy"] / med["old"],
                load_avg_1min=os.getloadavg()[0],
                note="2-core machine shared with other jobs; load average at the end of the row",
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    dev = jax.devices()[0].platform
    out = pathlib.Path(args.out or ROOT / "benchmarks" / "results" / f"theory-ab-{dev}.json")
    harness.write_rows(out, rows, keep_others=True)  # keeps the rows not re-run
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""A Gaussian collapse sweep as one `collapse-jax sweep` against the same grid run as separate
single-chain NumPy processes (issue 13, item 6: a published study launched ~5,000 of those).

Grid: d in {1, 3, 10, 31, 100} x M in {10, 32, 100, 316, 1000} x policy in {replace, accumulate},
100 seeds (chains) per point, 100 generations, unbiased refit; our sweep uses the exact method
(sufficient statistics, equal in distribution), one process, every point a resumable sub-run.
The exact method's sample sizes are traced, so the 5 values of M of each (d, policy) form one
batch (`sweep.batches`): 10 batches, each one compiled call per block of generations.

Baseline: one OS process per (point, seed), as such studies run them: Python + NumPy start-up,
then 100 generations of drawing the M points of the current fit, refitting (accumulate keeps
running sums, not the raw points) and computing the metrics the sweep records per generation
(W2 to the original, trace and log-determinant of the covariance). We time one seed of every
grid point as its own process and extrapolate x 100 seeds (the single-chain cost does not depend
on the seed).

Output: benchmarks/results/sweep-<platform>.json (one object per measurement).
Usage: python benchmarks/bench_sweep.py [--quick] [--seeds N]   (--quick: d, M in {1, 10, 100},
10 gens); --baseline-only re-times the NumPy processes alone and updates the stored record;
python benchmarks/bench_sweep.py --factor-ab appends (replaces) the record
"gaussian_factor_ab": one generation of 500 exact-method chains (draw, refit, log-det) with the
rank-robust factor against LAPACK's Cholesky alone, d = 3 and 31, interleaved in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap
import time

import jax

from collapse_jax import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]

NUMPY_CHAIN = textwrap.dedent(
    """
    import sys, numpy as np
    d, m, gens, seed = (int(a) for a in sys.argv[1:4] + sys.argv[5:6])
    policy = sys.argv[4]
    rng = np.random.default_rng(seed)
    mu, cov = np.zeros(d), np.eye(d)
    n, s1, s2 = 0, np.zeros(d), np.zeros((d, d))
    rows = []
    for g in range(gens):
        if g == 0:
            x = rng.standard_normal((m, d))
        else:
            x = rng.multivariate_normal(mu, cov, size=m, method="eigh")
        if policy == "accumulate":
            n, s1, s2 = n + m, s1 + x.sum(0), s2 + x.T @ x
            mu = s1 / n
            cov = (s2 - n * np.outer(mu, mu)) / (n - 1)
        else:
            mu, cov = x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))
        cov = cov + 1e-12 * np.eye(d)  # M <= d: a singular refit (as the JAX run's -inf log-det)
        # the per-generation metrics the sweep records: W2 to N(0, I), trace, log-det
        ev = np.linalg.eigvalsh(cov)
        tr = float(np.trace(cov))
        w2sq = float(mu @ mu + tr + d - 2.0 * np.sqrt(np.maximum(ev, 0.0)).sum())
        rows.append((np.sqrt(max(w2sq, 0.0)), tr, np.linalg.slogdet(cov)[1]))
    print(rows[-1])
    """
)


def numpy_baseline(points: list[dict], gens: int) -> tuple[float, list[dict]]:
    """Seconds for one seed of every grid point, each as its own process, and per point."""
    per_point = []
    t_all = time.perf_counter()
    for p in points:
        o = p["overrides"]
        d, m, pol = o["model.dim"], o["generation.samples_per_generation"], o["generation.policy"]
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", NUMPY_CHAIN, str(d), str(m), str(gens), pol, "0"],
            check=True,
            capture_output=True,
        )
        per_point.append({"dim": d, "M": m, "policy": pol, "seconds": time.perf_counter() - t})
    return time.perf_counter() - t_all, per_point


def factor_ab(repeats: int = 9) -> dict:
    """The d > 1 Gaussian's rank-robust factor (`gaussian.robust_cholesky`: LAPACK's Cholesky
    plus the semi-definite repair where it fails) and log-det against LAPACK's Cholesky and
    slogdet alone, on well-conditioned fits (M = 1000, where both give the same numbers):
    median ms per generation of 500 chains, the two interleaved in one process."""
    import jax.numpy as jnp
    import numpy as np

    from collapse_jax.theory import gaussian, metrics

    robust = gaussian.robust_cholesky
    out = {}
    for d in (3, 31):
        params = gaussian.GaussianParams(jnp.zeros(d), jnp.eye(d))
        keys = jax.random.split(jax.random.key(0), 500)

        def make(chol, log_det, keys=keys, params=params):
            def one(k, p):
                # The module's factor is looked up while tracing: each program keeps its own.
                gaussian.robust_cholesky = chol
                fit = gaussian.fit_stats(gaussian.sample_stats(k, p, 1000), "unbiased")
                return fit.cov, log_det(fit.cov)

            f = jax.jit(jax.vmap(one, in_axes=(0, None)))
            jax.block_until_ready(f(keys, params))
            return f

        fs = {
            "lapack": make(jnp.linalg.cholesky, metrics.log_det),
            "robust": make(robust, gaussian.robust_log_det),
        }
        gaussian.robust_cholesky = robust
        times = {n: [] for n in fs}
        for _ in range(repeats):
            for n, f in fs.items():
                t = time.perf_counter()
                jax.block_until_ready(f(keys, params))
                times[n].append(time.perf_counter() - t)
        ms = {n: round(float(np.median(v)) * 1e3, 2) for n, v in times.items()}
        out[f"d={d}"] = {**ms, "ratio_robust_over_lapack": round(ms["robust"] / ms["lapack"], 3)}
    return {
        "name": "gaussian_factor_ab",
        "device": f"{jax.default_backend()}:{jax.devices()[0].device_kind}",
        "unit": "median ms per generation of 500 chains (M = 1000, exact method)",
        "results": out,
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--factor-ab", action="store_true", help="only the factor A/B (appended)")
    ap.add_argument("--seeds", type=int, default=None, help="chains per point (default 100)")
    ap.add_argument(
        "--baseline-only",
        action="store_true",
        help="re-time only the NumPy baseline and update the stored record's baseline and ratio",
    )
    args = ap.parse_args()
    res = REPO / "benchmarks" / "results" / f"sweep-{jax.default_backend()}.json"
    if args.factor_ab:
        recs = json.loads(res.read_text()) if res.exists() else []
        recs = [r for r in recs if r.get("name") != "gaussian_factor_ab"] + [factor_ab()]
        res.write_text(json.dumps(recs, indent=1) + "\n")
        print(json.dumps(recs[-1], indent=1))
        return
    load_start = os.getloadavg()
    dims = [1, 10, 100] if args.quick else [1, 3, 10, 31, 100]
    sizes = [10, 100, 1000] if args.quick else [10, 32, 100, 316, 1000]
    gens, seeds = (10, 100) if args.quick else (100, 100)
    seeds = args.seeds or seeds
    policies = ["replace", "accumulate"]
    axes = [
        f"model.dim={','.join(map(str, dims))}",
        f"generation.samples_per_generation={','.join(map(str, sizes))}",
        f"generation.policy={','.join(policies)}",
        f"generation.num_generations={gens}",
        f"generation.num_trials={seeds}",
        "generation.block_size=100",
        "generation.record_trials=100",
        "model.mean=null",
    ]
    config = REPO / "collapse_jax" / "configs" / "theory_gaussian.yaml"
    out = pathlib.Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    from collapse_jax import loop
    from collapse_jax.rundir import commits

    sw = sweep.Sweep(config, sweep.parse_axes(axes), out / "sweep")
    if args.baseline_only:
        recs = json.loads(res.read_text())
        rec = next(r for r in recs if r.get("name") == "gaussian_sweep")
        load = os.getloadavg()
        sampled_s, per_point = numpy_baseline(sw.points, gens)
        rec.update(
            baseline_sampled_s=round(sampled_s, 2),
            baseline_wall_s_extrapolated=round(sampled_s * seeds, 1),
            ratio=round(sampled_s * seeds / rec["sweep_wall_s"], 2),
            baseline_per_point=per_point,
            baseline_load_average=[round(v, 2) for v in load],
        )
        res.write_text(json.dumps(recs, indent=1) + "\n")
        print(
            json.dumps(
                {k: v for k, v in rec.items() if "baseline" in k and k != "baseline_per_point"}
            )
        )
        return
    sw.prepare()
    batches = sweep.batches(sw)
    points = len(sw.points)
    # The sweep as `collapse-jax sweep` runs it (sweep.run_sweep), batch by batch, so that a
    # batch stopped by a non-finite metric (see `failures`) does not hide the others' timings.
    per_batch, failures = [], []
    t = time.perf_counter()
    for batch in batches:
        cfgs = [sw.configs[i] for i in batch]
        tb = time.perf_counter()
        try:
            loop.run_batch(cfgs, [sw.point_dir(i) for i in batch])
        except commits.NonFiniteMetric as e:
            failures.append({"points": [sw.points[i]["dir"] for i in batch], "error": str(e)})
        per_batch.append(
            {
                "points": [sw.points[i]["dir"].split("/")[-1] for i in batch],
                "wall_s": round(time.perf_counter() - tb, 2),
            }
        )
        print(f"batch {len(per_batch)}/{len(batches)}: {per_batch[-1]}", file=sys.stderr)
    sweep_s = time.perf_counter() - t
    sweep.write_table(sw)
    sweep.sweep_figures(sw)

    # Before/after on the first batch: its points one after the other (as before batching;
    # compile included in both, each path compiling its own program).
    first = [sw.configs[i] for i in batches[0]]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_sweep_seq_"))
    t = time.perf_counter()
    for j, c in enumerate(first):
        loop.run_generations(c, tmp / f"p{j}")
    sequential_first_s = time.perf_counter() - t

    sampled_s, per_point = numpy_baseline(sw.points, gens)
    numpy_s = sampled_s * seeds
    rec = {
        "name": "gaussian_sweep",
        "device": f"{jax.default_backend()}:{jax.devices()[0].device_kind}",
        "config": {
            "dims": dims,
            "sizes": sizes,
            "policies": policies,
            "seeds": seeds,
            "generations": gens,
            "points": points,
            "method": "exact",
        },
        "sweep_batches": len(batches),
        "sweep_wall_s": round(sweep_s, 2),
        "sweep_per_batch": per_batch,
        "first_batch_points_one_after_another_s": sequential_first_s,
        "first_batch_batched_s": per_batch[0]["wall_s"],
        "nonfinite_failures": failures,
        "baseline": "separate single-chain NumPy processes (sample method), extrapolated",
        "baseline_processes": points * seeds,
        "baseline_sampled_processes": points,
        "baseline_sampled_s": round(sampled_s, 2),
        "baseline_wall_s_extrapolated": round(numpy_s, 1),
        "ratio": round(numpy_s / sweep_s, 2),
        "baseline_per_point": per_point,
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "note": (
            "measured on a shared 2-core CPU under contention from other jobs (see the load "
            "averages, 1/5/15 min), under nice -n 10; a batch listed in nonfinite_failures "
            "computed all its generations but stopped at the commit of a NaN metric (none is "
            "expected since the Gaussian learner's factor is rank-robust: singular M <= d fits "
            "and collapsed chains sample exactly, logdet_cov = -inf)"
        ),
    }
    res.parent.mkdir(parents=True, exist_ok=True)
    res.write_text(json.dumps([rec], indent=1) + "\n")
    print(json.dumps({k: v for k, v in rec.items() if k != "baseline_per_point"}, indent=1))
    print(f"sweep directory (figures): {out / 'sweep'}")


if __name__ == "__main__":
    main()

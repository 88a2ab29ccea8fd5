"""Throughput of the theory models against a straightforward vectorised NumPy implementation of
the same process, in one process on one machine (issue 2, item 4).

Measurements (one JSON object each, written to benchmarks/results/theory-<platform>.json):
- gaussian_sample: samples/s of `gaussian.simulate(method="sample")` (10^4 chains x 200
  generations x M = 100, d = 1) vs NumPy drawing and refitting the same points; vs the same
  simulation drawing `jax.random.normal` under philox4x32 (interleaved); and as a fraction of
  the raw throughput of its normals (`gaussian.standard_normals`), the sampler's limit.
- gaussian_exact: chain-generations/s of `method="exact"` at M = 1000 vs NumPy drawing the M
  points (the process as written) and vs NumPy drawing the statistics (chi-square + normal),
  the latter timed interleaved with it.
- rng_normals: raw normals/s of each JAX PRNG vs NumPy (the sample method's ceiling).
- discrete_sample / discrete_exact: K = 10 states, M = 100 / 1000, vs NumPy inverse-CDF draws
  and NumPy's `Generator.multinomial` (C-level conditional binomials; interleaved with the exact
  method).

Usage: python benchmarks/bench_theory.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

import jax
import numpy as np

from collapse_jax.bench import baselines, harness
from collapse_jax.theory import discrete, gaussian


def bench_gaussian_sample(key, rng, chains, gens, repeats, quick, record):
    """The sample method (its default rng_impl, fused threefry normals) against NumPy and the
    same simulation with `jax.random.normal` under philox4x32 (the default before), all three
    timed interleaved; the limits are raw normals/s of each source (one call, summed)."""
    m = 100
    n_samples = chains * gens * m
    runs = {
        impl: lambda impl=impl: gaussian.simulate(
            key, chains=chains, generations=gens, sample_size=m, method="sample", rng_impl=impl
        )
        for impl in ("threefry2x32", "philox4x32")
    }
    runs["numpy"] = lambda: baselines.numpy_gaussian_sample(rng, chains, gens, m)
    compile_s, med = harness.interleaved(runs, repeats)  # all three see the same machine load
    t, t_old, t_np = med["threefry2x32"], med["philox4x32"], med["numpy"]
    pkey = jax.random.key(0, impl="philox4x32")
    raw = jax.jit(lambda k: jax.random.normal(k, (chains, m)).sum())
    _, t_raw = harness.timeit(lambda: raw(pkey).block_until_ready(), 5)
    fused = jax.jit(lambda k: gaussian.standard_normals(k, chains * m).sum())
    _, t_fused = harness.timeit(lambda: fused(key).block_until_ready(), 5)
    fused_rate = chains * m / t_fused
    record(
        "gaussian_sample",
        dict(chains=chains, generations=gens, M=m, d=1),
        compile_s["threefry2x32"],
        t,
        n_samples / t,
        (n_samples / t) / (n_samples / t_np),
        baseline="numpy",
        baseline_throughput=n_samples / t_np,
        philox_path_throughput=n_samples / t_old,
        speedup_vs_philox_path=t_old / t,
        raw_philox_normal_throughput=chains * m / t_raw,
        raw_fused_normal_throughput=fused_rate,
        fraction_of_rng_limit=(n_samples / t) / fused_rate,
        unit="samples/s",
    )


def bench_gaussian_exact(key, rng, chains, gens, repeats, quick, record):
    m = 1000
    cg = chains * gens
    cs, ts = harness.interleaved(
        {
            "jax": lambda: gaussian.simulate(
                key, chains=chains, generations=gens, sample_size=m, method="exact"
            ),
            "numpy": lambda: baselines.numpy_gaussian_exact(rng, chains, gens, m),
        },
        repeats + 2,
    )
    c, t, t_npx = cs["jax"], ts["jax"], ts["numpy"]
    np_gens = 5 if quick else 10  # NumPy drawing 10^7 points per generation is slow
    _, t_np = harness.timeit(lambda: baselines.numpy_gaussian_sample(rng, chains, np_gens, m), 1)
    record(
        "gaussian_exact",
        dict(chains=chains, generations=gens, M=m, d=1),
        c,
        t,
        cg / t,
        (cg / t) / (chains * np_gens / t_np),
        baseline="numpy drawing the M points",
        baseline_throughput=chains * np_gens / t_np,
        ratio_vs_numpy_exact=(cg / t) / (cg / t_npx),
        numpy_exact_throughput=cg / t_npx,
        unit="chain-generations/s",
    )


def _zipf10():
    return baselines.zipf_probs(10)


def bench_discrete_sample(key, rng, chains, gens, repeats, quick, record):
    probs, m = _zipf10(), 100
    n_samples = chains * gens * m
    c, t = harness.timeit(
        lambda: discrete.simulate(
            key, probs=probs, chains=chains, generations=gens, sample_size=m, method="sample"
        ),
        repeats,
    )
    np_gens = max(1, gens // 4)
    _, t_np = harness.timeit(
        lambda: baselines.numpy_discrete_sample(rng, probs, chains, np_gens, m), 1
    )
    np_rate = chains * np_gens * m / t_np
    record(
        "discrete_sample",
        dict(chains=chains, generations=gens, M=m, K=10),
        c,
        t,
        n_samples / t,
        (n_samples / t) / np_rate,
        baseline="numpy inverse CDF",
        baseline_throughput=np_rate,
        unit="samples/s",
    )


def bench_discrete_exact(key, rng, chains, gens, repeats, quick, record):
    probs, m = _zipf10(), 1000
    cg = chains * gens
    cs, ts = harness.interleaved(
        {
            "jax": lambda: discrete.simulate(
                key, probs=probs, chains=chains, generations=gens, sample_size=m, method="exact"
            ),
            "numpy": lambda: baselines.numpy_discrete_exact(rng, probs, chains, gens, m),
        },
        repeats,
    )
    c, t, t_npx = cs["jax"], ts["jax"], ts["numpy"]
    _, t_np = harness.timeit(lambda: baselines.numpy_discrete_sample(rng, probs, chains, 2, m), 1)
    record(
        "discrete_exact",
        dict(chains=chains, generations=gens, M=m, K=10),
        c,
        t,
        cg / t,
        (cg / t) / (chains * 2 / t_np),
        baseline="numpy inverse CDF (M draws)",
        baseline_throughput=chains * 2 / t_np,
        ratio_vs_numpy_multinomial=(cg / t) / (cg / t_npx),
        numpy_multinomial_throughput=cg / t_npx,
        unit="chain-generations/s",
    )


def bench_rng_normals(key, rng, chains, gens, repeats, quick, record):
    """The sample method's ceiling: raw standard normals per second of each JAX PRNG (one call
    drawing chains x 100 normals, summed) against NumPy's `standard_normal`. `rbg`/`unsafe_rbg`
    are shown for reference only: they draw a vmapped batch from its first key, which breaks
    "chain i gives the same result whatever the batch" (NOTES.md), so the chains cannot use them.
    """
    n = chains * 100
    _, t_np = harness.timeit(lambda: rng.standard_normal(n).sum(), repeats + 2)
    for impl in ("threefry2x32", "philox4x32", "rbg", "unsafe_rbg"):
        k = jax.random.key(0, impl=impl)
        f = jax.jit(lambda k: jax.random.normal(k, (n,)).sum())
        c, t = harness.timeit(lambda f=f, k=k: f(k).block_until_ready(), repeats + 2)
        record(
            f"rng_normals_{impl}",
            dict(normals=n),
            c,
            t,
            n / t,
            t_np / t,
            baseline="numpy standard_normal",
            baseline_throughput=n / t_np,
            unit="normals/s",
        )


BENCHES = {
    "rng_normals": bench_rng_normals,
    "gaussian_sample": bench_gaussian_sample,
    "gaussian_exact": bench_gaussian_exact,
    "discrete_sample": bench_discrete_sample,
    "discrete_exact": bench_discrete_exact,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer generations and repeats")
    ap.add_argument("--only", default="", help="comma-separated measurements (default: all)")
    ap.add_argument("--out", default=None, help="output JSON (default benchmarks/results/)")
    args = ap.parse_args()
    dev = jax.devices()[0]
    device = f"{dev.platform}:{getattr(dev, 'device_kind', '')}"
    repeats = 1 if args.quick else 3
    chains, gens = 10_000, (50 if args.quick else 200)
    key = jax.random.key(0)
    rng = np.random.default_rng(0)
    results = []

    def record(name, config, compile_s, median_s, throughput, ratio, **extra):
        row = dict(
            name=name,
            device=device,
            config=config,
            compile_s=round(compile_s, 3),
            median_ms=round(1e3 * median_s, 3),
            throughput=throughput,
            ratio=ratio,
            **extra,
            load_avg_1min=round(os.getloadavg()[0], 2),  # the machine may be shared: say so
        )
        results.append(row)
        print(json.dumps(row), flush=True)

    names = [n for n in args.only.split(",") if n] or list(BENCHES)
    for name in names:
        if name not in BENCHES:
            raise SystemExit(f"unknown measurement {name!r}; choose from {sorted(BENCHES)}")
        BENCHES[name](key, rng, chains, gens, repeats, args.quick, record)

    out = (
        pathlib.Path(args.out)
        if args.out
        else (pathlib.Path(__file__).parent / "results" / f"theory-{dev.platform}.json")
    )
    # --only keeps the other measurements of an earlier full run.
    harness.write_rows(out, results, keep_others=bool(args.only))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

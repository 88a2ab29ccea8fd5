"""Benchmarks of the theory chains: `gaussian.simulate` and `discrete.simulate` (exact and sample
methods) against NumPy implementations of the same processes (`bench.baselines`). Each row also
times the device's work (`kernel_s`, waited for with `block_until_ready`) and the copy of every
generation of every chain to the host (`copy_s`) apart (`simulate(..., timings=)`)."""

from __future__ import annotations

import jax
import numpy as np

from collapse_jax.bench.baselines import (
    numpy_discrete_exact,
    numpy_discrete_sample,
    numpy_gaussian_exact,
    numpy_gaussian_sample,
    zipf_probs,
)
from collapse_jax.bench.harness import Suite, once, row, timeit
from collapse_jax.theory import discrete, gaussian

# The rows `bench_theory` writes (each may be asked for alone: `--only gaussian_exact`).
THEORY_ROWS = ("gaussian_exact", "gaussian_sample", "discrete_exact", "discrete_sample")


def bench_theory(suite: Suite, ctx: dict) -> list[dict]:
    """The theory chains (`simulate`) against NumPy implementations of the same processes."""
    rows = []
    r, g, reps = suite.theory_chains, suite.theory_generations, suite.repeats
    key = jax.random.key(0)
    rng = np.random.default_rng(0)
    rn = min(suite.numpy_chains, r)
    probs = zipf_probs(10)
    cases = [
        ("gaussian_exact", 1000, "chain-generations/s",
         lambda m, t: gaussian.simulate(key, chains=r, generations=g, sample_size=m,
                                        method="exact", timings=t),
         lambda m: numpy_gaussian_exact(rng, rn, g, m), "numpy standard_normal + chisquare"),
        ("gaussian_sample", 100, "samples/s",
         lambda m, t: gaussian.simulate(key, chains=r, generations=g, sample_size=m,
                                        method="sample", timings=t),
         lambda m: numpy_gaussian_sample(rng, rn, g, m), "numpy draw + refit"),
        ("discrete_exact", 1000, "chain-generations/s",
         lambda m, t: discrete.simulate(key, probs=probs, chains=r, generations=g,
                                        sample_size=m, method="exact", timings=t),
         lambda m: numpy_discrete_exact(rng, probs, rn, g, m), "numpy multinomial"),
        ("discrete_sample", 100, "samples/s",
         lambda m, t: discrete.simulate(key, probs=probs, chains=r, generations=g,
                                        sample_size=m, method="sample", timings=t),
         lambda m: numpy_discrete_sample(rng, probs, rn, max(1, g // 10), m),
         "numpy inverse CDF + bincount"),
    ]  # fmt: skip
    for name, m, unit, ours, theirs, base_name in cases:
        if ctx["only_theory"] and name not in ctx["only_theory"]:
            continue
        compile_s, med = timeit(lambda ours=ours, m=m: ours(m, None), reps)
        # One more call, compiled above: the same programs, the copies no longer overlapping
        # (one call: at 10^6 chains a call copies up to 4 GB to the host).
        apart: dict[str, float] = {}
        ours(m, apart)
        kernel_s, copy_s = apart["kernel_s"], apart["copy_s"]
        per = 1 if unit == "chain-generations/s" else m
        value = r * g * per / med
        base = None
        if suite.baselines:
            t_np = once(lambda theirs=theirs, m=m: theirs(m))
            np_gens = g if name != "discrete_sample" else max(1, g // 10)
            base = rn * np_gens * per / t_np
        rows.append(
            row(
                name,
                value,
                unit,
                compile_s=compile_s,
                median_s=med,
                config=dict(chains=r, generations=g, M=m, numpy_chains=rn),
                baseline=base_name if base else None,
                base_value=base,
                kernel_s=kernel_s,
                copy_s=copy_s,
                note="median_ms: simulate end to end (the device's work and the copy of every "
                "generation to the host overlap); kernel_s, copy_s: one more call, timed apart",
            )
        )
    return rows

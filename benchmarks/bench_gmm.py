"""EM throughput: chains x EM iterations per second, JAX (vmapped) vs scikit-learn chain by chain.

The paper's setting: 2 components, full covariance, k-means initialisation, tol 1e-5, up to 2000
iterations, N = 1000 points of a 2-D Gaussian blob per chain. JAX runs all chains at once, in two
ways: one jitted `vmap` of the per-chain `while_loop` (it becomes a single loop that runs until
the slowest chain stops, converged chains frozen by masks), and `gmm.fit_em`'s host loop that
compacts unfinished chains every 32 iterations. scikit-learn's `GaussianMixture` fits a subset of
the same chains one by one in the same process; throughput counts the EM iterations each
implementation reports (`n_iter`), initialisation time included on both sides.

Writes `benchmarks/results/gmm-<device>.json`: one object per measurement (name, device, config,
compile_s, median_ms, throughput, ratio = throughput / scikit-learn's).

    python benchmarks/bench_gmm.py [--chains 1000] [--points 1000] [--sk-chains 40]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
import warnings

import jax
import numpy as np
import threadpoolctl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chains", type=int, default=1000)
    ap.add_argument("--points", type=int, default=1000)
    ap.add_argument("--components", type=int, default=2)
    ap.add_argument("--sk-chains", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from sklearn.mixture import GaussianMixture

    from collapse_jax import gmm

    rng = np.random.default_rng(0)
    xs = rng.normal(size=(args.chains, args.points, 2)).astype(np.float32)
    c = args.components
    config = {
        "chains": args.chains,
        "points": args.points,
        "dim": 2,
        "components": c,
        "tol": 1e-5,
        "max_iter": 2000,
        "init": "kmeans",
        "dtype": "float32",
    }
    device = jax.devices()[0]
    dev = "cpu" if device.platform == "cpu" else str(device.device_kind)
    results = []

    # scikit-learn, chain by chain (the baseline).
    t0 = time.perf_counter()
    sk_iters = 0
    # One BLAS thread: on a small shared CPU, scikit-learn's default threading was ~20x slower
    # per fit (threads oversubscribe the cores), so this is the stronger baseline.
    with warnings.catch_warnings(), threadpoolctl.threadpool_limits(1):
        warnings.simplefilter("ignore")
        for i in range(args.sk_chains):
            g = GaussianMixture(c, tol=1e-5, max_iter=2000, random_state=i).fit(xs[i])
            sk_iters += g.n_iter_
    sk_s = time.perf_counter() - t0
    sk_tp = sk_iters / sk_s
    results.append(
        {
            "name": "em_sklearn_chain_by_chain",
            "device": "cpu",
            "config": {
                **config,
                "chains": args.sk_chains,
                "mean_iters": sk_iters / args.sk_chains,
                "blas_threads": 1,
                "median_ms": "extrapolated to all chains",
            },
            "compile_s": 0.0,
            "median_ms": round(1000 * sk_s / args.sk_chains * args.chains, 1),
            "throughput": round(sk_tp, 1),
            "ratio": 1.0,
        }
    )

    key = jax.random.key(0)
    xj = jax.device_put(xs)

    def single_loop(x, k):
        return gmm.fit_em(x, n_components=c, key=k, tol=1e-5, max_iter=2000)

    variants = {
        "em_jax_vmap_single_loop": jax.jit(single_loop),  # traced: no host compaction
        "em_jax_compacted": lambda x, k: gmm.fit_em(
            x, n_components=c, key=k, tol=1e-5, max_iter=2000
        ),
    }
    for name, fn in variants.items():
        t0 = time.perf_counter()
        res = jax.block_until_ready(fn(xj, key))
        first = time.perf_counter() - t0
        # A second warm-up key: the compacted loop compiles each batch size it meets.
        jax.block_until_ready(fn(xj, jax.random.fold_in(key, 99)))
        times = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            res = jax.block_until_ready(fn(xj, jax.random.fold_in(key, r)))
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        n_iter = np.asarray(res.n_iter)
        tp = float(n_iter.sum()) / med
        results.append(
            {
                "name": name,
                "device": dev,
                "config": {
                    **config,
                    "mean_iters": float(n_iter.mean()),
                    "max_iters": int(n_iter.max()),
                    "converged": float(np.asarray(res.converged).mean()),
                },
                "compile_s": round(max(first - med, 0.0), 2),
                "median_ms": round(1000 * med, 1),
                "throughput": round(tp, 1),
                "ratio": round(tp / sk_tp, 2),
            }
        )

    out = pathlib.Path(__file__).parent / "results" / f"gmm-{'cpu' if dev == 'cpu' else 'gpu'}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    for r in results:
        print(
            json.dumps({k: r[k] for k in ("name", "compile_s", "median_ms", "throughput", "ratio")})
        )


if __name__ == "__main__":
    main()

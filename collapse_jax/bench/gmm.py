"""Benchmark of EM: the paper's GMM setting on all chains at once (`gmm.fit_em`), against
scikit-learn's `GaussianMixture` chain by chain where installed."""

from __future__ import annotations

import time
import warnings

import jax
import numpy as np

from collapse_jax import gmm
from collapse_jax.bench.harness import Suite, block, installed, row, timeit

try:  # scikit-learn's dependency: only the baseline needs it
    import threadpoolctl
except ImportError:
    threadpoolctl = None


def bench_gmm(suite: Suite, ctx: dict) -> list[dict]:
    """EM of the paper's GMM setting (2 components, full covariance, k-means init, tol 1e-5, up to
    2000 iterations) on 2-D Gaussian blobs, all chains at once (`gmm.fit_em`)."""
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(suite.gmm_chains, suite.gmm_points, 2)).astype(np.float32)
    xj = jax.device_put(xs)
    key = jax.random.key(0)
    out = {}

    def run():
        out["res"] = block(gmm.fit_em(xj, n_components=2, key=key, tol=1e-5, max_iter=2000))

    compile_s, med = timeit(run, suite.repeats)
    iters = float(np.asarray(out["res"].n_iter).sum())
    value = iters / med
    base = None
    if suite.baselines and installed("sklearn") and threadpoolctl is not None:
        from sklearn.mixture import GaussianMixture

        t = time.perf_counter()
        sk_iters = 0
        # One BLAS thread: faster per fit on a small shared CPU (threads oversubscribe).
        with warnings.catch_warnings(), threadpoolctl.threadpool_limits(1):
            warnings.simplefilter("ignore")
            for i in range(suite.sklearn_chains):
                fit = GaussianMixture(2, tol=1e-5, max_iter=2000, random_state=i).fit(xs[i])
                sk_iters += fit.n_iter_
        base = sk_iters / (time.perf_counter() - t)
    return [
        row(
            "gmm_em",
            value,
            "chain-iterations/s",
            compile_s=compile_s,
            median_s=med,
            config=dict(
                chains=suite.gmm_chains,
                points=suite.gmm_points,
                dim=2,
                components=2,
                mean_iterations=iters / suite.gmm_chains,
                sklearn_chains=suite.sklearn_chains,
            ),
            baseline="scikit-learn chain by chain (1 BLAS thread)" if base else None,
            base_value=base,
        )
    ]

"""Reporting of GMM runs (`kind: gmm`): chain 0's samples at chosen generations (the paper's
panels), the chain means of the L2 distance and of the fitted covariance's trace, and the
closed-form mean of that trace. Chain 0's data are recomputed by the loop core (`replay_chain`)."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from collapse_jax import loop
from collapse_jax.config import GenerationConfig
from collapse_jax.gmm.em import moments
from collapse_jax.gmm.learner import GMMConfig, GMMLearner


def replay_chain(
    learner: GMMLearner, seed: int, generations: list[int], generation: Any = None
) -> dict[int, np.ndarray]:
    """Training data of chain 0 at the given generations, recomputed by the loop core with the
    run's keys (`loop.replay_data`): the run need not store every generation's data.

    Args:
      learner: the run's learner; seed: the run's seed; generations: indices (0 = real data).
      generation: the run's `GenerationConfig` (policy and sizes; None: the defaults).
    Returns:
      {generation: [M_g, d] points}.
    """
    gcfg = GenerationConfig() if generation is None else generation
    return loop.replay_data(learner, gcfg, seed, generations)


def expected_curves(
    config: GMMConfig,
    mode: str,
    sample_sizes: np.ndarray,
    *,
    filtered: bool = False,
    generation: Any = None,
) -> dict[str, np.ndarray]:
    """E[cov_trace] per generation under the "replace" policy without sampling bias (else empty).

    Every M-step matches the mixture's overall mean and covariance to the training data's
    (plus reg_covar on the diagonal), so whatever the components do the overall covariance
    follows the Gaussian MLE chain: E[Sigma_g] = (M_g - 1) / M_g * Sigma_{g-1} + reg * I.

    Args:
      config: the run's model config; mode: its policy; sample_sizes: [G] training-set sizes.
      filtered: whether the run filters synthetic data by likelihood (not used by this curve).
      generation: the run's `generation:` block (unused here).
    """
    if mode != "replace" or config.sampling_bias != 1.0:
        return {}
    _, cov = moments(config.true_mixture())
    t = float(np.trace(np.asarray(cov, np.float64)))
    out = []
    for m in np.asarray(sample_sizes, dtype=np.float64):
        t = (m - 1.0) / m * t + config.reg_covar * config.dim
        out.append(t)
    return {"cov_trace": np.asarray(out)}


def figures(learner: GMMLearner, run: Any, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """The paper's GMM panels: chain 0's training data at `scatter_generations` (gmm_scatter.png),
    and the chain mean of the L2 distance and of the fitted covariance's trace over generations
    (gmm_l2.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = learner.config
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    finished = run.finished_generations()
    gens = [g for g in cfg.scatter_generations if finished and g <= finished[-1]]
    gcfg = run.config.generation
    if gens and gcfg.policy != "accumulate":  # accumulate changes shapes every generation
        points = replay_chain(learner, run.config.seed, gens, gcfg)
        fig, axes = plt.subplots(1, len(gens), figsize=(2.6 * len(gens), 2.8), squeeze=False)
        lim = None
        for ax, g in zip(axes[0], gens):
            pts = points[g][: cfg.scatter_points]
            y = pts[:, 1] if cfg.dim > 1 else np.zeros(len(pts))
            ax.scatter(pts[:, 0], y, s=2, alpha=0.5)
            if lim is None:  # every panel on generation 0's scale, as in the paper
                lo, hi = pts.min(axis=0), pts.max(axis=0)
                pad = 0.1 * (hi - lo + 1e-9)
                lim = (lo - pad, hi + pad)
            ax.set_xlim(lim[0][0], lim[1][0])
            if cfg.dim > 1:
                ax.set_ylim(lim[0][1], lim[1][1])
            ax.set_title(f"generation {g}", fontsize=9)
        fig.tight_layout()
        path = out_dir / "gmm_scatter.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)
    l2 = run.series("l2")
    if l2.size:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3))
        axes[0].plot(l2)
        axes[0].set_yscale("log")
        axes[0].set_xlabel("generation")
        axes[0].set_ylabel("squared L2 to the real distribution")
        axes[1].plot(run.series("cov_trace"), label="chain mean")
        sizes = np.array([r["sample_size"] for r in run.rows()])
        expected = expected_curves(
            cfg, gcfg.policy, sizes, filtered=gcfg.likelihood_filter is not None
        ).get("cov_trace")
        if expected is not None:
            axes[1].plot(expected, "--", label="expected (Gaussian MLE chain)")
        axes[1].set_xlabel("generation")
        axes[1].set_ylabel("trace of the fitted covariance")
        axes[1].legend(fontsize=7, frameon=False)
        fig.tight_layout()
        path = out_dir / "gmm_l2.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)
    return files

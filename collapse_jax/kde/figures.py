"""Reporting of KDE runs (`kind: kde`): the true density against chain 0's fitted KDEs, and the
closed-form variance of the fitted 1-D KDE (`learner.expected_variance`)."""

from __future__ import annotations

import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np

from collapse_jax.kde.learner import (
    KDEConfig,
    KDELearner,
    KDEParams,
    expected_variance,
    kde_log_prob,
    kde_variance,
)
from collapse_jax.rundir import fileio


def expected_curves(
    config: KDEConfig,
    mode: str,
    sample_sizes: np.ndarray,
    *,
    filtered: bool = False,
    generation: Any = None,
) -> dict[str, np.ndarray]:
    """E `variance` for 1-D Gaussian data, a fixed bandwidth and replace (constant sizes).

    Args:
      config: the run's model config; mode: its policy; sample_sizes: [G] training-set sizes.
      filtered: whether the run filters synthetic data by likelihood (then no curve is known).
      generation: the run's `generation:` block (unused here).
    """
    c = config
    sizes = np.asarray(sample_sizes)
    if filtered:
        return {}
    if (
        c.dataset != "gaussian"
        or c.data_dim != 1
        or c.sampling_bias != 1.0
        or mode != "replace"
        or not np.all(sizes == c.num_points)
    ):
        return {}
    return {
        "variance": expected_variance(len(sizes), num_points=c.num_points, bandwidth=c.bandwidth)
    }


def figures(learner: KDELearner, run: Any, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """`kde_density.png`: the true density and chain 0's fitted KDE at the generations whose
    parameters the run kept (`keep_params: all` keeps the last of every block)."""
    import matplotlib.pyplot as plt

    saved = sorted(p / "params.npz" for p in (run.path / "params").glob("gen_*"))
    # The loop's committed state holds Carry(params, data): the params' leaves come first.
    if not saved and (run.path / "state" / "carry.npz").exists():
        saved.append(run.path / "state" / "carry.npz")
    saved = [p for p in saved if p.exists()]
    if not saved:
        return []
    pick = [saved[i] for i in np.unique(np.linspace(0, len(saved) - 1, 4).round().astype(int))]
    fits = []
    for p in pick:
        leaves = fileio.load_npz(p)
        gen = "last" if p.parent.name == "state" else str(int(p.parent.name.split("_")[1]))
        centers, chol = leaves["leaf_00000"][0], leaves["leaf_00001"][0]  # chain 0
        fits.append((gen, KDEParams(jnp.asarray(centers), jnp.asarray(chol))))
    c = learner.config
    path = out_dir / "kde_density.png"
    if c.data_dim == 1:
        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
        half = max(4.0, *(4.0 * float(jnp.sqrt(kde_variance(p)[0, 0])) for _, p in fits))
        grid = jnp.linspace(-half, half, 400)[:, None]
        ax.plot(grid[:, 0], jnp.exp(learner.truth_log_prob(grid)), "k--", lw=1.2, label="truth")
        for i, (gen, p) in enumerate(fits):
            ax.plot(
                grid[:, 0],
                jnp.exp(kde_log_prob(p, grid)),
                color=f"C{i}",
                lw=1.2,
                label=f"gen {gen} (chain 0)",
            )
        ax.set_xlabel("x")
        ax.set_ylabel("density")
        ax.legend(fontsize=7, frameon=False)
    else:
        lo, hi = (-2.0, 3.0) if c.dataset == "two_moons" else (-2.5, 2.5)
        g = jnp.linspace(lo, hi, 120)
        xy = jnp.stack(jnp.meshgrid(g, g), -1).reshape(-1, 2)
        panels = [("truth", learner.truth_log_prob(xy))] + [
            (f"gen {gen} (chain 0)", kde_log_prob(p, xy)) for gen, p in fits
        ]
        fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8), dpi=110)
        for ax, (title, lp) in zip(axes, panels):
            ax.imshow(
                np.exp(np.asarray(lp)).reshape(120, 120),
                origin="lower",
                extent=(lo, hi, lo, hi),
                cmap="viridis",
            )
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{run.path.name}: KDE of its own samples ({c.dataset})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return [path]

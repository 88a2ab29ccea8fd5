"""Reporting of the theory models (`kind: gaussian`, `kind: discrete`): their closed-form chain
means and paper-style figures from a run directory (`rundir.reader.Run`).

Gaussian: fitted densities drifting over generations (Shumailov et al. 2024, Fig. 2-like) and
per-chain covariance trajectories with the closed-form mean (flat for the unbiased estimator)
against the median (falling: almost-sure collapse). Discrete: surviving support and absorbed
fraction against the exactly propagated Wright-Fisher expectations, and where chains are absorbed
against the original probabilities (the limit).
"""

from __future__ import annotations

import pathlib
from typing import Any

# A plotting module, imported only to draw figures: matplotlib at its top (TID253 lists it).
import matplotlib  # noqa: TID253

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402, TID253
import numpy as np  # noqa: E402

from collapse_jax.config import split_shares  # noqa: E402
from collapse_jax.theory import analytic  # noqa: E402
from collapse_jax.theory.discrete import DiscreteConfig  # noqa: E402
from collapse_jax.theory.gaussian import GaussianConfig  # noqa: E402


def expected_curves(
    config: GaussianConfig | DiscreteConfig,
    mode: str,
    sample_sizes: np.ndarray,
    *,
    filtered: bool = False,
    generation: Any = None,
) -> dict[str, np.ndarray]:
    """Closed-form chain means per generation, for every policy that has one.

    Gaussian: `trace_cov`, `mean_dist2` (and `var` for d = 1) under every policy; `logdet_cov`
    (and `w2_squared` for d = 1) under "replace" (`analytic.gaussian_expectations`), and
    `logdet_cov` = -inf under the accumulate policies when generation 0 has M_0 <= d points (its
    span is never left). Discrete (without truncation): `gini_simpson` under every policy; the
    exactly propagated `support_size`, `lost_tail_mass`, `absorbed` under "replace". Policies
    other than "replace" need `generation` (their shares); "mix" needs fresh real data
    (`real_data: fixed` correlates every generation with generation 0's real set: no closed form
    here). Nothing is returned for a run that filters synthetic data by likelihood (it changes
    the law).

    Args:
      config: the run's model config.
      mode: the run's policy ("replace", "mix", "accumulate", "accumulate_subsample").
      sample_sizes: [G] the training-set size of each generation (index 0 = real data; under
        "accumulate" the cumulative size, as the summary rows record it).
      filtered: whether the run filters synthetic data by likelihood.
      generation: the run's `generation:` block (`config.GenerationConfig`).
    """
    sizes = np.asarray(sample_sizes)
    if filtered or sizes.size == 0:
        return {}
    if isinstance(config, DiscreteConfig) and config.truncation is not None:
        return {}
    if mode == "replace":
        if isinstance(config, GaussianConfig):
            return analytic.gaussian_expectations(
                sizes,
                config.mean_array(),
                config.cov_array(),
                config.estimator,
                config.sampling_bias,
            )
        out = analytic.discrete_expectations(config.probs_array(), sizes)
        out.pop("absorbed_at", None)
        return out
    if generation is None or mode not in analytic.POLICIES_WITH_CLOSED_FORMS:
        return {}
    if mode == "mix" and generation.gamma > 0 and generation.real_data != "fresh":
        return {}
    if mode == "accumulate":  # the rows record the pool's size: the added counts are its steps
        sizes = np.diff(sizes, prepend=0)
    shares = (generation.alpha, generation.beta, generation.gamma)
    counts = [int(sizes[0])] + [split_shares(int(m), mode, shares) for m in sizes[1:]]
    if isinstance(config, DiscreteConfig):
        return {
            "gini_simpson": analytic.discrete_policy_gini_simpson(
                config.probs_array(), mode, counts
            )
        }
    mom = analytic.gaussian_policy_moments(mode, counts, config.estimator, config.sampling_bias)
    cov0 = config.cov_array()
    out = {
        "trace_cov": np.trace(cov0) * mom["cov"],
        "mean_dist2": np.trace(cov0) * mom["mean"],
    }
    if config.dim == 1:
        out["var"] = cov0[0, 0] * mom["cov"]
    if mode != "mix" and sizes[0] <= config.dim:  # singular from generation 0 on
        out["logdet_cov"] = np.full(sizes.size, -np.inf)
    return out


def figures(learner: Any, run: Any, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """The figures of a Gaussian or discrete run (`gaussian_figures`, `discrete_figures`)."""
    if isinstance(learner.config, GaussianConfig):
        return gaussian_figures(learner, run, out_dir)
    return discrete_figures(learner, run, out_dir)


def _curves(learner: Any, run: Any) -> dict[str, np.ndarray]:
    g = run.config.generation
    sizes = np.array([r["sample_size"] for r in run.rows()])
    return expected_curves(
        learner.config, g.policy, sizes, filtered=g.likelihood_filter is not None, generation=g
    )


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _pick_generations(num: int, count: int = 6) -> np.ndarray:
    return np.unique(np.round(np.geomspace(1, num, count)).astype(int) - 1)


def gaussian_figures(learner: Any, run: Any, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Writes gaussian_drift.png and gaussian_trajectories.png; returns the files."""
    out_dir = pathlib.Path(out_dir)
    rows = run.rows()
    if not rows:
        return []
    files = []
    gens = np.array([r["generation"] for r in rows])
    mu0 = float(learner.truth.mean[0])
    sd0 = float(np.sqrt(learner.truth.cov[0, 0]))
    try:
        means = run.trial_series("fitted_mean")[..., 0]  # [G, chains]
        sds = run.trial_series("fitted_std")[..., 0]
    except (KeyError, FileNotFoundError):
        means = sds = None
    if means is not None and means.shape[1] > 0:
        fig, axes = plt.subplots(
            1, min(3, means.shape[1]), figsize=(11, 3.4), dpi=110, squeeze=False
        )
        x = np.linspace(mu0 - 4 * sd0, mu0 + 4 * sd0, 400)
        picks = _pick_generations(len(gens))
        cmap = plt.get_cmap("viridis")
        for c, ax in enumerate(axes[0]):
            ax.plot(
                x,
                np.exp(-0.5 * ((x - mu0) / sd0) ** 2) / (sd0 * np.sqrt(2 * np.pi)),
                "k--",
                lw=1.2,
                label="original",
            )
            for j, g in enumerate(picks):
                m, s = means[g, c], max(sds[g, c], 1e-12)
                pdf = np.exp(-0.5 * ((x - m) / s) ** 2) / (s * np.sqrt(2 * np.pi))
                ax.plot(
                    x, pdf, color=cmap(j / max(len(picks) - 1, 1)), lw=1, label=f"gen {gens[g]}"
                )
            ax.set_title(f"chain {c}: fitted N(mu_n, sigma_n^2)", fontsize=9)
            ax.set_xlabel("x (first coordinate)")
        axes[0][0].legend(fontsize=6, frameon=False)
        files.append(_save(fig, out_dir / "gaussian_drift.png"))

    tr = run.trial_series("trace_cov")  # [G, chains]
    fig, ax = plt.subplots(figsize=(5.8, 3.8), dpi=110)
    ax.semilogy(gens, tr[:, :50], color="C0", alpha=0.15, lw=0.6)
    ax.semilogy(gens, run.series("trace_cov"), color="C0", lw=2, label="chain mean")
    ax.semilogy(gens, run.series("trace_cov_q50"), color="C2", lw=1.5, label="chain median")
    curves = _curves(learner, run)
    if "trace_cov" in curves:
        ax.semilogy(gens, curves["trace_cov"], "r--", lw=1.2, label="E[tr Sigma_n] (closed form)")
    if "logdet_cov" in curves and learner.config.dim == 1:
        ax.semilogy(
            gens,
            np.exp(curves["logdet_cov"]),
            "m:",
            lw=1.2,
            label="exp E[log sigma_n^2] (closed form)",
        )
    ax.set_xlabel("generation")
    ax.set_ylabel("trace of the fitted covariance")
    ax.legend(fontsize=7, frameon=False)
    ax.set_title(f"{run.path.name}: per-chain covariance", fontsize=9)
    files.append(_save(fig, out_dir / "gaussian_trajectories.png"))
    return files


def discrete_figures(learner: Any, run: Any, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Writes discrete_support.png, discrete_absorbed_at.png and (K <= 100) discrete_drift.png."""
    out_dir = pathlib.Path(out_dir)
    rows = run.rows()
    if not rows:
        return []
    files = []
    gens = np.array([r["generation"] for r in rows])
    curves = _curves(learner, run)
    fig, ax = plt.subplots(figsize=(5.8, 3.8), dpi=110)
    ax.plot(gens, run.series("support_size"), color="C0", lw=1.8, label="support size (mean)")
    if "support_size" in curves:
        ax.plot(gens, curves["support_size"], "C0--", lw=1, label="exact expectation")
    ax.set_xlabel("generation")
    ax.set_ylabel("states with p > 0")
    ax2 = ax.twinx()
    ax2.plot(gens, run.series("absorbed"), color="C3", lw=1.8, label="absorbed fraction")
    if "absorbed" in curves:
        ax2.plot(gens, curves["absorbed"], "C3--", lw=1, label="exact expectation")
    ax2.set_ylabel("fraction of chains in a delta")
    ax2.set_ylim(0, 1)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, frameon=False, loc="center right")
    ax.set_title(f"{run.path.name}: vanishing tails", fontsize=9)
    files.append(_save(fig, out_dir / "discrete_support.png"))

    p0 = np.asarray(learner.truth)
    at = run.mean_series("absorbed_at")  # [G, K]
    fig, ax = plt.subplots(figsize=(5.8, 3.6), dpi=110)
    k = np.arange(p0.size)
    ax.bar(k - 0.2, p0, width=0.4, color="0.6", label="p_0 (limit)")
    ax.bar(k + 0.2, at[-1], width=0.4, color="C3", label=f"absorbed at state, gen {gens[-1]}")
    ax.set_xlabel("state")
    ax.set_ylabel("fraction of chains")
    ax.legend(fontsize=7, frameon=False)
    files.append(_save(fig, out_dir / "discrete_absorbed_at.png"))

    try:
        probs = run.trial_series("probs")  # [G, chains, K]
    except (KeyError, FileNotFoundError):
        probs = None
    if probs is not None and probs.shape[1] > 0:
        fig, ax = plt.subplots(figsize=(6.2, 3.6), dpi=110)
        img = np.log10(np.maximum(probs[:, 0, :].T, 1e-4))
        im = ax.imshow(
            img,
            aspect="auto",
            origin="lower",
            cmap="magma",
            vmin=-4,
            vmax=0,
            extent=(gens[0] - 0.5, gens[-1] + 0.5, -0.5, p0.size - 0.5),
        )
        fig.colorbar(im, ax=ax, label="log10 p_n (chain 0)")
        ax.set_xlabel("generation")
        ax.set_ylabel("state")
        files.append(_save(fig, out_dir / "discrete_drift.png"))
    return files

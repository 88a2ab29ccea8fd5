"""Figures from a run directory: every metric against generations, plus the kind's own figures.

The generic figure of a scalar metric shows the chain mean with a +-2 SE band and the 5-95 %
chain quantiles, with the closed-form expectation overlaid where the kind has one (e.g. the
variance of the MLE Gaussian chain, ((M-1)/M)^n sigma_0^2). The kind's own figures and its
closed forms come from its reporting module, found through `config.MODEL_REGISTRY`
(`config.reporting_module`): learners draw nothing.
"""

from __future__ import annotations

import os
import pathlib
import shutil

# A plotting module, imported only to draw figures: matplotlib at its top (TID253 lists it).
import matplotlib  # noqa: TID253

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402, TID253
import numpy as np  # noqa: E402

from collapse_jax import config as config_lib  # noqa: E402
from collapse_jax.report import headline  # noqa: E402
from collapse_jax.rundir import fileio, reader  # noqa: E402

_SUFFIXES = ("_se", "_std", "_q05", "_q50", "_q95")


# Config keys and metrics in words, for axis labels and titles (others: the key's last part).
AXIS_WORDS = {
    "model.dim": "dimension d",
    "generation.samples_per_generation": "samples per generation M",
    "generation.policy": "data policy",
    "generation.num_trials": "chains",
    "generation.num_generations": "generations",
    "generation.alpha": "synthetic share alpha",
    "generation.beta": "previous-data share beta",
    "generation.gamma": "real-data share gamma",
    "model.sampling_bias": "sampling bias lambda (MAD)",
    "model.estimator": "covariance estimator",
    "model.num_states": "number of states K",
    "seed": "seed",
}
METRIC_WORDS = {
    "w2": "W2 distance to the original (not squared)",
    "w2_squared": "squared W2 distance to the original",
    "trace_cov": "trace of the fitted covariance",
    "logdet_cov": "log-determinant of the fitted covariance",
    "mean_dist2": "squared distance of the fitted mean to the original",
    "gini_simpson": "Gini-Simpson diversity",
    "support_size": "support size",
}


def words(key: str) -> str:
    """A config key or metric name in words (AXIS_WORDS, METRIC_WORDS, else its last part)."""
    return AXIS_WORDS.get(key) or METRIC_WORDS.get(key) or key.split(".")[-1].replace("_", " ")


def scalar_metrics(rows: list[dict]) -> list[str]:
    """Names of the chain-mean columns of the summary rows."""
    names: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k in ("generation", "sample_size") or k.endswith(_SUFFIXES):
                continue
            if isinstance(v, (int, float)) and k not in names:
                names.append(k)
    return names


def metric_figure(run: reader.Run, name: str, expected: np.ndarray | None, path: pathlib.Path):
    g = run.series("generation")
    mean = run.series(name)
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    q05, q95 = run.series(f"{name}_q05"), run.series(f"{name}_q95")
    if np.isfinite(q05).any():
        ax.fill_between(g, q05, q95, color="C0", alpha=0.15, lw=0, label="5-95% of chains")
    se = run.series(f"{name}_se")
    if np.isfinite(se).any():
        ax.fill_between(
            g, mean - 2 * se, mean + 2 * se, color="C0", alpha=0.35, lw=0, label="mean +- 2 SE"
        )
    ax.plot(g, mean, color="C0", lw=1.5, label="chain mean")
    q50 = run.series(f"{name}_q50")
    if np.isfinite(q50).any():
        ax.plot(g, q50, color="C0", lw=1, ls=":", label="median")
    if expected is not None:
        ax.plot(g, expected[: len(g)], color="C3", lw=1.2, ls="--", label="closed form")
    ax.set_xlabel("generation")
    ax.set_ylabel(name)
    ax.set_title(f"{run.path.name}: {words(name)}", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def expected_curves(
    cfg: config_lib.ExperimentConfig, sample_sizes: np.ndarray
) -> dict[str, np.ndarray]:
    """Closed-form chain means of a run's metrics per generation, from its kind's reporting
    module (`config.reporting_module`): {metric: [G] array}; empty when none is known.

    Args:
      cfg: the run's experiment config (its model block and its policy decide the curves).
      sample_sizes: [G] the training-set size of each generation (index 0 = real data).
    """
    reporting = config_lib.reporting_module(cfg.kind)
    if reporting is None:
        return {}
    g = cfg.generation
    return reporting.expected_curves(
        cfg.model,
        g.policy,
        np.asarray(sample_sizes),
        filtered=g.likelihood_filter is not None,
        generation=g,
    )


def make_figures(run: reader.Run, learner=None) -> list[pathlib.Path]:
    """Writes `figures/*.png` for a run; returns the files written.

    With the run's `learner`, the closed-form curves are overlaid and the kind's reporting
    module draws its own figures too (`figures(learner, run, out_dir)`).

    Figures are drawn into a temporary folder and each is renamed into `figures/` when all are
    done, so a kill while plotting leaves the previous figures, never an empty or torn PNG (the
    temporary folder is removed here or by the next run's `rundir.guard.clean_leftovers`).
    """
    out = run.path / "figures"
    rows = run.rows()
    if not rows:
        return []
    expected = {}
    reporting = None
    if learner is not None:
        expected = expected_curves(run.config, np.array([r["sample_size"] for r in rows]))
        reporting = config_lib.reporting_module(run.config.kind)
    tmp = fileio.fresh_dir(run.path, "figures")
    try:
        drawn = []
        for name in scalar_metrics(rows):
            path = tmp / f"{name}.png"
            metric_figure(run, name, expected.get(name), path)
            drawn.append(path)
        if reporting is not None:
            drawn += reporting.figures(learner, run, tmp)
        out.mkdir(exist_ok=True)
        files = []
        for path in map(pathlib.Path, drawn):
            if not path.is_relative_to(tmp):  # a kind's file outside figures/ (run-dir text)
                files.append(path)
                continue
            rel = path.relative_to(tmp)
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, out / rel)
            files.append(out / rel)
        return files
    except OSError as e:
        if e.filename is None:  # matplotlib's writer does not say which file (e.g. a full disk)
            e.filename = str(out)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def summary_table(
    rows: list[dict], max_rows: int = 12, max_cols: int = 6, kind: str | None = None
) -> str:
    """A fixed-width table of chain means (with SE) at a few generations, first and last kept.

    With the run's model `kind`, its headline metrics (`report.headline`) come first."""
    if not rows:
        return "(no generations)"
    names = scalar_metrics(rows)
    if kind is not None:
        names = headline.lead_with_headline(kind, names)
    names = names[:max_cols]
    idx = np.unique(np.linspace(0, len(rows) - 1, min(max_rows, len(rows))).round().astype(int))
    header = ["gen", "M"] + names
    lines = []
    for i in idx:
        r = rows[i]
        cells = [str(r["generation"]), str(r.get("sample_size", ""))]
        for n in names:
            v = r.get(n)
            se = r.get(f"{n}_se")
            cells.append("" if v is None else f"{v:.4g}" + (f"±{se:.2g}" if se else ""))
        lines.append(cells)
    widths = [max(len(h), *(len(c[j]) for c in lines)) for j, h in enumerate(header)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*c) for c in lines])

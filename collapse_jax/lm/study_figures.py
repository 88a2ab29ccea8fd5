"""The LM study's figures (`collapse_jax.lm.study`; numbers from `lm.study_data`), in the study
directory's `figures/`.

- `study_<metric>.png`: the metric against generation, one column per decoder and one row per
  policy (shared axes), one line per learner: the seed mean with a +- 1 standard-error band.
  Data metrics are those of the synthetic blocks (generation 0: the real data); the true-NLL
  panels draw the entropy rate and the minimum block NLL;
- `study_decomposition_<metric>.png`: the decomposition (`lm.study`) of the KL and of the
  synthetic data's lost mass at generation 1 and at the last generation, one panel per policy
  and generation: for every (learner, decoder) a bar of signed parts (a negative part is drawn
  below zero, so a bar's visible height is not the total) and the total as a black dot with its
  standard error;
- `study_nll_<policy>.png`: histograms of every block's floored true NLL at the last generation
  under a policy that keeps real blocks (mix10, accumulate), split by provenance (real blocks
  black, synthetic blocks coloured), pooled over the seeds, each normalised to its own area.
"""

from __future__ import annotations

import pathlib

import numpy as np

from collapse_jax import plots
from collapse_jax import sweep as sweep_lib
from collapse_jax.lm import study_data as study

LEARNER_COLORS = {"oracle": "C2", "counts": "C0", "base": "C1", "scratch": "C3"}
PART_COLORS = {"floor": "0.7", "recursion": "C0", "approximation": "C1", "decoder": "C3"}
CURVES = (
    "kl_to_truth",
    "tail_retention",
    "off_support_mass",
    "synthetic_data_true_nll_floored",
    "synthetic_data_true_nll",
    "synthetic_lost_mass",
    "synthetic_support_coverage",
    "synthetic_data_repetition",
)
NONNEGATIVE = (
    "kl_to_truth",
    "off_support_mass",
    "synthetic_lost_mass",
    "synthetic_data_repetition",
)
WHAT = {
    "kl_to_truth": "KL(truth || model), nats/token",
    "tail_retention": "tail kept (bounded, 0-1)",
    "off_support_mass": "model mass on impossible tokens",
    "synthetic_data_true_nll_floored": "synthetic data's true NLL, impossible tokens floored",
    "synthetic_data_true_nll": "synthetic data's true NLL, possible tokens only",
    "synthetic_lost_mass": "synthetic data's lost transition mass",
    "synthetic_support_coverage": "synthetic data's transition coverage",
    "synthetic_data_repetition": "synthetic data's repeated 4-grams",
}


def _labels(sw: sweep_lib.Sweep, axis: str) -> list[str]:
    return [v.label for v in dict(sw.axes)[axis]]


def study_figures(sw: sweep_lib.Sweep) -> list[pathlib.Path]:
    """Every study figure of `sw` (the points run so far); returns the files."""
    import matplotlib

    matplotlib.use("Agg")

    out = sw.out / "figures"
    out.mkdir(exist_ok=True)
    table = study.cells(sw)
    if not table:
        return []
    files = [curves_figure(sw, table, name, out / f"study_{name}.png") for name in CURVES]
    for name in study.DECOMPOSED:
        files.append(decomposition_figure(sw, table, name, out / f"study_decomposition_{name}.png"))
    last = max(c.generation.num_generations for c in sw.configs) - 1
    for policy in ("mix10", "accumulate"):
        if policy in _labels(sw, "policy"):
            path = out / f"study_nll_{policy}.png"
            files.append(provenance_figure(sw, table, policy, last, path))
    return [f for f in files if f is not None]


def curves_figure(sw, table, name: str, path: pathlib.Path) -> pathlib.Path:
    import matplotlib.pyplot as plt

    decoders, policies = _labels(sw, "decoder"), _labels(sw, "policy")
    learners = _labels(sw, "learner")
    fig, axes = plt.subplots(
        len(policies),
        len(decoders),
        figsize=(3.6 * len(decoders), 2.5 * len(policies) + 0.6),
        dpi=90,
        squeeze=False,
        sharex=True,
        sharey=True,
    )
    any_cell = next(iter(table.values()))
    nll = name.startswith("synthetic_data_true_nll")
    top = 0.0  # the highest mean + s.e. of any panel (the panels share their y-axis)
    for r, pol in enumerate(policies):
        for c, dec in enumerate(decoders):
            ax = axes[r, c]
            for learner in learners:
                cell = table.get((learner, dec, pol))
                if cell is None:
                    continue
                mean, se, n = study.mean_se(cell[name])
                g = np.arange(mean.size)
                ok = n > 0
                color = LEARNER_COLORS.get(learner, None)
                ax.plot(g[ok], mean[ok], color=color, lw=1.4, marker=".", ms=3, label=learner)
                band = ok & np.isfinite(se)
                top = max(top, float(np.nanmax(np.where(band, mean + se, mean), initial=0.0)))
                ax.fill_between(
                    g[band], (mean - se)[band], (mean + se)[band], color=color, alpha=0.2, lw=0
                )
            if nll:
                h = np.nanmean(any_cell["entropy_rate"])
                floor = np.nanmean(any_cell["min_block_nll"])
                ax.axhline(h, color="k", ls="--", lw=0.8, label=f"entropy rate {h:.3f}")
                ax.axhline(floor, color="0.4", ls=":", lw=0.8, label=f"min block NLL {floor:.3f}")
            if r == 0:
                ax.set_title(f"decoder: {dec}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"policy: {pol}", fontsize=9)
            if r == len(policies) - 1:
                ax.set_xlabel("generation", fontsize=8)
            ax.tick_params(labelsize=7)
    # The shared y-limits, set once every panel is drawn (set inside the loop, they would clip
    # the panels drawn after the first).
    if name in ("tail_retention", "synthetic_support_coverage"):
        axes[0, 0].set_ylim(-0.02, 1.02)
    elif name in NONNEGATIVE:  # from 0, at least 0.05 tall: float32 noise is not a value
        axes[0, 0].set_ylim(-0.002, max(1.05 * top, 0.05))
    axes[0, 0].legend(fontsize=6, frameon=False)
    seeds = len(_labels(sw, "seed"))
    fig.suptitle(
        f"{sw.out.name}: {WHAT.get(name, plots.words(name))} ({name})\n"
        f"mean +- 1 s.e. over {seeds} seeds; generation 0's data are the real blocks",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def decomposition_figure(sw, table, name: str, path: pathlib.Path) -> pathlib.Path | None:
    import matplotlib.pyplot as plt

    parts = study.decomposition(table, name)
    if not parts:
        return None
    policies = _labels(sw, "policy")
    last = max(c.generation.num_generations for c in sw.configs) - 1
    gens = [g for g in (1, last) if 0 < g]
    bars = [(lrn, dec) for lrn in _labels(sw, "learner") for dec in _labels(sw, "decoder")]
    fig, axes = plt.subplots(
        len(gens),
        len(policies),
        figsize=(max(3.9 * len(policies), 9.0), 3.3 * len(gens) + 1.4),
        dpi=90,
        squeeze=False,
        sharey=True,
    )
    for r, g in enumerate(gens):
        for c, pol in enumerate(policies):
            ax = axes[r, c]
            for x, (lrn, dec) in enumerate(bars):
                d = parts.get((lrn, dec, pol))
                if d is None or not np.isfinite(d["total"][:, g]).any():
                    continue
                up = down = 0.0
                for part in study.PARTS:
                    m, _, n = study.mean_se(d[part][:, g : g + 1])
                    v = float(m[0]) if n[0] else np.nan
                    if not np.isfinite(v) or v == 0:
                        continue
                    base = up if v > 0 else down
                    ax.bar(x, v, bottom=base, color=PART_COLORS[part], width=0.75, lw=0)
                    if v > 0:
                        up += v
                    else:
                        down += v
                m, se, n = study.mean_se(d["total"][:, g : g + 1])
                if n[0]:
                    ax.errorbar(x, m[0], yerr=np.nan_to_num(se[0]), fmt="o", color="k", ms=3,
                                lw=0.8, capsize=2)  # fmt: skip
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xticks(range(len(bars)), [f"{a}/{b}" for a, b in bars], rotation=70, fontsize=6)
            ax.tick_params(axis="y", labelsize=7)
            ax.set_title(f"policy: {pol}, generation {g}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=PART_COLORS[p]) for p in study.PARTS]
    fig.legend(
        handles + [plt.Line2D([], [], marker="o", color="k", ls="", ms=3)],
        [
            "floor: oracle, sampling",
            "recursion: exact learner (counts), sampling - floor",
            "approximation: learner, sampling - exact learner",
            "decoder: learner, decoder - learner, sampling",
            "total (mean +- s.e.)",
        ],
        loc="upper left",
        bbox_to_anchor=(0.01, 0.955),
        fontsize=7,
        frameon=False,
        ncol=3 if len(policies) > 2 else 2,
    )
    seeds = len(_labels(sw, "seed"))
    fig.suptitle(
        f"{sw.out.name}: decomposition of {name} (seed means over {seeds} seeds; parts sum to "
        "the total;\nnegative parts drawn below zero)",
        fontsize=9,
        x=0.01,
        y=0.995,
        ha="left",
    )
    fig.tight_layout(rect=(0, 0, 1, 0.86))
    fig.savefig(path)
    plt.close(fig)
    return path


def provenance_figure(sw, table, policy: str, generation: int, path) -> pathlib.Path | None:
    import matplotlib
    import matplotlib.pyplot as plt

    data = study.histogram_data(sw, generation, policy)
    if not data:
        return None
    learners, decoders = _labels(sw, "learner"), _labels(sw, "decoder")
    allv = np.concatenate([v for d in data.values() for v in d.values() if v.size])
    allv = allv[np.isfinite(allv)]
    bins = np.geomspace(max(allv.min(), 1e-3) * 0.95, allv.max() * 1.05, 40)
    any_cell = next(iter(table.values()))
    h = np.nanmean(any_cell["entropy_rate"])
    floor = np.nanmean(any_cell["min_block_nll"])
    fig, axes = plt.subplots(
        len(learners),
        len(decoders),
        figsize=(3.6 * len(decoders), 2.2 * len(learners) + 0.7),
        dpi=90,
        squeeze=False,
        sharex=True,
    )
    for r, lrn in enumerate(learners):
        for c, dec in enumerate(decoders):
            ax = axes[r, c]
            d = data.get((lrn, dec))
            if d is not None:
                for part, color in (("real", "k"), ("synthetic", LEARNER_COLORS.get(lrn))):
                    v = d[part][np.isfinite(d[part])]
                    if v.size:
                        ax.hist(v, bins=bins, density=True, histtype="step", color=color,
                                lw=1.2, label=f"{part} ({v.size} blocks)")  # fmt: skip
            ax.axvline(h, color="k", ls="--", lw=0.7)
            ax.axvline(floor, color="0.4", ls=":", lw=0.7)
            ax.set_xscale("log")
            ticks = [t for t in (1, 1.5, 2, 3, 5, 10, 20, 50) if bins[0] <= t <= bins[-1]]
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6, frameon=False)
            if r == 0:
                ax.set_title(f"decoder: {dec}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{lrn}\ndensity", fontsize=8)
            if r == len(learners) - 1:
                ax.set_xlabel(
                    "block's true NLL (nats/token, impossible tokens floored)", fontsize=7
                )
    fig.suptitle(
        f"{sw.out.name}: policy {policy}, training data of generation {generation}, by provenance "
        f"(all seeds pooled)\ndashed: entropy rate {h:.3f}; dotted: min block NLL {floor:.3f}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

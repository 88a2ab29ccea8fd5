"""`collapse-jax compare`: several runs (or a sweep's points) on one figure per metric.

Each run is one line (its chain mean per generation) with a band of +-2 standard errors over its
chains; runs whose configs differ only in the seed are drawn as one line, the mean over those
runs with +-2 standard errors over the runs. The closed-form expectation is drawn once, black
and dashed, where every run has the same one, and per run (dashed, in the run's colour) where
they differ. The y axis is logarithmic when every drawn value is positive and they span two
decades or more. Every figure is written with the data it draws (`<figure>.json`), so what is
drawn can be read back.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

# A plotting module, imported only to draw figures: matplotlib at its top (TID253 lists it).
import matplotlib  # noqa: TID253

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402, TID253
import numpy as np  # noqa: E402

from collapse_jax import plots  # noqa: E402
from collapse_jax.report import headline, runs  # noqa: E402
from collapse_jax.rundir import fileio  # noqa: E402


class CompareError(runs.NoRuns):
    """The runs cannot be compared as asked (no common metric, an unknown metric)."""


@dataclasses.dataclass
class Group:
    """Runs drawn as one line: one run, or runs that differ only in their seed."""

    members: list[runs.RunInfo]
    label: str = ""

    def metrics(self) -> set[str]:
        return set.intersection(*(set(plots.scalar_metrics(m.run.rows())) for m in self.members))


def group_runs(infos: Sequence[runs.RunInfo]) -> list[Group]:
    """Runs whose configs are equal but for `seed` (and `name`) form one group, in first-seen
    order; each group is labelled by what differs among the groups (`runs.label_runs`)."""
    groups: dict[str, Group] = {}
    for info in infos:
        key = repr(sorted((k, repr(v)) for k, v in info.flat.items() if k not in ("seed", "name")))
        groups.setdefault(key, Group(members=[])).members.append(info)
    out = list(groups.values())
    heads = [g.members[0] for g in out]
    if len(out) > 1:
        # Label the groups by their first members, the seed left out when it varies within.
        saved = [h.flat for h in heads]
        for h, g in zip(heads, out):
            if len(g.members) > 1:
                h.flat = {k: v for k, v in h.flat.items() if k != "seed"}
        runs.label_runs(heads)
        for h, s in zip(heads, saved):
            h.flat = s
    else:
        heads[0].label = heads[0].config.name
    for h, g in zip(heads, out):
        n = len(g.members)
        g.label = h.label + (f" ({n} seeds)" if n > 1 else "")
    return out


def group_series(group: Group, name: str) -> dict[str, np.ndarray] | None:
    """{"generation", "mean", "lo", "hi"} [G] of one metric (None if no member records it):
    one run's chain mean +-2 SE over its chains, or the mean over the group's runs +-2 SE over
    the runs (their common generations)."""
    have = [m.run for m in group.members if name in plots.scalar_metrics(m.run.rows())]
    if not have:
        return None
    if len(have) == 1:
        r = have[0]
        mean, se = r.series(name), r.series(f"{name}_se")
        return {
            "generation": r.series("generation"),
            "mean": mean,
            "lo": mean - 2 * se,
            "hi": mean + 2 * se,
        }
    g = min(len(r.rows()) for r in have)
    stack = np.stack([r.series(name)[:g] for r in have])  # [runs, G]
    mean = stack.mean(axis=0)
    se = stack.std(axis=0, ddof=1) / math.sqrt(len(have))
    return {
        "generation": have[0].series("generation")[:g],
        "mean": mean,
        "lo": mean - 2 * se,
        "hi": mean + 2 * se,
    }


def log_scale(values: Sequence[np.ndarray]) -> bool:
    """Whether a y axis should be logarithmic: every finite value positive, spanning at least
    two decades."""
    v = np.concatenate([np.ravel(x) for x in values]) if values else np.zeros(0)
    v = v[np.isfinite(v)]
    return v.size > 0 and bool((v > 0).all()) and v.max() / v.min() >= 100.0


def _closed_forms(groups: Sequence[Group], name: str) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(group index, generations, closed form) of the groups whose first run has one for
    `name` (from its kind's reporting module)."""
    out = []
    for i, gr in enumerate(groups):
        r = gr.members[0].run
        rows = r.rows()
        sizes = np.array([row.get("sample_size", np.nan) for row in rows])
        try:
            curves = plots.expected_curves(gr.members[0].config, sizes)
        except (ValueError, TypeError):
            curves = {}
        if name in curves:
            g = r.series("generation")
            out.append((i, g, np.asarray(curves[name], np.float64)[: len(g)]))
    return out


def _same_curve(forms: list[tuple[int, np.ndarray, np.ndarray]]) -> bool:
    _, g0, y0 = forms[0]
    for _, g, y in forms[1:]:
        n = min(len(g0), len(g))
        if not (
            np.array_equal(g0[:n], g[:n]) and np.allclose(y0[:n], y[:n], rtol=1e-9, equal_nan=True)
        ):
            return False
    return True


def _json(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return [None if not np.isfinite(v) else float(v) for v in x.astype(np.float64)]
    return x


def figure_data(groups: Sequence[Group], name: str) -> dict[str, Any]:
    """What the figure of metric `name` draws: {"metric", "yscale", "lines": [{"label", "runs",
    "index", "generation", "mean", "lo", "hi"}] ("index": the run group's, its colour),
    "closed_form": [{"label", "index", "generation", "values", "shared"}], "missing": [labels
    of runs without the metric]}."""
    lines, missing = [], []
    for i, gr in enumerate(groups):
        s = group_series(gr, name)
        if s is None:
            missing.append(gr.label)
            continue
        runs_ = [str(m.path) for m in gr.members]
        lines.append({"label": gr.label, "index": i, "runs": runs_, **s})
    forms = _closed_forms(groups, name)
    closed = []
    if forms and len(forms) == len(groups) and _same_curve(forms):
        _, g, y = max(forms, key=lambda f: len(f[1]))
        closed.append(
            {"label": "closed form", "index": None, "generation": g, "values": y, "shared": True}
        )
    else:
        for i, g, y in forms:
            closed.append(
                {
                    "label": f"closed form ({groups[i].label})",
                    "index": i,
                    "generation": g,
                    "values": y,
                    "shared": False,
                }
            )
    drawn = [ln["mean"] for ln in lines] + [c["values"] for c in closed]
    return {
        "metric": name,
        "yscale": "log" if log_scale(drawn) else "linear",
        "lines": lines,
        "closed_form": closed,
        "missing": missing,
    }


def draw(data: dict[str, Any], path: pathlib.Path) -> plt.Figure:
    """Draws one metric's figure (`figure_data`) to `path`; returns the (closed) figure, whose
    artists hold the drawn data."""
    many = len(data["lines"]) > 3  # the legend goes beside the axis
    fig, ax = plt.subplots(figsize=(9.6 if many else 6.4, 4.0), dpi=110)
    log = data["yscale"] == "log"
    handles = []
    for ln in data["lines"]:
        color = f"C{ln['index'] % 10}"
        g, mean, lo, hi = ln["generation"], ln["mean"], ln["lo"], ln["hi"]
        if np.isfinite(lo).any():
            if log:  # a band reaching 0 or below: drawn from the mean on a log axis
                lo = np.where(lo > 0, lo, mean)
            ax.fill_between(g, lo, hi, color=color, alpha=0.2, lw=0)
        handles += ax.plot(g, mean, color=color, lw=1.5, label=ln["label"])
    own = []
    for c in data["closed_form"]:
        color = "k" if c["shared"] else f"C{c['index'] % 10}"
        drawn = ax.plot(
            c["generation"], c["values"], color=color, lw=1.1, ls="--", label=c["label"]
        )
        (handles if c["shared"] else own).extend(drawn)
    if own:  # one legend entry for the runs' own closed forms
        (proxy,) = ax.plot([], [], color="0.4", lw=1.1, ls="--")
        proxy.set_label("closed form (dashed, in each run's colour)")
        handles.append(proxy)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("generation")
    ax.set_ylabel(data["metric"])
    ax.set_title(
        f"{plots.words(data['metric'])}\n(bands: mean +- 2 SE over chains, or over seeds)",
        fontsize=9,
    )
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if many:
        ax.legend(
            handles=handles, fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1)
        )
    else:
        ax.legend(handles=handles, fontsize=7, frameon=False)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.cjx{os.getpid()}.png")
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return fig


def _metric_sets(groups: Sequence[Group]) -> list[set[str]]:
    return [g.metrics() for g in groups]


def choose_metrics(groups: Sequence[Group], wanted: Sequence[str] | None) -> list[str]:
    """The metrics to draw: those asked for (each recorded by at least one run), else the
    headline metrics of the runs' kinds that some run records, else every metric some run
    records; in headline order.

    Raises:
      CompareError: no metric is common to all runs, or one asked for is recorded by none.
    """
    sets = _metric_sets(groups)
    union = list(
        dict.fromkeys(m for g in groups for m in plots.scalar_metrics(g.members[0].run.rows()))
    )
    if not set.intersection(*sets):
        parts = "; ".join(
            f"{g.label}: {', '.join(sorted(s)) or 'none'}" for g, s in zip(groups, sets)
        )
        raise CompareError(f"the runs have no metric in common ({parts})")
    kinds = list(dict.fromkeys(g.members[0].config.kind for g in groups))
    ordered = union
    for k in reversed(kinds):
        ordered = headline.lead_with_headline(k, ordered)
    if wanted:
        for m in wanted:
            if m not in union:
                raise CompareError(
                    f"--metric {m}: recorded by none of the runs; they record {', '.join(ordered)}"
                )
        return list(dict.fromkeys(wanted))
    first = [m for m in ordered if any(m in headline.headline(k, union) for k in kinds)]
    return first or ordered


def out_paths(out: pathlib.Path, metrics: Sequence[str]) -> list[pathlib.Path]:
    """The figure files: `out` itself for one metric, `<out stem>-<metric>.png` for several."""
    if out.suffix.lower() != ".png":
        out = out.with_name(out.name + ".png")
    if len(metrics) == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{m}.png") for m in metrics]


@dataclasses.dataclass
class Comparison:
    """What `compare` drew: the figure files, their data and the notes about missing metrics."""

    files: list[pathlib.Path]
    data: list[dict[str, Any]]
    notes: list[str]
    figures: list[plt.Figure]


def compare(
    paths: Sequence[str | os.PathLike],
    metrics: Sequence[str] | None = None,
    out: str | os.PathLike = "compare.png",
) -> Comparison:
    """Draws the runs `paths` name (run directories, sweeps, suites) on one figure per metric.

    Args:
      paths: run directories, sweep directories (their points) or suite folders.
      metrics: the metrics to draw (default: the headline metrics of the runs' kinds).
      out: the figure file (one metric) or the stem of `<stem>-<metric>.png` (several); each
        figure's data goes next to it as `.json`.

    Raises:
      runs.NoRuns: a path is not a run directory, sweep or suite.
      CompareError: no common metric, or a metric no run records.
    """
    infos = [runs.load(p) for p in runs.expand(paths)]
    groups = group_runs(infos)
    names = choose_metrics(groups, metrics)
    files = out_paths(pathlib.Path(out), names)
    if files:
        files[0].parent.mkdir(parents=True, exist_ok=True)
    notes, datas, figs = [], [], []
    for name, path in zip(names, files):
        data = figure_data(groups, name)
        if data["missing"]:
            notes.append(
                f"{name}: not recorded by {'; '.join(data['missing'])}; drawn for the other runs"
            )
        figs.append(draw(data, path))
        fileio.atomic_write_json(path.with_suffix(".json"), _as_json(data))
        datas.append(data)
    return Comparison(files=files, data=datas, notes=notes, figures=figs)


def _as_json(data: dict[str, Any]) -> dict[str, Any]:
    return {
        **data,
        "lines": [{k: _json(v) for k, v in ln.items()} for ln in data["lines"]],
        "closed_form": [{k: _json(v) for k, v in c.items()} for c in data["closed_form"]],
    }

"""Grids of experiments in one run directory: `collapse-jax sweep CONFIG a.b=v1,v2 c.d=w1,w2`.

Every `key=v1,v2,...` argument is an axis of the grid (a single value is a fixed override for
every point; commas inside `[...]` or `{...}` belong to the value). Each grid point is an ordinary
run directory with its own resolved config (exactly what `collapse-jax run CONFIG <overrides>`
would write, so a point can also be resumed or plotted on its own); the sweep directory adds:

```
sweep.json            the config file, the axes and every point's overrides and folder
points/p003-dim=3-samples_per_generation=100/   one run directory per point
sweep.csv             one row per point: its axis values and the last generation's metrics
figures/<metric>_curves.png    one curve per value (chain mean, 5-95 % band over chains)
figures/<metric>_heatmap.png   last-generation chain mean over the first two varying axes (one
                               colour norm for all panels; closed form in each cell where known)
```

An axis may also be *named*: its values are `Choice`s, each a label and a set of overrides
applied together (a point of the LM study's `learner` axis sets `model.learner` and removes
`model.pretrain` at once; such grids are built in Python, e.g. `collapse_jax.lm.study`). The
point's folder, `sweep.json` and `sweep.csv` show the label; `sweep.json` also keeps every
label's overrides.

All points run in one process through the one loop. Points whose configs differ only in the seed,
the learner's knobs (`model.sampling_bias`, lambda) and, for learners with traced sizes (e.g. the
exact Gaussian), the sample sizes and the mix shares alpha / beta / gamma (with the same shares
> 0) form a batch (`batches`) that runs ONE compiled program per block of generations
(`loop.run_batch`: every value that differs is a traced argument; each point executes the
very program a separate run of it executes, so each point's numbers are bit-identical to a
separate run's). Other points run one after the other; the loop's jitted core takes only the
learner (model config) and the mixing `Policy` as static arguments, so they too share compiled
code per (model config, policy). A sweep
that is killed resumes at the first unfinished generation of the first unfinished point. Every
point's config is validated before the first one runs, so a bad value fails at once with one line
naming the key and the point.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import pathlib
import re
import textwrap
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import yaml

from collapse_jax import config as config_lib
from collapse_jax import loop, plots
from collapse_jax.rundir import fileio, reader

log = logging.getLogger(__name__)

Axis = tuple[str, list[Any]]


class Choice(NamedTuple):
    """A value of a named axis: `label` names it (folders, tables, figures); `overrides`
    ({dotted key: value}) are applied together to the point's config."""

    label: str
    overrides: dict[str, Any]


def split_values(text: str) -> list[str]:
    """Splits `v1,v2,...` at the commas outside brackets and braces."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def parse_axes(args: Sequence[str]) -> list[Axis]:
    """`["a.b=1,2", "c=x"]` -> `[("a.b", [1, 2]), ("c", ["x"])]` (values parsed as YAML)."""
    axes: list[Axis] = []
    seen: set[str] = set()
    for item in args:
        if "=" not in item:
            raise config_lib.ConfigError(
                f"sweep axis {config_lib.short(item)} is not of the form key=v1,v2,..."
            )
        key, text = item.split("=", 1)
        key = key.strip()
        if key in seen:
            raise config_lib.ConfigError(f"sweep axis {key} is given twice")
        seen.add(key)
        texts = split_values(text)
        if any(t == "" for t in texts):
            raise config_lib.ConfigError(
                f"sweep axis {key}: empty value in {config_lib.short(text)}"
            )
        # parse_yaml limits aliases and names the axis in its errors
        values = [config_lib.parse_yaml(t, f"sweep axis {key}") for t in texts]
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise config_lib.ConfigError(
                f"sweep axis {key}: repeated value in {config_lib.short(text)}"
            )
        axes.append((key, values))
    return axes


def _value_text(v: Any) -> str:
    """A value as an override writes it (YAML flow style, no trailing newline); a `Choice`'s
    label."""
    if isinstance(v, Choice):
        return v.label
    if isinstance(v, str):
        return v
    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("\n...")


def _label(index: int, assignment: dict[str, Any], varying: list[str]) -> str:
    bits = [f"{k.split('.')[-1]}={_value_text(assignment[k])}" for k in varying]
    text = re.sub(r"[^A-Za-z0-9_.=\-]+", "_", "-".join(bits))[:80]
    return f"p{index:03d}" + (f"-{text}" if text else "")


class Sweep:
    """A grid of experiment configs over `axes`, laid out under `out`.

    Attributes:
      config_path: the experiment config file.
      axes: [(dotted key, [values])] in command-line order; the grid is their product, the last
        axis varying fastest. A named axis has any key and `Choice` values.
      varying: keys of the axes with more than one value.
      points: [{"index", "overrides": {key: value (a Choice's label)}, "dir"}] in grid order.
      configs: the resolved `ExperimentConfig` of every point (validated).
    """

    def __init__(self, config_path: str | pathlib.Path, axes: list[Axis], out: str | pathlib.Path):
        self.config_path = pathlib.Path(config_path)
        self.out = pathlib.Path(out)
        self.axes = axes
        self.varying = [k for k, vs in axes if len(vs) > 1]
        raw = config_lib.load_raw(self.config_path)
        if "experiments" in raw:
            raise config_lib.ConfigError(
                f"{self.config_path}: a suite cannot be swept; sweep one of its experiments"
            )
        self.points: list[dict[str, Any]] = []
        self.configs: list[config_lib.ExperimentConfig] = []
        keys = [k for k, _ in axes]
        for i, combo in enumerate(itertools.product(*(vs for _, vs in axes))):
            assignment = dict(zip(keys, combo))
            overrides = []
            for k, v in assignment.items():
                if isinstance(v, Choice):
                    overrides += [f"{a}={_value_text(b)}" for a, b in v.overrides.items()]
                else:
                    overrides.append(f"{k}={_value_text(v)}")
            label = _label(i, assignment, self.varying)
            try:
                cfg = config_lib.from_dict(raw, overrides)
            except config_lib.ConfigError as e:
                raise config_lib.ConfigError(
                    f"{self.config_path} (sweep point {label}): {e}"
                ) from None
            shown = {
                k: _value_text(v) if isinstance(v, Choice) else v for k, v in assignment.items()
            }
            self.points.append({"index": i, "overrides": shown, "dir": f"points/{label}"})
            self.configs.append(cfg)

    def spec(self) -> dict[str, Any]:
        choices = {
            k: {v.label: v.overrides for v in vs}
            for k, vs in self.axes
            if any(isinstance(v, Choice) for v in vs)
        }
        return {
            "config": str(self.config_path),
            "axes": [
                [k, [_value_text(v) if isinstance(v, Choice) else v for v in vs]]
                for k, vs in self.axes
            ],
            **({"choices": choices} if choices else {}),
            "points": self.points,
        }

    def point_dir(self, i: int) -> pathlib.Path:
        return self.out / self.points[i]["dir"]

    def prepare(self) -> None:
        """Writes `sweep.json`, or checks that an existing sweep directory holds the same grid
        (each point's own config is checked again by the loop when it resumes)."""
        path = self.out / "sweep.json"
        spec = self.spec()
        if path.exists():
            stored = fileio.load_json(path)  # a corrupt file is named
            same = (
                stored.get("axes") == json.loads(json.dumps(spec["axes"]))
                and stored.get("choices") == json.loads(json.dumps(spec.get("choices")))
                and [p["dir"] for p in stored.get("points", [])]
                == [p["dir"] for p in spec["points"]]
            )
            if not same:
                raise ValueError(
                    f"{self.out} holds a sweep of a different grid ({path}); use another --out"
                )
        self.out.mkdir(parents=True, exist_ok=True)
        fileio.atomic_write_json(path, spec)


def run_sweep(
    config_path: str | pathlib.Path,
    axis_args: Sequence[str],
    out: str | pathlib.Path,
    *,
    progress: bool = False,
    on_point: Callable[[int, list[dict[str, Any]]], None] | None = None,
    figures: bool = True,
) -> Sweep:
    """Runs (or resumes) every point of the grid in `out`; returns the sweep.

    Args:
      config_path: experiment config file.
      axis_args: `key=v1,v2,...` strings (one value: an override for every point).
      out: the sweep directory.
      progress: a progress bar per point.
      on_point: called as `on_point(i, rows)` after point i finished.
      figures: draw the combined figures at the end (a point's own figures: `collapse-jax plot
        OUT/points/<point>`; drawing them for every point of a large grid would dominate).
    """
    sweep = Sweep(config_path, parse_axes(axis_args), out)
    run_grid(sweep, progress=progress, on_point=on_point, figures=figures)
    return sweep


def run_grid(
    sweep: Sweep,
    *,
    progress: bool = False,
    on_point: Callable[[int, list[dict[str, Any]]], None] | None = None,
    figures: bool = True,
) -> None:
    """Runs (or resumes) every point of `sweep` (arguments as `run_sweep`'s), then writes
    `sweep.csv` and, with `figures`, the combined figures."""
    sweep.prepare()
    for batch in batches(sweep):
        cfgs = [sweep.configs[i] for i in batch]
        names = ", ".join(sweep.points[i]["dir"] for i in batch)
        log.info("sweep points %s/%d: %s", batch[-1] + 1, len(sweep.configs), names)
        learner = loop.make_learner(cfgs[0])
        if len(batch) == 1:
            results = [
                loop.run_generations(
                    cfgs[0], sweep.point_dir(batch[0]), learner=learner, progress=progress
                )
            ]
        else:
            dirs = [sweep.point_dir(i) for i in batch]
            results = loop.run_batch(cfgs, dirs, learner=learner)
        if on_point is not None:
            for i, res in zip(batch, results):
                on_point(i, res.rows)
    write_table(sweep)
    if figures:
        sweep_figures(sweep)


def batches(sweep: Sweep) -> list[list[int]]:
    """The grid's points grouped into batches (`loop.run_batch`): points of equal
    `loop.batch_key` (differing only in traced values: seed, knobs such as lambda and, for
    learners with traced sample sizes, sample sizes and mix shares), in grid order, at most
    `chunk_size` chains (all points' together) per batch."""
    groups: dict[Any, list[int]] = {}
    out: list[list[int]] = []
    for i, cfg in enumerate(sweep.configs):
        key = loop.batch_key(cfg, loop.make_learner(cfg))
        if key is None:
            out.append([i])
            continue
        group = groups.get(key)
        gcfg = cfg.generation
        if group is None or (len(group) + 1) * gcfg.num_trials > gcfg.chunk_size:
            group = groups[key] = []
            out.append(group)
        group.append(i)
    return out


# ----------------------------------------------------------------------------------------------
# Combined results.


def point_rows(sweep: Sweep) -> list[list[dict[str, Any]]]:
    """Every point's summary rows (empty for points that have not run)."""
    out = []
    for i in range(len(sweep.points)):
        d = sweep.point_dir(i)
        out.append(reader.Run(d).rows() if (d / "config.yaml").exists() else [])
    return out


def write_table(sweep: Sweep) -> pathlib.Path:
    """`sweep.csv`: per point, its axis values and its last generation's summary row."""
    rows = point_rows(sweep)
    table = []
    for p, r in zip(sweep.points, rows):
        if not r:
            continue
        last = r[-1]
        entry = {"point": p["dir"].split("/")[-1]}
        entry.update({k: _value_text(v) for k, v in p["overrides"].items()})
        entry["generation"] = last["generation"]
        for name in plots.scalar_metrics(r):
            for suffix in ("", "_se", "_q05", "_q50", "_q95"):
                if f"{name}{suffix}" in last:
                    entry[f"{name}{suffix}"] = last[f"{name}{suffix}"]
        table.append(entry)
    cols: list[str] = []
    for e in table:
        cols += [k for k in e if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, restval="")
    w.writeheader()
    w.writerows(table)
    path = sweep.out / "sweep.csv"
    fileio.atomic_write_text(path, buf.getvalue())
    return path


def _series(rows: list[dict], name: str) -> np.ndarray:
    return np.array([r.get(name, np.nan) for r in rows], dtype=np.float64)


def sweep_figures(sweep: Sweep, max_metrics: int = 8) -> list[pathlib.Path]:
    """Curves per metric (one per value of the last varying axis, one panel per combination of
    the other axes) and, for grids with >= 2 varying axes, heatmaps of the last generation's
    chain mean over the first two (one panel per combination of the rest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = point_rows(sweep)
    done = [r for r in rows if r]
    if not done:
        return []
    out = sweep.out / "figures"
    out.mkdir(exist_ok=True)
    metrics = plots.scalar_metrics(done[0])[:max_metrics]
    vary = sweep.varying
    files = []

    def value_of(i: int, key: str) -> str:
        return _value_text(sweep.points[i]["overrides"][key])

    # Each point's closed-form chain means (its kind's reporting module; none for a point not run).
    expected = [
        plots.expected_curves(cfg, np.array([x["sample_size"] for x in r])) if r else {}
        for cfg, r in zip(sweep.configs, rows)
    ]

    # --- curves: facets = combinations of all varying axes but the last --------------------
    last = vary[-1] if vary else None
    facet_keys = vary[:-1]
    facets: dict[tuple, list[int]] = {}
    for i in range(len(sweep.points)):
        facets.setdefault(tuple(value_of(i, k) for k in facet_keys), []).append(i)
    facet_items = list(facets.items())[:30]
    for name in metrics:
        ncol = min(len(facet_items), 4)
        nrow = math.ceil(len(facet_items) / ncol)
        fig, axes = plt.subplots(
            nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), dpi=100, squeeze=False, sharey=True
        )
        # one y axis (range and log or linear scale) for every panel, so that panels compare
        log_scale = _positive(rows, list(range(len(rows))), name)
        for ax, (fvals, idx) in zip(axes.flat, facet_items):
            for c, i in enumerate(idx):
                r = rows[i]
                if not r:
                    continue
                g, m = _series(r, "generation"), _series(r, name)
                color = f"C{c % 10}"
                lo, hi = _series(r, f"{name}_q05"), _series(r, f"{name}_q95")
                if np.isfinite(lo).any():
                    ax.fill_between(g, lo, hi, color=color, alpha=0.12, lw=0)
                label = f"{plots.words(last)}: {value_of(i, last)}" if last else "mean"
                ax.plot(g, m, color=color, lw=1.4, label=label)
                want = expected[i].get(name)
                if want is not None:  # the learner's closed form for this point, dashed
                    ax.plot(g, np.asarray(want)[: g.size], color=color, lw=1.0, ls="--")
            title = ", ".join(f"{plots.words(k)}: {v}" for k, v in zip(facet_keys, fvals))
            ax.set_title(title, fontsize=8)
            ax.set_xlabel("generation", fontsize=8)
            ax.set_ylabel(name, fontsize=8)
            if log_scale:
                ax.set_yscale("log")
            if ax.lines:
                ax.legend(fontsize=6, frameon=False)
        for ax in list(axes.flat)[len(facet_items) :]:
            ax.axis("off")
        what = "chain mean, 5-95 % of chains"
        if any(name in e for e in expected):
            what += "; dashed: closed form"
        fig.suptitle(f"{sweep.out.name}: {plots.words(name)} ({name})\n({what})", fontsize=9)
        fig.tight_layout()
        path = out / f"{name}_curves.png"
        fig.savefig(path)
        plt.close(fig)
        files.append(path)

    # --- heatmaps of the last generation over the first two varying axes --------------------
    if len(vary) >= 2:
        for name in metrics:
            files.append(heatmap_figure(sweep, rows, expected, name, out / f"{name}_heatmap.png"))
    return files


def heatmap_grid(
    sweep: Sweep, rows: list[list[dict]], expected: list[dict], name: str
) -> dict[tuple, dict[str, np.ndarray]]:
    """The heatmap's numbers: per panel (the values of the varying axes after the first two),
    `value` (the last generation's chain mean of `name`), `se` (its standard error) and `closed`
    (the closed-form chain mean there, NaN where the kind has none), each [len(y), len(x)]
    over the first varying axis (x) and the second (y); NaN for points not finished."""
    kx, ky, rest = sweep.varying[0], sweep.varying[1], sweep.varying[2:]
    xs = [_value_text(v) for v in dict(sweep.axes)[kx]]
    ys = [_value_text(v) for v in dict(sweep.axes)[ky]]
    panels: dict[tuple, dict[str, np.ndarray]] = {}
    for i, r in enumerate(rows):
        ov = sweep.points[i]["overrides"]
        pk = tuple(_value_text(ov[k]) for k in rest)
        grid = panels.setdefault(
            pk, {k: np.full((len(ys), len(xs)), np.nan) for k in ("value", "se", "closed")}
        )
        # only finished points: a killed point's last row is an earlier generation
        if not r or len(r) != sweep.configs[i].generation.num_generations:
            continue
        cell = ys.index(_value_text(ov[ky])), xs.index(_value_text(ov[kx]))
        grid["value"][cell] = r[-1].get(name, np.nan)
        grid["se"][cell] = r[-1].get(f"{name}_se", np.nan)
        want = expected[i].get(name)
        if want is not None and len(want) >= len(r):
            grid["closed"][cell] = np.asarray(want, np.float64)[len(r) - 1]
    return panels


def _shared_norm(values: np.ndarray):
    """One colour norm for every panel of a metric: log for positive values spanning more than
    a decade, symmetric-log for other values whose magnitudes span more than two, else linear."""
    from matplotlib import colors

    v = values[np.isfinite(values)]
    if v.size == 0:
        return colors.Normalize(0.0, 1.0), "linear"
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    if lo > 0 and hi / lo > 10:
        return colors.LogNorm(lo, hi), "log"
    mag = np.abs(v[v != 0])
    if mag.size and mag.max() / mag.min() > 100:  # linear within 1e-4 of the largest magnitude
        thresh = max(float(mag.min()), 1e-4 * float(mag.max()))
        return colors.SymLogNorm(thresh, vmin=lo, vmax=hi, base=10), "symlog"
    return colors.Normalize(lo, hi), "linear"


def heatmap_figure(
    sweep: Sweep, rows: list[list[dict]], expected: list[dict], name: str, path: pathlib.Path
) -> pathlib.Path:
    """The last generation's chain mean of `name` over the first two varying axes, one panel per
    combination of the others, every panel on ONE colour norm (equal colours, equal values).
    Cells show the value and, where the kind has one, the closed form; a non-finite value is
    grey and says whether the closed form is non-finite too (e.g. a singular fit: fewer points
    than dimensions + 1) or not (then the value is an artefact of the computation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kx, ky, rest = sweep.varying[0], sweep.varying[1], sweep.varying[2:]
    xs = [_value_text(v) for v in dict(sweep.axes)[kx]]
    ys = [_value_text(v) for v in dict(sweep.axes)[ky]]
    panels = list(heatmap_grid(sweep, rows, expected, name).items())[:6]
    norm, scale = _shared_norm(np.concatenate([g["value"].ravel() for _, g in panels]))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.82")
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(4.6 * len(panels) + 1.2, 4.4),
        dpi=110,
        squeeze=False,
        layout="constrained",
    )
    for ax, (pk, grid) in zip(axes[0], panels):
        vals = grid["value"]
        im = ax.imshow(
            np.ma.masked_invalid(vals), origin="lower", cmap=cmap, norm=norm, aspect="auto"
        )
        ax.set_xticks(range(len(xs)), xs, fontsize=7)
        ax.set_yticks(range(len(ys)), ys, fontsize=7)
        ax.set_xlabel(plots.words(kx), fontsize=8)
        ax.set_ylabel(plots.words(ky), fontsize=8)
        for (yy, xx), v in np.ndenumerate(vals):
            cf = grid["closed"][yy, xx]
            text = f"{v:.3g}" if np.isfinite(v) else ("-inf" if v < 0 else f"{v}")
            if np.isnan(v):
                continue
            if np.isfinite(cf) or (np.isinf(cf) and np.isfinite(v)):
                text += f"\n(cf {cf:.3g})"
            elif np.isinf(v) and np.isinf(cf):
                text = "singular\n(cf -inf)" if v < 0 else text
            if np.isfinite(v):  # black on light colours, white on dark ones
                r, g, b, _ = cmap(norm(v))
                color = "k" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "w"
            else:
                color = "k" if not np.isfinite(cf) else "C3"
            ax.text(xx, yy, text, ha="center", va="center", fontsize=6, color=color)
        title = ", ".join(f"{plots.words(k)}: {v}" for k, v in zip(rest, pk))
        ax.set_title(title or "", fontsize=8)
    suffix = {"log": " (log scale)", "symlog": " (symmetric log scale)"}.get(scale, "")
    label = plots.words(name) + suffix
    fig.colorbar(im, ax=list(axes[0]), label=label, shrink=0.9).ax.yaxis.label.set_size(8)
    width = int(fig.get_figwidth() * 15)  # characters of 8-pt text per line
    notes = []
    if any(np.isfinite(g["closed"]).any() for _, g in panels):
        notes.append("cf = closed-form mean")
    if any((np.isinf(g["value"])).any() for _, g in panels):
        notes.append("grey = not finite")
    parts = _heatmap_caption(sweep, rows, name, "; ".join(notes))
    caption = "\n".join(textwrap.fill(p, width) for p in parts)
    fig.suptitle(caption, fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _heatmap_caption(sweep: Sweep, rows: list[list[dict]], name: str, notes: str) -> list[str]:
    """What a heatmap plots: the statistic over chains, the generation, the fixed settings."""
    cfgs = sweep.configs
    chains = sorted({c.generation.num_trials for c in cfgs})
    gens = sorted({len(r) for r in rows if r})
    fixed = []
    for f in ("estimator", "method", "sampling_bias", "family"):
        vals = {str(getattr(c.model, f, None)) for c in cfgs}
        if len(vals) == 1 and "None" not in vals and f"model.{f}" not in sweep.varying:
            fixed.append(f"{f.replace('_', ' ')} {vals.pop()}")
    if "generation.policy" not in sweep.varying:
        fixed.append(f"policy {cfgs[0].generation.policy}")
    gen = (
        f"generation {gens[-1] - 1} (the {gens[-1]}th fit)" if len(gens) == 1 else "last generation"
    )
    return [
        f"{sweep.out.name}: {plots.words(name)}, mean over {'/'.join(map(str, chains))} chains "
        f"at {gen}",
        f"{cfgs[0].kind}: {', '.join(fixed)}" + (f"; {notes}" if notes else ""),
    ]


def _positive(rows: list[list[dict]], idx: list[int], name: str) -> bool:
    """Whether a metric's curves are positive and span > 2 decades (then drawn on a log axis)."""
    parts = [_series(rows[i], name) for i in idx if rows[i]]
    if not parts:  # no point of this panel has run yet
        return False
    vals = np.concatenate(parts)
    vals = vals[np.isfinite(vals)]
    return vals.size > 0 and vals.min() > 0 and vals.max() / vals.min() > 100

"""`collapse-jax report`: one self-contained HTML page of a run directory or a sweep.

The page holds everything a colleague needs to read a result, and nothing it has to fetch: the
figures are PNGs inside the page (base64 `data:` URIs), the style is inline, there is no script.
It is written from the run directory alone (summary rows, figures, `metrics.jsonl`, config,
manifest, `env.json`, `example_continuations.txt`): no model is loaded, nothing is recomputed.

A run's page: its headline metrics (`report.headline`) as a table and as figures first, then
the config and what it changes from the shipped config of the same name, the metrics table
(and the whole `metrics.csv` as a download), the per-step training curves, the example
continuations of an LM run, the run directory's integrity (`rundir.commits.verify`) and the
environment; the other figures, flat lines last, in a collapsed section. A sweep's page: its
axes and grid table, its heatmaps and curves (headline metrics first), every point's integrity.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import pathlib
import tempfile
from collections.abc import Sequence
from typing import Any

# A plotting module, imported only to draw the training curves: matplotlib at its top.
import matplotlib  # noqa: TID253

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402, TID253
import numpy as np  # noqa: E402

from collapse_jax import config as config_lib  # noqa: E402
from collapse_jax import plots  # noqa: E402
from collapse_jax.report import headline, runs, steps  # noqa: E402
from collapse_jax.rundir import commits, events, fileio, reader  # noqa: E402

REPORT_NAME = "report.html"

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1180px;
padding:16px 24px;color:#1d2230;background:#fff;line-height:1.4}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;border-bottom:1px solid #d8dce6;
padding-bottom:3px;margin-top:1.6em}h3{font-size:1em;margin:1em 0 .3em}
table{border-collapse:collapse;font-size:.85em;margin:.4em 0}
td,th{border:1px solid #d8dce6;padding:2px 7px;text-align:right;white-space:nowrap}
th{background:#f1f3f8}td.k,th.k{text-align:left}
pre{background:#f6f7fa;border:1px solid #e1e4ec;padding:8px;overflow-x:auto;font-size:.8em;
white-space:pre-wrap}
.figs{display:flex;flex-wrap:wrap;gap:10px}.fig{margin:0;border:1px solid #e6e8ef;padding:4px}
.fig img{width:520px;max-width:100%;height:auto;display:block}
.fig.full{flex:1 1 100%}.fig.full img{width:100%}.fig figcaption{font-size:.75em;color:#555}
.ok{color:#176d2c;font-weight:600}.bad{color:#a4161a;font-weight:600}
.muted{color:#666;font-size:.85em}details{margin:.8em 0}summary{cursor:pointer;font-weight:600}
.wide{overflow-x:auto}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _img(data: bytes, alt: str) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{b64}" alt="{_e(alt)}">'


def _png_width(data: bytes) -> int:
    """A PNG's width in pixels (its IHDR chunk); 0 for anything else."""
    return int.from_bytes(data[16:20], "big") if data[:8] == b"\x89PNG\r\n\x1a\n" else 0


def _figure(data: bytes, caption: str) -> str:
    cls = "fig full" if _png_width(data) > 800 else "fig"  # a wide figure gets the full width
    cap = f"<figcaption>{_e(caption)}</figcaption>"
    return f'<figure class="{cls}">{_img(data, caption)}{cap}</figure>'


def _figures(items: Sequence[tuple[bytes, str]]) -> str:
    return '<div class="figs">' + "".join(_figure(d, c) for d, c in items) + "</div>"


def _fmt(v: Any, se: Any = None) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v) and not np.isinf(v)):
        return ""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    s = f"{v:.4g}"
    if isinstance(se, int | float) and se and np.isfinite(se):
        s += f" ± {se:.2g}"
    return s


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """An HTML table (cells already escaped); the first `left` columns aligned left."""

    def cls(j: int) -> str:
        return ' class="k"' if j < left else ""

    head = "".join(f"<th{cls(j)}>{h}</th>" for j, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(j)}>{c}</td>" for j, c in enumerate(r)) + "</tr>" for r in rows
    )
    return f'<div class="wide"><table><tr>{head}</tr>{body}</table></div>'


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Parts of a run's page.


def is_flat(run: reader.Run, name: str) -> bool:
    """Whether a metric's chain mean is the same in every generation (a flat-line figure)."""
    y = run.series(name)
    y = y[np.isfinite(y)]
    return y.size > 1 and float(y.max() - y.min()) <= 1e-9 * max(1.0, float(np.abs(y).max()))


def metrics_table(rows: list[dict], names: Sequence[str], max_rows: int = 12) -> str:
    """Chain mean +- SE of `names` at up to `max_rows` generations (the first and last kept)."""
    if not rows:
        return '<p class="muted">No generation has finished.</p>'
    idx = np.unique(np.linspace(0, len(rows) - 1, min(max_rows, len(rows))).round().astype(int))
    header = ["generation", "M"] + [_e(n) for n in names]
    body = []
    for i in idx:
        r = rows[i]
        cells = [_e(r["generation"]), _e(r.get("sample_size", ""))]
        cells += [_e(_fmt(r.get(n), r.get(f"{n}_se"))) for n in names]
        body.append(cells)
    return _table(header, body, left=0)


def _csv_link(run_dir: pathlib.Path) -> str:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return ""
    b64 = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<p><a download="metrics.csv" href="data:text/csv;base64,{b64}">metrics.csv</a> '
        '<span class="muted">(every generation, every column, inside this page)</span></p>'
    )


def shipped_config(name: str, kind: str | None = None) -> tuple[pathlib.Path, dict] | None:
    """The shipped config (`collapse_jax/configs/`) of the experiment `name`: a file whose
    `name:` is `name` (or a suite's experiment of that name), with its kind `kind`; as (file,
    flat resolved config). None when no shipped config has that name."""
    root = config_lib.shipped_config_dir()
    for path in sorted(root.rglob("*.yaml")):
        try:
            raw = config_lib.load_raw(path)
        except (config_lib.ConfigError, OSError):
            continue
        candidates = raw.get("experiments") if "experiments" in raw else [raw]
        for exp in candidates or []:
            if not isinstance(exp, dict) or exp.get("name") != name:
                continue
            try:
                cfg = config_lib.from_dict(exp)
            except (config_lib.ConfigError, ValueError, OSError):
                continue
            if kind is not None and cfg.kind != kind:
                continue
            return path, runs.flatten(config_lib.to_dict(cfg, expand=False))
    return None


def config_section(info: runs.RunInfo) -> str:
    text = (info.path / "config.yaml").read_text()
    found = shipped_config(info.config.name, info.config.kind)
    if found is None:
        diff = f'<p class="muted">No shipped config is named {_e(info.config.name)}.</p>'
    else:
        path, flat = found
        rel = path.relative_to(config_lib.shipped_config_dir())
        keys = [
            k
            for k in dict.fromkeys([*flat, *info.flat])
            if json.dumps(flat.get(k, "(absent)")) != json.dumps(info.flat.get(k, "(absent)"))
        ]
        if keys:
            rows = [
                [
                    _e(k),
                    _e(config_lib.short(flat.get(k, "(absent)"))),
                    _e(config_lib.short(info.flat.get(k, "(absent)"))),
                ]
                for k in keys
            ]
            diff = f"<p>Changed from the shipped <code>{_e(rel)}</code>:</p>" + _table(
                ["key", "shipped", "this run"], rows, left=3
            )
        else:
            diff = f"<p>Same as the shipped <code>{_e(rel)}</code>.</p>"
    yaml_text = f"<details><summary>config.yaml</summary><pre>{_e(text)}</pre></details>"
    return f"<h2>Config</h2>{diff}{yaml_text}"


def integrity_section(run_dir: pathlib.Path) -> str:
    """The run directory checked against its manifest (`commits.verify_snapshot`, the check
    `collapse-jax plot` makes)."""
    try:
        manifest = commits.read_manifest(run_dir)
    except commits.RunDirDamaged as e:
        return f'<h2>Integrity</h2><p class="bad">Damaged: {_e(e)}</p>'
    problems = commits.verify_snapshot(run_dir)  # retried if the run commits meanwhile
    if manifest is None and not problems:
        return '<h2>Integrity</h2><p class="muted">No manifest (a run of an older version).</p>'
    if problems:
        items = "".join(f"<li>{_e(p)}</li>" for p in problems[:40])
        more = f"<li>and {len(problems) - 40} more</li>" if len(problems) > 40 else ""
        return (
            f'<h2>Integrity</h2><p class="bad">{len(problems)} problem(s) against '
            f"state/manifest.json:</p><ul>{items}{more}</ul>"
        )
    n_files = len(manifest.get("files", {}))
    return (
        f'<h2>Integrity</h2><p class="ok">Verified</p><p>{manifest.get("next_generation")} '
        f"committed generation(s); {n_files} committed file(s) match their size and SHA-256 in "
        "state/manifest.json.</p>"
    )


def environment_section(run_dir: pathlib.Path) -> str:
    path = run_dir / "env.json"
    if not path.is_file():
        return '<h2>Environment</h2><p class="muted">No env.json.</p>'
    env = fileio.load_json(path)
    rows = []
    for k, v in env.items():
        if isinstance(v, dict):
            rows += [[_e(f"{k}.{a}"), _e(b)] for a, b in v.items()]
        elif isinstance(v, list):
            shown = ", ".join(map(str, v[:16])) + (f" (+{len(v) - 16})" if len(v) > 16 else "")
            rows.append([_e(f"{k} ({len(v)})"), _e(shown)])
        else:
            rows.append([_e(k), _e(v)])
    return "<h2>Environment</h2>" + _table(["", "value"], rows, left=2)


def step_figure(curves: dict[str, dict[str, np.ndarray]]) -> bytes:
    """The per-step training curves (loss and validation loss, learning rate, gradient norm,
    throughput, ...) in one figure of panels, against the step index over the whole run."""
    panels = [f for f in curves if f != "val_loss"]
    n = len(panels)
    cols = 2 if n > 1 else 1
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 2.8 * rows), dpi=100, squeeze=False)
    for ax, f in zip(axes.ravel(), panels):
        c = curves[f]
        ax.plot(c["x"], c["y"], lw=0.8, color="C0", label=f)
        if f == "loss" and "val_loss" in curves:
            v = curves["val_loss"]
            ax.plot(v["x"], v["y"], "o-", ms=3, lw=1, color="C3", label="val_loss")
            ax.legend(fontsize=7, frameon=False)
        gens = c["generation"]
        for b in np.flatnonzero(np.diff(gens)) + 1:  # generation boundaries
            ax.axvline(c["x"][b], color="0.8", lw=0.6, zorder=0)
        y = c["y"][np.isfinite(c["y"])]
        if y.size and (y > 0).all() and y.max() / y.min() >= 100:
            ax.set_yscale("log")
        ax.set_title(f.replace("_", " "), fontsize=9)
        ax.set_xlabel("step (generations one after the other)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return _png(fig)


def steps_section(run_dir: pathlib.Path) -> str:
    try:
        records = events.read_metrics(run_dir)
    except fileio.CorruptFileError as e:  # the page still shows everything else
        return f"<h2>Training curves</h2><p>not drawn: {_e(str(e))}</p>"
    curves = steps.step_curves(records)
    if not curves:
        return ""
    return "<h2>Training curves</h2>" + _figures(
        [(step_figure(curves), f"per-step training records of {events.METRICS_NAME}")]
    )


def examples_section(run_dir: pathlib.Path) -> str:
    path = run_dir / "example_continuations.txt"
    if not path.is_file():
        return ""
    return f"<h2>Example continuations</h2><pre>{_e(path.read_text())}</pre>"


def _drawn_metric_figures(run: reader.Run, names: Sequence[str]) -> dict[str, bytes]:
    """Per-metric figures drawn here (without closed forms) for a run whose figures/ is empty."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in names:
            p = pathlib.Path(tmp) / f"{n}.png"
            plots.metric_figure(run, n, None, p)
            out[n] = p.read_bytes()
    return out


def run_page(run_dir: pathlib.Path) -> str:
    info = runs.load(run_dir)
    run, cfg = info.run, info.config
    rows = run.rows()
    names = headline.lead_with_headline(cfg.kind, plots.scalar_metrics(rows))
    heads = headline.headline(cfg.kind, names)
    fig_dir = run_dir / "figures"
    pngs = (
        {
            p.relative_to(fig_dir).with_suffix("").as_posix(): p
            for p in sorted(fig_dir.rglob("*.png"))
            if not p.name.startswith(".")
        }
        if fig_dir.is_dir()
        else {}
    )
    if pngs:
        figs = {k: p.read_bytes() for k, p in pngs.items()}
    else:
        figs = _drawn_metric_figures(run, names)
    own = [k for k in figs if k not in names]  # the kind's own figures
    first = [k for k in heads if k in figs] + own
    flat = [k for k in names if k in figs and k not in first and is_flat(run, k)]
    rest = [k for k in names if k in figs and k not in first and k not in flat]

    parts = [
        f"<h1>{_e(cfg.name)}</h1>",
        f'<p class="muted">{_e(run_dir.resolve())} · kind {_e(cfg.kind)} · '
        f"{len(rows)} generation(s) finished of {cfg.generation.num_generations}</p>",
    ]
    if heads:
        parts.append("<h2>Headline metrics</h2>" + metrics_table(rows, heads, max_rows=6))
    else:
        parts.append("<h2>Metrics</h2>")
    parts.append(_figures([(figs[k], k) for k in first if k not in own]))
    if own:
        parts.append("<h2>Figures of the experiment</h2>" + _figures([(figs[k], k) for k in own]))
    parts.append(config_section(info))
    parts.append("<h2>Metrics table</h2>" + metrics_table(rows, names) + _csv_link(run_dir))
    parts.append(steps_section(run_dir))
    parts.append(examples_section(run_dir))
    if rest or flat:
        note = f" ({len(flat)} flat)" if flat else ""
        parts.append(
            f"<details><summary>Other figures: {len(rest) + len(flat)}{note}</summary>"
            + _figures([(figs[k], k) for k in rest] + [(figs[k], f"{k} (flat)") for k in flat])
            + "</details>"
        )
    parts.append(integrity_section(run_dir))
    parts.append(environment_section(run_dir))
    return _document(f"{cfg.name}: collapse-jax report", "".join(parts))


# ----------------------------------------------------------------------------------------------
# A sweep's page.


def _sweep_csv(sweep_dir: pathlib.Path) -> tuple[list[str], list[dict[str, str]]]:
    path = sweep_dir / "sweep.csv"
    if not path.is_file():
        return [], []
    reader_ = csv.DictReader(io.StringIO(path.read_text()))
    return list(reader_.fieldnames or []), list(reader_)


def _num(text: str | None) -> float | str | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return text


def sweep_page(sweep_dir: pathlib.Path) -> str:
    spec = json.loads((sweep_dir / "sweep.json").read_text())
    points = runs.sweep_points(sweep_dir)
    infos = [runs.load(p) for p in points]
    kind = infos[0].config.kind if infos else None
    axes = spec.get("axes", [])
    parts = [
        f"<h1>Sweep {_e(sweep_dir.name)}</h1>",
        f'<p class="muted">{_e(sweep_dir.resolve())} · config {_e(spec.get("config", ""))} · '
        f"{len(spec.get('points', []))} point(s), {len(points)} started</p>",
    ]
    if axes:
        rows = [[_e(k), _e(", ".join(map(str, vs)))] for k, vs in axes]
        parts.append("<h2>Axes</h2>" + _table(["key", "values"], rows, left=2))
    columns, table = _sweep_csv(sweep_dir)
    if columns:
        varying = [c for c in columns if "." in c and len({r.get(c) for r in table}) > 1]
        keys = ["point", *varying, "generation"]
        suffixes = ("_se", "_std", "_q05", "_q50", "_q95")
        metrics = [
            c for c in columns if "." not in c and c not in keys and not c.endswith(suffixes)
        ]
        metrics = headline.lead_with_headline(kind, metrics) if kind else metrics
        body = [
            [_e(r.get("point", "").split("-")[0])]  # p003: the axes follow
            + [_e(r.get(k, "")) for k in keys[1:]]
            + [_e(_fmt(_num(r.get(m)), _num(r.get(f"{m}_se")))) for m in metrics]
            for r in table
        ]
        parts.append(
            "<h2>Grid (last generation of every point; mean ± SE over chains)</h2>"
            + _table([_e(c) for c in keys + metrics], body, left=len(keys))
        )
    fig_dir = sweep_dir / "figures"
    pngs = sorted(fig_dir.glob("*.png")) if fig_dir.is_dir() else []
    heads = headline.HEADLINE_METRICS.get(kind, ()) if kind else ()

    def rank(p: pathlib.Path) -> tuple[int, int, str]:
        metric = p.stem.rsplit("_", 1)[0]
        h = heads.index(metric) if metric in heads else len(heads)
        return (0 if p.stem.endswith("_heatmap") else 1, h, p.stem)

    pngs.sort(key=rank)
    first = [p for p in pngs if rank(p)[1] < len(heads)] or pngs[:4]
    rest = [p for p in pngs if p not in first]
    parts.append("<h2>Figures</h2>" + _figures([(p.read_bytes(), p.stem) for p in first]))
    if rest:
        parts.append(
            f"<details><summary>Other figures: {len(rest)}</summary>"
            + _figures([(p.read_bytes(), p.stem) for p in rest])
            + "</details>"
        )
    if infos:
        labels = runs.label_runs(infos) if len(infos) > 1 else [infos[0].config.name]
        rows = []
        for info, label in zip(infos, labels):
            try:
                problems = commits.verify_snapshot(info.path)
            except commits.RunDirError as e:
                problems = [str(e)]
            status = (
                '<span class="ok">verified</span>'
                if not problems
                else f'<span class="bad">{_e(problems[0])}</span>'
            )
            rows.append(
                [_e(info.path.relative_to(sweep_dir)), _e(label), _e(len(info.run.rows())), status]
            )
        parts.append(
            "<h2>Points and integrity</h2>"
            + _table(["folder", "setting", "generations", "integrity"], rows, left=2)
        )
        parts.append(
            config_section(infos[0]).replace("<h2>Config</h2>", "<h2>Config (first point)</h2>", 1)
        )
        parts.append(environment_section(infos[0].path))
    return _document(f"sweep {sweep_dir.name}: collapse-jax report", "".join(parts))


def _document(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n"
        '<p class="muted">Written by collapse-jax report from the run directory alone.</p>'
        "\n</body></html>\n"
    )


def suite_runs(path: pathlib.Path) -> list[pathlib.Path]:
    """The experiments' run directories in a suite's folder (e.g. `collapse-jax quickstart`)."""
    return sorted(d for d in path.iterdir() if d.is_dir() and (d / "config.yaml").is_file())


def is_suite_dir(path: pathlib.Path) -> bool:
    """A folder of run directories that is itself neither a run nor a sweep."""
    return (
        path.is_dir()
        and not (path / "config.yaml").is_file()
        and not runs.is_sweep_dir(path)
        and bool(suite_runs(path))
    )


def build(path: str | os.PathLike) -> str:
    """The HTML page of a run directory or a sweep directory.

    Raises:
      runs.NoRuns: `path` is neither.
    """
    p = pathlib.Path(path)
    if not p.is_dir():
        raise runs.NoRuns(f"{p}: no such directory")
    if runs.is_sweep_dir(p):
        return sweep_page(p)
    if not (p / "config.yaml").is_file():
        raise runs.NoRuns(f"{p} is not a run directory or a sweep (no config.yaml, no sweep.json)")
    return run_page(p)


def write_report(path: str | os.PathLike, out: str | os.PathLike | None = None) -> pathlib.Path:
    """Writes the page of `path` (a run or sweep directory) to `out` (default
    `<path>/report.html`), atomically; returns the file written."""
    html_text = build(path)
    target = pathlib.Path(out) if out else pathlib.Path(path) / REPORT_NAME
    fileio.atomic_write_text(target, html_text)
    return target

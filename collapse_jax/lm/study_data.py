"""The LM study's numbers (`collapse_jax.lm.study`): seed means and standard errors of every
(learner, decoder, policy) cell, the decomposition of a collapse metric into floor, recursion,
approximation and decoder parts (defined in `lm.study`'s docstring), `metrics.csv`, and the
per-block true NLL split by provenance (the histograms' data)."""

from __future__ import annotations

import csv
import io
import math
import pathlib
from typing import Any

import numpy as np

from collapse_jax import sweep as sweep_lib
from collapse_jax.rundir import fileio

ORIGIN_REAL = -1  # lm.experiment.ORIGIN_REAL (importing lm.experiment pulls in the OPT stack)

# The metrics of metrics.csv and the figures: the model's (kl_to_truth, tail_retention,
# off_support_mass) and the data's, of the pool and of its synthetic part.
HEADLINE = (
    "kl_to_truth",
    "tail_retention",
    "off_support_mass",
    "data_true_nll",
    "data_true_nll_floored",
    "data_invalid_rate",
    "support_coverage",
    "lost_mass",
    "data_repetition",
)
DATA_METRICS = HEADLINE[3:]
DECOMPOSED = ("kl_to_truth", "synthetic_lost_mass")
PARTS = ("floor", "recursion", "approximation", "decoder")


def synthetic(row: dict[str, Any], name: str) -> float:
    """The synthetic part's value of data metric `name` in `row`; at generation 0 (no synthetic
    block yet) the real data's, so that every curve starts from the same data."""
    v = row.get(f"synthetic_{name}")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return float(row.get(name, math.nan)) if row.get("synthetic_share", 0.0) == 0 else math.nan
    return float(v)


def value(row: dict[str, Any], name: str) -> float:
    """`row`'s `name`, where `synthetic_<data metric>` is `synthetic`'s reading."""
    if name.startswith("synthetic_"):
        return synthetic(row, name.removeprefix("synthetic_"))
    return float(row.get(name, math.nan))


def cells(sw: sweep_lib.Sweep) -> dict[tuple[str, str, str], dict[str, np.ndarray]]:
    """(learner, decoder, policy) -> {metric: [seeds, generations]} (NaN where a point has not
    run or a metric is missing); also "seeds": the seed labels in row order."""
    rows = sweep_lib.point_rows(sw)
    gens = max(c.generation.num_generations for c in sw.configs)
    names = [*HEADLINE, *(f"synthetic_{m}" for m in DATA_METRICS), "entropy_rate", "min_block_nll"]
    seed_labels = [v.label for v in dict(sw.axes)["seed"]]
    out: dict[tuple[str, str, str], dict[str, np.ndarray]] = {}
    for p, r in zip(sw.points, rows):
        ov = p["overrides"]
        key = (ov["learner"], ov["decoder"], ov["policy"])
        cell = out.setdefault(key, {n: np.full((len(seed_labels), gens), np.nan) for n in names})
        s = seed_labels.index(ov["seed"])
        for row in r:
            for n in names:
                cell[n][s, row["generation"]] = value(row, n)
    return out


def mean_se(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, standard error (std / sqrt(n), ddof 1; NaN for n < 2) and n over axis 0, NaN-aware."""
    n = np.sum(np.isfinite(x), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(x, axis=0) / np.where(n > 0, n, np.nan)
        dev = np.where(np.isfinite(x), x - mean, 0.0)
        sd = np.sqrt(np.sum(dev**2, axis=0) / np.where(n > 1, n - 1, np.nan))
    return mean, sd / np.sqrt(n), n


def decomposition(
    table: dict[tuple[str, str, str], dict[str, np.ndarray]], name: str
) -> dict[tuple[str, str, str], dict[str, np.ndarray]]:
    """The parts of metric `name` (module docstring) for every (learner, decoder, policy) whose
    reference rows ran: {part or "total": [seeds, generations]}; parts sum to the total."""
    out = {}
    for (learner, dec, pol), cell in table.items():
        refs = [("oracle", "sample", pol), ("counts", "sample", pol), (learner, "sample", pol)]
        if learner == "oracle":  # never refitted: no recursion, no approximation
            refs[1] = refs[0]
        if any(r not in table for r in refs):
            continue
        floor, exact, own = (table[r][name] for r in refs)
        total = cell[name]
        out[(learner, dec, pol)] = {
            "floor": floor,
            "recursion": exact - floor,
            "approximation": own - exact,
            "decoder": total - own,
            "total": total,
        }
    return out


def write_metrics(sw: sweep_lib.Sweep) -> pathlib.Path:
    """`metrics.csv`: one row per (learner, decoder, policy, generation) with each headline
    metric's seed mean, standard error and seed count (`synthetic_`: the synthetic blocks)."""
    table = cells(sw)
    names = [*HEADLINE, *(f"synthetic_{m}" for m in DATA_METRICS)]
    buf = io.StringIO()
    cols = ["learner", "decoder", "policy", "generation"]
    for n in names:
        cols += [n, f"{n}_se", f"{n}_n"]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for (learner, dec, pol), cell in table.items():
        stats = {n: mean_se(cell[n]) for n in names}
        for g in range(cell[names[0]].shape[1]):
            if not np.isfinite(cell["kl_to_truth"][:, g]).any():
                continue
            row: list[Any] = [learner, dec, pol, g]
            for n in names:
                m, se, k = (a[g] for a in stats[n])
                row += [_num(m), _num(se), int(k)]
            w.writerow(row)
    path = sw.out / "metrics.csv"
    fileio.atomic_write_text(path, buf.getvalue())
    return path


def _num(x: float) -> str:
    return "" if not np.isfinite(x) else f"{x:.6g}"


def histogram_data(
    sw: sweep_lib.Sweep, generation: int, policy: str
) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """(learner, decoder) -> {"real", "synthetic": every block's floored true NLL (nats/token) at
    `generation` under `policy`, pooled over the seeds, split by provenance}."""
    out: dict[tuple[str, str], dict[str, list]] = {}
    name = f"gen_{generation:05d}.npz"
    for i, p in enumerate(sw.points):
        ov = p["overrides"]
        if ov["policy"] != policy:
            continue
        d = sw.point_dir(i)
        if not (d / "arrays" / name).exists() or not (d / "data" / name).exists():
            continue
        with np.load(d / "arrays" / name) as z:
            nll = z["trials/data_true_nll_floored_per_block"][0]
        with np.load(d / "data" / name) as z:
            origin = z["origin"]
        cell = out.setdefault((ov["learner"], ov["decoder"]), {"real": [], "synthetic": []})
        cell["real"].append(nll[origin == ORIGIN_REAL])
        cell["synthetic"].append(nll[origin != ORIGIN_REAL])
    return {k: {s: np.concatenate(v[s]) for s in v} for k, v in out.items()}

"""Summaries of per-chain metrics: a generation's row of `metrics.json` and its arrays."""

from __future__ import annotations

import math

import numpy as np

from collapse_jax.loop.schedule import Schedule


def summarize(metrics: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Chain statistics of one generation's metrics.

    Args:
      metrics: {name: [R] or [R, ...]} per-chain values.
    Returns:
      (row, means): scalar metrics give `name` (chain mean) and, when R > 1, `name_se`,
      `name_std`, `name_q05`, `name_q50`, `name_q95`; vector metrics give their chain mean in
      `means`.
    """
    row: dict[str, float] = {}
    means: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", over="ignore"):  # -inf log-dets of collapsed chains
        for name, v in metrics.items():
            _summarize_one(name, np.asarray(v, dtype=np.float64), row, means)
    return row, means


def _summarize_one(name: str, v: np.ndarray, row: dict, means: dict) -> None:
    if v.ndim > 1:
        means[name] = v.mean(axis=0)
        return
    r = v.shape[0]
    row[name] = float(v.mean())
    if r > 1:
        std = float(v.std(ddof=1))
        row[f"{name}_se"] = std / math.sqrt(r)
        row[f"{name}_std"] = std
        q = np.quantile(v, [0.05, 0.5, 0.95])
        row[f"{name}_q05"], row[f"{name}_q50"], row[f"{name}_q95"] = map(float, q)


def row_and_arrays(
    schedule: Schedule, g: int, per_chain: dict, record_trials: int
) -> tuple[dict, dict]:
    """A generation's summary row and arrays from its per-chain metrics {name: [R, ...]}
    (`record_trials`: how many chains' values the arrays keep)."""
    row, means = summarize(per_chain)
    row = {"generation": g, "sample_size": schedule.fitted_size(g), **row}
    arrays = {f"trials/{k}": np.asarray(v)[:record_trials] for k, v in per_chain.items()}
    arrays.update({f"mean/{k}": v for k, v in means.items()})
    return row, arrays

"""Reporting of linear-regression runs (`kind: linear_regression`): the closed-form chain means
of `param_error` and `test_mse` (`learner.expected_param_error`) overlaid on the generic figures;
the family draws no figures of its own."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from collapse_jax.linreg.learner import LinearRegressionConfig, expected_param_error


def expected_curves(
    config: LinearRegressionConfig,
    mode: str,
    sample_sizes: np.ndarray,
    *,
    filtered: bool = False,
    generation: Any = None,
) -> dict[str, np.ndarray]:
    """Closed-form chain means of `param_error` and `test_mse` for OLS when every generation
    relabels the whole design once: replace (all sizes T) or accumulate (sizes (n + 1) T).

    Args:
      config: the run's model config; mode: its policy; sample_sizes: [G] training-set sizes.
      filtered: whether the run filters synthetic data by likelihood (then no curve is known).
      generation: the run's `generation:` block (unused here).
    """
    c = config
    if c.ridge != 0 or filtered:
        return {}
    sizes = np.asarray(sample_sizes)
    g = np.arange(1, len(sizes) + 1)
    if not (
        (mode == "replace" and np.all(sizes == c.num_points))
        or (mode == "accumulate" and np.all(sizes == g * c.num_points))
    ):
        return {}
    pe = expected_param_error(
        mode,
        len(sizes),
        dim=c.dim,
        num_points=c.num_points,
        noise_std=c.noise_std,
        sampling_bias=c.sampling_bias,
    )
    return {"param_error": pe, "test_mse": pe + c.noise_std**2}


def figures(learner: Any, run: Any, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """None beyond the generic per-metric figures (which carry the closed forms)."""
    return []

"""Gaussian mixtures fitted by EM, vmapped over chains (the paper's GMM experiment).

Split along its seams: `em` (the EM library: `fit`, `fit_em`, `l2_distance`, `sample`, ...),
`learner` (`GMMConfig`, `GMMLearner` for the generational loop) and `figures` (the run's figures
and closed-form curves, `replay_chain`).
The public names of `em` and `learner` are importable from `collapse_jax.gmm`.
"""

from collapse_jax.gmm.em import (
    INIT_METHODS,
    EMResult,
    GMMParams,
    InitMethod,
    fit,
    fit_em,
    l2_distance,
    log_likelihood,
    moments,
    sample,
)
from collapse_jax.gmm.learner import GMMConfig, GMMLearner

__all__ = [
    "INIT_METHODS",
    "EMResult",
    "GMMConfig",
    "GMMLearner",
    "GMMParams",
    "InitMethod",
    "fit",
    "fit_em",
    "l2_distance",
    "log_likelihood",
    "moments",
    "sample",
]

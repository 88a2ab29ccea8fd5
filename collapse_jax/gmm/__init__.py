"""Gaussian mixtures fitted by EM, vmapped over chains (the paper's GMM experiment).

Split along its seams: `em` (the EM library: `fit`, `fit_em`, `l2_distance`, `sample`, ...),
`learner` (`GMMConfig`, `GMMLearner` for the generational loop, `replay_chain`) and `figures`.
Every public name stays importable from `collapse_jax.gmm`.
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
from collapse_jax.gmm.learner import GMMConfig, GMMLearner, replay_chain

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
    "replay_chain",
    "sample",
]

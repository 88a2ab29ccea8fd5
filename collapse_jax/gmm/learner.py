"""The GMM learner of the generational loop (the paper's GMM experiment; EM in `gmm.em`).

`GMMConfig` is the `model: {kind: gmm, ...}` block; `GMMLearner` fits a fresh mixture per chain
and generation (or warm-starts), and offers the loop a batched fit over chains (`fit_chains`)
that skips converged chains.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from collapse_jax.config import ConfigError
from collapse_jax.gmm import em
from collapse_jax.gmm.em import (
    EMResult,
    GMMParams,
    InitMethod,
    em_chain,
    fit_chain,
    l2_distance,
    moments,
    sample,
    weighted_log_prob,
)
from collapse_jax.loop.learner import AbstractLearner


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GMMConfig:
    """The GMM learner (`model: {kind: gmm, ...}`); defaults follow the paper's notebook.

    Attributes:
      n_components: C, components of every fitted mixture (paper: 2).
      true_weights: [K] weights of the real data distribution (a mixture; K = 1 is one blob).
      true_means: [K][d] its component means.
      true_covs: [K][d][d] its component covariances.
      real_size: points of real data of generation 0 (None: generation.samples_per_generation,
        or 1000 if that is None too); the paper uses N = 1000.
      heldout_size: fresh real points every fit's log-likelihood is measured on.
      init_method: EM initialisation: "kmeans" (scikit-learn's default, the paper's), "k-means++"
        or "random" (random responsibilities).
      kmeans_max_iter: maximum Lloyd iterations of the "kmeans" initialisation.
      tol: EM stops when the per-sample mean log-likelihood changes by less (paper: 1e-5).
      max_iter: maximum EM iterations (paper: 2000).
      reg_covar: added to every covariance's diagonal (scikit-learn's default 1e-6).
      warm_start: start EM from the parameters the loop passes in (set generation.init_from:
        previous to continue from the last generation's fit) instead of a fresh initialisation.
      sampling_bias: lambda > 0: synthetic points are drawn with every component's covariance
        scaled by lambda (real points never are).
      scatter_generations: generations whose samples `figures` scatter-plots (those that exist).
      scatter_points: points per scatter plot.
    """

    kind: ClassVar[str] = "gmm"
    n_components: int = 2
    true_weights: tuple[float, ...] = (1.0,)
    true_means: tuple[tuple[float, ...], ...] = ((0.0, 0.0),)
    true_covs: tuple[tuple[tuple[float, ...], ...], ...] = (((1.0, 0.0), (0.0, 1.0)),)
    real_size: int | None = None
    heldout_size: int = 10000
    init_method: InitMethod = "kmeans"
    kmeans_max_iter: int = 300
    tol: float = 1e-5
    max_iter: int = 2000
    reg_covar: float = 1e-6
    warm_start: bool = False
    sampling_bias: float = 1.0
    scatter_generations: tuple[int, ...] = (0, 50, 100, 150, 200, 350, 2000)
    scatter_points: int = 1000

    @property
    def previous_fit_ignored(self) -> str | None:
        """Why a fit would not start from the previous generation's (None: it does)."""
        if self.warm_start:
            return None
        return "EM starts from a fresh initialisation unless model.warm_start is true"

    def __post_init__(self):
        def check(ok: bool, field: str, problem: str) -> None:
            if not ok:
                raise ConfigError(f"model.{field}: {problem}")

        check(self.n_components >= 1, "n_components", f"must be >= 1, got {self.n_components}")
        k = len(self.true_weights)
        check(k >= 1, "true_weights", "needs at least one component")
        check(all(w > 0 for w in self.true_weights), "true_weights", "must all be > 0")
        check(
            abs(sum(self.true_weights) - 1.0) < 1e-6,
            "true_weights",
            f"must sum to 1, got {sum(self.true_weights)}",
        )
        check(len(self.true_means) == k, "true_means", f"needs {k} means (one per weight)")
        d = len(self.true_means[0]) if self.true_means else 0
        check(
            d >= 1 and all(len(m) == d for m in self.true_means),
            "true_means",
            "every mean must have the same dimension >= 1",
        )
        check(len(self.true_covs) == k, "true_covs", f"needs {k} covariances (one per weight)")
        for i, cov in enumerate(self.true_covs):
            a = np.asarray(cov, dtype=np.float64)
            check(a.shape == (d, d), f"true_covs[{i}]", f"must be {d}x{d}, got shape {a.shape}")
            check(np.allclose(a, a.T), f"true_covs[{i}]", "must be symmetric")
            check(
                bool(np.all(np.linalg.eigvalsh(a) > 0)),
                f"true_covs[{i}]",
                "must be positive definite",
            )
        check(
            self.real_size is None or self.real_size >= max(2, self.n_components),
            "real_size",
            f"must be >= max(2, n_components), got {self.real_size}",
        )
        check(self.heldout_size >= 1, "heldout_size", "must be >= 1")
        check(self.kmeans_max_iter >= 1, "kmeans_max_iter", "must be >= 1")
        check(self.tol >= 0 and math.isfinite(self.tol), "tol", "must be a finite number >= 0")
        check(self.max_iter >= 1, "max_iter", "must be >= 1")
        check(self.reg_covar >= 0, "reg_covar", "must be >= 0")
        check(
            math.isfinite(self.sampling_bias) and self.sampling_bias > 0,
            "sampling_bias",
            f"must be > 0, got {self.sampling_bias}",
        )
        check(all(g >= 0 for g in self.scatter_generations), "scatter_generations", "must be >= 0")
        check(self.scatter_points >= 1, "scatter_points", "must be >= 1")

    @property
    def dim(self) -> int:
        return len(self.true_means[0])

    @property
    def min_points(self) -> int:
        """Fewest training points EM can fit (one per component); checked by the experiment."""
        return self.n_components

    def true_mixture(self) -> GMMParams:
        """The real data distribution as a mixture (float32)."""
        return GMMParams(
            jnp.asarray(self.true_weights, jnp.float32),
            jnp.asarray(self.true_means, jnp.float32),
            jnp.asarray(self.true_covs, jnp.float32),
        )


class GMMLearner(AbstractLearner[EMResult, jax.Array]):
    """EM-fitted Gaussian mixture in the generational loop; data = points [N, d] of one chain.

    Params are an `EMResult` (the mixture plus EM's iteration count, convergence flag and
    lower bound, which `evaluate` reports). Each generation's fit starts from a fresh
    initialisation drawn with its key (the paper: a new `GaussianMixture` every generation),
    or from the given params when `warm_start` is set.
    """

    jittable: ClassVar[bool] = True
    config: GMMConfig

    def real_size(self, requested: int | None) -> int:
        """`model.real_size`, else the loop's M_0, else 1000 (the paper's N)."""
        if self.config.real_size is not None:
            return self.config.real_size
        return 1000 if requested is None else int(requested)

    def draw_real(self, key: jax.Array, num: int | jax.Array) -> jax.Array:
        return sample(key, self.config.true_mixture(), num)

    def reference(self, key: jax.Array) -> jax.Array:
        """[heldout_size, d] fresh real points for the held-out log-likelihood."""
        return sample(key, self.config.true_mixture(), self.config.heldout_size)

    def init(self, key: jax.Array) -> EMResult:
        """A placeholder fit (uniform weights, means drawn from the true distribution, the
        true overall covariance); only the starting point of `warm_start` fits."""
        cfg = self.config
        true = cfg.true_mixture()
        means = sample(key, true, cfg.n_components)
        _, cov = moments(true)
        covs = jnp.broadcast_to(cov, (cfg.n_components, cfg.dim, cfg.dim))
        weights = jnp.full((cfg.n_components,), 1.0 / cfg.n_components, jnp.float32)
        return EMResult(
            GMMParams(weights, means, covs),
            jnp.array(jnp.nan, jnp.float32),
            jnp.array(0, jnp.int32),
            jnp.array(False),
        )

    def fit(self, key: jax.Array, data: jax.Array, params: EMResult, **kwargs: Any) -> EMResult:
        cfg = self.config
        data = data.astype(jnp.float32)
        tol = jnp.asarray(cfg.tol, jnp.float32)
        reg = jnp.asarray(cfg.reg_covar, jnp.float32)
        if cfg.warm_start:
            return em_chain(data, em.as_params(params), tol, reg, cfg.max_iter, False)
        return fit_chain(
            data,
            key,
            None,
            tol,
            reg,
            n_components=cfg.n_components,
            init_method=cfg.init_method,
            max_iter=cfg.max_iter,
            kmeans_max_iter=cfg.kmeans_max_iter,
            trace=False,
        )

    def fit_chains(self, keys: jax.Array, data: jax.Array, params: EMResult) -> EMResult:
        """The batched fit the loop uses: `fit_em` over the chains, which on one CPU device runs
        EM in rounds on the chains still unconverged only (EM's iteration counts are
        long-tailed, so a plain vmapped loop spends most of its time on chains that have
        already stopped; `em.compacts` says where). Equals `fit` chain by chain up to float
        rounding.

        Args:
          keys: [R] fit keys; data: [R, N, d]; params: [R]-batched starting params.
        """
        cfg = self.config
        warm = cfg.warm_start
        return em.fit_em(
            jnp.asarray(data, jnp.float32),
            n_components=cfg.n_components,
            init=em.as_params(params) if warm else None,
            key=None if warm else keys,
            tol=cfg.tol,
            max_iter=cfg.max_iter,
            reg_covar=cfg.reg_covar,
            init_method=cfg.init_method,
            kmeans_max_iter=cfg.kmeans_max_iter,
        )

    def sample(
        self, key: jax.Array, params: EMResult, num: int | jax.Array, **kwargs: Any
    ) -> jax.Array:
        p = params.params
        if self.config.sampling_bias != 1.0:
            p = GMMParams(p.weights, p.means, p.covs * self.config.sampling_bias)
        return sample(key, p, num)

    def log_prob(self, data: jax.Array, params: EMResult) -> jax.Array:
        """[N] log-density of points `[N, d]` under the fitted mixture (selection scorer
        "generation0")."""
        return em.log_likelihood(params.params, data.astype(jnp.float32))

    def truth_log_prob(self, data: jax.Array) -> jax.Array:
        """[N] log-density of points `[N, d]` under the real mixture (selection scorer
        "truth")."""
        return em.log_likelihood(self.config.true_mixture(), data.astype(jnp.float32))

    def evaluate(self, key: jax.Array, params: EMResult, reference: Any) -> dict[str, Any]:
        """Metrics of one chain's fit.

        Returns:
          l2: squared L2 distance to the real (generation-0) distribution.
          log_lik: mean log-likelihood of the held-out real points.
          cov_trace, cov_det: trace and determinant of the fitted mixture's overall covariance.
          mean_shift: distance of the mixture's overall mean from the real mean.
          min_weight: smallest fitted weight; weights [C]: fitted weights, sorted descending.
          true_component_weight [K]: fitted weight whose mean lies nearest (Mahalanobis) to
            each real component: a low-weight real component that drops to 0 has been lost.
          n_iter, converged, lower_bound: EM's diagnostics.
        """
        true = self.config.true_mixture()
        p = params.params
        mean, cov = moments(p)
        true_mean, _ = moments(true)
        # Nearest real component of every fitted mean, by the real components' Mahalanobis
        # distance (plus their log-determinant: the most likely real component).
        owner = jnp.argmax(weighted_log_prob(p.means, true), axis=1)  # [C]
        owned = jax.nn.one_hot(owner, true.weights.shape[0], dtype=p.weights.dtype)
        metrics = {
            "l2": l2_distance(p, true),
            "cov_trace": jnp.trace(cov),
            "cov_det": jnp.linalg.det(cov),
            "mean_shift": jnp.linalg.norm(mean - true_mean),
            "min_weight": jnp.min(p.weights),
            "weights": -jnp.sort(-p.weights),
            "true_component_weight": jnp.einsum("c,ck->k", p.weights, owned),
            "n_iter": params.n_iter,
            "converged": jnp.asarray(params.converged, jnp.float32),
            "lower_bound": params.lower_bound,
        }
        if reference is not None:
            metrics["log_lik"] = jnp.mean(logsumexp(weighted_log_prob(reference, p), axis=1))
        return metrics

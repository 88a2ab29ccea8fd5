"""Recursive Gaussian kernel density estimation (Kazdan et al. 2024, "Collapse or thrive?"): the
learner `kind: kde`.

Each generation's model is the Gaussian KDE of its training points,
    p(x) = (1 / N) sum_i N(x; c_i, H),
with kernel covariance H either fixed (`bandwidth: h`, H = h^2 I) or chosen from the data as
SciPy's `gaussian_kde` does (`scott`: H = n^{-2/(D+4)} S, `silverman`:
H = (n (D + 2) / 4)^{-2/(D+4)} S, S the sample covariance with ddof = 1). Sampling picks a centre
uniformly and adds kernel noise (scaled by `sampling_bias` lambda: N(c_i, lambda H)).

Closed form behind the `variance` metric (1-D): the KDE is a mixture of N equal-weight
components N(c_i, H), so Var = mean_i (c_i - cbar)^2 + H (the biased sample variance plus the
kernel variance). Each refit loses a factor (N - 1) / N of spread to resampling and gains the
kernel's: with a fixed h the variance converges to N h^2 (it grows from 1 when h^2 > 1/N), with
Scott's rule it grows geometrically; `expected_variance` gives E Var_n under replace.

Data sets (the real distribution): `gaussian` (N(0, I_D), D = 1 or 2), `two_moons` and
`circles` (2-D; as scikit-learn's `make_moons` / `make_circles` with inner radius 0.5 and
isotropic noise `noise`), each with a known density (the curves' densities by quadrature), used
for the held-out NLL's floor (the entropy) and for selection by likelihood under the truth.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from collapse_jax.config import require
from collapse_jax.loop.learner import KnobbedLearner

_F = jnp.float32
Dataset = Literal["gaussian", "two_moons", "circles"]
_QUAD = 512  # quadrature nodes along a curve for the true density of moons / circles
_CIRCLE_FACTOR = 0.5


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class KDEConfig:
    """A Gaussian KDE refitted on its own samples.

    Attributes:
      dataset: the real distribution: "gaussian" (N(0, I), 1-D or 2-D), "two_moons", "circles".
      dim: D; None = 1 for "gaussian", 2 for the others (which are 2-D only).
      bandwidth: a number h > 0 (kernel covariance h^2 I), or "scott" / "silverman" (SciPy's
        `gaussian_kde` rules, refitted every generation).
      num_points: size of the real data set (generation 0's training set).
      noise: standard deviation of the isotropic noise around the moons' / circles' curves.
      heldout_points: held-out real points for `heldout_nll` (shared by all chains).
      sampling_bias: lambda, samples are drawn from N(c_i, lambda H) (1 = the fitted KDE).
    """

    kind: ClassVar[str] = "kde"

    dataset: Dataset = "gaussian"
    dim: int | None = None
    bandwidth: float | Literal["scott", "silverman"] = "scott"
    num_points: int = 200
    noise: float = 0.1
    heldout_points: int = 1000
    sampling_bias: float = 1.0

    def __post_init__(self):
        require(
            self.dataset in ("gaussian", "two_moons", "circles"),
            "model.dataset",
            f"{self.dataset!r} is not one of gaussian, two_moons, circles",
        )
        d = self.data_dim
        if self.dataset == "gaussian":
            require(d in (1, 2), "model.dim", f"gaussian data is 1-D or 2-D (got {d})")
        else:
            require(d == 2, "model.dim", f"{self.dataset} is 2-D (got {d})")
        if isinstance(self.bandwidth, str):
            require(
                self.bandwidth in ("scott", "silverman"),
                "model.bandwidth",
                f"{self.bandwidth!r} is not a number, 'scott' or 'silverman'",
            )
        else:
            require(
                math.isfinite(self.bandwidth) and self.bandwidth > 0,
                "model.bandwidth",
                f"must be > 0 (got {self.bandwidth})",
            )
        require(self.num_points >= 2, "model.num_points", "must be >= 2")
        require(self.noise > 0, "model.noise", f"must be > 0 (got {self.noise})")
        require(self.heldout_points >= 1, "model.heldout_points", "must be >= 1")
        require(self.sampling_bias > 0, "model.sampling_bias", "must be > 0")

    @property
    def data_dim(self) -> int:
        if self.dim is not None:
            return self.dim
        return 1 if self.dataset == "gaussian" else 2


class KDEParams(NamedTuple):
    """A fitted KDE: centres [N, D] and the Cholesky factor [D, D] of the kernel covariance."""

    centers: Array
    chol: Array


# ----------------------------------------------------------------------------------------------
# The real distributions.


def _curves(dataset: str, t: Array) -> Array:
    """Points [2, ..., 2] on the data set's two curves at parameters t in [0, 1)."""
    if dataset == "two_moons":  # scikit-learn's make_moons
        a = jnp.pi * t
        outer = jnp.stack([jnp.cos(a), jnp.sin(a)], -1)
        inner = jnp.stack([1.0 - jnp.cos(a), 0.5 - jnp.sin(a)], -1)
        return jnp.stack([outer, inner])
    a = 2.0 * jnp.pi * t  # circles
    ring = jnp.stack([jnp.cos(a), jnp.sin(a)], -1)
    return jnp.stack([ring, _CIRCLE_FACTOR * ring])


def draw_truth(key: Array, dataset: str, num: int, dim: int, noise: float) -> Array:
    """`num` points [num, dim] of the real distribution."""
    if dataset == "gaussian":
        return jax.random.normal(key, (num, dim), _F)
    k_c, k_t, k_n = jax.random.split(key, 3)
    which = jax.random.bernoulli(k_c, 0.5, (num,)).astype(jnp.int32)
    t = jax.random.uniform(k_t, (num,), _F)
    on = _curves(dataset, t)  # [2, num, 2]
    pts = jnp.where(which[:, None] == 0, on[0], on[1])
    return pts + noise * jax.random.normal(k_n, (num, 2), _F)


def truth_log_prob(x: Array, dataset: str, noise: float) -> Array:
    """log p_true(x) for x [Q, D] -> [Q]; moons / circles: midpoint quadrature over the curve
    parameter (512 nodes per curve; the curves are smooth and the noise >= a few hundredths)."""
    d = x.shape[-1]
    if dataset == "gaussian":
        return -0.5 * jnp.sum(jnp.square(x), -1) - 0.5 * d * math.log(2 * math.pi)
    t = (jnp.arange(_QUAD, dtype=_F) + 0.5) / _QUAD
    nodes = _curves(dataset, t).reshape(2 * _QUAD, 2)  # [2K, 2], equal weights 1 / (2K)
    sq = jnp.sum(jnp.square(x[:, None, :] - nodes[None]), -1)  # [Q, 2K]
    log_k = -0.5 * sq / noise**2 - math.log(2 * math.pi * noise**2)
    return jax.scipy.special.logsumexp(log_k, axis=-1) - math.log(2 * _QUAD)


# ----------------------------------------------------------------------------------------------
# The KDE.


def kernel_cov(x: Array, bandwidth: float | str) -> Array:
    """Kernel covariance H [D, D] of the KDE of points x [N, D] (SciPy's conventions)."""
    n, d = x.shape
    if not isinstance(bandwidth, str):
        return bandwidth**2 * jnp.eye(d, dtype=_F)
    if bandwidth == "scott":
        factor = n ** (-1.0 / (d + 4))
    else:
        factor = (n * (d + 2) / 4.0) ** (-1.0 / (d + 4))
    xc = x - jnp.mean(x, 0, keepdims=True)
    cov = xc.T @ xc / (n - 1)  # [D, D]
    return factor**2 * cov


def fit_kde(x: Array, bandwidth: float | str) -> KDEParams:
    """The KDE of points x [N, D]."""
    h = kernel_cov(x, bandwidth)
    d = x.shape[1]
    # A chain whose points all coincide has S = 0: a tiny jitter keeps the factor finite (its
    # density is then a spike, and its NLL correctly huge).
    jitter = 1e-12 + 1e-7 * jnp.trace(h) / d
    return KDEParams(x, jnp.linalg.cholesky(h + jitter * jnp.eye(d, dtype=_F)))


def kde_log_prob(params: KDEParams, x: Array) -> Array:
    """log p(x) under the KDE, x [Q, D] -> [Q]."""
    n, d = params.centers.shape
    inv = jax.scipy.linalg.solve_triangular(params.chol, jnp.eye(d, dtype=_F), lower=True)
    z = (x[:, None, :] - params.centers[None]) @ inv.T  # [Q, N, D] whitened differences
    log_det = jnp.sum(jnp.log(jnp.diagonal(params.chol)))
    log_k = -0.5 * jnp.sum(jnp.square(z), -1) - log_det - 0.5 * d * math.log(2 * math.pi)
    return jax.scipy.special.logsumexp(log_k, axis=-1) - math.log(n)


def kde_variance(params: KDEParams) -> Array:
    """Covariance [D, D] of the KDE density: biased sample covariance of the centres + H."""
    c = params.centers
    cc = c - jnp.mean(c, 0, keepdims=True)
    return cc.T @ cc / c.shape[0] + params.chol @ params.chol.T


def expected_variance(
    generations: int, *, num_points: int, bandwidth: float | str, var0: float = 1.0
) -> np.ndarray:
    """E Var of the fitted 1-D KDE at generations 0..G-1 under replace with N points per
    generation, for real data of variance var0.

    Let s_n be the biased sample variance of generation n's N points. The kernel variance is
    H_n = a + b s_n (fixed h: a = h^2, b = 0; Scott / Silverman: a = 0, b = f^2 N / (N - 1) with
    the rule's factor f), so Var_n = (1 + b) s_n + a. A generation's samples are i.i.d. from the
    previous KDE, whose variance is Var_{n-1}, hence E s_n = ((N - 1) / N) E Var_{n-1} (and
    E s_0 = ((N - 1) / N) var0); everything is linear, so the recursion holds for expectations:
        E Var_n = (1 + b) ((N - 1) / N) E Var_{n-1} + a,   E Var_{-1} := var0.
    """
    n = num_points
    if isinstance(bandwidth, str):
        factor = n ** (-1 / 5) if bandwidth == "scott" else (n * 3 / 4) ** (-1 / 5)
        a, b = 0.0, factor**2 * n / (n - 1)
    else:
        a, b = float(bandwidth) ** 2, 0.0
    f = (n - 1) / n
    v, out = var0, []
    for _ in range(generations):
        v = (1 + b) * f * v + a
        out.append(v)
    return np.array(out)


class KDELearner(KnobbedLearner[KDEParams, Array]):
    """Gaussian KDE refitted on its own samples (jittable; data = points [N, D])."""

    jittable: ClassVar[bool] = True

    def _truth(self, key: Array, num: int) -> Array:
        c = self.config
        return draw_truth(key, c.dataset, num, c.data_dim, c.noise)

    def real_size(self, requested: int | None) -> int:
        """Generation 0 fits the `num_points` real points (`samples_per_generation` sets later
        generations' sizes; null = the same)."""
        return self.config.num_points

    def draw_real(self, key: Array, num: int | Array) -> Array:
        return self._truth(key, num)

    def reference(self, key: Array) -> Array:
        """Held-out real points [heldout_points, D], the same for every chain."""
        return self._truth(key, self.config.heldout_points)

    def init(self, key: Array) -> KDEParams:
        d, n = self.config.data_dim, self.config.num_points
        return KDEParams(jnp.zeros((n, d), _F), jnp.eye(d, dtype=_F))

    def fit(self, key: Array, data: Array, params: KDEParams, **kw: Any) -> KDEParams:
        return fit_kde(data, self.config.bandwidth)

    def evaluate(self, key: Array, params: KDEParams, reference: Array) -> dict[str, Array]:
        """`heldout_nll` (mean -log p of held-out real points), `bandwidth` (kernel scale
        sqrt(tr H / D)), `variance` (1-D) or `total_variance` (trace, 2-D) of the fitted KDE."""
        d = params.centers.shape[1]
        cov = kde_variance(params)
        out = {
            "heldout_nll": -jnp.mean(kde_log_prob(params, reference)),
            "bandwidth": jnp.sqrt(jnp.sum(jnp.square(params.chol)) / d),
        }
        if d == 1:
            out["variance"] = cov[0, 0]
        else:
            out["total_variance"] = jnp.trace(cov)
        return out

    knob_fields: ClassVar[frozenset[str]] = frozenset({"sampling_bias"})

    def knobs(self) -> dict[str, float]:
        """The kernel noise's scale sqrt(lambda) (traced in a sweep batch)."""
        return {"sampling_scale": math.sqrt(self.config.sampling_bias)}

    def sample(self, key: Array, params: KDEParams, num: int | Array, **kw: Any) -> Array:
        k_i, k_z = jax.random.split(key)
        n, d = params.centers.shape
        idx = jax.random.randint(k_i, (num,), 0, n)
        z = jax.random.normal(k_z, (num, d), _F)
        scale = self.knob("sampling_scale")
        return params.centers[idx] + scale * z @ params.chol.T

    def log_prob(self, data: Array, params: KDEParams) -> Array:
        """[N] log density of each point under the fitted KDE `params`."""
        return kde_log_prob(params, data)

    def truth_log_prob(self, data: Array) -> Array:
        """[N] log density of each point under the real distribution."""
        return truth_log_prob(data, self.config.dataset, self.config.noise)

    def take(self, data: Array, idx: Array) -> Array:
        return data[idx]

    # --- the floor of the held-out NLL -------------------------------------------------------
    def truth_nll(self, key: Array) -> float:
        """-mean log p_true of the held-out points: the floor of `heldout_nll`."""
        return float(-jnp.mean(self.truth_log_prob(self.reference(key))))

"""Recursive fitting of a d-dimensional Gaussian (Shumailov et al., Nature 2024, Sec. 3.2 and
Supplementary Theorem 3.1; the paper's notebook fitted with np.std, the MLE).

Each generation draws M_n points from the current fit N(mu_n, Sigma_n) and refits the mean and
covariance. Two ways to draw a generation, equal in distribution:

- `method="sample"` draws the M points (data = raw points `[M, d]`);
- `method="exact"` draws the sufficient statistics directly, at a cost independent of M:
  mean ~ N(mu, Sigma / M) and scatter (M - 1) S ~ Wishart(M - 1, Sigma) (Bartlett
  decomposition), independent (Cochran). Data = `GaussianStats(n, mean, scatter)`.

`simulate` runs many independent chains (vmap) over generations (lax.scan), chunked over chains;
`GaussianLearner` is the same model for the model-agnostic loop in `collapse_jax.loop`.

Singular fits and the float32 floor (d > 1). Every draw uses a factor L with L L^T = Sigma that
exists for positive SEMI-definite Sigma (`robust_cholesky`: LAPACK's Cholesky, `psd_cholesky`
where that fails), so the collapse runs to its end instead of stopping on NaN:
- M <= d points: each fit has rank M - 1; the chain lives in the affine span of its first real
  points (the Wishart draw is singular, `samplers.wishart_bartlett_factor`), logdet_cov = -inf
  from generation 0, trace and W2 finite.
- A collapsing chain's covariance loses directions once its spread in them falls below float32's
  resolution relative to the rest (condition number beyond ~1 / ((d + 1) eps) ~ 10^6): those
  directions get exactly zero variance and stay so (later draws lie in L's column space). The
  log-determinant is therefore not read off that matrix where it can be carried in log space
  (`GaussianParams.logdet`): an exact draw's scatter L A A^T L^T has log det = log det Sigma +
  2 sum_i log A_ii (A the Bartlett factor), so a chain trained on its predecessor's samples alone
  (replace) adds independent log chi-square terms to the previous fit's log-det, which is then
  exact in distribution however ill-conditioned float32's covariance has become, and -inf only
  where the law says so (M <= d). Where the training set is a union or a subset (accumulate,
  mix, accumulate_subsample) or raw points (method "sample"), and for d = 1, the log-det is that
  of the float32 covariance, -inf once float32 cannot resolve it.
- When the scale itself underflows (float32's ~1e-38; XLA on CPU flushes denormals to zero) the
  covariance is exactly 0: the chain is a point mass whose mean stops moving, every draw equals
  it, trace_cov = 0, w2^2 = |mu - mu_0|^2 + tr Sigma_0, all finite.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.scipy.linalg import solve_triangular

from collapse_jax import loop
from collapse_jax.config import ConfigError
from collapse_jax.jaxtools import lanes, prng
from collapse_jax.loop.learner import KnobbedLearner
from collapse_jax.theory import metrics, samplers
from collapse_jax.theory.common import data_count, with_impl

_F = jnp.float32
RngImpl = Literal["default", "threefry2x32", "philox4x32"]


# Largest |mean| / standard deviation (and square root of the covariance's condition number) whose
# float32 computation keeps the measured quantities: float32's spacing 2^-23 * |mean| stays below
# 1/1000 of a standard deviation.
MAX_FLOAT32_RATIO = 1e-3 * 2.0**23


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GaussianConfig:
    """The original distribution N(mean, cov) and how each generation refits it.

    Attributes:
      dim: dimension d of the Gaussian.
      mean: the original mean (d values); None = zeros.
      cov: the original covariance: a scalar variance (times the identity) or d rows of d values
        (symmetric positive definite).
      estimator: covariance estimator of each fit: "unbiased" (divide the scatter by M - 1, the
        paper's theorem) or "mle" (divide by M, the paper's notebook: np.std).
      method: "exact" (draw mean and Wishart scatter directly, cost independent of M) or
        "sample" (draw the M points).
      rng_impl: PRNG of the sample method's normals: "threefry2x32" (the default: the loop's
        key hashed in fused code, `standard_normals`; the fastest on CPU:
        benchmarks/results/theory-cpu.json, row gaussian_sample, `speedup_vs_philox_path`),
        "philox4x32" (`jax.random.normal` under philox), or "default" (the impl of the key
        passed in; a threefry key takes the fused path). Each gives different numbers with the
        same distribution. The exact method hashes the loop's own key (`jaxtools.prng`, fused
        threefry) whatever this is.
      sampling_bias: lambda_MAD > 0, the sampling bias of Alemohammad et al. (2023, "MAD"):
        synthetic data are drawn from N(mu, lambda_MAD Sigma) of the fit (< 1 under-disperses,
        as a low sampling temperature); real data never are. Not Bertrand et al. (2024)'s
        lambda, the synthetic-to-real ratio (`generation.alpha / generation.gamma`).
    """

    kind: ClassVar[str] = "gaussian"

    dim: int = 1
    mean: tuple[float, ...] | None = None
    cov: float | tuple[tuple[float, ...], ...] = 1.0
    estimator: Literal["unbiased", "mle"] = "unbiased"
    method: Literal["exact", "sample"] = "exact"
    rng_impl: RngImpl = "threefry2x32"
    sampling_bias: float = 1.0

    def __post_init__(self):
        if not (np.isfinite(self.sampling_bias) and self.sampling_bias > 0):
            raise ConfigError(f"model.sampling_bias: must be > 0 (got {self.sampling_bias})")
        if self.dim < 1:
            raise ConfigError(f"model.dim: must be >= 1 (got {self.dim})")
        if self.mean is not None and len(self.mean) != self.dim:
            raise ConfigError(f"model.mean: has {len(self.mean)} values, dim is {self.dim}")
        if self.mean is not None and not np.all(np.isfinite(self.mean)):
            raise ConfigError("model.mean: must be finite")
        if isinstance(self.cov, (int, float)):
            if not (np.isfinite(self.cov) and self.cov > 0):
                raise ConfigError(f"model.cov: a scalar variance must be > 0 (got {self.cov})")
        else:
            c = np.asarray(self.cov, np.float64)
            if c.shape != (self.dim, self.dim):
                raise ConfigError(
                    f"model.cov: must be a scalar or {self.dim}x{self.dim}, got shape {c.shape}"
                )
            if not np.allclose(c, c.T, rtol=1e-6, atol=1e-12):
                raise ConfigError("model.cov: must be symmetric")
            try:
                np.linalg.cholesky(c)
            except np.linalg.LinAlgError:
                raise ConfigError("model.cov: must be positive definite") from None
            eig = np.linalg.eigvalsh(c)
            if eig[-1] > MAX_FLOAT32_RATIO**2 * eig[0]:
                raise ConfigError(
                    f"model.cov: its largest variance is {eig[-1] / eig[0]:.3g} times its "
                    "smallest; float32 (about 7 digits) loses the smallest direction beside the "
                    f"largest (the limit is {MAX_FLOAT32_RATIO**2:.3g}); rescale the coordinates"
                )
        if self.mean is not None:
            # The generations' mean drift is measured in float32, whose spacing at |mean| is
            # |mean| * 2^-23: it must stay well below a standard deviation, or mean_dist2 and the
            # mean part of w2 come out exactly 0.
            var = self.cov if isinstance(self.cov, (int, float)) else np.diag(self.cov).min()
            ratio = float(np.max(np.abs(self.mean))) / float(np.sqrt(var))
            if ratio > MAX_FLOAT32_RATIO:
                raise ConfigError(
                    f"model.mean: |mean| is {ratio:.3g} standard deviations; in float32 the "
                    f"drift of the mean between generations is lost beyond "
                    f"{MAX_FLOAT32_RATIO:.0f}; centre the distribution (subtract the mean, "
                    "which changes no metric) or rescale it"
                )
        if self.estimator not in ("unbiased", "mle"):
            raise ConfigError(f"model.estimator: {self.estimator!r} is not 'unbiased' or 'mle'")
        if self.method not in ("exact", "sample"):
            raise ConfigError(f"model.method: {self.method!r} is not 'exact' or 'sample'")
        if self.rng_impl not in ("default", "threefry2x32", "philox4x32"):
            raise ConfigError(f"model.rng_impl: {self.rng_impl!r} is not a supported PRNG")

    def mean_array(self) -> np.ndarray:
        """The original mean as float64 `[d]`."""
        return np.zeros(self.dim) if self.mean is None else np.asarray(self.mean, np.float64)

    def cov_array(self) -> np.ndarray:
        """The original covariance as float64 `[d, d]`."""
        if isinstance(self.cov, (int, float)):
            return float(self.cov) * np.eye(self.dim)
        return np.asarray(self.cov, np.float64)


class GaussianParams(NamedTuple):
    """A fitted Gaussian: mean `[d]`, covariance `[d, d]` (batched: leading chain axes), and
    for d > 1 the log-determinant of the covariance carried in log space (scalar; None: not
    carried, read off `cov`), which stays finite where float32's `cov` has lost directions."""

    mean: Array
    cov: Array
    logdet: Array | None = None


class GaussianStats(NamedTuple):
    """Sufficient statistics of a data set (the `exact` method's data).

    n: int32 scalar, number of points; mean: [d] sample mean; scatter: [d, d] sum of the
    outer products of the centred points; logdet: log det scatter carried in log space (a
    synthetic exact draw from params with a carried log-det, d > 1), or None (read off
    `scatter` by the fit: real data, unions and subsets, d = 1).
    """

    n: Array
    mean: Array
    scatter: Array
    logdet: Array | None = None


def robust_cholesky(cov: Array) -> Array:
    """A factor L `[d, d]` with L L^T = cov for a positive SEMI-definite covariance (never NaN).

    d = 1: the square root. d > 1: LAPACK's Cholesky where it succeeds, `psd_cholesky` where it
    fails, so a singular fit (M <= d points) or a covariance collapsed below float32's resolution
    still samples correctly: any L with L L^T = Sigma gives mean + L z ~ N(mean, Sigma) and
    L W L^T ~ Wishart(n, Sigma) (`robust_cholesky_lanes`).
    """
    if cov.shape[-1] == 1:
        return jnp.sqrt(jnp.maximum(cov, 0.0))
    return _factor(cov)


def robust_cholesky_lanes(a: Array) -> Array:
    """Lower-triangular L `[L, d, d]` with L L^T = a for PSD matrices `a [L, d, d]`, never NaN:
    each matrix takes LAPACK's factor when it is finite, else `psd_cholesky`'s. The choice is
    per matrix, so a chain's factor never depends on the other chains in its batch.

    `_factor` (`lanes.whole_batch`) hands this every matrix of a vmapped batch at once, so
    the batch-wide `cond` can skip computing `psd_cholesky` (several times LAPACK's cost at
    d >= 31) when no matrix needs it, the usual case; a plain vmap would turn that `cond` into
    a select that always computes both factors."""
    chol = jnp.linalg.cholesky(a)
    ok = jnp.all(jnp.isfinite(chol), axis=(-2, -1))

    def repair(_):
        psd = jnp.vectorize(psd_cholesky, signature="(d,d)->(d,d)")(a)
        return jnp.where(ok[..., None, None], chol, psd)

    return jax.lax.cond(jnp.all(ok), lambda _: chol, repair, None)


_factor = lanes.whole_batch(robust_cholesky_lanes, core_ndims=(2,))


def psd_cholesky(a: Array) -> Array:
    """Lower-triangular L `[d, d]` with L L^T = a, for a symmetric positive SEMI-definite `a`.

    LAPACK's Cholesky (`jnp.linalg.cholesky`) returns NaN as soon as a pivot is not positive,
    which a singular covariance (rank M - 1 < d) or one whose spread fell below float32's
    resolution always gives. This is the outer-product (right-looking) Cholesky with a
    semi-definite rule: pivot j is kept when it exceeds (d + 1) eps a_jj, the cancellation error
    of computing it in float32 (Cholesky's backward error), else column j is set to zero. For a
    PSD matrix a zero pivot has an all-zero Schur column, so dropping it is exact; a pivot at the
    rounding level carries no information (its column would be rounding noise divided by
    sqrt(rounding noise)). L's zero columns mark the directions without variance, so
    rank(L) is the numerical rank of `a` and `a == 0` gives L == 0.

    The columns are a `lax.scan` of rank-1 updates (one compile for any d): as fast as LAPACK
    at small d, several times slower at d >= 31, which is why `robust_cholesky_lanes` calls it only
    for the matrices LAPACK fails on (benchmarks/results/sweep-cpu.json, row gaussian_factor_ab,
    measures the generation with this fallback in place against LAPACK alone).
    """
    d = a.shape[-1]
    tol = (d + 1) * jnp.finfo(a.dtype).eps * jnp.diagonal(a)  # [d]
    eye = jnp.eye(d, dtype=a.dtype)

    def step(s, xs):  # s: the Schur complement [d, d] so far
        e, tol_j = xs
        v = s @ e  # its column j
        p = v @ e
        keep = p > tol_j
        col = jnp.where(keep, v * jax.lax.rsqrt(jnp.where(keep, p, 1.0)), 0.0)
        col = col * jnp.cumsum(e)  # rows >= j only (the rows above hold rounding residue)
        return s - jnp.outer(col, col), col

    _, cols = jax.lax.scan(step, a, (eye, tol))
    return cols.T


def _solve_live(factor: Array, b: Array) -> Array:
    """x with factor_KK x_K = b_K on the live (non-zero) columns K of a `psd_cholesky` factor and
    x = 0 elsewhere: the triangular solve restricted to the factor's support. b: [d] or [d, k]."""
    dead = jnp.diagonal(factor) == 0.0
    x = solve_triangular(factor + jnp.diag(dead.astype(factor.dtype)), b, lower=True)
    return jnp.where(dead.reshape(dead.shape + (1,) * (b.ndim - 1)), 0.0, x)


def standard_normals(key: Array, num: int) -> Array:
    """`num` standard normals `[num]` (float32) from one key.

    Threefry keys: Box-Muller pairs (`samplers.normal_pair_of_bits`: one log, one square root
    and two short polynomials per two normals; ~1/4 the cost per normal of the erf_inv
    inversion `jax.random.normal` uses, and of XLA's own sin/cos) of fused-hash words
    (`prng.word_pairs`: one hash per pair). Other PRNGs draw `jax.random.normal`.
    """
    if prng.is_threefry(key):
        # The key computed once per chain: else XLA fused its derivation (the loop's fold_in
        # and split hashes) into every element of the draw.
        a, b = prng.word_pairs(prng.materialize(key), (num + 1) // 2)
        return jnp.concatenate(samplers.normal_pair_of_bits(a, b))[:num]
    return jax.random.normal(key, (num,), _F)


def sample_points(key: Array, params: GaussianParams, num: int) -> Array:
    """`num` points `[num, d]` from N(params.mean, params.cov) (one chain); the normals come
    from `standard_normals` (so the key's PRNG implementation chooses how they are drawn)."""
    d = params.mean.shape[-1]
    if d == 1:
        z = standard_normals(key, num)
        sd = jnp.sqrt(jnp.maximum(params.cov[0, 0], 0.0))
        return (params.mean[0] + z * sd)[:, None]
    z = standard_normals(key, num * d).reshape(num, d)
    return params.mean[None, :] + z @ robust_cholesky(params.cov).T


def stats_noise(
    key: Array, num: int | Array, stream: Array | int = 0, *, compact: bool | None = None
) -> Array:
    """The randomness of `sample_stats` for d = 1: a standard normal z and a chi-square(num - 1)
    draw (chi-square(1) where num < 2, unused there), independent of the fitted params, from
    the words of `key`'s stream `stream` (`samplers.normal_and_chi_square`), as ONE complex64
    z + i chi (the scanned loop slices it per generation and splits it in the step's fusion).
    `compact`: how rejected lanes finish (`samplers.normal_and_chi_square`; the same draws)."""
    df = jnp.maximum(jnp.asarray(num, jnp.int32).astype(_F) - 1.0, 0.0)
    df = jnp.where(df > 0, df, 1.0)
    return samplers.normal_and_chi_square(key, df, stream, packed=True, compact=compact)


def sample_stats(
    key: Array,
    params: GaussianParams,
    num: int | Array,
    noise: Any = None,
    *,
    compact: bool | None = None,
) -> GaussianStats:
    """Sufficient statistics of `num` points from N(mean, cov), drawn without the points.

    mean ~ N(mu, Sigma / num); scatter = L A A^T L^T with A the Bartlett factor of
    Wishart(num - 1, I) and Sigma = L L^T; the two are independent (Cochran's theorem).

    Args:
      key: PRNG key; params: mean [d], cov [d, d]; num: int or traced int32 scalar (>= 0).
      noise: d = 1 only: `stats_noise(key, num)` drawn ahead (the generational loop draws a
        block of generations' noise at once); None draws it here.
      compact: passed to `stats_noise` (the same draws whatever it is).
    """
    d = params.mean.shape[-1]
    num = jnp.asarray(num, jnp.int32)
    nf = num.astype(_F)
    chol = robust_cholesky(params.cov)
    if d == 1:  # both draws from one call for random words (no key splits: the hot path)
        df = jnp.maximum(nf - 1.0, 0.0)
        noise = stats_noise(key, num, compact=compact) if noise is None else noise
        z, chi = jnp.real(noise), jnp.imag(noise)
        sd = chol[0, 0]
        mean = params.mean + sd * z / jnp.sqrt(jnp.maximum(nf, 1.0))
        mean = jnp.where(num > 0, mean, jnp.zeros_like(mean))
        scatter = jnp.where(df > 0, jnp.square(chol) * chi, 0.0)  # Sigma * chi2(M - 1)
        return GaussianStats(num, mean, scatter)
    k_m, k_w = jax.random.split(key)
    z = jax.random.normal(k_m, (d,), _F)
    mean = params.mean + (chol @ z) / jnp.sqrt(jnp.maximum(nf, 1.0))
    mean = jnp.where(num > 0, mean, jnp.zeros_like(mean))
    a = samplers.wishart_bartlett_factor(k_w, jnp.maximum(nf - 1.0, 0.0), d)
    la = chol @ a
    scatter = la @ la.T
    logdet = None
    if params.logdet is not None:
        # det(L A A^T L^T) = det(Sigma) prod_i A_ii^2: log space, never float32's cancellation;
        # A_ii = 0 (num - 1 <= i: a singular draw) gives -inf, as the law does.
        logdet = params.logdet + 2.0 * jnp.sum(jnp.log(jnp.diagonal(a)))
    return GaussianStats(num, mean, scatter, logdet)


def gaussian_log_prob(x: Array, params: GaussianParams) -> Array:
    """[N] log N(x_n; mean, cov) of points `x [N, d]` (one chain), finite for any PSD covariance.

    A singular covariance (M <= d, or a collapsed chain) is read at float32's resolution: the
    factor is taken of cov + delta I with delta = (d + 1) eps max(diag cov) (+ tiny), so points on
    the covariance's support rank by their Mahalanobis distance within it and points off it get
    very negative (or -inf, cov == 0) log-densities, never NaN."""
    d = params.mean.shape[-1]
    eps = jnp.finfo(_F).eps
    delta = (d + 1) * eps * jnp.max(jnp.diagonal(params.cov)) + jnp.finfo(_F).tiny ** 0.5
    chol = robust_cholesky(params.cov + delta * jnp.eye(d, dtype=_F))
    z = _solve_live(chol, (x - params.mean[None, :]).T)  # [d, N]
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
    return -0.5 * (jnp.sum(z * z, axis=0) + logdet + d * np.log(2.0 * np.pi))


def robust_log_det(cov: Array) -> Array:
    """log det cov: -inf when float32 cannot resolve the covariance as full rank (LAPACK's
    Cholesky fails and `psd_cholesky` has a dead column: a singular fit, or a collapsed chain),
    rather than LU's rounding-noise value; d = 1 as `metrics.log_det`."""
    if cov.shape[-1] == 1:
        return metrics.log_det(cov)
    diag = jnp.diagonal(_factor(cov))
    return jnp.where(
        jnp.all(diag > 0.0), 2.0 * jnp.sum(jnp.log(jnp.where(diag > 0, diag, 1.0))), -jnp.inf
    )


def stats_of_points(x: Array) -> GaussianStats:
    """Sufficient statistics of points `[n, d]`, in one pass over the points.

    Sums are taken around the first point (a shift within a few standard deviations of the
    mean), so sum(y y^T) - n ybar ybar^T does not cancel catastrophically even when the spread
    is tiny compared with the mean (a collapsed chain); one pass lets XLA fuse the draws of the
    sample method with the reduction instead of materialising them twice.
    """
    n = x.shape[0]
    if x.shape[1] == 1:  # 1-D: reduce a flat [n] vector (a trailing axis of 1 halves the speed)
        v = x[:, 0]
        y1 = v - v[0]
        ybar1 = jnp.sum(y1) / n
        scatter1 = jnp.sum(jnp.square(y1)) - n * jnp.square(ybar1)
        return GaussianStats(jnp.int32(n), (v[0] + ybar1).reshape(1), scatter1.reshape(1, 1))
    y = x - x[:1]
    ybar = jnp.sum(y, axis=0) / n  # [d]
    scatter = y.T @ y - n * jnp.outer(ybar, ybar)
    return GaussianStats(jnp.int32(n), x[0] + ybar, scatter)


def subset_stats(key: Array, stats: GaussianStats, num: int | Array) -> GaussianStats:
    """Statistics of a uniformly random subset of `num` of the `stats.n` points, drawn exactly
    from their distribution given the pool's statistics (Gaussian points), at a cost
    independent of the sizes.

    Why it is exact: write the pool's centred points as X_c = H F^T, F F^T = scatter (F =
    `psd_cholesky`, whose r live columns span the points; r <= n - 1) and H an [n, r] orthonormal
    frame orthogonal to the ones vector. For Gaussian points H is uniform (Haar) and independent
    of F, and the subset's statistics are functions of H and F only: mean_A - mean =
    sqrt((n - k) / (n k)) F t and scatter_A = F W_A F^T, where (W_A, t) are the whitened
    within-subset scatter and between-parts deviation of ANY Gaussian sample with the same H law.
    We therefore draw a standard one through its parts on F's r live coordinates (the others
    are masked to zero: F's columns there are zero), G_A ~ W(k - 1, I), G_B ~ W(n - k - 1, I),
    z ~ N(0, I) (the within-A, within-B and between scatters, independent), and whiten them by
    the Cholesky factor C of their sum, Wishart(n - 1, I_r), full rank as r <= n - 1 (C^T is the
    R of that sample's QR): W_A = C^-1 G_A C^-T, t = C^-1 z. A singular pool (fewer points than
    dimensions, or a collapsed chain) thus stays exact, with the subset in the pool's span.

    Args:
      key: PRNG key; stats: the pool (any n >= 1, any rank);
      num: k, the subset size (int or traced int32, 1 <= k <= n).
    """
    d = stats.mean.shape[-1]
    n = stats.n.astype(_F)
    num = jnp.asarray(num, jnp.int32)
    k = num.astype(_F)
    ell = robust_cholesky(stats.scatter)
    live = (jnp.diagonal(ell) > 0.0).astype(_F)[:, None]  # [d, 1]: F's live coordinates
    k_a, k_b, k_z = jax.random.split(key, 3)
    a = live * samplers.wishart_bartlett_factor(k_a, jnp.maximum(k - 1.0, 0.0), d)  # G_A = a a^T
    b = live * samplers.wishart_bartlett_factor(k_b, jnp.maximum(n - k - 1.0, 0.0), d)
    z = live[:, 0] * jax.random.normal(k_z, (d,), _F)
    c = robust_cholesky(a @ a.T + b @ b.T + jnp.outer(z, z))
    ca = _solve_live(c, a)  # W_A = ca ca^T
    t = _solve_live(c, z)
    la = ell @ ca
    mean = stats.mean + (ell @ t) * jnp.sqrt(jnp.maximum(n - k, 0.0) / (n * jnp.maximum(k, 1.0)))
    whole = num >= stats.n  # the subset is the pool itself
    return GaussianStats(
        num,
        jnp.where(whole, stats.mean, mean),
        jnp.where(whole, stats.scatter, la @ la.T),
    )


def pool(parts: Sequence[GaussianStats]) -> GaussianStats:
    """Statistics of the union of data sets (Chan et al.'s parallel update; empty parts ok).
    The union's log-det is not carried (None: the fit reads it off the pooled scatter)."""
    out = parts[0]._replace(logdet=None)
    for s in parts[1:]:
        n1, n2 = out.n.astype(_F), s.n.astype(_F)
        n = n1 + n2
        safe = jnp.maximum(n, 1.0)
        delta = s.mean - out.mean
        mean = out.mean + delta * (n2 / safe)
        scatter = out.scatter + s.scatter + jnp.outer(delta, delta) * (n1 * n2 / safe)
        out = GaussianStats(out.n + s.n, mean, scatter)
    return out


def fit_stats(stats: GaussianStats, estimator: str) -> GaussianParams:
    """Mean and covariance estimate from sufficient statistics; for d > 1 also the covariance's
    log-determinant: the data's carried one minus d log(divisor), else read off the matrix."""
    nf = stats.n.astype(_F)
    denom = nf - 1.0 if estimator == "unbiased" else nf
    cov = stats.scatter / denom
    d = stats.mean.shape[-1]
    if d == 1:
        return GaussianParams(stats.mean, cov)
    if stats.logdet is None:
        return GaussianParams(stats.mean, cov, robust_log_det(cov))
    return GaussianParams(stats.mean, cov, stats.logdet - d * jnp.log(denom))


class GaussianLearner(KnobbedLearner[GaussianParams, Any]):
    """The Gaussian model for the generational loop (one chain per call; final class).

    Data: raw points `[n, d]` for `method="sample"`, `GaussianStats` for `method="exact"`
    (whose sample sizes may be traced: `static_sample_size` is False).
    """

    jittable: ClassVar[bool] = True
    infinite_metrics: ClassVar[frozenset[str]] = frozenset({"logdet_cov"})  # collapsed: -inf

    def __init__(self, config: GaussianConfig, mesh: Any = None):
        super().__init__(config, mesh)
        self.static_sample_size = config.method == "sample"
        self._mean0 = config.mean_array()
        self._cov0 = config.cov_array()
        # Under a mesh the chains are sharded: the exact sampler's rejected lanes then finish in
        # masked full-width rounds (the same draws), not by a compaction across every chain,
        # which would gather lanes from all devices.
        self._compact = None if mesh is None else False

    @property
    def truth(self) -> GaussianParams:
        """The original distribution (float32)."""
        logdet = None
        if self.config.dim > 1:  # carried in log space from here on (`GaussianParams.logdet`)
            logdet = jnp.asarray(np.linalg.slogdet(self._cov0)[1], _F)
        return GaussianParams(jnp.asarray(self._mean0, _F), jnp.asarray(self._cov0, _F), logdet)

    def _draw(self, key: Array, params: GaussianParams, num: Any, noise: Any = None) -> Any:
        if self.config.method == "sample":
            return sample_points(with_impl(key, self.config.rng_impl), params, num)
        # The exact method draws a few words per chain from the loop's own (threefry) key,
        # hashed in fused code (`prng.random_words`); re-wrapping it for another impl would
        # only make `jax.random` hash it more slowly.
        return sample_stats(key, params, num, noise, compact=self._compact)

    def sample_noise(self, key: Array, num: int | Array, stream: Array | int = 0) -> Any:
        """The randomness of a synthetic draw, independent of the params (the exact method for
        d = 1: `stats_noise` from `key`'s words of stream `stream`; stream 0 is what
        `sample(key, params, num)` draws itself), for the loop to draw ahead for a block of
        generations; None for the other configurations."""
        if self.config.method != "exact" or self.config.dim != 1:
            return None
        return stats_noise(key, num, stream, compact=self._compact)

    def draw_real(self, key: Array, num: int | Array) -> Any:
        # Real data carry no log-det (the fit reads it off their scatter): a data set kept
        # across generations (accumulate, a fixed real set) then has one pytree structure.
        return self._draw(key, self.truth._replace(logdet=None), num)

    def init(self, key: Array) -> GaussianParams:
        return self.truth

    def fit(self, key: Array, data: Any, params: GaussianParams, **kwargs: Any) -> GaussianParams:
        stats = stats_of_points(data) if self.config.method == "sample" else data
        return fit_stats(stats, self.config.estimator)

    knob_fields: ClassVar[frozenset[str]] = frozenset({"sampling_bias"})

    def knobs(self) -> dict[str, float]:
        return {"sampling_bias": self.config.sampling_bias}

    def sample(
        self, key: Array, params: GaussianParams, num: int | Array, noise: Any = None, **kwargs: Any
    ) -> Any:
        """`num` synthetic points from N(mean, sampling_bias * cov) (lambda: a traced scalar in
        a sweep batch, `knob`; times lambda = 1 leaves the covariance's bits unchanged);
        `noise`: `sample_noise(key, num)` drawn ahead by the loop (the same numbers as drawing
        it here)."""
        lam = self.knob("sampling_bias")
        if isinstance(lam, jax.Array) or lam != 1.0:
            logdet = params.logdet
            if logdet is not None:
                logdet = logdet + params.mean.shape[-1] * jnp.log(jnp.asarray(lam, _F))
            params = GaussianParams(params.mean, params.cov * lam, logdet)
        return self._draw(key, params, num, noise)

    def evaluate(self, key: Array, params: GaussianParams, reference: Any) -> dict[str, Array]:
        """W2 distance to the original, trace and log-determinant of the covariance (the carried
        one where the params have it), |mu-mu0|^2, and the fitted mean and standard deviations
        `[d]` (for the drift figures)."""
        t = self.truth
        w2sq = metrics.gaussian_w2_squared(params.mean, params.cov, t.mean, t.cov)
        return {
            "w2": jnp.sqrt(w2sq),
            "w2_squared": w2sq,
            "trace_cov": jnp.trace(params.cov),
            "logdet_cov": robust_log_det(params.cov) if params.logdet is None else params.logdet,
            "mean_dist2": jnp.sum(jnp.square(params.mean - t.mean)),
            "fitted_mean": params.mean,
            "fitted_std": jnp.sqrt(jnp.maximum(jnp.diagonal(params.cov), 0.0)),
        }

    def log_prob(self, data: Array, params: GaussianParams) -> Array:
        """[N] log-density of points `[N, d]` under N(params.mean, params.cov) (method "sample";
        the selection scorer "generation0")."""
        return gaussian_log_prob(data, params)

    def truth_log_prob(self, data: Array) -> Array:
        """[N] log-density of points `[N, d]` under the original distribution (the selection
        scorer "truth")."""
        return gaussian_log_prob(data, self.truth)

    # --- data algebra: sufficient statistics for the exact method --------------------------
    def subset(self, key: Array, data: Any, num: int | Array) -> Any:
        if self.config.method == "exact":
            return subset_stats(key, data, num)
        return super().subset(key, data, num)

    def concat(self, parts: list[Any]) -> Any:
        if self.config.method == "exact":
            return pool(parts)
        return super().concat(parts)

    def num_samples(self, data: Any) -> Any:
        if self.config.method == "exact":
            return data_count(data.n)
        return super().num_samples(data)


@dataclasses.dataclass(frozen=True)
class GaussianSimulation:
    """Result of `simulate`.

    Attributes:
      mean: [G + 1, R, d] fitted means; index 0 is the original distribution.
      cov: [G + 1, R, d, d] fitted covariances.
      sample_sizes: [G] the training-set size of indices 1..G.
    """

    mean: np.ndarray
    cov: np.ndarray
    sample_sizes: np.ndarray


def measure_params(
    learner: Any, key: Array, params: GaussianParams, reference: Any, data: Any
) -> tuple[Array, Array]:
    """What `simulate` keeps per generation, the fitted (mean, cov) (a `loop.simulate_chains`
    measure)."""
    return params.mean, params.cov


def sample_size_schedule(sample_size: int | Sequence[int], generations: int) -> list[int]:
    """Per-generation sizes from an int (constant) or a sequence of `generations` ints (>= 2)."""
    if isinstance(sample_size, (int, np.integer)):
        sizes = [int(sample_size)] * generations
    else:
        sizes = [int(m) for m in sample_size]
        if len(sizes) != generations:
            raise ValueError(f"sample_size has {len(sizes)} entries but generations={generations}")
    if any(m < 2 for m in sizes):
        raise ValueError(f"every sample size must be >= 2, got min {min(sizes)}")
    if max(sizes) >= 2**24:
        raise ValueError("sample sizes must be < 2^24 (float32 counts)")
    return sizes


def simulate(
    key: Array,
    *,
    chains: int,
    generations: int,
    sample_size: int | Sequence[int],
    mean: float | Sequence[float] = 0.0,
    cov: float | Sequence[Sequence[float]] = 1.0,
    method: Literal["exact", "sample"] = "exact",
    estimator: Literal["unbiased", "mle"] = "unbiased",
    policy: Literal["replace", "mix", "accumulate", "accumulate_subsample"] = "replace",
    alpha: float = 1.0,
    beta: float = 0.0,
    gamma: float = 0.0,
    chunk_size: int = 65536,
    rng_impl: RngImpl = "threefry2x32",
    sampling_bias: float = 1.0,
    timings: dict[str, float] | None = None,
) -> GaussianSimulation:
    """Simulates `chains` independent chains of recursive Gaussian fitting.

    Args:
      key: the base PRNG key; chain r and generation g draw with the keys of the generational
        loop (`collapse_jax.loop`), so `simulate(jax.random.key(s), ...)` gives chain by
        chain the numbers of `collapse-jax run` with seed s (and nothing depends on chunking).
      chains: R, number of independent chains.
      generations: G, number of refits.
      sample_size: M, an int or a sequence of G ints: the size of the training set of fit g
        (index g + 1 of the result; the first is real data).
      mean: original mean: a scalar (d = 1, or broadcast to the dimension of `cov`) or [d].
      cov: original covariance: a scalar variance (d = 1 unless `mean` has d values) or [d, d].
      method: "exact" (sufficient statistics drawn directly) or "sample" (the M points).
      estimator: "unbiased" (scatter / (M - 1)) or "mle" (scatter / M).
      policy: "replace" (train on the last model's samples only), "mix" (alpha synthetic, beta
        previous training data, gamma fresh real data), "accumulate" (keep all data) or
        "accumulate_subsample" (keep all data, fit a random subset of M of it).
      alpha, beta, gamma: the "mix" shares (summing to 1).
      chunk_size: chains per batch (bounds memory for 10^6+ chains).
      rng_impl: PRNG of the sample method's normals (`GaussianConfig.rng_impl`: "threefry2x32",
        fused and fastest; "philox4x32"; or "default", the key's own); the exact method hashes
        the loop's keys (`collapse_jax.jaxtools.prng`) whatever this is.
      sampling_bias: lambda: each generation's synthetic data come from N(mu, lambda Sigma).
      timings: None, or a dict that receives the device time ("kernel_s") and the
        device-to-host copy time ("copy_s"), measured apart (`loop.simulate_chains`).
    Returns:
      GaussianSimulation with `.mean [G + 1, R, d]` and `.cov [G + 1, R, d, d]`.
    """
    mean_a = np.atleast_1d(np.asarray(mean, np.float64))
    cov_a = np.asarray(cov, np.float64)
    if cov_a.ndim == 0:
        cov_a = float(cov_a) * np.eye(mean_a.shape[0])
    if mean_a.shape[0] == 1 and cov_a.shape[0] > 1:
        mean_a = np.full(cov_a.shape[0], mean_a[0])
    if cov_a.shape != (mean_a.shape[0], mean_a.shape[0]):
        raise ValueError(f"mean has shape {mean_a.shape} but cov has shape {cov_a.shape}")
    sizes = sample_size_schedule(sample_size, generations)
    try:
        cfg = GaussianConfig(
            dim=int(mean_a.shape[0]),
            mean=tuple(float(v) for v in mean_a),
            cov=tuple(tuple(float(v) for v in row) for row in cov_a),
            estimator=estimator,
            method=method,
            rng_impl=rng_impl,
            sampling_bias=sampling_bias,
        )
        schedule = loop.Schedule.build(sizes, mode=policy, alpha=alpha, beta=beta, gamma=gamma)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    learner = GaussianLearner(cfg)
    t = learner.truth
    m, c = loop.simulate_chains(
        learner,
        schedule,
        key,
        chains=chains,
        measure=measure_params,
        chunk_size=chunk_size,
        timings=timings,
        initial=(np.asarray(t.mean), np.asarray(t.cov)),  # index 0: the original distribution
    )
    return GaussianSimulation(mean=m, cov=c, sample_sizes=np.asarray(sizes))


__all__ = [
    "GaussianConfig",
    "GaussianLearner",
    "GaussianParams",
    "GaussianSimulation",
    "GaussianStats",
    "simulate",
]

"""Gaussian mixtures fitted by EM, vmapped over independent chains (the paper's GMM experiment).

Shumailov et al. (Nature 2024) fit a two-component, full-covariance Gaussian mixture by EM
(scikit-learn's `GaussianMixture`, tol 1e-5, up to 2000 iterations) to N = 1000 points, sample
N new points from the fit, refit, and so on for ~2000 generations; the mixture's L2 distance to
the original distribution grows while its variance shrinks. This module is that learner in JAX:

- `fit(x, n_components=...)` runs EM with scikit-learn's semantics (initial M-step from
  k-means / random responsibilities or explicit starting parameters, `reg_covar` on the
  diagonal, stop when the per-sample mean log-likelihood changes by less than `tol`) on
  `x [..., N, d]`, every leading index an independent chain. One chain is a `lax.while_loop`;
  `vmap` turns it into a single loop that runs while any chain is unconverged and freezes the
  finished ones (`benchmarks/bench_gmm.py` compares it with an explicitly masked loop). On
  one CPU device, `fit_em` instead runs a large batch in host-driven rounds on the chains still
  unconverged (`compacts` says where; never inside `jit`, on accelerators or across devices).
- `l2_distance(p, q)` is the closed-form squared L2 distance between two mixture densities,
  from the Gaussian product integral  int N(x; a, A) N(x; b, B) dx = N(a; b, A + B).

The generational-loop learner is in `collapse_jax.gmm.learner`, its figures in
`collapse_jax.gmm.figures`; `collapse_jax.gmm` re-exports the public names of all three.

Shape letters: `N` points, `d` dimension, `C` fitted components, `K` true components.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular
from jax.scipy.special import logsumexp

_HI = jax.lax.Precision.HIGHEST  # fp32 accumulation even where the backend defaults to TF32
InitMethod = Literal["kmeans", "k-means++", "random"]
INIT_METHODS: tuple[str, ...] = ("kmeans", "k-means++", "random")


class GMMParams(NamedTuple):
    """A Gaussian mixture; leading axes `...` index independent chains.

    Attributes:
      weights: [..., C] mixing weights (sum to 1).
      means: [..., C, d] component means.
      covs: [..., C, d, d] component covariances (symmetric positive definite).
    """

    weights: jax.Array
    means: jax.Array
    covs: jax.Array


class EMResult(NamedTuple):
    """Everything EM returns for each chain.

    Attributes:
      params: the fitted mixture (after the last M-step).
      lower_bound: [...] per-sample mean log-likelihood at the last E-step (scikit-learn's
        `lower_bound_` with n_init=1: it scores the parameters *before* the last M-step).
      n_iter: [...] int32 EM iterations run (scikit-learn's `n_iter_`).
      converged: [...] bool, True when the change of the lower bound fell below `tol`.
      trace: [..., max_iter] the lower bound of every iteration (scikit-learn's
        `lower_bounds_`), NaN after the chain stopped; None unless requested.
    """

    params: GMMParams
    lower_bound: jax.Array
    n_iter: jax.Array
    converged: jax.Array
    trace: jax.Array | None = None


# ----------------------------------------------------------------------------------------------
# Gaussian densities.


def _precision_cholesky(covs: jax.Array) -> jax.Array:
    """[..., d, d] covariances -> upper-triangular U with precision = U U^T (scikit-learn's
    `precisions_cholesky_`)."""
    chol = jnp.linalg.cholesky(covs)  # lower L, cov = L L^T
    eye = jnp.broadcast_to(jnp.eye(covs.shape[-1], dtype=covs.dtype), covs.shape)
    return jnp.swapaxes(solve_triangular(chol, eye, lower=True), -1, -2)  # L^-T


def _log_gaussian(x: jax.Array, means: jax.Array, prec_chol: jax.Array) -> jax.Array:
    """log N(x_n; mu_c, Sigma_c) for one chain: x [N, d], means [C, d], prec_chol [C, d, d]
    -> [N, C]."""
    d = x.shape[-1]
    y = jnp.einsum("nd,cde->nce", x, prec_chol, precision=_HI)  # [N, C, d]
    y = y - jnp.einsum("cd,cde->ce", means, prec_chol, precision=_HI)[None]
    log_det = jnp.sum(jnp.log(jnp.diagonal(prec_chol, axis1=-2, axis2=-1)), axis=-1)  # [C]
    return -0.5 * (d * math.log(2 * math.pi) + jnp.sum(y * y, axis=-1)) + log_det[None, :]


def weighted_log_prob(x: jax.Array, params: GMMParams) -> jax.Array:
    """[N, C] log(w_c) + log N(x_n; mu_c, Sigma_c) for one chain."""
    lp = _log_gaussian(x, params.means, _precision_cholesky(params.covs))
    return lp + jnp.log(params.weights)[None, :]


def log_likelihood(params: GMMParams, x: jax.Array) -> jax.Array:
    """Per-point log-density of the mixture.

    Args:
      params: mixture with leading chain axes `...`.
      x: [..., N, d] points (same leading axes as `params`).
    Returns:
      [..., N] log p(x_n).
    """
    fn = lambda p, xs: logsumexp(weighted_log_prob(xs, p), axis=-1)
    return _map_chains(fn, params.weights.shape[:-1], params, x)


# ----------------------------------------------------------------------------------------------
# EM for one chain.


def _m_step(x: jax.Array, resp: jax.Array, reg_covar: jax.Array) -> GMMParams:
    """Maximum-likelihood mixture for responsibilities resp [N, C] (scikit-learn's
    `_estimate_gaussian_parameters` with the `10 * eps` guard against empty components)."""
    d = x.shape[-1]
    nk = jnp.sum(resp, axis=0) + 10 * jnp.finfo(resp.dtype).eps  # [C]
    means = jnp.einsum("nc,nd->cd", resp, x, precision=_HI) / nk[:, None]  # [C, d]
    diff = x[None, :, :] - means[:, None, :]  # [C, N, d]
    covs = jnp.einsum("nc,cnd,cne->cde", resp, diff, diff, precision=_HI) / nk[:, None, None]
    covs = covs + reg_covar * jnp.eye(d, dtype=x.dtype)[None]  # [C, d, d]
    return GMMParams(nk / jnp.sum(nk), means, covs)


def _e_step(x: jax.Array, params: GMMParams) -> tuple[jax.Array, jax.Array]:
    """(mean log-likelihood scalar, log responsibilities [N, C]) for one chain."""
    wlp = weighted_log_prob(x, params)  # [N, C]
    lpn = logsumexp(wlp, axis=1)  # [N]
    return jnp.mean(lpn), wlp - lpn[:, None]


def _initial_resp(
    key: jax.Array, x: jax.Array, n_components: int, method: str, kmeans_max_iter: int
) -> jax.Array:
    """Initial responsibilities [N, C] for one chain (scikit-learn's `init_params`)."""
    n = x.shape[0]
    if method == "random":
        resp = jax.random.uniform(key, (n, n_components), dtype=x.dtype)
        return resp / jnp.sum(resp, axis=1, keepdims=True)
    centers = _kmeans_plusplus(key, x, n_components)
    if method == "kmeans":
        centers = _lloyd(x, centers, kmeans_max_iter)
    labels = jnp.argmin(_sq_dist(x, centers), axis=1)
    return jax.nn.one_hot(labels, n_components, dtype=x.dtype)


def _sq_dist(x: jax.Array, centers: jax.Array) -> jax.Array:
    """[N, C] squared distances between x [N, d] and centers [C, d]."""
    diff = x[:, None, :] - centers[None, :, :]
    return jnp.sum(diff * diff, axis=-1)


def _kmeans_plusplus(key: jax.Array, x: jax.Array, n_components: int) -> jax.Array:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new center is a data point drawn
    with probability proportional to its squared distance to the nearest chosen center.
    Inverse-CDF draws keep it branch-free under vmap. Returns [C, d]."""
    n = x.shape[0]
    keys = jax.random.split(key, n_components)
    first = jax.random.randint(keys[0], (), 0, n)
    centers = jnp.broadcast_to(x[first], (n_components, x.shape[1]))
    closest = jnp.sum((x - x[first][None, :]) ** 2, axis=1)  # [N]
    for c in range(1, n_components):
        cdf = jnp.cumsum(closest)
        u = jax.random.uniform(keys[c], (), dtype=x.dtype) * cdf[-1]
        idx = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), n - 1)
        centers = centers.at[c].set(x[idx])
        closest = jnp.minimum(closest, jnp.sum((x - x[idx][None, :]) ** 2, axis=1))
    return centers


def _lloyd(x: jax.Array, centers: jax.Array, max_iter: int, tol: float = 1e-4) -> jax.Array:
    """Lloyd's k-means iterations with scikit-learn's `KMeans` stopping rules: the assignment no
    longer changes, or the centers moved by at most tol * mean(var(x)) in squared distance, or
    max_iter; an empty cluster keeps its previous center. Returns [C, d]."""
    c, d = centers.shape
    cols = [x[:, i] for i in range(d)]  # d x [N]: elementwise work that XLA fuses
    threshold = tol * jnp.mean(jnp.var(x, axis=0))

    def assign(centers):
        dist = [sum((cols[i] - centers[k, i]) ** 2 for i in range(d)) for k in range(c)]
        return jnp.argmin(jnp.stack(dist), axis=0)  # [N]

    def body(state):
        centers, labels, _, it = state
        member = [labels == k for k in range(c)]
        counts = jnp.stack([jnp.sum(m.astype(x.dtype)) for m in member])  # [C]
        sums = jnp.stack(
            [jnp.stack([jnp.sum(jnp.where(m, cols[i], 0)) for i in range(d)]) for m in member]
        )  # [C, d]
        new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], centers)
        new_labels = assign(new)
        moving = jnp.any(new_labels != labels) & (jnp.sum((new - centers) ** 2) > threshold)
        return new, new_labels, moving, it + 1

    state = (centers, assign(centers), jnp.array(True), jnp.array(0, jnp.int32))
    centers, *_ = jax.lax.while_loop(lambda s: s[2] & (s[3] < max_iter), body, state)
    return centers


class _EMState(NamedTuple):
    """The loop state of one chain's EM (resumable: `fit_em` continues unfinished chains)."""

    params: GMMParams  # current parameters, in the chain's centred coordinates
    prev: jax.Array  # lower bound of the previous iteration (-inf before the first)
    n_iter: jax.Array  # int32 iterations run
    converged: jax.Array  # bool
    trace: jax.Array  # [max_iter] lower bounds (or [0] when not traced)


_UNROLL_D = 6  # up to this dimension the E/M-steps are unrolled into elementwise ops


def _em_step(x: jax.Array, params: GMMParams, reg_covar: jax.Array) -> tuple[jax.Array, GMMParams]:
    """One EM iteration for one chain: (lower bound of `params`, new parameters)."""
    if x.shape[-1] > _UNROLL_D:
        lb, log_resp = _e_step(x, params)
        return lb, _m_step(x, jnp.exp(log_resp), reg_covar)
    return _em_step_unrolled(x, params, reg_covar)


def _chol_unrolled(covs: jax.Array) -> list[list[jax.Array]]:
    """Cholesky factors of covs [C, d, d] as a d x d lower-triangular table of [C] arrays."""
    d = covs.shape[-1]
    chol: list[list[Any]] = [[None] * d for _ in range(d)]
    for i in range(d):
        for j in range(i + 1):
            s = covs[:, i, j]
            for k in range(j):
                s = s - chol[i][k] * chol[j][k]
            chol[i][j] = jnp.sqrt(s) if i == j else s / chol[j][j]
    return chol


def _em_step_unrolled(
    x: jax.Array, params: GMMParams, reg_covar: jax.Array
) -> tuple[jax.Array, GMMParams]:
    """`_em_step` for small d, written as elementwise ops on [N] columns (one per component and
    coordinate) so that XLA fuses each E-step into a few passes over the points, instead of tiny
    batched matmuls and Cholesky calls (faster on CPU at small d; benchmarks/results/
    gmm-cpu.json times the EM chains)."""
    n, d = x.shape
    c = params.weights.shape[0]
    cols = [x[:, i] for i in range(d)]  # d x [N]
    chol = _chol_unrolled(params.covs)
    inv_diag = [1.0 / chol[i][i] for i in range(d)]  # [C] each
    log_det = sum(jnp.log(chol[i][i]) for i in range(d))
    const = jnp.log(params.weights) - log_det - 0.5 * d * math.log(2 * math.pi)  # [C]
    wlp = []  # C x [N]: log w_k + log N(x_n; mu_k, Sigma_k)
    resid = []  # C x d x [N]: x - mu_k, reused by the M-step
    for k in range(c):
        z: list[jax.Array] = []  # forward substitution L z = x - mu
        resid.append([cols[i] - params.means[k, i] for i in range(d)])
        for i in range(d):
            s = resid[k][i]
            for j in range(i):
                s = s - chol[i][j][k] * z[j]
            z.append(s * inv_diag[i][k])
        wlp.append(const[k] - 0.5 * sum(zi * zi for zi in z))
    top = functools.reduce(jnp.maximum, wlp)
    e = [jnp.exp(a - top) for a in wlp]  # C x [N], one exp per point and component
    total = sum(e)
    lpn = top + jnp.log(total)  # [N] log p(x_n)
    inv_total = 1.0 / total
    resp = [ek * inv_total for ek in e]  # C x [N]
    eps = 10 * jnp.finfo(x.dtype).eps  # scikit-learn's guard against empty components
    nk = jnp.stack([jnp.sum(r) for r in resp]) + eps  # [C]
    # Moments about the previous means: delta = mu_new - mu_old is small, so
    # cov = E_r[(x - mu_old)(x - mu_old)^T] - delta delta^T cancels far less than raw moments
    # (float32 EM on a near-singular component is otherwise visibly non-monotone).
    sx = jnp.stack([jnp.stack([jnp.sum(r * e) for e in res]) for r, res in zip(resp, resid)])
    delta = sx / nk[:, None]  # [C, d]
    sxx = [[None] * d for _ in range(d)]
    for i in range(d):
        for j in range(i + 1):
            sxx[i][j] = sxx[j][i] = jnp.stack(
                [jnp.sum(r * res[i] * res[j]) for r, res in zip(resp, resid)]
            )
    second = jnp.stack([jnp.stack(row, axis=-1) for row in sxx], axis=-2)  # [C, d, d]
    covs = second / nk[:, None, None] - delta[:, :, None] * delta[:, None, :]
    covs = covs + reg_covar * jnp.eye(d, dtype=x.dtype)[None]
    means = params.means + delta
    return jnp.mean(lpn), GMMParams(nk / jnp.sum(nk), means, covs)


def _em_start(x: jax.Array, params: GMMParams, max_iter: int, trace: bool) -> _EMState:
    """Initial loop state of one chain, with `params` moved to the chain's centred frame."""
    shift = jnp.mean(x, axis=0)
    params = params._replace(means=params.means - shift[None, :])
    tr = jnp.full((max_iter if trace else 0,), jnp.nan, x.dtype)
    return _EMState(
        params, jnp.array(-jnp.inf, x.dtype), jnp.array(0, jnp.int32), jnp.array(False), tr
    )


def _em_run(
    x: jax.Array,
    state: _EMState,
    tol: jax.Array,
    reg_covar: jax.Array,
    max_iter: int,
    budget: jax.Array,
) -> _EMState:
    """Runs EM for one chain until convergence, `max_iter` or `budget` more iterations
    (scikit-learn's `fit_predict` loop: tol on the change of the mean log-likelihood)."""
    xc = x - jnp.mean(x, axis=0)[None, :]  # EM is translation-equivariant
    stop = state.n_iter + budget
    trace = state.trace.shape[0] > 0

    def body(s: _EMState) -> _EMState:
        lb, params = _em_step(xc, s.params, reg_covar)
        converged = jnp.abs(lb - s.prev) < tol  # first iteration: prev = -inf, never converged
        tr = s.trace.at[s.n_iter].set(lb) if trace else s.trace
        return _EMState(params, lb, s.n_iter + 1, converged, tr)

    def cond(s: _EMState) -> jax.Array:
        return (~s.converged) & (s.n_iter < max_iter) & (s.n_iter < stop)

    return jax.lax.while_loop(cond, body, state)


def _em_result(x: jax.Array, state: _EMState, trace: bool) -> EMResult:
    shift = jnp.mean(x, axis=0)
    params = state.params._replace(means=state.params.means + shift[None, :])
    return EMResult(
        params, state.prev, state.n_iter, state.converged, state.trace if trace else None
    )


def em_chain(
    x: jax.Array,
    params: GMMParams,
    tol: jax.Array,
    reg_covar: jax.Array,
    max_iter: int,
    trace: bool,
) -> EMResult:
    """EM from starting parameters for one chain, x [N, d], run to the end."""
    state = _em_start(x, params, max_iter, trace)
    state = _em_run(x, state, tol, reg_covar, max_iter, jnp.array(max_iter, jnp.int32))
    return _em_result(x, state, trace)


def fit_chain(
    x: jax.Array,
    key: jax.Array,
    init: GMMParams | None,
    tol: jax.Array,
    reg_covar: jax.Array,
    *,
    n_components: int,
    init_method: str,
    max_iter: int,
    kmeans_max_iter: int,
    trace: bool,
) -> EMResult:
    """EM for one chain, x [N, d], from `init` or from a start drawn with `key` by `init_method`
    (what `fit_em` vmaps over chains)."""
    return em_chain(
        x,
        _start_params(x, key, init, reg_covar, n_components, init_method, kmeans_max_iter),
        tol,
        reg_covar,
        max_iter,
        trace,
    )


def _start_params(
    x: jax.Array,
    key: jax.Array,
    init: GMMParams | None,
    reg_covar: jax.Array,
    n_components: int,
    init_method: str,
    kmeans_max_iter: int,
) -> GMMParams:
    """EM's starting point: `init`, or the M-step of initial responsibilities."""
    if init is not None:
        return init
    resp = _initial_resp(key, x, n_components, init_method, kmeans_max_iter)
    return _m_step(x, resp, reg_covar)


# ----------------------------------------------------------------------------------------------
# Public API.


def fit(
    x: jax.Array,
    *,
    n_components: int,
    init: GMMParams | None = None,
    key: jax.Array | None = None,
    tol: float = 1e-5,
    max_iter: int = 2000,
    reg_covar: float = 1e-6,
    init_method: InitMethod = "kmeans",
    kmeans_max_iter: int = 300,
) -> GMMParams:
    """Fits a full-covariance Gaussian mixture by EM to every chain of `x`.

    Args:
      x: [..., N, d] points; every leading index is an independent chain.
      n_components: C, the number of mixture components.
      init: starting parameters (`weights [..., C]`, `means [..., C, d]`, `covs [..., C, d, d]`,
        unbatched or with the chains' leading axes), as scikit-learn's `weights_init` /
        `means_init` / `precisions_init`; None initialises from responsibilities.
      key: PRNG key for the initialisation (split over the chains), or keys with the chains'
        leading shape; None uses `jax.random.key(0)`. Unused when `init` is given.
      tol: convergence threshold on the change of the per-sample mean log-likelihood.
      max_iter: maximum number of EM iterations per chain.
      reg_covar: added to the diagonal of every covariance.
      init_method: "kmeans" (k-means++ seeding + Lloyd, scikit-learn's default), "k-means++"
        (hard assignment to k-means++ seeds) or "random" (uniform random responsibilities).
      kmeans_max_iter: maximum Lloyd iterations of the "kmeans" initialisation.
    Returns:
      The fitted `GMMParams` with leading axes `...`. Use `fit_em` for the log-likelihood
      trace, iteration counts and convergence flags.
    """
    return fit_em(
        x,
        n_components=n_components,
        init=init,
        key=key,
        tol=tol,
        max_iter=max_iter,
        reg_covar=reg_covar,
        init_method=init_method,
        kmeans_max_iter=kmeans_max_iter,
    ).params


def fit_em(
    x: jax.Array,
    *,
    n_components: int,
    init: GMMParams | None = None,
    key: jax.Array | None = None,
    tol: float = 1e-5,
    max_iter: int = 2000,
    reg_covar: float = 1e-6,
    init_method: InitMethod = "kmeans",
    kmeans_max_iter: int = 300,
    trace: bool = False,
    compact: bool | None = None,
) -> EMResult:
    """`fit` that also returns the lower bound, iteration count and convergence flag per chain.

    Args:
      x, n_components, init, key, tol, max_iter, reg_covar, init_method, kmeans_max_iter: as
        in `fit`.
      trace: also return every iteration's lower bound, `trace [..., max_iter]`.
      compact: whether the chains run in compacted rounds (`compacts`): None where that pays
        and keeps every chain on its device, True wherever possible, False never.
    Returns:
      `EMResult` with leading axes `...`.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    if x.ndim < 2:
        raise ValueError(f"x must have shape [..., N, d], got {x.shape}")
    batch, (n, d) = x.shape[:-2], x.shape[-2:]
    if n_components < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    if n < n_components:
        raise ValueError(f"need at least n_components={n_components} points per chain, got {n}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if tol < 0 or reg_covar < 0:
        raise ValueError(f"tol and reg_covar must be >= 0, got {tol}, {reg_covar}")
    if init_method not in INIT_METHODS:
        raise ValueError(f"init_method must be one of {INIT_METHODS}, got {init_method!r}")
    nb = math.prod(batch)
    xs = x.reshape(nb, n, d)
    if init is not None:
        init = _check_params(init, batch, n_components, d, x.dtype, "init")
        init = jax.tree.map(lambda a: a.reshape((nb,) + a.shape[len(batch) :]), init)
        keys = None
    else:
        keys = _chain_keys(key, batch).reshape(nb)
    tol_a, reg_a = jnp.asarray(tol, x.dtype), jnp.asarray(reg_covar, x.dtype)
    start, run, finish = _compiled(
        n_components, init_method, int(max_iter), int(kmeans_max_iter), bool(trace)
    )
    state = start(xs, keys, init, reg_a)
    if compacts(x, compact):
        state = _run_compacted(run, xs, state, tol_a, reg_a, int(max_iter))
    else:
        state = run(xs, state, tol_a, reg_a, jnp.array(max_iter, jnp.int32))
    res = finish(xs, state)
    return jax.tree.map(lambda a: a.reshape(batch + a.shape[1:]), res)


_MIN_BUCKET = 16  # smallest batch of unfinished chains `_run_compacted` runs
_ROUND_ITERS = 32  # EM iterations between two compactions


def compacts(x: jax.Array, compact: bool | None = None) -> bool:
    """Whether `fit_em` runs the chains of `x [..., N, d]` in compacted rounds
    (`_run_compacted`) rather than as one vmapped loop at full width.

    The rounds are a loop on the host between compiled programs (each round gathers the
    unconverged chains, runs them `_ROUND_ITERS` iterations and scatters them back), so they
    need concrete data: a traced `x` (inside `jit`) always gets the single loop. With
    `compact=None` they run only where they pay and stay local: `x` on ONE CPU device. On
    accelerators the masked full-width loop is cheap and a host round trip per round is not;
    with the chains sharded over several devices (a `mesh:`), each gather would pull every
    device's chains together. `compact=True` compacts any concrete batch, `False` never. A
    batch of fewer than 2 * `_MIN_BUCKET` chains is never compacted."""
    if compact is False or isinstance(x, jax.core.Tracer):
        return False
    if math.prod(x.shape[:-2]) < 2 * _MIN_BUCKET:
        return False
    if compact:
        return True
    devices = x.sharding.device_set if isinstance(x, jax.Array) else jax.devices()[:1]
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"


def _run_compacted(
    run, xs: jax.Array, state: _EMState, tol: jax.Array, reg: jax.Array, max_iter: int
) -> _EMState:
    """Runs the batched EM loop in rounds of `_ROUND_ITERS` iterations, each round only on the
    chains still running, gathered into a batch padded to a power of four (where: `compacts`).

    Under `vmap` one `while_loop` runs until the slowest chain finishes, computing (and
    discarding) iterations for every converged chain; EM's iteration counts are long-tailed
    (from the paper's setting: mean ~50, maximum ~300 over 1000 chains), so compaction saves
    most of that work. A chain's iterations do not depend on the batch it runs in, so the
    result equals a single loop's up to float rounding (which differs between batch sizes; in
    float32 a chain whose last change lies within rounding of `tol` may stop one iteration
    apart).
    """
    nb = xs.shape[0]
    active = np.arange(nb)
    budget = jnp.array(_ROUND_ITERS, jnp.int32)
    while active.size:
        bucket = _bucket(active.size, nb)
        if bucket == nb and active.size == nb:
            state = run(xs, state, tol, reg, budget)
            sub = state
        else:
            pad = bucket - active.size
            idx = np.concatenate([active, np.full(pad, active[0])])
            dest = np.concatenate([active, np.full(pad, nb)])
            state, sub = _gather_run_scatter(run, xs, state, idx, dest, tol, reg, budget)
        conv, n_iter = jax.device_get((sub.converged, sub.n_iter))
        done = conv[: active.size] | (n_iter[: active.size] >= max_iter)
        active = active[~done]
    return state


def _bucket(active: int, nb: int) -> int:
    """Batch size for `active` unfinished chains of `nb`: a power of 4 (>= _MIN_BUCKET), so that
    few batch sizes, hence few compiles, ever occur."""
    size = _MIN_BUCKET
    while size < active:
        size *= 4
    return min(size, nb)


@functools.partial(jax.jit, static_argnums=0)
def _gather_run_scatter(run, xs, state, idx, dest, tol, reg, budget):
    """Runs the chains `idx` (bucket-sized: active chains, then padding) and writes them back
    to `dest` (padding points past the end and is dropped). Fixed shapes per bucket size, so
    varying numbers of active chains do not recompile."""
    sub = run(xs[idx], jax.tree.map(lambda a: a[idx], state), tol, reg, budget)
    state = jax.tree.map(lambda a, b: a.at[dest].set(b, mode="drop"), state, sub)
    return state, sub


@functools.cache
def _compiled(
    n_components: int, init_method: str, max_iter: int, kmeans_max_iter: int, trace: bool
):
    """Jitted, chain-vmapped (start, run, finish) functions of `fit_em`."""

    def start(xs, keys, init, reg):
        def one(x, key, p):
            p = _start_params(x, key, p, reg, n_components, init_method, kmeans_max_iter)
            return _em_start(x, p, max_iter, trace)

        axes = (0, None if keys is None else 0, None if init is None else 0)
        return jax.vmap(one, in_axes=axes)(xs, keys, init)

    def run(xs, state, tol, reg, budget):
        one = lambda x, s: _em_run(x, s, tol, reg, max_iter, budget)
        return jax.vmap(one)(xs, state)

    def finish(xs, state):
        return jax.vmap(lambda x, s: _em_result(x, s, trace))(xs, state)

    return jax.jit(start), jax.jit(run), jax.jit(finish)


def _chain_keys(key: jax.Array | None, batch: tuple[int, ...]) -> jax.Array:
    if key is None:
        key = jax.random.key(0)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # legacy uint32 PRNGKey
    if key.shape == batch:
        return key
    if key.shape != ():
        raise ValueError(
            f"key must be a single key or have the chains' shape {batch}, got {key.shape}"
        )
    return jax.random.split(key, math.prod(batch)).reshape(batch)


def _check_params(
    p: Any, batch: tuple[int, ...], c: int, d: int, dtype: Any, name: str
) -> GMMParams:
    w, m, s = (jnp.asarray(a, dtype) for a in (p.weights, p.means, p.covs))
    for arr, tail, what in ((w, (c,), "weights"), (m, (c, d), "means"), (s, (c, d, d), "covs")):
        if arr.shape[arr.ndim - len(tail) :] != tail or arr.ndim not in (
            len(tail),
            len(tail) + len(batch),
        ):
            raise ValueError(
                f"{name}.{what} must have shape [..., {', '.join(map(str, tail))}] "
                f"with leading axes () or {batch}, got {arr.shape}"
            )
    w, m, s = (
        jnp.broadcast_to(a, batch + a.shape[a.ndim - k :]) for a, k in ((w, 1), (m, 2), (s, 3))
    )
    return GMMParams(w, m, s)


def _map_chains(fn, batch: tuple[int, ...], *args):
    """Applies a one-chain function to arguments with leading chain axes `batch`."""
    nb = math.prod(batch)
    flat = jax.tree.map(lambda a: a.reshape((nb,) + a.shape[len(batch) :]), args)
    out = jax.vmap(fn)(*flat)
    return jax.tree.map(lambda a: a.reshape(batch + a.shape[1:]), out)


def as_params(p: Any) -> GMMParams:
    """`GMMParams` as JAX arrays from any object with `weights`, `means`, `covs` (an `EMResult`
    gives its `params`)."""
    if isinstance(p, EMResult):
        p = p.params
    return GMMParams(jnp.asarray(p.weights), jnp.asarray(p.means), jnp.asarray(p.covs))


def _overlap(p: GMMParams, q: GMMParams) -> jax.Array:
    """sum_ij wp_i wq_j int N_i N_j dx = sum_ij wp_i wq_j N(mp_i; mq_j, Sp_i + Sq_j): [...]."""
    d = p.means.shape[-1]
    s = p.covs[..., :, None, :, :] + q.covs[..., None, :, :, :]  # [..., Cp, Cq, d, d]
    diff = p.means[..., :, None, :] - q.means[..., None, :, :]  # [..., Cp, Cq, d]
    chol = jnp.linalg.cholesky(s)
    z = solve_triangular(chol, diff[..., None], lower=True)[..., 0]
    log_det = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    log_n = -0.5 * (d * math.log(2 * math.pi) + jnp.sum(z * z, axis=-1)) - log_det
    w = p.weights[..., :, None] * q.weights[..., None, :]
    return jnp.sum(w * jnp.exp(log_n), axis=(-2, -1))


def l2_distance(p: GMMParams, q: GMMParams) -> jax.Array:
    """Closed-form squared L2 distance  int (p(x) - q(x))^2 dx  between two mixtures.

    Args:
      p: mixture with `weights [..., Cp]`, `means [..., Cp, d]`, `covs [..., Cp, d, d]`.
      q: mixture with `weights [..., Cq]`, ...; its leading axes broadcast against p's.
    Returns:
      [...] squared L2 distance (>= 0; exactly 0 for identical mixtures).
    """
    p, q = as_params(p), as_params(q)
    if p.means.shape[-1] != q.means.shape[-1]:
        raise ValueError(
            f"mixtures of different dimension: {p.means.shape[-1]} and {q.means.shape[-1]}"
        )
    dtype = jnp.result_type(p.means.dtype, q.means.dtype)
    batch = jnp.broadcast_shapes(p.weights.shape[:-1], q.weights.shape[:-1])

    def expand(m: GMMParams) -> GMMParams:
        return GMMParams(
            *(
                jnp.broadcast_to(a.astype(dtype), batch + a.shape[a.ndim - k :])
                for a, k in ((m.weights, 1), (m.means, 2), (m.covs, 3))
            )
        )

    p, q = expand(p), expand(q)
    pp, qq, pq = _overlap(p, p), _overlap(q, q), _overlap(p, q)
    return jnp.maximum(pp + qq - 2 * pq, 0.0)


def sample(key: jax.Array, params: GMMParams, num: int) -> jax.Array:
    """Draws `num` points from one mixture (vmap for chains).

    The component of each point comes from the inverse CDF of the weights (branch-free, no
    M x C Gumbel noise), the point from mean + L z with cov = L L^T.

    Args:
      key: PRNG key.
      params: one mixture (`weights [C]`, `means [C, d]`, `covs [C, d, d]`).
      num: number of points.
    Returns:
      [num, d] points.
    """
    params = as_params(params)
    c, d = params.means.shape
    k_comp, k_z = jax.random.split(key)
    cdf = jnp.cumsum(params.weights)
    u = jax.random.uniform(k_comp, (num,), dtype=params.means.dtype) * cdf[-1]
    comp = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), c - 1)  # [num]
    z = jax.random.normal(k_z, (num, d), dtype=params.means.dtype)
    chol = jnp.linalg.cholesky(params.covs)  # [C, d, d]
    return params.means[comp] + jnp.einsum("nde,ne->nd", chol[comp], z, precision=_HI)


def moments(params: GMMParams) -> tuple[jax.Array, jax.Array]:
    """Mean [..., d] and covariance [..., d, d] of the mixture as one distribution."""
    params = as_params(params)
    w = params.weights[..., None]
    mean = jnp.sum(w * params.means, axis=-2)
    second = params.covs + params.means[..., :, None] * params.means[..., None, :]
    second = jnp.sum(params.weights[..., None, None] * second, axis=-3)
    return mean, second - mean[..., :, None] * mean[..., None, :]

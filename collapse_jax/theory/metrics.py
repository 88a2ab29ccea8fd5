"""Pure metric functions of the theory models (Shumailov et al., Nature 2024, Figs. 2-4).

Every function works on arrays with arbitrary leading (batch) axes, e.g. `[chains, K]` or
`[chains, d, d]`, is jittable, and never reads global state. Distances to the original
distribution are what the paper plots: the Wasserstein-2 distance for Gaussians, and for discrete
distributions the lost tail mass, total variation, KL divergence and diversity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array


def _broadcast_gaussians(mean1, cov1, mean2, cov2):
    """Broadcasts the leading (batch) axes of two Gaussians explicitly (rank promotion safe)."""
    mean1, mean2 = jnp.asarray(mean1), jnp.asarray(mean2)
    cov1, cov2 = jnp.asarray(cov1), jnp.asarray(cov2)
    if mean1.shape[-1] != cov1.shape[-1] or mean2.shape[-1] != cov2.shape[-1]:
        raise ValueError(
            f"gaussian metrics: mean/cov dims differ: {mean1.shape} vs {cov1.shape}, "
            f"{mean2.shape} vs {cov2.shape}"
        )
    if mean1.shape[-1] != mean2.shape[-1]:
        raise ValueError(f"gaussian metrics: dims differ: {mean1.shape} vs {mean2.shape}")
    d = mean1.shape[-1]
    batch = jnp.broadcast_shapes(
        mean1.shape[:-1], cov1.shape[:-2], mean2.shape[:-1], cov2.shape[:-2]
    )
    return (
        jnp.broadcast_to(mean1, (*batch, d)),
        jnp.broadcast_to(cov1, (*batch, d, d)),
        jnp.broadcast_to(mean2, (*batch, d)),
        jnp.broadcast_to(cov2, (*batch, d, d)),
    )


def _broadcast_probs(p, q, name: str):
    p, q = jnp.asarray(p), jnp.asarray(q)
    if p.shape[-1] != q.shape[-1]:
        raise ValueError(f"{name}: distributions have {p.shape[-1]} and {q.shape[-1]} states")
    shape = jnp.broadcast_shapes(p.shape, q.shape)
    return jnp.broadcast_to(p, shape), jnp.broadcast_to(q, shape)


def _sym_sqrtm(a: Array) -> Array:
    """Square root of symmetric positive semi-definite matrices `[..., d, d]` via `eigh`."""
    w, v = jnp.linalg.eigh(a)
    w = jnp.sqrt(jnp.maximum(w, 0.0))  # clip round-off negatives of PSD matrices
    return jnp.einsum("...ij,...j,...kj->...ik", v, w, v)


def gaussian_w2_squared(mean1: Array, cov1: Array, mean2: Array, cov2: Array) -> Array:
    """Squared Wasserstein-2 distance between two Gaussians, in closed form.

    W2^2 = |m1 - m2|^2 + tr(S1 + S2 - 2 (S2^1/2 S1 S2^1/2)^1/2)  (Dowson & Landau 1982).

    Args:
      mean1: [..., d] first mean; cov1: [..., d, d] first covariance (symmetric PSD).
      mean2: [..., d] second mean; cov2: [..., d, d] second covariance. Leading axes broadcast.
    Returns:
      [...] the squared distance (>= 0).
    """
    mean1, cov1, mean2, cov2 = _broadcast_gaussians(mean1, cov1, mean2, cov2)
    d = mean1.shape[-1]
    dm = jnp.sum(jnp.square(mean1 - mean2), axis=-1)
    if d == 1:
        # 1-D: (s1 - s2)^2 exactly, without the cancellation of the trace formula.
        s1 = jnp.sqrt(jnp.maximum(cov1[..., 0, 0], 0.0))
        s2 = jnp.sqrt(jnp.maximum(cov2[..., 0, 0], 0.0))
        return dm + jnp.square(s1 - s2)
    r2 = _sym_sqrtm(cov2)
    cross = jnp.linalg.eigvalsh(r2 @ cov1 @ r2)
    cross = jnp.sum(jnp.sqrt(jnp.maximum(cross, 0.0)), axis=-1)
    tr = jnp.trace(cov1, axis1=-2, axis2=-1) + jnp.trace(cov2, axis1=-2, axis2=-1)
    return dm + jnp.maximum(tr - 2.0 * cross, 0.0)


def gaussian_w2(mean1: Array, cov1: Array, mean2: Array, cov2: Array) -> Array:
    """Wasserstein-2 distance between two Gaussians (square root of `gaussian_w2_squared`).

    Args/Returns as `gaussian_w2_squared`; the result is `[...]`.
    """
    return jnp.sqrt(gaussian_w2_squared(mean1, cov1, mean2, cov2))


def gaussian_kl(mean1: Array, cov1: Array, mean2: Array, cov2: Array) -> Array:
    """KL(N(mean1, cov1) || N(mean2, cov2)) for non-singular covariances.

    Args:
      mean1, mean2: [..., d]; cov1, cov2: [..., d, d] symmetric positive definite.
    Returns:
      [...] the divergence in nats.
    """
    mean1, cov1, mean2, cov2 = _broadcast_gaussians(mean1, cov1, mean2, cov2)
    d = mean1.shape[-1]
    l2 = jnp.linalg.cholesky(cov2)
    a = jax.scipy.linalg.solve_triangular(l2, cov1, lower=True)
    a = jax.scipy.linalg.solve_triangular(l2, jnp.swapaxes(a, -1, -2), lower=True)
    tr = jnp.trace(a, axis1=-2, axis2=-1)
    z = jax.scipy.linalg.solve_triangular(l2, (mean2 - mean1)[..., None], lower=True)[..., 0]
    maha = jnp.sum(jnp.square(z), axis=-1)
    logdet2 = 2.0 * jnp.sum(jnp.log(jnp.diagonal(l2, axis1=-2, axis2=-1)), axis=-1)
    logdet1 = log_det(cov1)
    return 0.5 * (tr + maha - d + logdet2 - logdet1)


def log_det(cov: Array) -> Array:
    """log det of symmetric positive (semi-)definite matrices `[..., d, d]` -> `[...]`.

    Singular matrices (a collapsed chain) give -inf rather than NaN.
    """
    if cov.shape[-1] == 1:
        return jnp.log(cov[..., 0, 0])
    sign, logdet = jnp.linalg.slogdet(cov)
    return jnp.where(sign > 0, logdet, -jnp.inf)


def total_variation(p: Array, q: Array) -> Array:
    """Total-variation distance 0.5 * sum |p - q| of distributions `[..., K]` -> `[...]`."""
    p, q = _broadcast_probs(p, q, "total_variation")
    return 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)


def kl_divergence(p: Array, q: Array) -> Array:
    """KL(p || q) = sum p log(p / q) of distributions `[..., K]` -> `[...]` (nats).

    Terms with p = 0 are 0; a state with p > 0 and q = 0 gives +inf. For model collapse use
    KL(p_n || p_0), finite because a resampled distribution never gains support.
    """
    p, q = _broadcast_probs(p, q, "kl_divergence")
    pos = p > 0
    safe_p = jnp.where(pos, p, 1.0)
    safe_q = jnp.where(pos, q, 1.0)
    terms = jnp.where(pos, p * (jnp.log(safe_p) - jnp.log(safe_q)), 0.0)
    return jnp.sum(terms, axis=-1)


def support_size(p: Array) -> Array:
    """Number of states with positive probability, `[..., K]` -> int32 `[...]`."""
    return jnp.sum(jnp.asarray(p) > 0, axis=-1, dtype=jnp.int32)


def lost_tail_mass(p0: Array, p: Array) -> Array:
    """Original probability mass on the states that `p` has lost: sum p0[p == 0] -> `[...]`.

    Args:
      p0: [..., K] the original distribution; p: [..., K] the current one.
    """
    p0, p = _broadcast_probs(p0, p, "lost_tail_mass")
    return jnp.sum(jnp.where(p > 0, 0.0, p0), axis=-1)


def gini_simpson(p: Array) -> Array:
    """Gini-Simpson diversity 1 - sum p^2 (probability two draws differ), `[..., K]` -> `[...]`."""
    p = jnp.asarray(p)
    return 1.0 - jnp.sum(jnp.square(p), axis=-1)


def entropy(p: Array) -> Array:
    """Shannon entropy -sum p log p in nats, `[..., K]` -> `[...]`."""
    p = jnp.asarray(p)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)


def absorbed_state(p: Array) -> Array:
    """One-hot `[..., K]` of the state a chain is absorbed into (a delta), zeros if not absorbed.

    The chain mean of this array is the fraction of chains absorbed at each state.
    """
    p = jnp.asarray(p)
    is_delta = (support_size(p) == 1)[..., None]
    return jnp.where(is_delta & (p > 0), 1.0, 0.0).astype(p.dtype)


def perplexity(mean_loss: Array) -> Array:
    """Perplexity exp(mean token cross-entropy in nats), as the paper's code reports it."""
    return jnp.exp(jnp.asarray(mean_loss))

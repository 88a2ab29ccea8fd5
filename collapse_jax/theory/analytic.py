"""Closed-form expectations for the theory models (float64 NumPy; no JAX).

Gaussian (Shumailov et al. 2024, Supplementary Sec. 3.2; Cochran's theorem): with k = M - 1 and
the divisor D = k (unbiased) or M (MLE), each refit multiplies the covariance by
Sigma^1/2 W Sigma^1/2 / D with W ~ Wishart(k, I) independent of the past, and shifts the mean by
N(0, Sigma / M). Hence, per generation i with size M_i:

  E[Sigma_n] = Sigma_0 prod_i c_i,             c_i = k_i / D_i
  E[log det Sigma_n] = log det Sigma_0 + sum_i [sum_{j<d} psi((k_i - j)/2) + d log(2 / D_i)]
  Var[log det Sigma_n] = sum_i sum_{j<d} psi_1((k_i - j)/2)
  E|mu_n - mu_0|^2 = tr Sigma_0 sum_i (prod_{j<i} c_j) / M_i

Discrete (Wright-Fisher resampling): E[p_n] = p_0 (a martingale), the Gini-Simpson diversity
decays as E[GS_n] = GS_0 prod_i (1 - 1/M_i), and each state's count is itself a two-allele
Wright-Fisher chain, whose law is propagated exactly to get the expected support size, lost tail
mass and absorption probabilities.

Index convention: arrays of length G indexed by the loop's generation n (the model fitted to the
n-th training set; n = 0 is fitted to real data), i.e. `simulate`'s index n + 1.
"""

from __future__ import annotations

import math

import numpy as np


def digamma(x: np.ndarray | float) -> np.ndarray:
    """The digamma function psi(x) for x > 0 (float64; recurrence + asymptotic series)."""
    x = np.array(x, np.float64, copy=True)
    acc = np.zeros_like(x)
    while np.any(x < 10):
        small = x < 10
        acc = acc - np.where(small, 1.0 / x, 0.0)
        x = np.where(small, x + 1.0, x)
    x2 = 1.0 / (x * x)
    series = x2 * (1 / 12 - x2 * (1 / 120 - x2 * (1 / 252 - x2 * (1 / 240 - x2 / 132))))
    return acc + np.log(x) - 0.5 / x - series


def trigamma(x: np.ndarray | float) -> np.ndarray:
    """The trigamma function psi_1(x) for x > 0 (float64)."""
    x = np.array(x, np.float64, copy=True)
    acc = np.zeros_like(x)
    while np.any(x < 10):
        small = x < 10
        acc = acc + np.where(small, 1.0 / (x * x), 0.0)
        x = np.where(small, x + 1.0, x)
    x2 = 1.0 / (x * x)
    series = (1 + x2 * (1 / 6 - x2 * (1 / 30 - x2 * (1 / 42 - x2 / 30)))) / x + 0.5 * x2
    return acc + series


def _sizes(sample_sizes) -> np.ndarray:
    m = np.asarray(sample_sizes, np.float64).reshape(-1)
    if m.size == 0 or np.any(m < 2):
        raise ValueError("sample sizes must be a non-empty sequence of values >= 2")
    return m


def gaussian_log_cov_moments(
    sample_sizes, dim: int, estimator: str = "unbiased"
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of log det(Sigma_n) - log det(Sigma_0), per generation.

    Args:
      sample_sizes: [G] training-set sizes M_n; dim: d; estimator: "unbiased" or "mle".
    Returns:
      (mean [G], var [G]); -inf / nan where M_n - 1 < d (singular covariance).
    """
    m = _sizes(sample_sizes)
    k = m - 1.0
    denom = k if estimator == "unbiased" else m
    j = np.arange(dim, dtype=np.float64)[None, :]
    dof = (k[:, None] - j) / 2.0
    ok = np.all(dof > 0, axis=1)
    safe = np.where(dof > 0, dof, 1.0)
    step_mean = np.sum(digamma(safe), axis=1) + dim * np.log(2.0 / denom)
    step_var = np.sum(trigamma(safe), axis=1)
    step_mean = np.where(ok, step_mean, -np.inf)
    step_var = np.where(ok, step_var, np.nan)
    return np.cumsum(step_mean), np.cumsum(step_var)


def gaussian_expectations(
    sample_sizes,
    mean0: np.ndarray,
    cov0: np.ndarray,
    estimator: str = "unbiased",
    sampling_bias: float = 1.0,
) -> dict[str, np.ndarray]:
    """Expected chain-mean metrics of recursive Gaussian fitting ("replace" policy).

    With a sampling bias lambda each generation n >= 1 trains on draws from N(mu, lambda
    Sigma_{n-1}) (generation 0 on real data), so every expectation of a covariance picks up
    lambda^n: E[Sigma_n] = lambda^n prod_{j <= n} c_j Sigma_0.

    Args:
      sample_sizes: [G] sizes M_n; mean0: [d]; cov0: [d, d]; estimator: "unbiased" | "mle";
      sampling_bias: lambda (1: unbiased sampling).
    Returns:
      {"trace_cov", "logdet_cov", "mean_dist2"} (and "w2_squared", "var" for d = 1), each [G].
    """
    m = _sizes(sample_sizes)
    cov0 = np.atleast_2d(np.asarray(cov0, np.float64))
    d = cov0.shape[0]
    k = m - 1.0
    denom = k if estimator == "unbiased" else m
    c = k / denom
    lam = float(sampling_bias) ** np.arange(len(m), dtype=np.float64)  # lambda^n
    shrink = np.cumprod(c) * lam  # E[Sigma_n] = Sigma_0 * shrink[n]
    # E[covariance that generation i's data are drawn from] = Sigma_0 * before[i]
    before = np.concatenate([[1.0], shrink[:-1]]) * np.concatenate([[1.0], lam[1:] / lam[:-1]])
    tr0 = float(np.trace(cov0))
    logdet0 = float(np.linalg.slogdet(cov0)[1])
    dlog, _ = gaussian_log_cov_moments(m, d, estimator)
    out = {
        "trace_cov": tr0 * shrink,
        "logdet_cov": logdet0 + dlog + d * np.log(lam),
        "mean_dist2": tr0 * np.cumsum(before / m),
    }
    if d == 1:
        var0 = float(cov0[0, 0])
        # E[sqrt(chi2_k / D)] = sqrt(2 / D) Gamma((k + 1)/2) / Gamma(k/2)
        lg = np.array([math.lgamma((ki + 1) / 2) - math.lgamma(ki / 2) for ki in k])
        e_sd = np.cumprod(np.sqrt(2.0 / denom) * np.exp(lg)) * np.sqrt(lam)
        out["var"] = var0 * shrink
        out["w2_squared"] = out["mean_dist2"] + var0 * shrink - 2.0 * var0 * e_sd + var0
    return out


def _binom_matrix(m_from: int, m_to: int) -> np.ndarray:
    """T[c, c'] = P(Bin(m_to, c / m_from) = c'), shape [m_from + 1, m_to + 1]."""
    c = np.arange(m_from + 1, dtype=np.float64)[:, None]
    x = np.arange(m_to + 1, dtype=np.float64)[None, :]
    p = c / m_from
    lchoose = np.array(
        [
            math.lgamma(m_to + 1) - math.lgamma(i + 1) - math.lgamma(m_to - i + 1)
            for i in range(m_to + 1)
        ]
    )[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = (
            lchoose
            + np.where(x > 0, x * np.log(p), 0.0)
            + np.where(m_to - x > 0, (m_to - x) * np.log1p(-p), 0.0)
        )
    t = np.exp(logp)
    return np.nan_to_num(t, nan=0.0)


def state_count_laws(probs0: np.ndarray, sample_sizes) -> tuple[np.ndarray, np.ndarray]:
    """P(count_i = 0) and P(count_i = M_n) per generation n and state i (Wright-Fisher).

    Each state's count in a replace-policy chain is a two-allele Wright-Fisher chain:
    c_0 ~ Bin(M_0, p0_i), c_n | c_{n-1} ~ Bin(M_n, c_{n-1} / M_{n-1}); its law is propagated
    exactly (cost O(G M^2) per distinct probability).

    Args:
      probs0: [K] original distribution; sample_sizes: [G] integer sizes (<= 5000).
    Returns:
      (lost [G, K], fixed [G, K]) probabilities.
    """
    m = _sizes(sample_sizes).astype(np.int64)
    if m.max() > 5000:
        raise ValueError("state_count_laws: sample sizes above 5000 are too costly")
    p0 = np.asarray(probs0, np.float64)
    uniq, inv = np.unique(p0, return_inverse=True)
    # law[c, u]: probability that a state with original probability uniq[u] has count c.
    c = np.arange(m[0] + 1, dtype=np.float64)[:, None]
    lchoose = np.array(
        [
            math.lgamma(m[0] + 1) - math.lgamma(i + 1) - math.lgamma(m[0] - i + 1)
            for i in range(m[0] + 1)
        ]
    )[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = (
            lchoose
            + np.where(c > 0, c * np.log(uniq[None, :]), 0.0)
            + np.where(m[0] - c > 0, (m[0] - c) * np.log1p(-uniq[None, :]), 0.0)
        )
    law = np.nan_to_num(np.exp(logp), nan=0.0)
    lost = np.empty((m.size, uniq.size))
    fixed = np.empty((m.size, uniq.size))
    lost[0], fixed[0] = law[0], law[-1]
    cache: dict[tuple[int, int], np.ndarray] = {}
    for n in range(1, m.size):
        key = (int(m[n - 1]), int(m[n]))
        if key not in cache:
            cache[key] = _binom_matrix(*key)
        law = cache[key].T @ law
        lost[n], fixed[n] = law[0], law[-1]
    return lost[:, inv], fixed[:, inv]


def discrete_expectations(probs0: np.ndarray, sample_sizes) -> dict[str, np.ndarray]:
    """Expected chain-mean metrics of discrete resampling ("replace" policy), each [G]:
    gini_simpson, support_size, lost_tail_mass, absorbed (fraction of chains in a delta), and
    the per-state absorbed fractions `absorbed_at` [G, K]. The support-based ones need
    M_n <= 5000 and are left out above."""
    m = _sizes(sample_sizes)
    p0 = np.asarray(probs0, np.float64)
    gs0 = 1.0 - float(np.sum(p0**2))
    out: dict[str, np.ndarray] = {"gini_simpson": gs0 * np.cumprod(1.0 - 1.0 / m)}
    if m.max() <= 5000:
        lost, fixed = state_count_laws(p0, m)
        out["support_size"] = np.sum(1.0 - lost, axis=1)
        out["lost_tail_mass"] = lost @ p0
        out["absorbed"] = np.sum(fixed, axis=1)
        out["absorbed_at"] = fixed
    return out

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


# ----------------------------------------------------------------------------------------------
# The other data policies (accumulate, accumulate_subsample, mix with fresh real data).
#
# Every policy builds generation n's training set T_n (size N_n) as a union of parts: the
# synthetic share (n_s points of N(mu_{n-1}, lambda Sigma_{n-1})), a uniform subset of n_p points
# of T_{n-1} without replacement (mix with beta > 0; accumulate: all of it, n_p = N_{n-1}) and
# n_r fresh real points of N(mu_0, Sigma_0). The union's scatter is (Chan et al.)
#   S(T_n) = sum_p S_p + sum_{p<q} (n_p n_q / N_n) (m_p - m_q)(m_p - m_q)^T,
# and given the past, with u_p = m_p - mu_0 and B_{n-1} = E (mu_{n-1} - mu_0)(...)^T:
#   E S_syn = (n_s - 1) lambda Sigma_{n-1},       u_s = (mu_{n-1} - mu_0) + e_s, Var e_s = lambda
#                                                 Sigma_{n-1} / n_s;
#   E S_prev = (n_p - 1) / (N_{n-1} - 1) S_{n-1},  u_p = (mu_{n-1} - mu_0) + e_p, Var e_p = V_p
#                                                 = S_{n-1} (N_{n-1} - n_p) / (N_{n-1} n_p
#                                                 (N_{n-1} - 1)) (a subset's mean, no replacement);
#   E S_real = (n_r - 1) Sigma_0,                  u_r = e_r, Var e_r = Sigma_0 / n_r;
# e_s, e_p, e_r independent with mean 0, so E u_s u_s^T = B + lambda Sigma / n_s,
# E u_p u_p^T = B + V_p, E u_s u_p^T = B, E u_r u_r^T = Sigma_0 / n_r, E u_s u_r^T =
# E u_p u_r^T = 0. Each expectation is linear in (E Sigma_{n-1}, E S_{n-1}, B_{n-1}), all
# multiples of Sigma_0, so the recursion runs on scalars: E S(T_n) = s_n Sigma_0,
# E Sigma_n = s_n / D_n Sigma_0 (D_n = N_n - 1 unbiased, N_n MLE) and
# B_n = sum_{p,q} n_p n_q E u_p u_q^T / N_n^2 (mu_n = sum_p n_p m_p / N_n).
# accumulate_subsample fits a uniform subset of k_n = M_n points of the pool P_n (all data so
# far, size N_n, scatter s_n Sigma_0) and adds M_{n+1} synthetic points of that fit to the pool:
#   E Sigma_n = (k_n - 1) / (N_n - 1) s_n / D(k_n) Sigma_0,  mu_n = m_{P_n} + f, Var f = V(N_n,
#   k_n) as above, so B_n = B^P_n + V; the pool grows as accumulate with that fit's draws.
# The discrete (multinomial) analogue tracks Q_n = E sum_i p_n,i^2 (Gini-Simpson = 1 - Q_n) with
# the same parts: counts X_s ~ Mult(n_s, p_{n-1}), a hypergeometric subset X_p of T_{n-1}'s counts
# and X_r ~ Mult(n_r, p_0); E sum X_s^2 = n_s (1 - Q) + n_s^2 Q, E sum X_p^2 = n_p (1 - Q)
# (N - n_p) / (N - 1) + n_p^2 Q, E sum X_r^2 = n_r (1 - Q_0) + n_r^2 Q_0, E sum X_s X_p =
# n_s n_p Q, and E sum X_s X_r = n_s n_r Q_0 (E p_{n-1} = p_0: every part is unbiased).
# All of these are checked against Monte Carlo in tests/unit/theory/test_policy_closed_forms.py.

POLICIES_WITH_CLOSED_FORMS = ("replace", "accumulate", "accumulate_subsample", "mix")


def _check_counts(counts) -> None:
    if len(counts) < 1 or int(counts[0]) < 2:
        raise ValueError("counts: generation 0 needs >= 2 real points")


def gaussian_policy_moments(
    mode: str, counts, estimator: str = "unbiased", sampling_bias: float = 1.0
) -> dict[str, np.ndarray]:
    """E Sigma_n / Sigma_0 and E (mu_n - mu_0)(mu_n - mu_0)^T / Sigma_0 per generation of a
    Gaussian chain under a data policy (the derivation above; "mix" with FRESH real data).

    Args:
      mode: "replace", "accumulate", "accumulate_subsample" or "mix".
      counts: [G]: counts[0] the number of real points of generation 0, counts[n] (n >= 1) the
        (synthetic, previous, real) counts of generation n (`loop.Schedule.counts`; for the
        accumulate policies the synthetic count M_n added, and accumulate_subsample fits M_n).
      estimator: "unbiased" or "mle"; sampling_bias: lambda, the synthetic draws' variance factor.
    Returns:
      {"cov": [G], "mean": [G]}.
    """
    _check_counts(counts)
    lam = float(sampling_bias)

    def denom(n):
        return n - 1.0 if estimator == "unbiased" else float(n)

    def sub_var(s, big, k):  # Var of a k-subset's mean from a set of `big` points, scatter s
        return 0.0 if k >= big else s * (big - k) / (big * k * (big - 1.0))

    m0 = float(counts[0])
    big, s, b = m0, m0 - 1.0, 1.0 / m0  # N_0, s_0, B_0 (the pool's, for accumulate_subsample)
    a = s / denom(m0)
    v_fit = 0.0  # Var of the last fit's mean around the pool's (accumulate_subsample)
    cov, mean = [a], [b]
    for c in counts[1:]:
        n_s, n_p, n_r = (int(v) for v in c)
        if mode == "accumulate_subsample":
            # generation n-1's fit (a, mean dev. B + V) was from a subset of the pool
            new = big + n_s
            s = s + (n_s - 1.0) * lam * a + (big * n_s / new) * (lam * a / n_s + v_fit)
            b = b + (n_s / new) ** 2 * (v_fit + lam * a / n_s)
            big = new
            a = (n_s - 1.0) / (big - 1.0) * s / denom(n_s)  # a subset of k = n_s points
            v_fit = sub_var(s, big, n_s)
            cov.append(a)
            mean.append(b + v_fit)
            continue
        if mode == "accumulate":
            n_p = int(big)
        elif mode == "replace":
            n_p = n_r = 0
        parts = []  # (n, E scatter, E u u^T, tag)
        if n_s > 0:
            parts.append((n_s, (n_s - 1.0) * lam * a, b + lam * a / n_s, "s"))
        if n_p > 0:
            v_p = sub_var(s, big, n_p)
            parts.append((n_p, (n_p - 1.0) / (big - 1.0) * s, b + v_p, "p"))
        if n_r > 0:
            parts.append((n_r, n_r - 1.0, 1.0 / n_r, "r"))
        new = float(sum(p[0] for p in parts))

        s_new = sum(p[1] for p in parts)
        b_new = sum(p[0] ** 2 * p[2] for p in parts)
        for i, p in enumerate(parts):
            for q in parts[i + 1 :]:
                cross = b if {p[3], q[3]} == {"s", "p"} else 0.0  # E u_p u_q^T, p != q
                s_new += p[0] * q[0] / new * (p[2] + q[2] - 2.0 * cross)
                b_new += 2.0 * p[0] * q[0] * cross
        big, s, b = new, s_new, b_new / new**2
        a = s / denom(new)
        cov.append(a)
        mean.append(b)
    return {"cov": np.asarray(cov), "mean": np.asarray(mean)}


def discrete_policy_gini_simpson(probs0: np.ndarray, mode: str, counts) -> np.ndarray:
    """E Gini-Simpson diversity per generation of a discrete (multinomial) chain under a data
    policy (the derivation above; "mix" with fresh real data). `counts` as in
    `gaussian_policy_moments`. Returns [G]."""
    _check_counts(counts)
    p0 = np.asarray(probs0, np.float64)
    q0 = float(np.sum(p0**2))
    m0 = float(counts[0])
    big = m0
    q = q0 + (1.0 - q0) / m0  # the pool's (accumulate_subsample) or the fit's E sum p^2
    fit_q = [q]
    for c in counts[1:]:
        n_s, n_p, n_r = (float(v) for v in c)
        if mode == "accumulate_subsample":
            qf = fit_q[-1]  # the previous fit's, drawn from; the pool's q grows with its draws
            new = big + n_s
            q = (big**2 * q + 2.0 * big * n_s * q + n_s * (1.0 - qf) + n_s**2 * qf) / new**2
            big = new
            k = n_s
            fit_q.append(q + (1.0 - q) * (big - k) / (k * (big - 1.0)))
            continue
        if mode == "accumulate":
            n_p = big
        elif mode == "replace":
            n_p = n_r = 0.0
        new = n_s + n_p + n_r
        tot = n_s * (1.0 - q) + n_s**2 * q
        if n_p > 0:
            tot += n_p * (1.0 - q) * (big - n_p) / max(big - 1.0, 1.0) + n_p**2 * q
        tot += n_r * (1.0 - q0) + n_r**2 * q0
        tot += 2.0 * (n_s * n_p * q + n_s * n_r * q0 + n_p * n_r * q0)
        big, q = new, tot / new**2
        fit_q.append(q)
    return 1.0 - np.asarray(fit_q)

"""Closed forms of the memorising learner's test error on Zipf data (`theory.tails`), derived here
and checked against Monte Carlo in tests/unit/theory/test_tails.py.

Notation: p the true law on N tokens, q a generator's law, a learner trained on n_r real tokens
and n_s generator tokens (independent draws; the loop's `mix` policy with fresh real data, or
`replace`: n_r = 0). Token i is unseen iff none of the n_r + n_s draws is i, so

    P(i unseen) = (1 - p_i)^{n_r} (1 - q_i)^{n_s},    E[test error] = sum_i p_i P(i unseen)  (1)

(the error is a sum of indicators: its mean needs only these marginals). Its variance needs the
pairs, P(i, j both unseen) = (1 - p_i - p_j)^{n_r} (1 - q_i - q_j)^{n_s} (i != j), so

    Var[error] = sum_{i != j} p_i p_j [P(i,j unseen) - P(i)P(j)] + sum_i p_i^2 P(i)(1 - P(i)).  (2)

Special cases of (1):
- clean data (q = p or n_s = 0): E_clean(T) = sum_i p_i (1 - p_i)^T;
- top-k cut of the truth, q_i = p_i / P_k for i <= k (P_k = sum_{j<=k} p_j), 0 beyond:
  E = sum_{i<=k} p_i (1 - p_i)^{n_r} (1 - p_i/P_k)^{n_s} + sum_{i>k} p_i (1 - p_i)^{n_r}; with no
  real data it falls to the plateau sum_{i>k} p_i as T -> infinity (what the cut removed is
  never learnt), and with n_r = pi T real tokens it falls back onto the clean law's tail part
  once pi T p_i >> 1 for the cut tokens ("grokking": the error leaves the plateau at
  T ~ k^beta / pi and then follows E_clean(pi T) asymptotically).
- a finite-sample generator (the empirical law of T0 true tokens, counts c_i ~ Bin(T0, p_i)):
  E = sum_i p_i (1 - p_i)^{n_r} E[(1 - c_i/T0)^{n_s}], the inner expectation summed over the
  binomial law of c_i; its n_s -> infinity limit (n_r = 0) is E_clean(T0): the learner ends up
  knowing the generator's support, whose missing mass is the T0 sample's.

Asymptotics (N = infinity, p_i = i^-beta / zeta(beta), T -> infinity): with (1 - p)^T ~ e^{-Tp}
and the sum replaced by its integral, substituting t = T x^-beta / zeta(beta),

    E_clean(T) ~ int_0^inf x^-beta/zeta e^{-T x^-beta / zeta} dx
               = Gamma(1 - 1/beta) / (beta zeta(beta)^{1/beta}) T^{-(1 - 1/beta)},          (3)

and the plateau sum_{i>k} p_i ~ int_k^inf x^-beta/zeta dx = k^{-(beta-1)} / ((beta-1) zeta(beta)),
so with a top-k cut E(T) ~ C T^{-(1-1/beta)} + k^{-(beta-1)} / ((beta-1) zeta(beta)).

Iterated fits (`generator: fit`, `replace`, no cut): generation n trains on M_n tokens drawn from
generation n-1's empirical law, so token i's count is a two-allele Wright-Fisher chain,
c_0 ~ Bin(M_0, p_i), c_n | c_{n-1} ~ Bin(M_n, c_{n-1}/M_{n-1}), and the test error of generation n
is sum_i p_i P(c_n = 0). The chain's kernel does not depend on p_i, so the absorption
probabilities h_n(c) = P(c_n = 0 | c_0 = c) are one vector per generation, shared by all N
tokens: h_n = A_1 A_2 ... A_n e_0 with A_m[c, c'] = Bin(M_m, c/M_{m-1})(c'), and
E[error_n] = sum_i p_i sum_c Bin(M_0, p_i)(c) h_n(c) (exact; cost O(n^2 M^2 + N M)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def expected_error(p: np.ndarray, q: np.ndarray | None, n_real: int, n_synth: int) -> float:
    """(1): E[test error] of a learner on n_real tokens of p and n_synth of q (q None: p)."""
    p = np.asarray(p, np.float64)
    q = p if q is None else np.asarray(q, np.float64)
    return float(np.sum(p * np.exp(n_real * np.log1p(-p) + n_synth * _log1m(q))))


def _log1m(q: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log1p(-np.minimum(q, 1.0))


def error_variance(p: np.ndarray, q: np.ndarray | None, n_real: int, n_synth: int) -> float:
    """(2): Var[test error] under the exact multinomial draws (O(N^2): small N only)."""
    p = np.asarray(p, np.float64)
    q = p if q is None else np.asarray(q, np.float64)
    single = np.exp(n_real * np.log1p(-p) + n_synth * _log1m(q))
    pair = np.exp(
        n_real * _log1m(p[:, None] + p[None, :]) + n_synth * _log1m(q[:, None] + q[None, :])
    )
    np.fill_diagonal(pair, single)
    cov = pair - single[:, None] * single[None, :]
    return float(p @ cov @ p)


def independent_variance(p: np.ndarray, q: np.ndarray | None, n_real: int, n_synth: int) -> float:
    """What the variance would be if the tokens' presences were independent (per-token
    Bernoulli draws): sum_i p_i^2 P(i)(1 - P(i)); larger than (2), the pairs being negatively
    correlated. For tests that tell the exact joint law from that approximation."""
    p = np.asarray(p, np.float64)
    q = p if q is None else np.asarray(q, np.float64)
    single = np.exp(n_real * np.log1p(-p) + n_synth * _log1m(q))
    return float(np.sum(p**2 * single * (1 - single)))


def _binom_pmf(n: int, probs: np.ndarray) -> np.ndarray:
    """[len(probs), n + 1] binomial pmfs Bin(n, probs)(c), float64 (log space)."""
    c = np.arange(n + 1, dtype=np.float64)
    lchoose = np.array(
        [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(n + 1)]
    )
    pr = np.asarray(probs, np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = (
            lchoose[None, :]
            + np.where(c > 0, c * np.log(pr), 0.0)
            + np.where(n - c > 0, (n - c) * np.log1p(-pr), 0.0)
        )
    return np.nan_to_num(np.exp(logp), nan=0.0)


def fit_generator_error(p: np.ndarray, fit_size: int, n_real: int, n_synth: int) -> float:
    """E[test error] of a learner on n_real true tokens and n_synth tokens of the empirical law
    of fit_size true tokens (exact: the binomial law of each token's count, chunked)."""
    p = np.asarray(p, np.float64)
    c = np.arange(fit_size + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        inner = np.exp(n_synth * np.log1p(-np.minimum(c / fit_size, 1.0)))  # (1 - c/T0)^n_s
    if n_synth == 0:
        inner = np.ones_like(c)
    total = 0.0
    for start in range(0, p.size, 4096):
        part = p[start : start + 4096]
        total += float(np.sum(part * (1 - part) ** n_real * (_binom_pmf(fit_size, part) @ inner)))
    return total


def _kernel(m_prev: int, m_next: int) -> np.ndarray:
    """A[c, c'] = Bin(m_next, c / m_prev)(c'), [m_prev + 1, m_next + 1]."""
    return _binom_pmf(m_next, np.arange(m_prev + 1) / m_prev)


def iterated_fit_errors(p: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """E[test error] `[G]` of generations 0..G-1 under `generator: fit`, `replace`, no cut, with
    training sizes `sizes` (exact Wright-Fisher absorption; sizes <= 5000)."""
    m = [int(x) for x in sizes]
    if max(m) > 5000:
        raise ValueError("iterated_fit_errors: sample sizes above 5000 are too costly")
    p = np.asarray(p, np.float64)
    kernels = [_kernel(m[n - 1], m[n]) for n in range(1, len(m))]
    absorbed = np.empty((len(m), m[0] + 1))  # [n, c]: P(c_n = 0 | c_0 = c)
    for n in range(len(m)):
        h = np.zeros(m[n] + 1)
        h[0] = 1.0
        for a in reversed(kernels[:n]):
            h = a @ h
        absorbed[n] = h
    out = np.zeros(len(m))
    for start in range(0, p.size, 4096):
        part = p[start : start + 4096]
        out += part @ (_binom_pmf(m[0], part) @ absorbed.T)
    return out


def clean_constant(exponent: float) -> float:
    """C of (3): E_clean(T) ~ C T^{-(1 - 1/beta)} for N = infinity."""
    b = float(exponent)
    return math.gamma(1 - 1 / b) / (b * _zeta(b) ** (1 / b))


def plateau_constant(exponent: float) -> float:
    """D of the plateau sum_{i>k} p_i ~ D k^{-(beta-1)} (N = infinity): 1 / ((beta-1) zeta)."""
    b = float(exponent)
    return 1.0 / ((b - 1) * _zeta(b))


def _zeta(b: float, terms: int = 100_000) -> float:
    """Riemann zeta(b), b > 1: a partial sum plus the Euler-Maclaurin tail (error ~ terms^-b-3)."""
    n = float(terms)
    head = float(np.sum(np.arange(1, terms, dtype=np.float64) ** -b))
    return head + n ** (1 - b) / (b - 1) + 0.5 * n**-b + b * n ** (-b - 1) / 12

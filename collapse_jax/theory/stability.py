"""Stability of iterative retraining on a fixed real set (Bertrand et al., ICLR 2024, "On the
stability of iterative retraining of generative models on their own data"), for the 1-D
Gaussian fitted by maximum likelihood, in closed form.

The setting: a FIXED real set of n points from N(mu_0, sigma^2) (mean x_bar, MLE variance s^2);
generation 0 fits it; generation t + 1 fits the real set together with k = lambda n synthetic
points drawn from generation t's fit (m_t, v_t). lambda is Bertrand et al.'s synthetic-to-real
ratio, here `synthetic_ratio` (not MAD's sampling bias `model.sampling_bias`). In the loop this
is `policy: mix, real_data: fixed`, alpha = lambda / (1 + lambda), gamma = 1 / (1 + lambda),
M_0 = n and M_t = (1 + lambda) n (`collapse_jax/configs/theory/gaussian_stability.yaml`).

Derivation (a = lambda / (1 + lambda) = k / (n + k); y_bar, s_y^2 the synthetic mean and MLE
variance; e_t = m_t - x_bar, the fit's distance from the real set's own mean):
  m_{t+1} = (1 - a) x_bar + a y_bar,  so  e_{t+1} = a (e_t + xi),  xi ~ N(0, v_t / k);
  v_{t+1} = (1 - a) s^2 + a s_y^2 + a (1 - a) (x_bar - y_bar)^2
(the pooled sum of squares about m_{t+1}: n (x_bar - m)^2 + k (y_bar - m)^2 = (nk / (n + k))
(x_bar - y_bar)^2). With E s_y^2 = v_t (k - 1) / k and E (x_bar - y_bar)^2 = e_t^2 + v_t / k the
expectations follow a linear recursion, z_t = (E v_t, E e_t^2):
  z_{t+1} = A z_t + ((1 - a) s^2, 0),   A = [[a (1 - a / k), a (1 - a)], [a^2 / k, a^2]],
from z_0 = (s^2, 0). Averaged over the real set, s^2 -> sigma^2 (n - 1) / n, and since
E[e_t | real set] = 0, E (m_t - mu_0)^2 = E e_t^2 + sigma^2 / n.

Stability. det A = a^3 (1 - 1/k) and the characteristic polynomial at 1 is
(1 - a)(1 - a^2 + a^2 / k) > 0 with trace A < 2, so both eigenvalues lie in (-1, 1) for every
finite lambda: the expected error stays bounded and converges geometrically (rate
`spectral_radius`) to the fixed point (I - A)^{-1} ((1 - a) s^2, 0), whatever n >= 1 and lambda.
In the infinite-sample limit the retraining map is m -> (1 - a) mu + a m (and the same factor a on
v at the fixed point): a contraction with constant a = lambda / (1 + lambda) < 1. Only the fully
synthetic loop (lambda = infinity, a = 1: replace) is unstable: A = [[1 - 1/k, 0], [1/k, 1]] has
eigenvalue 1, E v_t = s^2 (1 - 1/k)^t collapses and E e_t^2 = s^2 (1 - (1 - 1/k)^t) saturates
only because the variance vanishes (the mean's random walk, Shumailov et al.'s collapse).

Against Bertrand et al.'s sufficient condition: their Theorem (recalled, not re-read: stability
when lambda (1 + L eps / alpha) < 1, eps the generative model's approximation error, L and alpha
Lipschitz and strong-concavity constants of the likelihood) asks lambda < 1 for an exact model
(eps = 0). For the Gaussian MLE every finite lambda is stable: the bound is sufficient, not
necessary; the price of a large lambda is a slower contraction and a larger stationary error.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np


def transition(synthetic_ratio: float, n: int) -> tuple[np.ndarray, float]:
    """(A [2, 2], a) of the recursion of (E v_t, E e_t^2) for ratio lambda and n real points;
    lambda = inf is the fully synthetic loop with k = n synthetic points (replace)."""
    if np.isinf(synthetic_ratio):
        a, k = 1.0, float(n)
    else:
        a, k = synthetic_ratio / (1.0 + synthetic_ratio), synthetic_ratio * n
    return np.array([[a * (1 - a / k), a * (1 - a)], [a * a / k, a * a]]), a


def spectral_radius(synthetic_ratio: float, n: int) -> float:
    """The geometric rate at which the expected errors reach their fixed point (< 1: stable)."""
    a_mat, _ = transition(synthetic_ratio, n)
    return float(np.max(np.abs(np.linalg.eigvals(a_mat))))


def expected_errors(
    synthetic_ratio: float, n: int, generations: int, sigma2: float = 1.0
) -> dict[str, np.ndarray]:
    """Chain means over generations 0..generations-1, averaged over the real set:
    `var` E v_t (the fitted MLE variance) and `mean_dist2` E (m_t - mu_0)^2."""
    a_mat, a = transition(synthetic_ratio, n)
    s2 = sigma2 * (n - 1) / n
    z = np.array([s2, 0.0])
    drive = np.array([(1 - a) * s2, 0.0])
    out = np.empty((generations, 2))
    for t in range(generations):
        out[t] = z
        z = a_mat @ z + drive
    return {"var": out[:, 0], "mean_dist2": out[:, 1] + sigma2 / n}


def fixed_point(synthetic_ratio: float, n: int, sigma2: float = 1.0) -> dict[str, float]:
    """The limits of `expected_errors` (finite lambda)."""
    a_mat, a = transition(synthetic_ratio, n)
    s2 = sigma2 * (n - 1) / n
    z = np.linalg.solve(np.eye(2) - a_mat, np.array([(1 - a) * s2, 0.0]))
    return {"var": float(z[0]), "mean_dist2": float(z[1] + sigma2 / n)}


def simulate(
    key, synthetic_ratio: float, n: int, generations: int, chains: int
) -> dict[str, np.ndarray]:
    """Monte Carlo of the same loop from sufficient statistics, exact in distribution (real
    mean N(0, 1 / n) and n s^2 ~ chi^2_{n-1}; synthetic mean N(m, v / k), k s_y^2 ~ v
    chi^2_{k-1}), chains vmapped: [generations, chains] arrays `var` and `mean_dist2`
    (mu_0 = 0, sigma = 1). One compiled program serves every (lambda, n)."""
    if np.isinf(synthetic_ratio):
        a, k = 1.0, float(n)
    else:
        a, k = synthetic_ratio / (1.0 + synthetic_ratio), float(round(synthetic_ratio * n))
    vs, d2 = _simulate(key, jnp.float32(a), jnp.float32(k), jnp.float32(n), generations, chains)
    return {"var": np.asarray(vs, np.float64).T, "mean_dist2": np.asarray(d2, np.float64).T}


@functools.partial(jax.jit, static_argnums=(4, 5))
def _simulate(key, a, k, n, generations: int, chains: int):
    def chain(key):
        k_real, k_var, k_gen = jax.random.split(key, 3)
        xbar = jax.random.normal(k_real, (), jnp.float32) / jnp.sqrt(n)
        s2 = 2.0 * jax.random.gamma(k_var, (n - 1) / 2.0, (), jnp.float32) / n

        def step(carry, kk):
            m, v = carry
            k1, k2 = jax.random.split(kk)
            ybar = m + jnp.sqrt(v / k) * jax.random.normal(k1, (), jnp.float32)
            sy2 = v * 2.0 * jax.random.gamma(k2, (k - 1) / 2.0, (), jnp.float32) / k
            m_new = (1 - a) * xbar + a * ybar
            v_new = (1 - a) * s2 + a * sy2 + a * (1 - a) * jnp.square(xbar - ybar)
            return (m_new, v_new), (m, v)

        _, (ms, vs) = jax.lax.scan(step, (xbar, s2), jax.random.split(k_gen, generations))
        return vs, jnp.square(ms)

    return jax.vmap(chain)(jax.random.split(key, chains))


def stability_figure(
    path,
    *,
    n: int = 20,
    generations: int = 100,
    ratios=(0.2, 1.0, 5.0, 100.0, np.inf),
    grid_ratios=(0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 100.0, np.inf),
    grid_sizes=(10, 20, 50, 100),
    chains: int = 10_000,
    seed: int = 0,
) -> dict:
    """Left: E (m_t - mu_0)^2 and E v_t over generations for several ratios lambda (n real
    points; Monte Carlo means +- 2 s.e. over `chains` chains, closed form as lines). Right: the
    variance lost after `generations` fits, 1 - E v / sigma^2, over (lambda, n): Monte Carlo
    chain means, the closed form printed in each cell, and Bertrand et al.'s sufficient
    condition for an exact model, lambda < 1. Returns the numbers drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = jax.random.key(seed)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    t = np.arange(generations)
    numbers: dict = {}
    for i, lam in enumerate(ratios):
        mc = simulate(jax.random.fold_in(key, i), lam, n, generations, chains)
        want = expected_errors(lam, n, generations)
        name = "inf (replace)" if np.isinf(lam) else f"{lam:g}"
        for metric, style in (("mean_dist2", "-"), ("var", "--")):
            mean = mc[metric].mean(1)
            se = mc[metric].std(1, ddof=1) / np.sqrt(chains)
            label = f"lambda = {name}" if metric == "mean_dist2" else None
            (h,) = ax.plot(t, want[metric], style, lw=1.2, label=label,
                           color=f"C{i}")  # fmt: skip
            every = slice(0, None, 9)
            ax.errorbar(t[every], mean[every], 2 * se[every], fmt="o", ms=2.5, color=h.get_color())
            numbers[f"{metric}_lambda_{name}"] = [float(mean[-1]), float(want[metric][-1])]
    ax.set_yscale("log")
    ax.set_xlabel("generation t (fits; 0 = the real set alone)")
    ax.set_ylabel("solid: E (m_t - mu_0)^2,  dashed: E v_t  (sigma^2 = 1)")
    ax.set_title(f"Fixed real set of n = {n}, lambda n synthetic points per generation\n"
                 f"lines: closed form; dots: Monte Carlo, {chains} chains, +-2 s.e.",
                 fontsize=10)  # fmt: skip
    ax.legend(fontsize=8, loc="lower left")
    heat = np.empty((len(grid_sizes), len(grid_ratios)))
    exact = np.empty_like(heat)
    for r, nn in enumerate(grid_sizes):
        for c, lam in enumerate(grid_ratios):
            k = jax.random.fold_in(key, 1000 + 100 * r + c)
            mc = simulate(k, lam, nn, generations, chains // 4)
            heat[r, c] = 1 - mc["var"][-1].mean()
            exact[r, c] = 1 - expected_errors(lam, nn, generations)["var"][-1]
    numbers["heat_variance_lost"], numbers["heat_closed_form"] = heat.tolist(), exact.tolist()
    im = bx.imshow(np.log10(np.maximum(heat, 1e-3)), origin="lower", cmap="viridis",
                   aspect="auto", vmin=-3, vmax=0)  # fmt: skip
    for r in range(len(grid_sizes)):
        for c in range(len(grid_ratios)):
            dark = np.log10(max(heat[r, c], 1e-3)) < -1.5
            bx.text(c, r, f"{heat[r, c]:.3f}\n({exact[r, c]:.3f})", ha="center", va="center",
                    fontsize=7, color="white" if dark else "black")  # fmt: skip
    edge = list(grid_ratios).index(1.0)
    bx.axvline(edge - 0.5, color="red", lw=2)
    bx.set_xticks(range(len(grid_ratios)), [f"{x:g}" for x in grid_ratios])
    bx.set_yticks(range(len(grid_sizes)), [str(x) for x in grid_sizes])
    bx.set_xlabel(
        "synthetic-to-real ratio lambda (synthetic points per real point)\nred line: "
        "Bertrand et al.'s sufficient bound for an exact model, lambda < 1 on its left"
    )
    bx.set_ylabel("real set size n")
    bx.set_title(f"Variance lost after {generations} fits, 1 - E v / sigma^2: Monte Carlo "
                 f"({chains // 4} chains)\n(closed form); stable for every finite lambda, "
                 "collapse only at inf", fontsize=10)  # fmt: skip
    fig.colorbar(im, ax=bx, label="log10 of the variance lost")
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return numbers


if __name__ == "__main__":
    import sys

    for key_, value in stability_figure(sys.argv[1]).items():
        print(key_, np.round(np.asarray(value), 4).tolist())

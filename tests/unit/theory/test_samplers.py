"""The exact samplers against SciPy's distributions (fixed keys; chi-square / KS tests).

Each goodness-of-fit test rejects at p < 1e-4, so a correct sampler fails one of them with
probability 1e-4 per assertion (about 2e-3 for the whole file); the keys are fixed, so a run is
deterministic.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from collapse_jax.theory import samplers

P_MIN = 1e-4


def _chi2_discrete(x: np.ndarray, pmf: np.ndarray) -> float:
    """p-value of a chi-square goodness-of-fit test; cells with expected count < 5 are pooled."""
    n = x.size
    obs = np.bincount(x, minlength=pmf.size)[: pmf.size].astype(np.float64)
    assert obs.sum() == n, "draws outside the support"
    exp = pmf * n
    order = np.argsort(exp)
    o, e = [], []
    acc_o = acc_e = 0.0
    for i in order:  # pool the smallest cells until each pooled cell expects >= 5
        acc_o += obs[i]
        acc_e += exp[i]
        if acc_e >= 5:
            o.append(acc_o)
            e.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e > 0:
        o[-1] += acc_o
        e[-1] += acc_e
    o, e = np.array(o), np.array(e)
    e *= o.sum() / e.sum()
    return float(scipy.stats.chisquare(o, e).pvalue)


def test_binomial_edge_cases():
    n = jnp.array([0, 5, 5, 100, 100, 2**23], jnp.int32)
    p = jnp.array([0.4, 0.0, 1.0, 0.0, 1.0, 1.0], jnp.float32)
    x = np.asarray(jax.jit(samplers.binomial)(jax.random.key(3), n, p))
    np.testing.assert_array_equal(x, [0, 0, 5, 0, 100, 2**23])


def test_binomial_matches_scipy_in_every_regime():
    """One call whose lanes mix every regime (inversion, BTRS, the p > 1/2 flip, n q at the
    cut-over 10 on both sides, n up to 2^24 - 1, tiny p, n = 0, p = 0 and p = 1): each group's
    draws match SciPy. 20,000 lanes per group, so the inversion lanes fill many blocks and the
    BTRS lanes rejected in their first two rounds (~2%) several blocks of the retry loop."""
    cases = [
        (7, 0.3),  # inversion
        (40, 0.2),  # inversion, n p = 8
        (50, 0.7),  # BTRS after the p > 1/2 flip (n q = 15)
        (1000, 0.5),  # BTRS
        (1_000_000, 0.01),  # BTRS at large n: needs the accurate acceptance test
        (3_000_000, 2e-6),  # inversion at large n, tiny p
        (9, 0.5),  # inversion, flip boundary
        (21, 0.47),  # inversion, n q = 9.87 just below the cut-over
        (20, 0.5),  # BTRS at n q = 10 exactly
        (40, 0.75),  # BTRS after the flip
        (2**24 - 1, 0.3),  # BTRS at the largest n
        (2**24 - 1, 1e-7),  # inversion, n q = 1.7, tiny p
    ]
    per = 20000
    n = np.concatenate([np.full(per, c[0]) for c in cases] + [np.array([0, 0, 7, 7, 2**24 - 1])])
    p = np.concatenate([np.full(per, c[1]) for c in cases] + [np.array([0.3, 1.0, 0.0, 1.0, 1.0])])
    x = np.asarray(
        jax.jit(samplers.binomial)(
            jax.random.key(5), jnp.asarray(n, jnp.int32), jnp.asarray(p, jnp.float32)
        )
    )
    np.testing.assert_array_equal(x[-5:], [0, 0, 0, 7, 2**24 - 1])
    for i, (ni, pi) in enumerate(cases):
        xi = x[i * per : (i + 1) * per]
        p32 = float(np.float32(pi))
        lo = int(scipy.stats.binom.ppf(1e-9, ni, p32))
        hi = int(scipy.stats.binom.isf(1e-9, ni, p32))
        assert xi.min() >= lo and xi.max() <= hi, (ni, pi)
        pmf = scipy.stats.binom.pmf(np.arange(lo, hi + 1), ni, p32)
        assert _chi2_discrete(xi - lo, pmf / pmf.sum()) > P_MIN, (ni, pi)


def test_multinomial_chain_does_not_depend_on_its_batch():
    """Vmapped over chains, each state's binomials are drawn for all chains at once, grouped by
    regime (a custom vmap rule): a chain's counts must still be the same whichever chains share
    its batch, and equal the unbatched call's."""
    probs = jnp.asarray([0.5, 0.2, 0.0, 0.25, 0.05], jnp.float32)
    keys = jax.random.split(jax.random.key(12), 600)
    ns = jnp.asarray(np.random.default_rng(0).integers(0, 3000, 600), jnp.int32)
    draw = jax.vmap(samplers.multinomial, in_axes=(0, 0, None))
    pick = np.array([3, 599, 17, 250])

    @jax.jit  # one compile for the three batchings
    def all_batchings(keys, ns):
        one = samplers.multinomial(keys[42], ns[42], probs)
        return draw(keys, ns, probs), draw(keys[pick], ns[pick], probs), one

    big, few, one = map(np.asarray, all_batchings(keys, ns))
    assert np.all(big[:, 2] == 0)
    np.testing.assert_array_equal(big.sum(1), ns)
    np.testing.assert_array_equal(few, big[pick])
    np.testing.assert_array_equal(one, big[42])


def test_binomial_grouping_never_changes_a_draw():
    """How the lanes are grouped is tuning only: the CPU's compacted blocks, other blocks and
    full-width rounds, and the masked full-width loops that other platforms run
    (`compact=False`) give the same draws bit for bit; so does a nested vmap (the whole-batch
    rule re-entered at every level) against the flat batch."""
    rng = np.random.default_rng(1)
    n = jnp.asarray(rng.integers(0, 3000, 5000), jnp.int32)
    p = jnp.asarray(rng.random(5000) ** 2, jnp.float32)
    key = jax.random.key(4)
    ref = np.asarray(jax.jit(samplers.binomial)(key, n, p))
    variants = [
        dict(compact=False),
        dict(compact=True, full_rounds=0, inversion_block=64, retry_block=7),
        dict(full_rounds=5, inversion_block=4096, retry_block=512),
    ]
    for kw in variants:
        got = jax.jit(lambda k, n, p, kw=kw: samplers.binomial(k, n, p, **kw))(key, n, p)
        np.testing.assert_array_equal(np.asarray(got), ref, err_msg=str(kw))
    probs = jnp.asarray([0.4, 0.3, 0.2, 0.1], jnp.float32)
    keys = jax.random.split(key, 60)
    ns = n[:60]
    flat = jax.vmap(samplers.multinomial, (0, 0, None))
    nested = jax.vmap(flat, (0, 0, None))
    a = jax.jit(flat)(keys, ns, probs)
    b = jax.jit(nested)(keys.reshape(6, 10), ns.reshape(6, 10), probs)
    np.testing.assert_array_equal(np.asarray(b).reshape(60, 4), np.asarray(a))


def test_gamma_and_chi_square_match_scipy():
    alphas = np.array([0.3, 1.0, 4.5, 49.5, 5000.0], np.float32)
    a = np.repeat(alphas, 20000)
    g = np.asarray(jax.jit(samplers.standard_gamma)(jax.random.key(7), jnp.asarray(a)))
    assert np.all(g > 0)
    for alpha in alphas:
        sel = g[a == alpha]
        assert scipy.stats.kstest(sel, scipy.stats.gamma(float(alpha)).cdf).pvalue > P_MIN
    x = np.asarray(samplers.chi_square(jax.random.key(8), jnp.full((20000,), 3.0)))
    assert scipy.stats.kstest(x, scipy.stats.chi2(3).cdf).pvalue > P_MIN


def test_multinomial_counts_and_marginals():
    probs = np.array([0.55, 0.0, 0.3, 1e-3, 0.149], np.float32)
    n = 500
    keys = jax.random.split(jax.random.key(11), 20000)
    c = np.asarray(jax.jit(jax.vmap(lambda k: samplers.multinomial(k, jnp.int32(n), probs)))(keys))
    assert c.shape == (20000, 5) and c.dtype == np.int32
    np.testing.assert_array_equal(c.sum(1), n)
    assert np.all(c[:, 1] == 0)  # zero-probability states never get counts
    p = probs.astype(np.float64) / probs.sum()
    for i in (0, 3, 4):  # each marginal is Binomial(n, p_i)
        lo, hi = (
            int(scipy.stats.binom.ppf(1e-9, n, p[i])),
            int(scipy.stats.binom.isf(1e-9, n, p[i])),
        )
        pmf = scipy.stats.binom.pmf(np.arange(lo, hi + 1), n, p[i])
        assert _chi2_discrete(c[:, i] - lo, pmf / pmf.sum()) > P_MIN
    # the covariance of two counts is -n p_i p_j: check it within 5 standard errors
    prod = (c[:, 0] - n * p[0]) * (c[:, 2] - n * p[2])
    assert abs(prod.mean() + n * p[0] * p[2]) < 5 * prod.std(ddof=1) / np.sqrt(prod.size)


_bartlett = jax.jit(
    jax.vmap(samplers.wishart_bartlett_factor, in_axes=(0, None, None)), static_argnums=2
)


@pytest.mark.parametrize("df,dim", [(9, 1), (12, 3), (2, 3)])
def test_wishart_bartlett(df, dim):
    """A A^T ~ Wishart(df, I): E = df I, diagonal entries chi2(df), rank min(df, dim)."""
    keys = jax.random.split(jax.random.key(df * 10 + dim), 20000)
    a = np.asarray(_bartlett(keys, jnp.float32(df), dim))
    w = np.einsum("rij,rkj->rik", a.astype(np.float64), a.astype(np.float64))
    mean = w.mean(0)
    se = w.std(0, ddof=1) / np.sqrt(w.shape[0])
    assert np.all(np.abs(mean - df * np.eye(dim)) <= 5 * se + 1e-9)
    for i in range(dim):  # W_ii ~ chi2(df) whatever the rank
        assert scipy.stats.kstest(w[:, i, i], scipy.stats.chi2(df).cdf).pvalue > P_MIN
    assert np.all(np.linalg.matrix_rank(w[:100], tol=1e-6) == min(df, dim))

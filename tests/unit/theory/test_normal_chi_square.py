"""`samplers.normal_and_chi_square` (the exact 1-D Gaussian generation's draws) against SciPy,
with and without its up-front Marsaglia-Tsang candidates.

KS tests reject at p < 1e-4, Pearson's |r| beyond 4.4 standard errors (p ~ 1e-5): a correct
sampler fails one of the 15 assertions with probability < 2e-3; the keys are fixed.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from collapse_jax.theory import samplers

P_MIN = 1e-4
DFS = (1.0, 2.0, 7.0, 999.0)  # chi2(1) = x^2; shapes 1 (most rejections), 3.5, 499.5


@pytest.mark.parametrize("candidates", [1, 0])  # 0: every lane goes through the fallback
def test_normal_and_chi_square_match_scipy(candidates):
    n = 20000
    df = np.repeat(np.asarray(DFS, np.float32), n)
    keys = jax.random.split(jax.random.key(candidates), df.size)
    draw = jax.jit(
        jax.vmap(functools.partial(samplers.normal_and_chi_square, candidates=candidates))
    )
    z, chi = (np.asarray(v, np.float64) for v in draw(keys, jnp.asarray(df)))
    assert np.all(np.isfinite(z)) and np.all(chi >= 0) and np.all(np.isfinite(chi))
    for d in DFS:
        sel = df == d
        assert scipy.stats.kstest(chi[sel], scipy.stats.chi2(d).cdf).pvalue > P_MIN
        # independence of the normal and the chi-square (Cochran: mean and scatter)
        r = np.corrcoef(z[sel], chi[sel])[0, 1]
        assert abs(r) < 4.4 / np.sqrt(n)
    assert scipy.stats.kstest(z, scipy.stats.norm.cdf).pvalue > P_MIN


def test_box_muller_pair_matches_scipy():
    """`normal_pair_of_bits`: both outputs standard normal (KS), uncorrelated, also in their
    squares (independence, not just zero correlation), and the angle uniform (chi-square over 64
    bins). Same thresholds as above: a correct sampler fails one of the 6 assertions with
    probability < 1e-3."""
    n = 400_000
    w = jax.random.bits(jax.random.key(7), (2, n), jnp.uint32)
    x, y = (np.asarray(v, np.float64) for v in jax.jit(samplers.normal_pair_of_bits)(w[0], w[1]))
    for v in (x, y):
        assert scipy.stats.kstest(v, scipy.stats.norm.cdf).pvalue > P_MIN
    assert abs(np.corrcoef(x, y)[0, 1]) < 4.4 / np.sqrt(n)
    assert abs(np.corrcoef(x * x, y * y)[0, 1]) < 4.4 / np.sqrt(n)
    counts = np.histogram(np.arctan2(y, x), bins=64, range=(-np.pi, np.pi))[0]
    assert scipy.stats.chisquare(counts).pvalue > P_MIN
    assert np.isfinite(x).all() and np.abs(x).max() < 7.0  # radius <= sqrt(2 log 2^33) = 6.8


@pytest.mark.parametrize("candidates, df", [(0, 2.0), (1, 30.0)])
def test_chi_square_fallback_does_not_depend_on_the_batch(candidates, df):
    """A lane's draw is the same alone, in a small batch (masked loop), in a large flat batch
    and in a nested (generations x chains) vmap (`_mt_finish` compacting rejected rows, after
    full rounds while many are pending): the rejected lanes' further candidates come from their
    own seeds. candidates=0 sends every lane through the fallback (df = 2: ~5 % rejected per
    round, so full rounds, then compaction); candidates=1 at df = 30 leaves ~100 rejected lanes
    (compaction alone, several passes of `rows` rows). On CPU the compaction runs; the masked
    loop that other platforms run gives the same bits."""
    key, gens, chains = jax.random.key(3), 6, 3000  # 18,000 lanes > row * rows

    def one(g, c, df, compact=None):  # df traced, as in the loop (a constant folds differently)
        k = jax.random.fold_in(key, c)
        draw = functools.partial(samplers.normal_and_chi_square, candidates=candidates)
        return draw(k, df, g, packed=True, compact=compact)

    g_idx, c_idx = jnp.arange(gens, dtype=jnp.uint32), jnp.arange(chains, dtype=jnp.uint32)
    df = jnp.float32(df)
    nested = jax.jit(jax.vmap(jax.vmap(one, (None, 0, None)), (0, None, None)))(g_idx, c_idx, df)
    flat = jax.jit(jax.vmap(one, (0, 0, None)))(
        jnp.repeat(g_idx, chains), jnp.tile(c_idx, gens), df
    )
    np.testing.assert_array_equal(np.asarray(flat).reshape(gens, chains), np.asarray(nested))
    small = jax.jit(jax.vmap(one, (0, 0, None)))(g_idx[:5], c_idx[:5], df)  # masked loop
    np.testing.assert_array_equal(np.asarray(small), np.asarray(nested)[:5, :5].diagonal())
    alone = jax.jit(one)(g_idx[2], c_idx[7], df)
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(nested)[2, 7])
    assert np.all(np.imag(np.asarray(nested)) >= 0)  # nothing left pending
    plain = jax.jit(jax.vmap(functools.partial(one, compact=False), (0, 0, None)))
    masked = plain(jnp.repeat(g_idx, chains), jnp.tile(c_idx, gens), df)
    np.testing.assert_array_equal(np.asarray(masked), np.asarray(flat))

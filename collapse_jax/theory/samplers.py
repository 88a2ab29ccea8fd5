"""Exact, vectorised samplers for the theory models: gamma, chi-square, binomial, multinomial,
Wishart (Bartlett).

`jax.random.gamma/binomial/multinomial` draw one key per element and loop per element (or per
state, for the multinomial), which is slow under `vmap` (NOTES.md). The samplers here draw whole
arrays of uniforms/normals per round from one key and run a *masked* rejection loop: every round
is one vectorised pass, accepted lanes keep their value, and the loop stops when every lane has
accepted (a few rounds: acceptance rates are >= 0.85 per round). The results are exact in
distribution up to float32 rounding of the uniforms (resolution 2^-24).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from collapse_jax.jaxtools import lanes, prng

_F = jnp.float32
_U = jnp.uint32


def _uniform_open(key: Array, shape: tuple[int, ...]) -> Array:
    """Uniform on the open interval (0, 1): never 0, so logs are finite."""
    return jax.random.uniform(key, shape, _F, minval=jnp.finfo(_F).tiny, maxval=1.0)


def _masked_rejection(
    key_of_round,
    shape: tuple[int, ...],
    propose,
    pre: Array,
    done0: Array | None = None,
):
    """Rejection sampling with `propose(uniforms [2, *shape]) -> (value, accept)`.

    The first rounds use the pre-drawn uniforms `pre [rounds, 2, *shape]`, vectorised over
    rounds (random draws inside a vmapped while loop are not fused with their consumers on
    CPU, and pre-drawing lets callers draw everything in one call); a lane keeps its first
    accepted value. The few lanes
    still rejected continue in a masked while loop whose round r draws from `key_of_round(r)`
    (evaluated only inside the loop).
    """
    # Rounds unrolled, the first accepted value kept by a chain of selects (a vmap over rounds
    # with argmax + take_along_axis is a gather, which XLA:CPU does not vectorise).
    value = jnp.zeros(shape, _F)
    done = jnp.zeros(shape, bool)
    for r in reversed(range(pre.shape[0])):
        v, ok = propose(pre[r])
        value = jnp.where(ok, v, value)
        done = done | ok
    if done0 is not None:
        done = done | done0

    def cond(c):
        return ~jnp.all(c[2])

    def body(c):
        i, value, done = c
        size = math.prod(shape)
        u = _unit_open(prng.random_words(key_of_round(i), 2 * size)).reshape(2, *shape)
        v, ok = propose(u)
        take = ok & ~done
        return i + 1, jnp.where(take, v, value), done | ok

    _, value, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), value, done))
    return value


def _unit_open(bits: Array) -> Array:
    """uint32 bits -> uniform on the open interval (0, 1): the midpoints of the 2^23-cell grid
    (23 random bits, as `jax.random.uniform`), so never 0 or 1 and logs are finite."""
    return ((bits >> 9).astype(_F) + 0.5) * _F(2.0**-23)


def normal_of_bits(bits: Array) -> Array:
    """uint32 bits -> standard normal by inversion, as `jax.random.normal` does it
    (sqrt(2) erfinv(2U - 1)); erf_inv is a short polynomial, far cheaper than `ndtri`."""
    return _F(np.sqrt(2.0)) * jax.lax.erf_inv(2.0 * _unit_open(bits) - 1.0)


_SIGN = np.uint32(0x80000000)
# Minimax coefficients of sin and cos on [-pi/4, pi/4] (Cephes `sinf` / `cosf`; relative error
# ~1e-7, float32's rounding).
_SIN = (-1.6666654611e-1, 8.3321608736e-3, -1.9515295891e-4)
_COS = (4.166664568298827e-2, -1.388731625493765e-3, 2.443315711809948e-5)


def normal_pair_of_bits(a: Array, b: Array) -> tuple[Array, Array]:
    """Two independent standard normals from two uint32 words, by Box-Muller: radius
    sqrt(-2 log U) from all 32 bits of `a` (U = (a + 1/2) 2^-32, so the radius, and every
    normal, is capped at sqrt(66 log 2) = 6.76: a truncation of 1.3e-11 of the normal's mass;
    below it the tail mass is the normal's to 2^-32, tests/unit/theory/test_normal_chi_square.py),
    angle from `b`: 23 bits give phi uniform on (-pi/4, pi/4), whose sin and cos
    are short polynomials (XLA's sin/cos reduce arbitrary arguments, a longer computation
    than the whole inversion); bit 0 swaps the pair and bits 1, 2 flip their signs, which maps
    phi to an angle uniform on the whole circle. Bits 3-8 of `b` are unused (callers may take
    them as further random bits). Cheaper per normal than `normal_of_bits` (one log per two
    normals and no erf_inv polynomials): benchmarks/results/xla_tricks-cpu.json, row
    box_muller."""
    u = (a.astype(_F) + 0.5) * _F(2.0**-32)  # in (0, 1]: log(u) <= 0
    r = jnp.sqrt(-2.0 * jnp.log(u))
    phi = (_unit_open(b) - 0.5) * _F(np.pi / 2)
    p2 = phi * phi
    s = phi + phi * p2 * (_SIN[0] + p2 * (_SIN[1] + p2 * _SIN[2]))
    c = 1.0 - 0.5 * p2 + p2 * p2 * (_COS[0] + p2 * (_COS[1] + p2 * _COS[2]))
    swap = (b & jnp.uint32(1)) != 0
    x, y = jnp.where(swap, s, c) * r, jnp.where(swap, c, s) * r

    def flip(v, bit):  # sign flip by bit `bit` of b (an xor: no multiply, no select)
        sign = (b << jnp.uint32(31 - bit)) & _SIGN
        return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(v, jnp.uint32) ^ sign, _F)

    return flip(x, 1), flip(y, 2)


def _mt_propose(d: Array, c: Array, x: Array, u: Array) -> tuple[Array, Array]:
    """One Marsaglia-Tsang proposal for Gamma(d + 1/3): (value, accepted) from a normal x and a
    uniform u."""
    # V = (1 + y)^3, y = c x; d (1 - V + log V) = d (3 (log1p(y) - y) - 3 y^2 - y^3)
    # avoids the cancellation of d - d V + d log V at large d.
    y = c * x
    pos = y > -1.0
    ys = jnp.where(pos, y, 0.0)
    ok = pos & (jnp.log(u) < 0.5 * x * x + d * (3.0 * (jnp.log1p(ys) - ys) - ys * ys * (3.0 + ys)))
    v = 1.0 + ys
    return d * (v * v * v), ok


def standard_gamma(key: Array, alpha: Array) -> Array:
    """Gamma(alpha, 1) draws of the shape of `alpha` (alpha > 0), exact.

    Marsaglia & Tsang (2000) for shape a >= 1; shapes < 1 use Gamma(a) = Gamma(a + 1) U^(1/a),
    computed in log space. Random words come from `prng.word_source(key)` (a fused hash: no key
    splits; erf_inv normals instead of `ndtri`); see `_gamma_loop` for the rejection rounds.
    """
    alpha = jnp.asarray(alpha, _F)
    g, (w_boost,) = _gamma_loop(prng.word_source(key), alpha, extra=1)
    return _boosted(g, alpha, w_boost)


def _boosted(g: Array, alpha: Array, w_boost: Array) -> Array:
    """Gamma(alpha) from g ~ Gamma(alpha + 1) where alpha < 1 (g U^(1/alpha), in log space)."""
    boost = alpha < 1.0
    log_u = jnp.log(_unit_open(w_boost))
    return jnp.where(boost, jnp.exp(jnp.log(g) + log_u / jnp.where(boost, alpha, 1.0)), g)


def _gamma_loop(source, alpha: Array, extra: int) -> tuple[Array, tuple[Array, ...]]:
    """Marsaglia-Tsang Gamma(max(alpha, alpha + 1 if alpha < 1)) by a masked loop: round i
    draws its normal and uniform, plus in round 0 `extra` further words per lane that the
    caller needs (returned), from stream i of `source`; a lane keeps its first accepted value.

    Everything random happens INSIDE the loop on purpose: XLA materialises a loop's outputs
    once, whereas a hash computed before the loop was duplicated into every fusion that
    consumed its words (the carry, the stacked outputs, the loop's inputs), several times the
    work per generation in the scanned chains. Later rounds only run while some lane was rejected
    (4.8 % per round at a = 1, 5e-5 at a = 500).
    """
    shape = alpha.shape
    a = jnp.where(alpha < 1.0, alpha + 1.0, alpha)
    d = a - 1.0 / 3.0
    c = 1.0 / jnp.sqrt(9.0 * d)

    def cond(carry):
        return ~jnp.all(carry[2])

    def body(carry):
        i, value, done, kept = carry
        w = _lane_words(source, 2 + extra, shape, i)
        v, ok = _mt_propose(d, c, normal_of_bits(w[0]), _unit_open(w[1]))
        kept = tuple(jnp.where(i == 0, w[2 + k], kept[k]) for k in range(extra))
        return i + 1, jnp.where(done, value, v), done | ok, kept

    init = (
        jnp.int32(0),
        jnp.zeros(shape, _F),
        jnp.zeros(shape, bool),
        tuple(jnp.zeros(shape, jnp.uint32) for _ in range(extra)),
    )
    _, g, _, kept = jax.lax.while_loop(cond, body, init)
    return g, kept


def _lane_words(source, num: int, shape: tuple[int, ...], stream: Any = 0) -> Sequence[Array]:
    """`num` words per lane of `shape` from a `prng.word_source`: a tuple of `num` scalars for
    a scalar lane (the hot path: never stacked), else an array `[num, *shape]`."""
    if not shape:
        return source(num, stream)
    return jnp.asarray(source(num * math.prod(shape), stream)).reshape(num, *shape)


def chi_square(key: Array, df: Array) -> Array:
    """Chi-square draws with `df` > 0 degrees of freedom (array), as 2 * Gamma(df / 2)."""
    return 2.0 * standard_gamma(key, 0.5 * jnp.asarray(df, _F))


# Key word of the fallback rounds' hashes (any constant: the other word is the lane's seed).
_FALLBACK_KEY = np.uint32(0x5EED5EED)


def normal_and_chi_square(
    key: Array,
    df: Array,
    stream: Array | int = 0,
    packed: bool = False,
    *,
    candidates: int = 1,
    row: int = 64,
    rows: int = 32,
    compact: bool | None = None,
) -> tuple[Array, Array] | Array:
    """One standard normal and one chi-square(df) draw (scalars), independent, all from the
    words of `key`'s stream `stream` (`prng.word_source`: no key derivation at all; the
    generational loop passes a chain's key and a per-generation stream). `df` must be an
    integer >= 1 (real values >= 2 are fine too); df = 1 is the square of a normal.

    Built to run vectorised over many lanes (`jax.vmap`) at two hashes per lane: 4 words give a
    Box-Muller pair (`normal_pair_of_bits`: the normal z and the normal of a Marsaglia-Tsang
    candidate for Gamma(df / 2); df = 1: that normal squared), the candidate's uniform, and 30
    bits that seed the lane's further candidates, drawn only where it is rejected
    (`_mt_finish`, which sees the whole vmapped batch and works on the rejected lanes alone).
    Each lane's draws are exact in distribution (to float32 rounding of the uniforms) except
    that the normals are capped at 6.76 standard deviations (`normal_pair_of_bits`: the normal
    has 1.3e-11 of its mass beyond), and do not depend on the batch; two rejected lanes with
    equal 30-bit seeds (probability ~ r^2 / 2^31 for r rejected lanes: about one pair per
    generation at 10^6 chains of shape 1) share their further candidates, so that pair's draws
    are not independent (each one's law is still exact). docs/experiments.md states both.

    Args:
      key: a PRNG key (one lane's); df: its degrees of freedom; stream: the word stream.
      packed: return one complex64 array (below).
      candidates: Marsaglia-Tsang candidates drawn up front (1; or 0, which sends every lane
        through the fallback: for tests). One is rejected with probability 4.8 % at shape 1
        and ~5e-5 at shape 500; the rare rejected lanes finish in `_mt_finish`.
      row, rows, compact: how `_mt_finish` finishes the rejected lanes: rows of `row` lanes, up
        to `rows` rows per compacted pass; `compact` None compacts on CPU only (a traced
        per-platform choice), True / False force it. None of these changes a draw.
    Returns:
      (z, chi), or with `packed` the complex64 z + i chi (one array: a consumer that splits it
      inside its own fusion saves two passes over the draws).
    """
    df = jnp.asarray(df, _F)
    w = _lane_words(prng.word_source(key), 4, df.shape, stream)
    alpha = 0.5 * df
    d = alpha - 1.0 / 3.0
    c = 1.0 / jnp.sqrt(9.0 * d)
    z, x = normal_pair_of_bits(w[0], w[1])
    # Not accepted yet: the seed's 30 bits with the sign bit set (accepted values are >= +0).
    chi = jax.lax.bitcast_convert_type((w[3] >> 2) | _SIGN, _F)
    if candidates:
        v, ok = _mt_propose(d, c, x, _unit_open(w[2]))
        chi = jnp.where(ok, 2.0 * v, chi)  # chi2(df) = 2 Gamma(df / 2)
    chi = jnp.where(alpha < 1.0, x * x, chi)  # df = 1: chi2(1) = x^2
    # z and chi travel as ONE complex64 array: XLA fuses the hashes into each array computed
    # from them, so two real outputs evaluated every hash (and the radius) twice.
    zc = _mt_finish(jax.lax.complex(z, chi), alpha, row=row, rows=rows, compact=compact)
    return zc if packed else (jnp.real(zc), jnp.imag(zc))


def _is_pending(chi: Array) -> Array:
    return jax.lax.bitcast_convert_type(chi, jnp.uint32) >= _SIGN


def _mt_rounds(zc: Array, alpha: Array, r0: Array, once: bool) -> Array:
    """Marsaglia-Tsang rounds r0, r0 + 1, ... for the pending lanes of chi = imag(zc) (a lane's
    round r hashes (seed, r) with `_FALLBACK_KEY`), masked: one round (`once`) or until none is
    left; real(zc) is carried along unchanged. (d and c are computed here from the shape alpha
    in every path, so a lane's value has the same bits whichever path finishes it.)"""
    d = alpha - 1.0 / 3.0
    c = 1.0 / jnp.sqrt(9.0 * d)

    def body(carry):
        r, zc = carry
        chi = jnp.imag(zc)
        seed = jax.lax.bitcast_convert_type(chi, jnp.uint32) & ~_SIGN
        x, u = prng.threefry2x32(seed, _FALLBACK_KEY, r.astype(jnp.uint32), jnp.uint32(0))
        v, ok = _mt_propose(d, c, normal_of_bits(x), _unit_open(u))
        chi = jnp.where(_is_pending(chi) & ok, 2.0 * v, chi)
        return r + 1, jax.lax.complex(jnp.real(zc), chi)

    if once:
        return body((r0, zc))[1]
    cond = lambda cr: jnp.any(_is_pending(jnp.imag(cr[1])))  # noqa: E731
    return jax.lax.while_loop(cond, body, (r0, zc))[1]


def _mt_finish_lanes(
    zc: Array, alpha: Array, *, row: int, rows: int, compact: bool | None
) -> Array:
    """`zc [L]` with its pending lanes (imaginary parts that are sign-flagged seeds) accepted:
    each imaginary part then a 2 Gamma(alpha) value (the real parts pass through).

    `_mt_finish` (`lanes.whole_batch`) hands this the whole vmapped batch. A masked loop over
    every lane costs a full pass of hashes, normals and logs per round, although at large
    shapes only ~5e-5 of the lanes are pending; on CPU (`compact`), the pending lanes are
    gathered instead (`_mt_compacted`). Other platforms run the masked loop
    (benchmarks/results/xla_tricks-cpu.json, row chi_square_compaction, times both on CPU). A
    lane's rounds are numbered from 0 in every case, so its value depends on its seed alone,
    whichever path finishes it.
    """
    plain = lambda zc, alpha: _mt_rounds(zc, alpha, jnp.int32(0), once=False)  # noqa: E731
    if zc.shape[0] <= row * rows or compact is False:  # small batches: already cheap
        return plain(zc, alpha)
    compacted = functools.partial(_mt_compacted, row=row, rows=rows)
    if compact:
        return compacted(zc, alpha)
    return jax.lax.platform_dependent(zc, alpha, cpu=compacted, default=plain)


_mt_finish = lanes.whole_batch(_mt_finish_lanes)


def _mt_compacted(zc: Array, alpha: Array, *, row: int, rows: int) -> Array:
    """`_mt_finish_lanes` by compaction: the lanes `[L]` are cut into rows of `row`; up to
    `rows` rows holding pending lanes are gathered and run to acceptance, then written back,
    until none is pending (while more than 4 * `rows` rows are pending, masked rounds over all
    lanes come first)."""
    (n,) = zc.shape
    num_rows = -(-n // row)

    def tiles(x, fill):  # [num_rows, row], padded with lanes that are never pending
        return jnp.pad(x, (0, num_rows * row - n), constant_values=fill).reshape(num_rows, row)

    zcs, alphas = tiles(zc, 0.0), tiles(alpha, 1.0)

    def step(carry):
        r, zcs, _ = carry
        # Recomputed from the loop's carry every step: carried along instead (updated by the
        # branches), XLA fused the draws or a full round into that reduction and evaluated
        # them twice.
        busy = jnp.any(_is_pending(jnp.imag(zcs)), axis=1)  # [num_rows]
        count = jnp.sum(busy)

        def compact(zcs):
            idx = jnp.nonzero(busy, size=rows, fill_value=num_rows)[0]  # num_rows: out of range
            take = lambda x, fill: jnp.take(x, idx, axis=0, mode="fill", fill_value=fill)  # noqa: E731
            sub = _mt_rounds(take(zcs, 0.0), take(alphas, 1.0), r, once=False)
            return r, zcs.at[idx].set(sub, mode="drop")

        def full(zcs):
            return r + 1, _mt_rounds(zcs, alphas, r, once=True)

        r, zcs = jax.lax.cond(count > 4 * rows, full, compact, zcs)
        return r, zcs, count > rows  # else the compaction took every busy row: done

    # The loop tests a flag, not the lanes: one pass over them per step (the usual case at
    # large shapes: one step, whose compaction finishes the few pending lanes).
    _, zcs, _ = jax.lax.while_loop(lambda c: c[2], step, (jnp.int32(0), zcs, jnp.bool_(True)))
    return zcs.reshape(-1)[:n]


# Stirling-series remainders fc(k) = log k! - [(k + 1/2) log(k + 1) - (k + 1) + log(2 pi)/2],
# exact for k <= 9 (Hoermann 1993, Table 1).
_FC_TABLE = np.array(
    [
        0.08106146679532726,
        0.04134069595540929,
        0.02767792568499834,
        0.02079067210376509,
        0.01664469118982119,
        0.01387612882307075,
        0.01189670994589177,
        0.01041126526197209,
        0.00925546218271273,
        0.00833056343336287,
    ],
    np.float32,
)


def _fc(k: Array) -> Array:
    small = jnp.zeros_like(k)
    kc = jnp.clip(k, 0.0, 9.0)
    # A chain of selects, not a table lookup: a gather in a fusion kept XLA from vectorising
    # the whole fusion (BTRS's proposal among it).
    for j, c in enumerate(_FC_TABLE):
        small = jnp.where(kc == j, c, small)
    r1 = 1.0 / (k + 1.0)  # one division (three, written as the series, slowed BTRS down)
    r2 = r1 * r1
    approx = r1 * (1.0 / 12.0 - r2 * (1.0 / 360.0 - r2 * (1.0 / 1260.0)))
    return jnp.where(k <= 9, small, approx)


# Below this mean the binomial is drawn by inversion over at most 48 terms; above it BTRS.
_INVERSION_MEAN = 10.0
# P(Bin(n, q) >= 48 | n q < 10) < 4e-18, far below the 2^-24 resolution of a float32 uniform.
_INVERSION_TERMS = 48
# Inversion terms per iteration of its search loop (the loop stops once every lane is found).
_INVERSION_CHUNK = 8


def binomial(
    key: Array,
    n: Array,
    p: Array,
    *,
    full_rounds: int = 2,
    inversion_block: int = 512,
    retry_block: int = 64,
    compact: bool | None = None,
) -> Array:
    """Binomial(n, p) draws, exact, vectorised over the broadcast shape of `n` and `p`.

    Small means (n min(p, 1-p) < 10) use sequential-search inversion (at most 48 terms; the
    truncated tail has probability < 4e-18). Larger means use Hoermann's (1993) transformed
    rejection BTRS; its acceptance test is evaluated as log-ratios of nearby factorials via
    `log1p` and Stirling remainders, so it stays accurate in float32 for n up to 2^24 (JAX's
    own BTRS loses ~0.1 nats of accuracy at n = 10^6). Lanes are processed by regime
    (`_binomial_lanes`), so each pays for its own algorithm only.

    Args:
      key: a PRNG key.
      n: int array of trial counts (>= 0, < 2^24).
      p: float array of success probabilities in [0, 1].
      full_rounds, inversion_block, retry_block, compact: how the lanes are grouped
        (`_binomial_lanes`); none of them changes a draw.
    Returns:
      int32 array of the broadcast shape.
    """
    n = jnp.asarray(n)
    p = jnp.asarray(p, _F)
    shape = jnp.broadcast_shapes(n.shape, p.shape)
    k1, k2 = _key_words(key)
    # Lane j hashes the counter (WORDS + j, round): its own stream of uniforms.
    lane = prng.WORDS + jnp.arange(math.prod(shape), dtype=jnp.uint32).reshape(shape)
    tuning = dict(full_rounds=full_rounds, inversion_block=inversion_block)
    return _binomial_words(k1, k2, lane, n, p, **tuning, retry_block=retry_block, compact=compact)


def _key_words(key: Array) -> tuple[Array, Array]:
    """The two threefry key words the binomial lanes hash: a threefry key's own data, else
    two words drawn from the key (any PRNG)."""
    if prng.is_threefry(key):
        kd = jax.random.key_data(key)
        return kd[..., 0], kd[..., 1]
    w = jax.random.bits(key, (2,), jnp.uint32)
    return w[0], w[1]


# Row length of `_prefix_count`'s blocked prefix sum.
_PREFIX_ROW = 128


def _prefix_count(mask: Array) -> Array:
    """Inclusive prefix sums `[L]` int32 of a bool `[L]`: within rows of 128 as one product with
    a triangular matrix (exact: sums <= 128 in float32), plus the rows' offsets. A handful of
    kernels, where `jnp.cumsum` (a reduce-window on CPU) or an associative scan (~2 log2(L)
    small kernels) cost more to run or to compile (the multinomial's compile time)."""
    size = mask.shape[0]
    rows = -(-size // _PREFIX_ROW)
    a = jnp.pad(mask.astype(_F), (0, rows * _PREFIX_ROW - size)).reshape(rows, _PREFIX_ROW)
    upper = jnp.triu(jnp.ones((_PREFIX_ROW, _PREFIX_ROW), _F))  # [j, k] = 1 where j <= k
    within = jnp.dot(a, upper, precision=jax.lax.Precision.HIGHEST)  # [rows, 128]
    total = within[:, -1]
    before = jnp.cumsum(total) - total  # [rows]
    return (within + before[:, None]).reshape(-1)[:size].astype(jnp.int32)


def _compact(mask: Array, block: int) -> tuple[Array, Array]:
    """(indices of the True lanes of `mask [L]` in order, padded with L to whole blocks; their
    count)."""
    size = mask.shape[0]
    padded = -(-size // block) * block
    pos = _prefix_count(mask)  # inclusive
    slot = jnp.where(mask, pos - 1, padded)  # padded: dropped
    idx = jnp.full((padded,), size, jnp.int32)
    idx = idx.at[slot].set(jnp.arange(size, dtype=jnp.int32), mode="drop")
    return idx, pos[-1]


def _for_blocks(mask: Array, block: int, fn, x: Array) -> Array:
    """x with its `mask`ed lanes set to `fn(lanes [B], valid [B]) -> [B]`, evaluated on the
    masked lanes only, gathered into blocks of B (the last block padded: `valid` False)."""
    size = x.shape[0]
    block = min(block, size)
    idx, count = _compact(mask, block)

    def body(j, x):
        sel = jax.lax.dynamic_slice(idx, (j * block,), (block,))
        valid = sel < size
        return x.at[sel].set(fn(jnp.minimum(sel, size - 1), valid), mode="drop")

    return jax.lax.fori_loop(0, (count + block - 1) // block, body, x)


def _inversion(n: Array, q: Array, u: Array, valid: Array) -> Array:
    """Bin(n, q) by sequential search: X = #{k < 48 : U > F(k)}, F the CDF, pmf by the
    recursion f(k+1)/f(k) = (n - k) q / ((k + 1)(1 - q)); the terms run in chunks of 8 until no
    valid lane is still searching (so a block of small means stops after a few terms)."""
    r = q / (1.0 - q)
    f = jnp.exp(n * jnp.log1p(-q))

    def cond(c):
        k, _, _, cdf = c
        return (k < _INVERSION_TERMS) & jnp.any(valid & (u > cdf))

    def body(c):
        k, x, f, cdf = c
        for j in range(_INVERSION_CHUNK):
            kf = (k + j).astype(_F)
            x = x + (u > cdf).astype(jnp.int32)
            f = f * (jnp.maximum(n - kf, 0.0) * r) * (1.0 / (kf + 1.0))
            cdf = cdf + f
        return k + _INVERSION_CHUNK, x, f, cdf

    init = (jnp.int32(0), jnp.zeros(u.shape, jnp.int32), f, f)
    _, x, _, _ = jax.lax.while_loop(cond, body, init)
    return jnp.minimum(x, n.astype(jnp.int32))


def _btrs_setup(n: Array, q: Array) -> tuple[Array, ...]:
    """BTRS's per-lane constants (Hoermann 1993, Algorithm BTRS) for n q >= 10, q <= 1/2."""
    spq = jnp.sqrt(n * q * (1.0 - q))
    b = 1.15 + 2.53 * spq
    a = -0.0873 + 0.0248 * b + 0.01 * q
    c = n * q + 0.5
    v_r = 0.92 - 4.2 / b
    alpha = (2.83 + 5.1 / b) * spq
    m = jnp.floor((n + 1.0) * q)
    # log of f(m+1)/f(m) * ... : (k - m) * log(r (n - m + 1) / (m + 1)), argument close to 1.
    lmode = jnp.log1p((q * (n + 2.0) - (m + 1.0)) / ((1.0 - q) * (m + 1.0)))
    fc_m = _fc(m) + _fc(n - m)
    return a, b, c, v_r, alpha, m, lmode, fc_m


def _btrs_propose(setup: tuple[Array, ...], n: Array, w_u: Array, w_v: Array) -> Array:
    """One BTRS proposal from two uint32 words: k if accepted, else -1 (int32)."""
    a, b, c, v_r, alpha, m, lmode, fc_m = setup
    uu = _unit_open(w_u) - 0.5  # open: us = 0.5 - |uu| > 0
    vv = _unit_open(w_v)
    us = 0.5 - jnp.abs(uu)
    kx = jnp.floor((2.0 * a / jnp.maximum(us, 1e-6) + b) * uu + c)
    inside = (kx >= 0) & (kx <= n)
    ks = jnp.clip(kx, 0.0, n)
    accept1 = (us >= 0.07) & (vv <= v_r)
    lv = jnp.log(vv * alpha / (a / (us * us) + b))
    # log f(k)/f(m) = D(m, k) + D(n-m, n-k) + (k-m) log(q/(1-q)), D(a, b) = log a! - log b!
    # = (k+1/2) log1p((m-k)/(k+1)) + (n-k+1/2) log1p((k-m)/(n-k+1)) + (k-m) lmode + fc terms
    ub = (
        (ks + 0.5) * jnp.log1p((m - ks) / (ks + 1.0))
        + (n - ks + 0.5) * jnp.log1p((ks - m) / (n - ks + 1.0))
        + (ks - m) * lmode
        + fc_m
        - _fc(ks)
        - _fc(n - ks)
    )
    # One output (not a value and a flag): XLA fuses a producer into each of its consumers and
    # evaluates it in every one, so two outputs computed the whole proposal twice.
    return jnp.where(inside & (accept1 | (lv <= ub)), ks.astype(jnp.int32), -1)


def _btrs_retry(k1, k2, x1, n, q, valid, first: int) -> Array:
    """BTRS from round 1 on for lanes whose round-0 proposal was rejected: rounds until every
    valid lane accepts (round r hashes the counter (x1, r), from r = `first`). The loop carries
    one array, the draw or -1 while pending (see `_btrs_propose`)."""
    setup = _btrs_setup(n, q)

    def body(c):
        r, x = c
        k = _btrs_propose(setup, n, *prng.threefry2x32(k1, k2, x1, r.astype(jnp.uint32)))
        return r + 1, jnp.where(x < 0, k, x)

    init = (jnp.int32(first), jnp.where(valid, -1, 0))
    return jax.lax.while_loop(lambda c: jnp.any(c[1] < 0), body, init)[1]


def _binomial_lanes(
    k1: Array,
    k2: Array,
    x1: Array,
    n: Array,
    p: Array,
    *,
    full_rounds: int,
    inversion_block: int,
    retry_block: int,
    compact: bool | None,
) -> Array:
    """Binomial(n_j, p_j) for each lane j of `[L]` inputs; lane j draws its uniforms from the
    threefry hashes of the counters (x1_j, round) under the key (k1_j, k2_j), so a lane's draw
    depends on its own inputs only, never on the batch it is drawn in.

    `_binomial_words` (`lanes.whole_batch`) hands this every lane of a vmapped batch at once,
    so the lanes can be grouped by regime instead of evaluating every algorithm and retry loop
    on every lane at full width: BTRS's first `full_rounds` rounds run at full width (a
    vectorised pass each; ~2% of its lanes are still rejected after two); then, on CPU
    (`compact`; None: CPU only, a traced per-platform choice), the inversion lanes and those
    rejected lanes are gathered into blocks of `inversion_block` / `retry_block` lanes
    (`_for_blocks`) that run their own loops; other platforms run those loops masked at full
    width (benchmarks/results/xla_tricks-cpu.json, row binomial_compaction, times both on
    CPU). Lanes with n = 0 or q = 0 are exactly 0 (zero-mass states stay empty); p > 1/2
    draws the complement. Every output lane (x, a loop's result) is a buffer: XLA fuses cheap
    producers into each consumer and recomputes them there, and a proposal fused into the
    ~2 log2(L) passes of the prefix sum that reads the rejected-lane mask cost several times
    the proposal itself.
    """
    k1, k2, x1 = (w.astype(_U) for w in (k1, k2, x1))
    n = n.astype(jnp.int32)
    p = jnp.clip(p.astype(_F), 0.0, 1.0)
    flip = p > 0.5
    q = jnp.where(flip, 1.0 - p, p)  # q <= 1/2
    nf = n.astype(_F)
    live = (n > 0) & (q > 0.0)
    use_inv = live & (nf * q < _INVERSION_MEAN)
    use_btrs = live & ~use_inv

    nb = jnp.where(use_btrs, nf, 64.0)  # a safe dummy where BTRS is not used
    qb = jnp.where(use_btrs, q, 0.5)
    setup = _btrs_setup(nb, qb)

    def round_(r, x):  # a loop, not unrolled: one compiled proposal (compile time), no slower
        words = prng.threefry2x32(k1, k2, x1, r.astype(_U))
        return jnp.where(x < 0, _btrs_propose(setup, nb, *words), x)

    # The first rounds at full width (acceptance ~0.85 each); x = -1 marks a pending lane.
    x = jax.lax.fori_loop(0, full_rounds, round_, jnp.where(use_btrs, -1, 0))

    def inversion(lanes, valid):  # lanes: indices into the lanes, or None for all
        at = (lambda a: a) if lanes is None else (lambda a: a[lanes])  # noqa: E731
        u = _unit_open(prng.threefry2x32(at(k1), at(k2), at(x1), _U(0))[0])
        return _inversion(at(nf), at(q), u, valid)

    def retry(lanes, valid):
        at = (lambda a: a) if lanes is None else (lambda a: a[lanes])  # noqa: E731
        return _btrs_retry(at(k1), at(k2), at(x1), at(nf), at(q), valid, full_rounds)

    def blocked(x):
        x = _for_blocks(use_inv, inversion_block, inversion, x)
        return _for_blocks(x < 0, retry_block, retry, x)

    def masked(x):  # the same loops over every lane, the others masked
        x = jnp.where(use_inv, inversion(None, use_inv), x)
        return jnp.where(x < 0, retry(None, x < 0), x)

    if compact is None:
        x = jax.lax.platform_dependent(x, cpu=blocked, default=masked)
    else:
        x = blocked(x) if compact else masked(x)
    return jnp.where(flip, n - x, x)


_binomial_words = lanes.whole_batch(_binomial_lanes)


def multinomial(
    key: Array,
    n: Array,
    probs: Array,
    *,
    full_rounds: int = 2,
    inversion_block: int = 512,
    retry_block: int = 64,
    compact: bool | None = None,
) -> Array:
    """Multinomial(n, probs) counts `[K]` for one chain, exact, at a cost independent of n.

    Conditional binomials in a `lax.scan` over the states: X_i ~ Bin(n - sum_{j<i} X_j,
    p_i / sum_{j>=i} p_j), and the last state takes what is left. The remaining masses are
    suffix sums (accurate for tiny tail probabilities, unlike 1 - cumsum); the last positive
    state's ratio is exactly 1, so states of zero probability always get zero counts
    (absorption is exact). Vmapped over chains, each state's binomials are one batched call
    (`_binomial_words`, a `lanes.whole_batch` function), grouped by regime across the chains.
    State i hashes the counters (WORDS + i, round) under the chain's key.

    Args:
      key: a PRNG key.
      n: int scalar, the number of draws (may be traced).
      probs: [K] non-negative weights (normalised internally).
      full_rounds, inversion_block, retry_block, compact: as in `binomial`.
    Returns:
      int32 [K] counts summing to n (if any weight is positive).
    """
    probs = jnp.asarray(probs, _F)
    (num_states,) = probs.shape
    rem = jnp.cumsum(probs[::-1])[::-1]  # [K] mass of states i..K-1
    cond = jnp.where(rem > 0, probs / jnp.where(rem > 0, rem, 1.0), 0.0)
    k1, k2 = _key_words(key)
    tuning = dict(full_rounds=full_rounds, inversion_block=inversion_block)
    tuning.update(retry_block=retry_block, compact=compact)

    def body(left, x):
        stream, p = x
        draw = _binomial_words(k1, k2, stream, left, p, **tuning)
        return left - draw, draw

    streams = prng.WORDS + jnp.arange(num_states - 1, dtype=jnp.uint32)
    xs = (streams, jnp.minimum(cond[:-1], 1.0))
    left, counts = jax.lax.scan(body, jnp.asarray(n, jnp.int32), xs)
    last = jnp.where(probs[-1] > 0, left, 0)
    return jnp.concatenate([counts, last[None]])


def wishart_bartlett_factor(key: Array, df: Array, dim: int) -> Array:
    """Lower-triangular A `[dim, dim]` with A A^T ~ Wishart(df, I_dim) (Bartlett decomposition).

    A_ii = sqrt(chi2(df - i)), A_ij ~ N(0, 1) for i > j (0-based i). A singular Wishart (df < dim,
    e.g. fewer points than dimensions) is handled exactly: columns j >= df are zero, which is the
    Cholesky-like factor of Z^T Z for a [df, dim] standard normal Z.

    Args:
      key: a PRNG key.
      df: scalar degrees of freedom (integer valued, may be traced), >= 0.
      dim: static dimension.
    """
    df = jnp.asarray(df, _F)
    i = jnp.arange(dim, dtype=_F)
    dfs = df - i
    live = dfs > 0
    if dim == 1:  # no normals: the key goes to the chi-square alone (saves a split per chain)
        return jnp.where(live, jnp.sqrt(chi_square(key, jnp.where(live, dfs, 1.0))), 0.0)[:, None]
    k_chi, k_n = jax.random.split(key)
    chi = jnp.sqrt(chi_square(k_chi, jnp.where(live, dfs, 1.0)))
    diag = jnp.where(live, chi, 0.0)
    z = jax.random.normal(k_n, (dim, dim), _F)
    rows = jnp.arange(dim)[:, None]
    cols = jnp.arange(dim)[None, :]
    lower = (rows > cols) & (cols.astype(_F) < df)
    return jnp.where(lower, z, 0.0) + jnp.diag(diag)


# ----------------------------------------------------------------------------------------------
# Hypergeometric draws (subsets without replacement). Kept at the end of the file on purpose.

# HRUA (Stadlober 1989) ratio-of-uniforms rounds drawn up front (acceptance ~0.6-0.8 per round).
_HRUA_ROUNDS = 4
_HYPERGEOMETRIC_UNIFORMS = 1 + 2 * _HRUA_ROUNDS
# Stadlober's hat constants: D1 = 2 sqrt(2 / e), D2 = 3 - 2 sqrt(3 / e) (NumPy's HRUA too).
_HRUA_D1 = 1.7155277699214135
_HRUA_D2 = 0.8989161620588988


def _log_factorial_ratio(a: Array, b: Array) -> Array:
    """log a! - log b! without the (a - b) log(a + 1) term, which the caller collects for all
    four factorial pairs of the hypergeometric pmf (where it cancels to one small logarithm):
    (b + 1/2) log1p((a - b) / (b + 1)) - (a - b) + fc(a) - fc(b), from Stirling's series with the
    remainders fc (exact below 10). Accurate in float32 for a, b < 2^24 that lie close."""
    return (b + 0.5) * jnp.log1p((a - b) / (b + 1.0)) - (a - b) + _fc(a) - _fc(b)


def hypergeometric(key: Array, good: Array, bad: Array, sample: Array) -> Array:
    """Hypergeometric draws: the number of `good` items in a uniformly random subset of `sample`
    items drawn without replacement from `good + bad`, vectorised over the broadcast shape.

    The problem is first reduced to s = min(sample, N - sample) draws and the rarer kind
    (g = min(good, bad)), then:
    - small means (s g / N < 10): inversion over 48 terms of the pmf recursion
      f(k+1)/f(k) = (g - k)(s - k) / ((k + 1)(N - g - s + k + 1)), normalised by the sum of the
      terms (so f(0) is never computed). The hypergeometric tail is below the binomial's of the
      same mean (Hoeffding 1963), so the truncated mass is < 1e-16;
    - larger means: Stadlober's (1989) ratio-of-uniforms HRUA (as NumPy's) with a masked retry
      loop. Its acceptance test needs log f(k) - log f(mode): a sum of four log-factorial
      differences of nearby integers, computed from Stirling's series as in `binomial` (never as
      differences of `lgamma` values, which lose ~0.06 nats in float32 at N = 10^5).
    The result is exact up to float32 rounding of the uniforms and of that log-ratio (absolute
    error ~1e-6 |k - mode|, below 1e-3 within 16 standard deviations for N < 2^24).

    Args:
      key: a PRNG key.
      good, bad: int arrays of the population's counts of each kind (>= 0, good + bad < 2^24).
      sample: int array of the subset's size, 0 <= sample <= good + bad.
    Returns:
      int32 array of the broadcast shape: the good items in the subset.
    """
    shape = jnp.broadcast_shapes(jnp.shape(good), jnp.shape(bad), jnp.shape(sample))
    k_u, k_fb = jax.random.split(key)
    u = _uniform_open(k_u, (_HYPERGEOMETRIC_UNIFORMS, *shape))
    return _hypergeometric(lambda r: jax.random.fold_in(k_fb, r), good, bad, sample, u)


def _hypergeometric(key_of_round, good: Array, bad: Array, sample: Array, u: Array) -> Array:
    """`hypergeometric` from pre-drawn uniforms `u [1 + 2 * rounds, *shape]`."""
    shape = u.shape[1:]
    good = jnp.broadcast_to(jnp.asarray(good, jnp.int32), shape)
    bad = jnp.broadcast_to(jnp.asarray(bad, jnp.int32), shape)
    sample = jnp.broadcast_to(jnp.asarray(sample, jnp.int32), shape)
    pop = good + bad
    # Symmetries: draw the complement when sample > N / 2, count the rarer kind.
    s_i = jnp.minimum(sample, pop - sample)
    g_i = jnp.minimum(good, bad)
    s, g, nf = s_i.astype(_F), g_i.astype(_F), pop.astype(_F)
    h_other = nf - g  # the commoner kind's count
    mean = s * g / jnp.maximum(nf, 1.0)
    use_inv = mean < _INVERSION_MEAN

    # --- inversion: X = #{k : U * sum(w) > w_0 + ... + w_k}, w_k = f(k) / f(0).
    u_inv = u[0]
    si = jnp.where(use_inv, s, 0.0)
    gi = jnp.where(use_inv, g, 0.0)
    hi = jnp.where(use_inv, h_other, 1.0)

    def weights(k, c):
        w, ws = c
        kf = jnp.asarray(k, _F)
        num = jnp.maximum(gi - kf, 0.0) * jnp.maximum(si - kf, 0.0)
        w = w * num / ((kf + 1.0) * jnp.maximum(hi - si + kf + 1.0, 1.0))
        return w, ws.at[k + 1].set(w)

    ws0 = jnp.zeros((_INVERSION_TERMS, *shape), _F).at[0].set(1.0)
    _, ws = jax.lax.fori_loop(0, _INVERSION_TERMS - 1, weights, (jnp.ones(shape, _F), ws0))
    cdf = jnp.cumsum(ws, axis=0)  # [terms, *shape]
    x_inv = jnp.sum((u_inv * cdf[-1])[None] > cdf, axis=0).astype(jnp.int32)
    x_inv = jnp.minimum(x_inv, jnp.minimum(s_i, g_i))

    # --- HRUA on lanes with a safe dummy (N = 200, g = s = 100) where inversion is used.
    sb = jnp.where(use_inv, 100.0, s)
    gb = jnp.where(use_inv, 100.0, g)
    nb = jnp.where(use_inv, 200.0, nf)
    hb = nb - gb
    p = gb / nb
    a = sb * p + 0.5
    var = (nb - sb) * sb * p * (1.0 - p) / (nb - 1.0)
    c = jnp.sqrt(var + 0.5)
    hat = _HRUA_D1 * c + _HRUA_D2
    m = jnp.floor((sb + 1.0) * (gb + 1.0) / (nb + 2.0))  # the mode
    top = jnp.minimum(jnp.minimum(sb, gb) + 1.0, jnp.floor(a + 16.0 * c))
    # The (a - b) log(a + 1) terms of the four log-factorial pairs sum to (m - k) * lmode.
    lmode = (
        jnp.log(m + 1.0)
        + jnp.log(hb - sb + m + 1.0)
        - jnp.log(gb - m + 1.0)
        - jnp.log(sb - m + 1.0)
    )

    def propose(both):
        uu, vv = both[0], both[1]
        x = a + hat * (vv - 0.5) / uu
        inside = (x >= 0.0) & (x < top)
        k = jnp.floor(jnp.clip(x, 0.0, top - 1.0))
        # T = log f(k) - log f(m), f the pmf: pairs (mode version, k version) of log factorials.
        t = (
            _log_factorial_ratio(m, k)
            + _log_factorial_ratio(gb - m, gb - k)
            + _log_factorial_ratio(sb - m, sb - k)
            + _log_factorial_ratio(hb - sb + m, hb - sb + k)
            + (m - k) * lmode
        )
        return k, inside & (2.0 * jnp.log(uu) <= t)

    pre = jnp.reshape(u[1:], (_HRUA_ROUNDS, 2, *shape))
    x_rou = _masked_rejection(key_of_round, shape, propose, pre, done0=use_inv)
    x = jnp.where(use_inv, x_inv, x_rou.astype(jnp.int32))
    # Undo the symmetries: the commoner kind, then the complement of the subset.
    x = jnp.where(good > bad, s_i - x, x)
    x = jnp.where(s_i < sample, good - x, x)
    return jnp.where(pop > 0, x, 0)


def multivariate_hypergeometric(key: Array, counts: Array, num: Array) -> Array:
    """Counts per state `[K]` of a uniformly random subset of `num` items drawn without
    replacement from a population with `counts [K]` items per state; exact, at a cost independent
    of the counts.

    Conditional hypergeometrics in a `lax.scan` over the states (as `multinomial`):
    X_i ~ Hypergeometric(good = counts_i, bad = sum_{j>i} counts_j, sample = num - sum_{j<i} X_j).
    States with no items get none; a subset of the whole population is the population.

    Args:
      key: a PRNG key.
      counts: [K] int population counts (total < 2^24).
      num: int scalar subset size, 0 <= num <= sum(counts) (may be traced).
    Returns:
      int32 [K] counts summing to num.
    """
    counts = jnp.asarray(counts, jnp.int32)
    (num_states,) = counts.shape
    rest = jnp.cumsum(counts[::-1])[::-1] - counts  # [K] items of the states after i
    k_u, k_fb = jax.random.split(key)
    us = _uniform_open(k_u, (num_states, _HYPERGEOMETRIC_UNIFORMS))

    def body(left, x):
        i, good, bad, u = x
        draw = _hypergeometric(lambda r: jax.random.fold_in(k_fb, i * 4096 + r), good, bad, left, u)
        return left - draw, draw

    xs = (jnp.arange(num_states, dtype=jnp.int32), counts, rest, us)
    _, out = jax.lax.scan(body, jnp.asarray(num, jnp.int32), xs)
    return out

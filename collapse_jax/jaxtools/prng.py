"""Threefry-2x32 key derivation written as plain fused array ops, bit-identical to `jax.random`.

Why it exists: on CPU, JAX lowers its threefry hash as a rolled 5-iteration while loop (to save
compile time). Inside the generational loop (vmapped over chains, scanned over generations)
every `fold_in` / `split` then becomes a loop of its own with its intermediates materialised,
and deriving the per-generation keys cost about as much as the theory models' draws themselves.
The unrolled hash below is 20 add/rotate/xor rounds that XLA fuses with whatever consumes the
key, and only the keys that are used are computed (a `split` into 6 computes one hash per key
actually read). benchmarks/results/xla_tricks-cpu.json, row prng_impl, times the loop's key
work this way against `jax.random` (and against an unrolled threefry registered with
`jax.extend.random.define_prng_impl`); tests/unit/test_xla_tricks.py checks that no loop is left
and that unused keys cost nothing.

Everything here equals `jax.random` exactly for threefry keys with `jax_threefry_partitionable`
(JAX's default): tests/unit/test_prng.py checks `fold_in`, `split` and `random_words`' domain. Other
PRNG implementations fall back to `jax.random`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import Array

_U = jnp.uint32
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
# Counter words of the hash: `jax.random.split` / `fold_in` use (0, i); `random_words` uses
# (WORDS, j), a domain no derived key's counter reaches, so the words are independent of every
# key derived from the same key.
WORDS = 1


def threefry2x32(k1: Array, k2: Array, x1: Array, x2: Array) -> tuple[Array, Array]:
    """The Threefry-2x32 hash (20 rounds) of the counter (x1, x2) under the key (k1, k2), all
    uint32 arrays (broadcast), as JAX's own `threefry2x32` primitive computes it."""
    ks = (k1, k2, k1 ^ k2 ^ _U(0x1BD11BDA))
    x1 = x1 + ks[0]
    x2 = x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = x1 ^ ((x2 << _U(r)) | (x2 >> _U(32 - r)))
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + _U(i + 1)
    return x1, x2


def materialize(x: Any) -> Any:
    """`x` (a pytree of keys or of 32-bit arrays), computed into buffers once, on CPU.

    XLA:CPU fuses cheap element-wise producers, hashes included, into EVERY consumer fusion and
    recomputes them there (per output array, and per element of a broadcast); the outputs of a
    while loop are buffers instead. The loop runs once and returns its input, but XLA can prove
    neither: its condition and body read a word of `x` (`w | 1 != 0` always holds). A
    `lax.optimization_barrier` does not do this: XLA:CPU drops the barrier after fusion and
    still evaluates the hash inside every consumer.

    The loop is a CPU trick: it is chosen inside the traced program
    (`jax.lax.platform_dependent`), and other platforms get `x` itself.
    tests/unit/test_xla_tricks.py checks on the compiled CPU program that the loop survives and
    the hash is computed once, and on programs exported for CUDA and TPU that no loop is left.
    It pays where a key's hash would be recomputed per element of a large draw:
    benchmarks/results/xla_tricks-cpu.json, row materialize_in_loop, times the Gaussian sample
    method with and without it (row materialize: small programs where recomputing costs less
    than a buffer).
    """
    leaves, tree = jax.tree.flatten(x)
    if not leaves:
        return x
    is_key = [jnp.issubdtype(v.dtype, jax.dtypes.prng_key) for v in leaves]
    # The loop carries uint32 words: key data, or other 32-bit values reinterpreted.
    data = [
        jax.random.key_data(v) if k else jax.lax.bitcast_convert_type(v, _U)
        for v, k in zip(leaves, is_key)
    ]
    out = jax.lax.platform_dependent(data, cpu=_once, default=lambda d: d)
    out = [
        jax.random.wrap_key_data(o, impl=str(jax.random.key_impl(v)))
        if k
        else jax.lax.bitcast_convert_type(o, v.dtype)
        for o, v, k in zip(out, leaves, is_key)
    ]
    return jax.tree.unflatten(tree, out)


def _once(data: list[Array]) -> list[Array]:
    """`data` (uint32 arrays) as the outputs of a while loop that runs once."""

    def body(c):
        _, vals = c
        keep = (jnp.ravel(vals[0])[0] | _U(1)) != _U(0)  # always true
        return keep, [jnp.where(keep, v, ~v) for v in vals]

    return jax.lax.while_loop(lambda c: ~c[0], body, (jnp.zeros((), bool), data))[1]


def is_threefry(key: Array) -> bool:
    """Whether `key` is a typed threefry key that this module reproduces bit for bit."""
    return (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        and str(jax.random.key_impl(key)) == "threefry2x32"
        and bool(jax.config.jax_threefry_partitionable)
    )


def _pair(key: Array) -> tuple[Array, Array]:
    # Static slices (not jnp indexing, which may lower to a gather): XLA then folds
    # slice(concatenate(a, b)) of a key made by `_wrap` back into a and b, and the hash that
    # made the key fuses into its consumer instead of being evaluated once per key word.
    kd = jax.random.key_data(key)
    ax = kd.ndim - 1
    return tuple(jax.lax.index_in_dim(kd, i, ax, keepdims=False) for i in (0, 1))


def _wrap(pair: tuple[Array, Array]) -> Array:
    # lax.concatenate of trailing unit axes, not jnp.stack: vmapped, stack put a transpose
    # between the concatenate and `_pair`'s slices, which stopped XLA from folding them.
    a, b = (jax.lax.expand_dims(x, (x.ndim,)) for x in pair)
    return jax.random.wrap_key_data(jax.lax.concatenate([a, b], a.ndim - 1), impl="threefry2x32")


def fold_in(key: Array, data: Array | int) -> Array:
    """`jax.random.fold_in(key, data)` for a uint32 `data` scalar."""
    if not is_threefry(key):
        return jax.random.fold_in(key, data)
    return _wrap(threefry2x32(*_pair(key), _U(0), jnp.asarray(data, _U)))


def split(key: Array, num: int) -> tuple[Array, ...]:
    """The keys of `jax.random.split(key, num)`, each computed on its own (unused ones cost
    nothing after dead-code elimination)."""
    if not is_threefry(key):
        return tuple(jax.random.split(key, num))
    k = _pair(key)
    return tuple(_wrap(threefry2x32(*k, _U(0), _U(i))) for i in range(num))


def fold_in_split(key: Array, data: Array | int, num: int) -> tuple[Array, ...]:
    """`split(fold_in(key, data), num)` without materialising the folded key: interleaving its
    two words into key data and reading them back (a concatenate XLA fused into the hash, which
    it then evaluated per output word, unvectorised) made this several times slower inside a
    loop."""
    if not is_threefry(key):
        return tuple(jax.random.split(jax.random.fold_in(key, data), num))
    f = threefry2x32(*_pair(key), _U(0), jnp.asarray(data, _U))
    return tuple(_wrap(threefry2x32(*f, _U(0), _U(i))) for i in range(num))


# Up to this many words a source returns separate arrays (hashes unrolled), beyond it one array.
_UNROLL_WORDS = 8


def word_source(key: Array):
    """`words(num, stream=0)` -> the words of `random_words(key, num, stream)`.

    Up to 8 words come as a tuple of separate arrays of the key's batch shape, never stacked:
    stacked, XLA fused the hash into the stack and evaluated it once per output word (twice the
    work, unvectorised). More words come as one array `[num]`
    (hashes vectorised over counters; an unbatched key only). The key's data are read once
    here, so a loop that draws from the source closes over two uint32 words per lane.
    """
    if not is_threefry(key):

        def fallback(num: int, stream: Array | int = 0) -> Array | tuple[Array, ...]:
            bits = jax.random.bits(jax.random.fold_in(key, WORDS + stream), (num,), _U)
            return tuple(bits[i] for i in range(num)) if num <= _UNROLL_WORDS else bits

        return fallback
    k1, k2 = _pair(key)

    def words(num: int, stream: Array | int = 0) -> Array | tuple[Array, ...]:
        hi = jnp.asarray(WORDS + stream, _U)
        if num > _UNROLL_WORDS:
            a, b = threefry2x32(k1, k2, hi, jnp.arange((num + 1) // 2, dtype=_U))
            return jnp.stack([a, b], axis=-1).reshape(-1)[:num]
        out: list[Array] = []
        for j in range((num + 1) // 2):
            out.extend(threefry2x32(k1, k2, hi, _U(j)))
        return tuple(out[:num])

    return words


def word_pairs(key: Array, num: int, stream: Array | int = 0) -> tuple[Array, Array]:
    """The two output words `[num]` each of the hashes j < `num` behind `random_words(key,
    2 num, stream)` (which interleaves them), for a consumer that treats the two halves alike:
    left apart, XLA fuses each half into the consumer without re-evaluating the hash per word
    (interleaved, the Gaussian sample method evaluated it once per word)."""
    if not is_threefry(key):
        w = random_words(key, 2 * num, stream)
        return w[0::2], w[1::2]
    hi = jnp.asarray(WORDS + stream, _U)
    return threefry2x32(*_pair(key), hi, jnp.arange(num, dtype=_U))


def random_words(key: Array, num: int, stream: Array | int = 0) -> Array:
    """`num` random uint32 words `[num]` from one (unbatched) key: two words per hash of the
    counter (WORDS + stream, j) for threefry keys (a stream of its own per `stream` >= 0,
    independent of the keys `split` / `fold_in` derive); other PRNGs draw
    `jax.random.bits(fold_in(key, WORDS + stream))`. Hot loops use `word_source` (unstacked)."""
    return (
        jnp.stack(word_source(key)(num, stream))
        if num <= _UNROLL_WORDS
        else (word_source(key)(num, stream))
    )


__all__ = [
    "WORDS",
    "fold_in",
    "fold_in_split",
    "is_threefry",
    "materialize",
    "random_words",
    "split",
    "threefry2x32",
    "word_pairs",
    "word_source",
]

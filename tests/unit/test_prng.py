"""The fused threefry key derivation equals jax.random's bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.jaxtools import prng


def _data(k):
    return np.asarray(jax.random.key_data(k))


def test_fold_in_split_equal_jax_random():
    for key in (jax.random.key(0), jax.random.key(2**31 + 5)):
        for d in (0, 1, 6, 2**32 - 1):
            assert np.array_equal(_data(prng.fold_in(key, d)), _data(jax.random.fold_in(key, d)))
        want = _data(jax.random.split(jax.random.fold_in(key, 9), 6))
        got = jax.jit(lambda k: jnp.stack([jax.random.key_data(x) for x in prng.split(k, 6)]))
        assert np.array_equal(got(jax.random.fold_in(key, 9)), want)
        both = jnp.stack([jax.random.key_data(x) for x in prng.fold_in_split(key, 9, 6)])
        assert np.array_equal(both, want)
    # vmapped over traced data, as the loop uses them
    key, chains = jax.random.key(3), jnp.arange(5, dtype=jnp.uint32)
    got = jax.jit(jax.vmap(lambda c: jax.random.key_data(prng.fold_in(key, c))))(chains)
    want = jax.vmap(lambda c: jax.random.key_data(jax.random.fold_in(key, c)))(chains)
    assert np.array_equal(got, want)


def test_random_words_independent_streams_and_fallback():
    key = jax.random.key(1)
    w = prng.random_words(key, 5)
    assert w.shape == (5,) and w.dtype == jnp.uint32
    assert np.array_equal(w[:4], prng.random_words(key, 4))  # a prefix does not depend on num
    assert np.array_equal(prng.random_words(key, 20)[:5], w)  # nor on the vectorised path
    assert not np.array_equal(w, prng.random_words(key, 5, stream=1))
    # the words are none of the derived keys' words
    derived = np.concatenate([_data(k) for k in prng.split(key, 4)])
    assert not np.isin(np.asarray(w), derived).any()
    phil = jax.random.key(1, impl="philox4x32")
    assert prng.random_words(phil, 3).shape == (3,)
    for k in (key, phil):  # word_pairs: the same hashes' words, left uninterleaved
        a, b = prng.word_pairs(k, 6)
        assert np.array_equal(np.stack([a, b], 1).reshape(-1), prng.random_words(k, 12))
    assert np.array_equal(_data(prng.fold_in(phil, 3)), _data(jax.random.fold_in(phil, 3)))


def test_materialize_returns_its_input():
    """`materialize` is the identity (keys and uint32 words, jitted), whatever the words."""
    keys = jax.random.split(jax.random.key(5), 4)
    words = jnp.asarray([0, 1, 2**32 - 1, 7], jnp.uint32)
    k2, w2 = jax.jit(prng.materialize)((keys, words))
    np.testing.assert_array_equal(jax.random.key_data(k2), jax.random.key_data(keys))
    np.testing.assert_array_equal(w2, words)

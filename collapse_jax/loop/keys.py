"""The loop's keys: one derivation everywhere.

A run seeded with `s` has the base key `key(s)`; `simulate` takes the base key directly. Chain
`r` uses

    k_real, k_base, k_gens = split(fold_in(base, r), 3)

(`k_real` draws the real data of generation 0, `k_base` the learner's base init) and generation
`n` of that chain uses `fold_in(k_gens, n)`, split into named keys (`generation_keys`). The
training set of generation n >= 1 is drawn with generation n - 1's `sample` / `previous` /
`real` keys (it is "generation n - 1's sample"; a learner with `sample_noise` draws that
sample's noise from stream `NOISE_STREAM + n - 1` of `k_gens` instead of the `sample` key).
Results therefore depend neither on how many chains or generations were asked for, nor on
chunking, nor on resumption. Held-out reference data use `fold_in(base, 2**31 - 1)`, which no
chain index reaches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.jaxtools import prng

# The reference (held-out) data's key: fold_in(base, REFERENCE_INDEX), beyond every chain index.
REFERENCE_INDEX = 2**31 - 1


def base_key(seed_or_key: int | jax.Array) -> jax.Array:
    """The run's base key: `key(seed)` for an int seed, else the (typed) key itself."""
    if isinstance(seed_or_key, (int, np.integer)):
        return jax.random.key(int(seed_or_key))
    key = jnp.asarray(seed_or_key) if not isinstance(seed_or_key, jax.Array) else seed_or_key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a legacy uint32 PRNGKey
    return key


def chain_keys(
    seed_or_key: int | jax.Array, chain: jax.Array | int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(k_real, k_base, k_gens) of chain `chain` of a run with this seed (or base key)."""
    k_real, k_base, k_gens = prng.fold_in_split(base_key(seed_or_key), chain, 3)
    return k_real, k_base, k_gens


def generation_keys(k_gens: jax.Array, generation: jax.Array | int) -> dict[str, jax.Array]:
    """Named keys of one generation of one chain (`fit`, `eval`, and the draws of the NEXT
    generation's training set: `sample`, `previous`, `real`, plus `init` for fresh fits)."""
    # prng: the same keys as jax.random's fold_in/split, fused (and only the used ones computed).
    ks = prng.fold_in_split(k_gens, generation, 6)
    return dict(fit=ks[0], eval=ks[1], sample=ks[2], previous=ks[3], real=ks[4], init=ks[5])


# The word stream (`prng.word_source`) of a chain's k_gens that carries generation g's synthetic
# draw's noise is NOISE_STREAM + g (learners with `sample_noise`): one counter-mode hash per two
# words, no per-generation key derivation. The counters (1 + NOISE_STREAM + g, j) never meet
# `fold_in` / `split`'s (0, i), so the noise is independent of every key `generation_keys` makes.
NOISE_STREAM = 2**30


def reference_key(seed_or_key: int | jax.Array) -> jax.Array:
    """The key of the held-out reference data shared by every chain."""
    return jax.random.fold_in(base_key(seed_or_key), REFERENCE_INDEX)


def vmapped_keys(key: jax.Array, chains: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`chain_keys` of every chain index in `chains` [R] (leaves [R])."""
    return jax.vmap(lambda c: chain_keys(key, c))(chains)

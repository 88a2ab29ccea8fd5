"""The Llama-family model (`lm.llama`) without torch: grouped-query attention through both caches.

The transformers references are in tests/parity/lm/test_llama.py; here the prompt-sharing cache's
grouped-query path (`cache._grouped_split_attention`, reached through `PromptSharingCache`) is
checked against the slot cache, and the model's uncached forward against a brute-force re-run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from collapse_jax.lm import decode, families, llama

IDS = np.array([[2, 4, 1, 3, 7], [0, 0, 3, 2, 9]])
MASK = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])


@pytest.fixture(scope="module")
def model():
    cfg = llama.LlamaConfig(
        vocab_size=11,
        hidden_size=24,
        intermediate_size=20,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=6,
        max_position_embeddings=32,
        initializer_range=0.5,  # well-separated scores: no near ties between the paths
        eos_token_id=10,
    )
    return families.init_random(cfg, jax.random.key(0))


def both_paths(model, **kw):
    seed = kw.pop("seed", 0)
    graphdef, state = nnx.split(model)
    settings = decode.resolve_settings(model, eos_token_id=(), **kw)  # run to the end
    args = (
        state,
        jnp.asarray(IDS, jnp.int32),
        jnp.asarray(MASK, jnp.int32),
        decode.prompt_keys(seed, np.arange(len(IDS))),
    )
    fast = decode.compiled_search(graphdef, settings)
    slot = decode.compiled_search(graphdef, settings, None, False)
    return [jax.tree.map(np.asarray, fn(*args)) for fn in (fast, slot)]


@pytest.mark.parametrize(
    "kw",
    [
        dict(max_new_tokens=6, num_beams=3, repetition_penalty=1.5, num_return_sequences=2),
        dict(max_new_tokens=6, do_sample=True, num_return_sequences=3, seed=5),
    ],
    ids=["beam", "sample_3_per_prompt"],
)
def test_grouped_prompt_sharing_cache_equals_slot_cache(model, kw):
    fast, slot = both_paths(model, **kw)
    np.testing.assert_array_equal(fast.tokens, slot.tokens)
    np.testing.assert_allclose(fast.scores, slot.scores, rtol=1e-5, atol=1e-5)


def test_greedy_equals_uncached_rerun(model):
    seqs, mask = IDS.copy(), MASK.copy()
    for _ in range(5):
        logits = np.asarray(model(jnp.asarray(seqs), jnp.asarray(mask)))
        seqs = np.concatenate([seqs, logits[:, -1].argmax(-1)[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((2, 1), int)], axis=1)
    np.testing.assert_array_equal(
        decode.generate(model, IDS, MASK, max_new_tokens=5, eos_token_id=()), seqs
    )


def test_cache_stores_key_value_heads(model):
    cache = model.init_cache(3, 8)
    assert cache.key.shape == (2, 3, 8, 2, 6)  # K = 2 heads stored, not N = 6
    with pytest.raises(ValueError, match="input_ids"):
        model(jnp.ones((4,), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(jnp.ones((2, 4), jnp.int32), jnp.ones((2, 5), jnp.int32))
    with pytest.raises(ValueError, match="attention_implementation"):
        families.init_random(model.config, jax.random.key(0), attention_implementation="flash")

"""The cache protocol (lm/cache.py) with a causal LM that is not OPT: a toy written here.

`ToyLM` (token + position embeddings, two attention layers, a head) implements the protocol in a
few lines and decodes through exactly the code OPT uses (`decode.generate` / `compiled_search`,
both caches). The references are brute force: the toy's own uncached forward, re-run on the
whole sequence for every candidate, with masks and positions spelled out here independently.
No torch needed.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from collapse_jax.lm import decode
from collapse_jax.lm.cache import KVCache, PromptSharingCache


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    vocab_size: int = 5
    dim: int = 8
    heads: int = 2
    layers: int = 2
    max_positions: int = 16
    eos_token_id: int | None = None
    pad_token_id: int | None = None


class ToyLM(nnx.Module):
    """A pre-norm-free two-layer attention LM; weights ~ N(0, 1) so that scores are well apart."""

    def __init__(self, config: ToyConfig, key: jax.Array):
        c = config
        h = c.dim // c.heads
        keys = iter(jax.random.split(key, 6))

        def w(*shape, scale=1.0):
            return nnx.Param(scale * jax.random.normal(next(keys), shape))

        self.config = c
        self.embed = w(c.vocab_size, c.dim)
        self.pos = w(c.max_positions, c.dim)
        self.wq = w(c.layers, c.dim, c.heads, h, scale=c.dim**-0.5)
        self.wkv = w(2, c.layers, c.dim, c.heads, h, scale=c.dim**-0.5)
        self.wo = w(c.layers, c.heads, h, c.dim, scale=(c.heads * h) ** -0.5)
        self.head = w(c.dim, c.vocab_size)

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        c = self.config
        return KVCache.zeros(
            c.layers, batch_size, max_length, c.heads, c.dim // c.heads, jnp.float32
        )

    @staticmethod
    def attention(q, k, v, mask):
        """Plain masked softmax attention, [B, T, N, H] x [B, S, N, H] -> [B, T, N, H]."""
        scores = jnp.einsum("btnh,bsnh->bnts", q, k)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, axis=-1), v)

    def __call__(self, input_ids, attention_mask=None, *, cache=None):
        b, t = input_ids.shape
        if cache is None:  # the brute-force path: masks and positions written out here
            mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask
            positions = jnp.cumsum(mask, axis=1) * mask - 1
            causal = jnp.tril(jnp.ones((t, t), bool))[None, None]  # [1, 1, T, T]
            view = causal & (mask[:, None, None, :] != 0)  # [B, 1, T, T]
        else:
            cache, positions, view = cache.prepare((b, t), attention_mask)
        x = self.embed[...][input_ids] + self.pos[...][jnp.maximum(positions, 0)]  # [B, T, D]
        for i in range(self.config.layers):
            q = jnp.einsum("btd,dnh->btnh", x, self.wq[...][i])
            k = jnp.einsum("btd,dnh->btnh", x, self.wkv[...][0, i])
            v = jnp.einsum("btd,dnh->btnh", x, self.wkv[...][1, i])
            if cache is None:
                out = self.attention(q, k, v, view)
            else:
                out, cache = cache.attend(i, q, k, v, view, self.attention)
            x = x + jnp.einsum("btnh,bnhd->btd", out, self.wo[...][i][None])
        logits = jnp.einsum("btd,dv->btv", x, self.head[...])
        return logits if cache is None else (logits, cache)


@pytest.fixture(scope="module")
def toy():
    return ToyLM(ToyConfig(), jax.random.key(7))


# Two prompts, the second left-padded: padding must change neither positions nor attention.
IDS = np.array([[2, 4, 1, 3], [0, 0, 3, 2]])
MASK = np.array([[1, 1, 1, 1], [0, 0, 1, 1]])


def log_probs(model, seqs, mask, prompt_len):
    """Brute force: log-probabilities of the tokens after the prompt, uncached forward.

    seqs [M, P + L], mask [M, P + L] -> [M] summed log-probs (float64)."""
    logits = np.asarray(model(jnp.asarray(seqs), jnp.asarray(mask)), np.float64)
    lp = logits - logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    steps = range(prompt_len, seqs.shape[1])
    return sum(lp[np.arange(len(seqs)), j - 1, seqs[:, j]] for j in steps)


def both_paths(model, ids, mask, **kw):
    """`search` output through the prompt-sharing cache and through the slot cache."""
    seed = kw.pop("seed", 0)
    graphdef, state = nnx.split(model)
    settings = decode.resolve_settings(model, **kw)
    args = (
        state,
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(mask, jnp.int32),
        decode.prompt_keys(seed, np.arange(len(ids))),
    )
    fast = decode.compiled_search(graphdef, settings)  # the program `generate` uses
    slot = decode.compiled_search(graphdef, settings, None, False)
    return [jax.tree.map(np.asarray, fn(*args)) for fn in (fast, slot)]


def test_greedy_equals_brute_force_argmax_loop(toy):
    """Greedy through both caches == re-running the uncached model on the growing sequence."""
    seqs, mask = IDS.copy(), MASK.copy()
    for _ in range(6):
        logits = np.asarray(toy(jnp.asarray(seqs), jnp.asarray(mask)))
        seqs = np.concatenate([seqs, logits[:, -1].argmax(-1)[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((2, 1), int)], axis=1)
    for out in both_paths(toy, IDS, MASK, max_new_tokens=6):
        np.testing.assert_array_equal(out.tokens, seqs[:, 4:])
    np.testing.assert_array_equal(decode.generate(toy, IDS, MASK, max_new_tokens=6), seqs)


def test_exhaustive_beam_search_equals_brute_force_ranking(toy):
    """With K = V^(L-1) beams nothing is pruned: both caches must return the K most likely of
    all V^L continuations, best first, with their summed log-probs (length_penalty=0,
    early_stopping="never"), each computed here by an uncached forward of the whole sequence.
    This checks the ancestry table: every beam is reordered at every step."""
    v, big_l = toy.config.vocab_size, 3
    k = v ** (big_l - 1)
    kw = dict(
        max_new_tokens=big_l,
        num_beams=k,
        length_penalty=0.0,
        early_stopping="never",
        num_return_sequences=k,
    )
    fast, slot = both_paths(toy, IDS, MASK, **kw)
    conts = np.array(list(itertools.product(range(v), repeat=big_l)))  # [V^L, L]
    for b in range(len(IDS)):
        seqs = np.concatenate([np.repeat(IDS[b : b + 1], len(conts), 0), conts], axis=1)
        mask = np.concatenate([np.repeat(MASK[b : b + 1], len(conts), 0), conts * 0 + 1], axis=1)
        scores = log_probs(toy, seqs, mask, IDS.shape[1])
        best = np.argsort(-scores, kind="stable")[:k]
        assert np.min(-np.diff(np.sort(scores)[::-1][: k + 1])) > 1e-4  # no near ties
        rows = slice(b * k, (b + 1) * k)
        for out in (fast, slot):
            np.testing.assert_array_equal(out.tokens[rows], conts[best])
            np.testing.assert_allclose(out.scores[rows], scores[best], rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "kw",
    [
        dict(max_new_tokens=7, num_beams=3, repetition_penalty=1.5, num_return_sequences=2),
        dict(max_new_tokens=7, do_sample=True, num_return_sequences=3, seed=5),
    ],
    ids=["beam", "sample_3_per_prompt"],
)
def test_prompt_sharing_cache_equals_slot_cache(toy, kw):
    """Pruned beam search and sampling with n rows per prompt (rows never reordered): the two
    caches give the same tokens (float rounding differs, far below the toy's score gaps)."""
    fast, slot = both_paths(toy, IDS, MASK, **kw)
    np.testing.assert_array_equal(fast.tokens, slot.tokens)
    np.testing.assert_array_equal(fast.lengths, slot.lengths)
    np.testing.assert_allclose(fast.scores, slot.scores, rtol=1e-5, atol=1e-5)


def test_prompt_sharing_cache_rejects_misuse(toy):
    prompt = toy.init_cache(2, 4)
    mask = jnp.asarray(MASK)
    cache = PromptSharingCache.from_prompt(prompt, mask, 3, 5, reorders=False)
    assert cache.gen_k.shape == (2, 6, 5, 2, 4) and cache.src is None
    with pytest.raises(ValueError, match="attention_mask=None"):
        cache.prepare((6, 1), jnp.ones((6, 9), jnp.int32))
    with pytest.raises(ValueError, match="one token"):
        cache.prepare((6, 2), None)
    with pytest.raises(ValueError, match="reorders=False"):
        cache.reorder(jnp.arange(6))
    with pytest.raises(ValueError, match="layer 2"):
        cache.attend(2, *[jnp.zeros((6, 1, 2, 4))] * 3, jnp.int32(0), None)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        PromptSharingCache.from_prompt(prompt, mask[:, :3], 3, 5)

"""Decoding algorithms against toy models with known answers (STYLE 8): no torch needed.

The toy is a bigram model: the next-token logits are a fixed table row picked by the last token,
so the log-probability of any continuation is a sum of table entries that NumPy can enumerate.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from collapse_jax.lm import decode, families, opt, processors, search
from collapse_jax.lm.settings import DecodeSettings


class ToyCache(NamedTuple):
    tokens: jax.Array  # [R, S] tokens written so far
    index: jax.Array

    def reorder(self, rows):
        return ToyCache(self.tokens[rows], self.index)


def toy(table: np.ndarray):
    """(step_fn, init_cache) of the bigram model `logits = table[last token]`, or with a 3-D table
    the position-dependent `logits = table[slot of the last token, last token]`."""
    table = jnp.asarray(table, jnp.float32)

    def step_fn(tokens, mask, cache):
        buf = jax.lax.dynamic_update_slice_in_dim(cache.tokens, tokens, cache.index, axis=1)
        index = cache.index + tokens.shape[1]
        rows = table[index - 1] if table.ndim == 3 else table
        return rows[tokens[:, -1]], ToyCache(buf, index)

    def init_cache(rows, length):
        return ToyCache(jnp.zeros((rows, length), jnp.int32), jnp.int32(0))

    return step_fn, init_cache


def run(table, ids, settings, mask=None, keys=None, jit=True):
    step_fn, init_cache = toy(table)
    ids = jnp.asarray(ids, jnp.int32)
    mask = jnp.ones_like(ids) if mask is None else jnp.asarray(mask, jnp.int32)
    if settings.do_sample and keys is None:
        keys = decode.prompt_keys(0, np.arange(ids.shape[0]))
    fn = lambda i, m, k: search.search(step_fn, init_cache, i, m, settings, row_keys=k)
    out = (jax.jit(fn) if jit else fn)(ids, mask, keys)
    return jax.tree.map(np.asarray, out)


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return (
        x
        - x.max(-1, keepdims=True)
        - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1))[..., None]
    )


def test_exhaustive_beam_search_ranks_every_sequence():
    """With K = V^(L-1) beams nothing is pruned: the K returned sequences must be the K most
    likely continuations in order, with their exact summed log-probabilities (length_penalty=0,
    early_stopping="never" is the canonical beam search). The toy's table depends on the position
    so that no two sequences tie (a bigram model gives permuted transitions equal scores)."""
    v, big_l = 5, 3
    k = v ** (big_l - 1)
    table = np.random.default_rng(0).normal(size=(big_l + 1, v, v)) * 2.0
    s = DecodeSettings(
        max_new_tokens=big_l,
        num_beams=k,
        length_penalty=0.0,
        early_stopping="never",
        num_return_sequences=k,
    )
    out = run(table, [[3]], s)
    lp = log_softmax(table)  # [slot, last token, next token]
    brute = sorted(
        (
            (sum(lp[j, a, b] for j, (a, b) in enumerate(zip((3,) + seq, seq, strict=False))), seq)
            for seq in itertools.product(range(v), repeat=big_l)
        ),
        reverse=True,
    )[:k]
    assert [tuple(r) for r in out.tokens] == [seq for _, seq in brute]
    np.testing.assert_allclose(out.scores, [sc for sc, _ in brute], rtol=0, atol=1e-5)
    assert np.all(np.diff(out.scores) <= 0)  # sorted best first
    assert np.all(out.lengths == big_l)


def test_beam_search_beats_greedy_trap():
    """Greedy takes the locally best token 1 and is then stuck with a flat row; two beams find
    the path through token 2, whose continuation is almost certain (Flax's sampler-test idea)."""
    v = 6
    table = np.zeros((v, v))
    table[0] = [-9, 1.0, 0.6, -9, -9, -9]  # from the prompt: 1 slightly better than 2
    table[1] = 0.0  # uniform afterwards: log(1/6) per step
    table[2] = [-9, -9, -9, 9.0, -9, -9]  # 2 -> 3 almost surely
    table[3] = [-9, -9, -9, 9.0, -9, -9]
    table[4] = table[5] = 0.0
    greedy = run(table, [[0]], DecodeSettings(max_new_tokens=3))
    beam = run(table, [[0]], DecodeSettings(max_new_tokens=3, num_beams=2))
    assert greedy.tokens[0, 0] == 1
    np.testing.assert_array_equal(beam.tokens[0], [2, 3, 3])
    lp = log_softmax(table)
    np.testing.assert_allclose(beam.scores[0], (lp[0, 2] + lp[2, 3] + lp[3, 3]) / 3, atol=1e-6)


def test_greedy_eos_padding_and_early_stop():
    """Rows stop at EOS, are padded afterwards, and the loop ends when every row has stopped."""
    v, eos, pad = 7, 2, 1
    table = np.full((v, v), -5.0)
    table[4, 5] = table[5, 6] = table[6, eos] = 5.0  # 4 -> 5 -> 6 -> EOS
    table[3, eos] = 5.0  # 3 -> EOS
    table[eos, 4] = 5.0  # never used: finished rows are forced to pad
    s = DecodeSettings(max_new_tokens=8, eos_token_ids=(eos,), pad_token_id=pad)
    out = run(table, [[0, 4], [0, 3]], s)
    np.testing.assert_array_equal(out.lengths, [3, 1])
    np.testing.assert_array_equal(out.tokens[0, :4], [5, 6, eos, pad])
    np.testing.assert_array_equal(out.tokens[1, :4], [eos, pad, pad, pad])
    assert np.all(out.tokens[:, 3:] == pad)
    full = decode.assemble(np.array([[0, 4], [0, 3]]), out, s)  # cropped to the longest
    np.testing.assert_array_equal(full, [[0, 4, 5, 6, eos], [0, 3, eos, pad, pad]])


def test_min_new_tokens_masks_eos():
    v, eos = 6, 2
    table = np.zeros((v, v))
    table[:, eos] = 10.0  # EOS is always the argmax
    table[:, 4] = 5.0
    for beams in (1, 3):
        s = DecodeSettings(
            max_new_tokens=6,
            min_new_tokens=3,
            eos_token_ids=(eos,),
            pad_token_id=1,
            num_beams=beams,
        )
        out = run(table, [[0]], s)
        np.testing.assert_array_equal(out.tokens[0, :4], [4, 4, 4, eos])
        assert out.lengths[0] == 4


def test_repetition_penalty_constructed_example():
    """Token 4 (logit 2) beats 5 (logit 1) unless 4 is in the prompt: 2 / 3 < 1. Negative
    logits are multiplied: -1 * 3 < -2.5. Left padding is not counted, BOS and prompt are."""
    v = 8
    pos = np.full((v, v), -9.0)
    pos[:, 4], pos[:, 5] = 2.0, 1.0
    neg = np.full((v, v), -9.0)
    neg[:, 4], neg[:, 5] = -1.0, -2.5
    s = DecodeSettings(max_new_tokens=1, repetition_penalty=3.0)
    ids = [[4, 4, 7, 6], [3, 3, 4, 6], [3, 3, 2, 6]]
    mask = [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]]
    for table in (pos, neg):
        out = run(table, ids, s, mask=mask)
        # row 0: the 4s are left padding -> not penalised; row 1: 4 is in the prompt.
        np.testing.assert_array_equal(out.tokens[:, 0], [4, 5, 4])
    np.testing.assert_array_equal(
        processors.prompt_seen(jnp.asarray(ids), jnp.asarray(mask), v),
        [[0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 0, 1, 0], [0, 0, 1, 0, 0, 0, 1, 0]],
    )
    scores = jnp.asarray([[2.0, -1.0, 0.5]])
    seen = jnp.asarray([[True, True, False]])
    np.testing.assert_array_equal(
        processors.repetition_penalty(scores, seen, 3.0), np.float32([[2.0 / 3.0, -3.0, 0.5]])
    )


def test_generated_tokens_are_penalised_too():
    """With a strong penalty greedy cannot repeat its own output on a table that loves token 4."""
    v = 6
    table = np.tile(np.array([0.0, 0.1, 0.2, 0.3, 3.0, 0.4]), (v, 1))
    plain = run(table, [[0]], DecodeSettings(max_new_tokens=3))
    penal = run(table, [[0]], DecodeSettings(max_new_tokens=3, repetition_penalty=100.0))
    np.testing.assert_array_equal(plain.tokens[0], [4, 4, 4])
    np.testing.assert_array_equal(penal.tokens[0], [4, 5, 3])


@pytest.mark.parametrize("beams", [1, 3])
def test_jit_and_eager_agree(beams):
    table = np.random.default_rng(1).normal(size=(9, 9)) * 3
    s = DecodeSettings(
        max_new_tokens=4,
        num_beams=beams,
        eos_token_ids=(2,),
        pad_token_id=1,
        repetition_penalty=1.7,
    )
    ids, mask = [[0, 5, 6], [7, 8, 3]], [[0, 1, 1], [1, 1, 1]]
    a = run(table, ids, s, mask=mask)
    with jax.disable_jit():
        b = run(table, ids, s, mask=mask, jit=False)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def _probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Independent NumPy statement of HF's warpers, in float64."""
    x = np.asarray(logits, np.float64) / temperature
    keep = np.ones_like(x, bool)
    if top_k:
        keep &= x >= np.sort(x)[-top_k]
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(p)  # ascending; drop the small tokens while their mass <= 1 - top_p
        cum = np.cumsum(p[order])
        drop = np.zeros_like(keep)
        drop[order] = cum <= 1 - top_p
        drop[order[-1]] = False
        p = np.where(drop, 0.0, p)
        p /= p.sum()
    return p


@pytest.mark.parametrize(
    "warp",
    [{}, {"temperature": 0.6, "top_k": 4}, {"top_p": 0.7}, {"temperature": 1.7, "top_p": 0.9}],
)
def test_sampling_matches_softmax_chi_square(warp):
    """Draws of the first new token follow softmax(warped logits): chi-square test on 20000
    independent rows (one prompt, num_return_sequences rows). The test fails with probability
    1e-5 when the implementation is right (p-value threshold); tokens the warpers remove must
    never be drawn."""
    v = 7
    logits = np.array([1.0, -0.5, 0.3, 2.0, 0.0, -1.2, 0.8])
    table = np.tile(logits, (v, 1))
    n = 20000
    s = DecodeSettings(
        max_new_tokens=1, do_sample=True, num_return_sequences=n, **{"top_k": 0, **warp}
    )
    out = run(table, [[0]], s)
    counts = np.bincount(out.tokens[:, 0], minlength=v)
    p = _probs(logits, **warp)
    assert np.all(counts[p == 0] == 0)
    support = p > 0
    stat = scipy.stats.chisquare(counts[support], n * p[support])
    assert stat.pvalue > 1e-5, (counts, n * p)


def test_sampling_is_batch_independent():
    """A prompt's draws depend on its key only, not on the batch it is decoded in (this is what
    makes sharded and resumed regenerations identical)."""
    table = np.random.default_rng(2).normal(size=(9, 9))
    s = DecodeSettings(max_new_tokens=5, do_sample=True, top_k=0)
    keys = decode.prompt_keys(3, np.arange(10, 13))
    batch = run(table, [[1, 2], [3, 4], [5, 6]], s, keys=keys)
    single = run(table, [[3, 4]], s, keys=keys[1:2])
    np.testing.assert_array_equal(batch.tokens[1], single.tokens[0])
    assert not np.array_equal(batch.tokens[0], batch.tokens[2])


def test_beam_sampling_runs_and_ranks():
    table = np.random.default_rng(3).normal(size=(9, 9))
    s = DecodeSettings(
        max_new_tokens=5,
        num_beams=3,
        do_sample=True,
        num_return_sequences=3,
        eos_token_ids=(2,),
        pad_token_id=1,
        top_k=0,
    )
    out = run(table, [[1, 2], [3, 4]], s)
    scores = out.scores.reshape(2, 3)
    assert np.all(np.diff(scores, axis=1) <= 0)
    assert np.all(np.isfinite(scores))


def tiny_opt(vocab=29, **kw):
    cfg = opt.OPTConfig(
        vocab_size=vocab,
        hidden_size=16,
        num_hidden_layers=2,
        ffn_dim=24,
        num_attention_heads=2,
        max_position_embeddings=40,
        dropout=0.0,
        init_std=0.5,
        **kw,
    )
    return families.init_random(cfg, jax.random.key(0))


@pytest.mark.slow  # compiles the decoder for many shapes: CI's full run (-m '')
def test_generate_compiles_once_per_shape_and_settings():
    from flax import nnx

    model = tiny_opt()
    ids = np.random.default_rng(0).integers(3, 29, size=(3, 5))
    kw = dict(max_new_tokens=4, num_beams=2, repetition_penalty=2.0)
    a = decode.generate(model, ids, **kw)
    b = decode.generate(model, ids, **kw)
    np.testing.assert_array_equal(a, b)
    graphdef, _ = nnx.split(model)
    fn = decode.compiled_search(graphdef, decode.resolve_settings(model, **kw))
    assert fn._cache_size() == 1
    decode.generate(model, ids[:2], **kw)
    assert fn._cache_size() == 2
    assert a.shape == (3, 9) and a.dtype == np.int64
    np.testing.assert_array_equal(a[:, :5], ids)


def test_generate_rejects_bad_input():
    model = tiny_opt()
    ids = np.full((2, 4), 5)
    with pytest.raises(ValueError, match="num_return_sequences"):
        decode.generate(model, ids, max_new_tokens=2, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="num_return_sequences"):
        decode.generate(model, ids, max_new_tokens=2, num_return_sequences=2)
    with pytest.raises(ValueError, match="early_stopping"):
        decode.generate(model, ids, max_new_tokens=2, num_beams=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="attention_mask"):
        decode.generate(model, ids, np.ones((2, 3)), max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids must lie"):
        decode.generate(model, ids + 100, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decode.generate(model, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="input_ids must be"):
        decode.generate(model, ids[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        decode.generate(model, ids, max_new_tokens=2, do_sample=True, top_p=1.5)


@pytest.mark.parametrize(
    "kw",
    [
        dict(
            num_beams=3,
            max_new_tokens=6,
            repetition_penalty=2.0,
            eos_token_id=[2, 5],
            num_return_sequences=2,
        ),
        dict(max_new_tokens=6, do_sample=True, num_return_sequences=2, seed=1),
    ],
    ids=["beam_post_ln", "sample"],
)
def test_opt_fast_decoder_equals_slot_cache_path(kw):
    """`PromptSharingDecoder` (split prompt/generated cache, ancestry table) gives the same tokens
    as decoding through the model's own slot cache with a reordering gather, with left padding; the
    beam case uses a post-LayerNorm OPT (pre-LN is covered by the transformers parity tests)."""
    from flax import nnx

    for model in [tiny_opt(do_layer_norm_before=not kw.get("num_beams"))]:
        ids = np.random.default_rng(4).integers(3, 29, size=(3, 7))
        mask = np.ones_like(ids)
        mask[0, :3] = mask[2, :5] = 0
        settings = decode.resolve_settings(model, **{k: v for k, v in kw.items() if k != "seed"})
        graphdef, state = nnx.split(model)
        args = (
            state,
            jnp.asarray(ids, jnp.int32),
            jnp.asarray(mask, jnp.int32),
            decode.prompt_keys(kw.get("seed", 0), np.arange(3)),
        )
        fast = decode.compiled_search(graphdef, settings, None, True)(*args)
        slot = decode.compiled_search(graphdef, settings, None, False)(*args)
        np.testing.assert_array_equal(fast.tokens, slot.tokens)
        np.testing.assert_array_equal(fast.lengths, slot.lengths)
        # The two attention arithmetics round differently (~1 ulp per step): scores agree to
        # float32 precision, not bit for bit.
        np.testing.assert_allclose(fast.scores, slot.scores, rtol=1e-5, atol=1e-6)

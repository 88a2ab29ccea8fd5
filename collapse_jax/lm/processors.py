"""Logits processors with transformers' semantics, applied in transformers' order.

The spec is `transformers.generation.logits_process` (v5): `RepetitionPenaltyLogitsProcessor`,
`MinNewTokensLengthLogitsProcessor`, `TemperatureLogitsWarper`, `TopKLogitsWarper`,
`TopPLogitsWarper`, as `GenerationMixin._get_logits_processor` orders them. Every function works
on next-token scores [R, V] (R rows, V vocabulary) and is traceable; the search loops
(`collapse_jax.lm.search`) call `process_scores` once per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from collapse_jax.lm.settings import DecodeSettings

Array = jax.Array


def prompt_seen(input_ids: Array, attention_mask: Array, vocab_size: int) -> Array:
    """Tokens the repetition penalty acts on from the first step: [B, P] -> bool [B, V].

    transformers (v5) ignores the leading padding of each row: every token from the first position
    whose mask is non-zero onwards counts, BOS included (`prompt_ignore_length` = argmax(mask)).
    """
    b, p = input_ids.shape
    first = jnp.argmax(attention_mask != 0, axis=1)  # [B]
    counted = jnp.arange(p)[None, :] >= first[:, None]  # [B, P]
    ids = jnp.where(counted, input_ids, vocab_size)  # out-of-range ids are dropped by the scatter
    seen = jnp.zeros((b, vocab_size), dtype=bool)
    return seen.at[jnp.arange(b)[:, None], ids].set(True, mode="drop")


def true_divide(x: Array, d: float | Array) -> Array:
    """x / d with IEEE division per element, as torch computes `tensor / scalar`.

    XLA rewrites a division by a broadcast scalar into a multiplication by its reciprocal, which
    differs from the quotient in the last bit for about 20% of inputs (e.g. d = 2.5 or 3): the
    barrier hides the broadcast, so the compiled division is the correctly rounded one.
    """
    d = jnp.broadcast_to(jnp.asarray(d, x.dtype), x.shape)
    return x / jax.lax.optimization_barrier(d)


def repetition_penalty(scores: Array, seen: Array, penalty: float) -> Array:
    """CTRL's repetition penalty (HF `RepetitionPenaltyLogitsProcessor`): [R, V] -> [R, V].

    Seen tokens' scores are divided by `penalty` when positive and multiplied when negative.
    """
    penalised = jnp.where(scores < 0, scores * penalty, true_divide(scores, penalty))
    return jnp.where(seen, penalised, scores)


def top_k_filter(scores: Array, top_k: int, min_tokens_to_keep: int = 1) -> Array:
    """HF `TopKLogitsWarper`: -inf below the k-th largest score (ties with it are kept)."""
    k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    kth = jax.lax.top_k(scores, k)[0][..., -1:]  # [R, 1]
    return jnp.where(scores < kth, -jnp.inf, scores)


def top_p_filter(scores: Array, top_p: float, min_tokens_to_keep: int = 1) -> Array:
    """HF `TopPLogitsWarper` (nucleus): -inf outside the smallest set of mass >= top_p.

    As in transformers, tokens are sorted ascending and removed while the cumulative probability
    is <= 1 - top_p; the `min_tokens_to_keep` most likely tokens always stay.
    """
    v = scores.shape[-1]
    order = jnp.argsort(scores, axis=-1)  # ascending
    sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
    remove_sorted = (cum <= 1 - top_p) & (jnp.arange(v) < v - min_tokens_to_keep)[None, :]
    rows = jnp.arange(scores.shape[0])[:, None]
    remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
    return jnp.where(remove, -jnp.inf, scores)


def process_scores(scores: Array, seen: Array, new_len: Array, s: DecodeSettings) -> Array:
    """Applies transformers' processor list for `s` to next-token scores [R, V] (fp32).

    Order as `_get_logits_processor`: repetition penalty, min-new-tokens (EOS -> -inf while fewer
    than `min_new_tokens` tokens were generated), then, when sampling, temperature, top-k, top-p.

    Args:
      scores: [R, V] logits (greedy/sampling) or log-softmax scores (beam search).
      seen: [R, V] bool, tokens already in each row's sequence (see `prompt_seen`).
      new_len: int32 scalar, tokens generated so far.
      s: the settings.
    """
    if s.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, seen, s.repetition_penalty)
    if s.min_new_tokens > 0 and s.eos_token_ids:
        eos = eos_mask(scores.shape[-1], s.eos_token_ids)
        scores = jnp.where(eos[None, :] & (new_len < s.min_new_tokens), -jnp.inf, scores)
    if s.do_sample:
        if s.temperature != 1.0:
            scores = true_divide(scores, s.temperature)
        if s.top_k != 0:
            scores = top_k_filter(scores, s.top_k, s.min_tokens_to_keep)
        if s.top_p < 1.0:
            scores = top_p_filter(scores, s.top_p, s.min_tokens_to_keep)
    return scores


def eos_mask(vocab_size: int, eos_token_ids: tuple[int, ...]) -> Array:
    """bool [V], True at the EOS ids."""
    return (
        jnp.zeros((vocab_size,), dtype=bool).at[jnp.asarray(eos_token_ids)].set(True, mode="drop")
    )


def is_eos(tokens: Array, eos_token_ids: tuple[int, ...]) -> Array:
    """bool, same shape as `tokens`: the token is one of the EOS ids."""
    hit = jnp.zeros(tokens.shape, dtype=bool)
    for e in eos_token_ids:
        hit = hit | (tokens == e)
    return hit


def mark_seen(seen: Array, tokens: Array) -> Array:
    """seen [R, V] with tokens [R] set."""
    return seen.at[jnp.arange(seen.shape[0]), tokens].set(True)


__all__ = [
    "eos_mask",
    "is_eos",
    "mark_seen",
    "process_scores",
    "prompt_seen",
    "repetition_penalty",
    "top_k_filter",
    "top_p_filter",
    "true_divide",
]

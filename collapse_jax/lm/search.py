"""Batched greedy decoding, sampling and beam search as single `lax.while_loop`s, model-agnostic.

The spec is transformers' `GenerationMixin.generate` (v5: `_sample`, `_beam_search` in
`generation/utils.py`); this is a reimplementation in JAX, not a port of its code.

The loops talk to the model through a *decoder* object with three methods, so they know nothing of
any architecture (tests inject toy models, STYLE 8):

  prefill(input_ids [B, P], mask [B, P], n, L) -> (logits [B*n, V] fp32, state)
      runs the prompts once (not once per beam, as transformers does) and expands to n rows per
      prompt, row b*n+j continuing prompt b;
  step(state, tokens [R], i) -> (logits [R, V] fp32, state)     feeds new token i of every row;
  reorder(state, rows [R]) -> state                              row r continues row rows[r].

Two decoders drive a model's own forward `step_fn(tokens [R, T], mask, cache) -> (logits [R, V]
at the last position, cache)`:

- `SlotCacheDecoder`: any cache with one slot per position, e.g. the toy caches of the tests or
  `lm.cache.KVCache`; it carries the [R, P + L] validity mask and gathers the whole cache when
  beams are reordered.
- `PromptSharingDecoder`: models whose attention follows the cache protocol of
  `collapse_jax.lm.cache` (every causal LM of this package): the prompt is prefilled into the
  model's `KVCache` and handed to a `PromptSharingCache` (prompt keys stored once per prompt,
  generated keys never moved, beams followed through an ancestry table), faster than the
  gather on CPU (benchmarks/bench_decode.py --old: benchmarks/results/decode_old_vs_new-cpu.json).

Caches are preallocated, beams are flattened into the batch (row = b * K + k), nothing returns to
the host before the end, and the repetition penalty keeps a per-row "seen" bitmap [R, V].

Shape legend: B prompts, K beams, R rows fed to the model (B * K for beam search, B * n for
`num_return_sequences = n` sampling), P prompt length, L `max_new_tokens`, S cache length (P + L),
V vocabulary, C beam candidates per prompt (2 K with one EOS id).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from collapse_jax.lm.cache import KVCache, PromptSharingCache
from collapse_jax.lm.processors import is_eos, mark_seen, process_scores, prompt_seen, true_divide
from collapse_jax.lm.settings import DecodeSettings

Array = jax.Array
Cache = Any
StepFn = Callable[[Array, Array | None, Cache], tuple[Array, Cache]]
ReorderFn = Callable[[Cache, Array], Cache]
InitCacheFn = Callable[[int, int], Cache]

# transformers marks impossible beams by adding -1e9 to their scores (not -inf): we do the same so
# that score ties and sums come out bit-identical.
_NEG = -1.0e9


class SearchOutput(NamedTuple):
    """Result of `search`, new tokens only (the prompt is not repeated).

    Attributes:
      tokens: [B * n, L] int32 new tokens, `settings.fill_token_id` after a sequence's end.
      lengths: [B * n] int32 number of generated tokens of each sequence (EOS included).
      scores: [B * n] float32 beam scores (length-penalised sum of processed log-probs) for beam
        search; zeros otherwise.
    """

    tokens: Array
    lengths: Array
    scores: Array


def _row_noise(row_keys: Array, step: Array, shape: tuple[int, ...]) -> Array:
    """Gumbel noise [rows, *shape] from per-row keys folded with the step (batch-independent)."""
    return jax.vmap(lambda k: jax.random.gumbel(jax.random.fold_in(k, step), shape))(row_keys)


# --------------------------------------------------------------------------------------------
# Decoders: how the loops feed a model
# --------------------------------------------------------------------------------------------


def _prefill(step_fn: StepFn, cache: Cache, input_ids: Array, mask: Array) -> tuple[Array, Cache]:
    """Writes the P prompt tokens into `cache` (mask: whatever `step_fn` takes with this cache);
    returns the next-token logits [B, V] fp32 and the cache."""
    p = input_ids.shape[1]
    if p > 1:
        # Only the last prompt position's logits are used: feeding it separately leaves the other
        # positions' logits (the LM head, [B, P-1, V]) dead, and XLA removes them.
        _, cache = step_fn(input_ids[:, : p - 1], mask, cache)
    logits, cache = step_fn(input_ids[:, p - 1 :], mask, cache)
    return logits.astype(jnp.float32), cache


class SlotCacheDecoder:
    """The generic model interface of the search loops: a cache with one slot per position.

    Wraps `step_fn(tokens [R, T], mask [R, S], cache) -> (logits [R, V], cache)` (writes the T
    tokens at the cache's next T slots; `mask` covers all S slots, 1 = valid token, 0 = padding or
    not yet written), `init_cache(rows, S)` and `reorder_fn(cache, rows [R']) -> cache`. The
    loop state is `(cache, mask [R, S])`.
    """

    def __init__(
        self, step_fn: StepFn, init_cache: InitCacheFn, reorder_fn: ReorderFn | None = None
    ):
        self.step_fn = step_fn
        self.init_cache = init_cache
        self.reorder_fn = reorder_fn or (lambda cache, rows: cache.reorder(rows))

    def prefill(self, input_ids: Array, attention_mask: Array, n: int, max_new_tokens: int):
        """Runs the prompts once, expands to n rows per prompt (rows b*n+j <- prompt b).

        Returns (logits [B*n, V] fp32 of the next token, state).
        """
        b, p = input_ids.shape
        self._prompt_len = p  # static: new token i goes to slot P + i
        length = p + max_new_tokens
        mask = jnp.zeros((b, length), jnp.int32).at[:, :p].set(attention_mask.astype(jnp.int32))
        logits, cache = _prefill(self.step_fn, self.init_cache(b, length), input_ids, mask)
        if n > 1:
            rows = jnp.repeat(jnp.arange(b), n)
            cache = self.reorder_fn(cache, rows)
            logits, mask = logits[rows], mask[rows]
        return logits, (cache, mask)

    def step(self, state, tokens: Array, i: Array):
        """Feeds new token i of every row (tokens [R]) into slot P + i.

        Returns (logits [R, V] fp32, state).
        """
        cache, mask = state
        slot = self._prompt_len + i
        mask = jax.lax.dynamic_update_slice_in_dim(
            mask, jnp.ones((mask.shape[0], 1), mask.dtype), slot, axis=1
        )
        logits, cache = self.step_fn(tokens[:, None], mask, cache)
        return logits.astype(jnp.float32), (cache, mask)

    def reorder(self, state, rows: Array):
        """Row r of the result continues row rows[r] (a beam of the same prompt)."""
        cache, mask = state
        return self.reorder_fn(cache, rows), mask


class PromptSharingDecoder:
    """Decodes a model whose attention follows `collapse_jax.lm.cache`'s protocol.

    The prompts run once through the model's own slot cache (`init_cache(B, P)`, a `KVCache`),
    which then becomes a `PromptSharingCache` for the n rows of every prompt; each step calls
    the same forward with that cache (`step_fn(tokens [R, 1], None, cache)`), whose attention
    reads the prompt's keys once per prompt and each beam's generated keys through the ancestry
    table. The decoder state is the cache itself.
    """

    def __init__(self, step_fn: StepFn, init_cache: InitCacheFn, *, reorders: bool = True):
        """`reorders=False` (greedy/sampling: rows never change places) attends row-locally;
        with beams the ancestry one-hot costs n^2 per prompt, fine for beam counts."""
        self.step_fn = step_fn
        self.init_cache = init_cache
        self.reorders = reorders

    def prefill(self, input_ids: Array, attention_mask: Array, n: int, max_new_tokens: int):
        b, p = input_ids.shape
        mask = attention_mask.astype(jnp.int32)
        cache = self.init_cache(b, p)
        if not isinstance(cache, KVCache):
            raise TypeError(
                f"PromptSharingDecoder needs a model whose init_cache gives a KVCache, got "
                f"{type(cache).__name__}"
            )
        logits, cache = _prefill(self.step_fn, cache, input_ids, mask)
        cache = PromptSharingCache.from_prompt(
            cache, mask, n, max_new_tokens, reorders=self.reorders
        )
        return logits[jnp.repeat(jnp.arange(b), n)], cache

    def step(self, cache: PromptSharingCache, tokens: Array, i: Array):
        del i  # the cache counts its steps
        logits, cache = self.step_fn(tokens[:, None], None, cache)
        return logits.astype(jnp.float32), cache

    def reorder(self, cache: PromptSharingCache, rows: Array) -> PromptSharingCache:
        return cache.reorder(rows)


# --------------------------------------------------------------------------------------------
# The search loops
# --------------------------------------------------------------------------------------------


def search(
    step_fn: StepFn,
    init_cache: InitCacheFn,
    input_ids: Array,
    attention_mask: Array,
    settings: DecodeSettings,
    *,
    reorder_fn: ReorderFn | None = None,
    row_keys: Array | None = None,
) -> SearchOutput:
    """Decodes `max_new_tokens` after each prompt: greedy, sampling or beam search (traceable).

    Args:
      step_fn: `(tokens [R, T], mask [R, S], cache) -> (logits [R, V] fp32 at the last of the T
        positions, cache)`; writes the T tokens at the cache's next T slots. `mask` covers all S
        slots (1 = valid token, 0 = padding or not yet written).
      init_cache: `(rows, S) -> cache`, an empty cache.
      input_ids: [B, P] int32 left-padded prompts.
      attention_mask: [B, P] int32 (1 = token, 0 = padding).
      settings: the decoding settings.
      reorder_fn: `(cache, rows [R']) -> cache` gathering cache rows (default `cache.reorder`);
        also used to expand the prompt cache [B] to [B * K].
      row_keys: [B] typed PRNG keys, one per prompt (sampling only): draws depend only on the
        prompt's key and the step, not on the batch it is decoded in.

    Returns:
      A `SearchOutput` with rows ordered prompt-major (prompt b's sequences are rows b*n..b*n+n-1).
    """
    decoder = SlotCacheDecoder(step_fn, init_cache, reorder_fn)
    return search_with(decoder, input_ids, attention_mask, settings, row_keys=row_keys)


def search_with(
    decoder: Any,
    input_ids: Array,
    attention_mask: Array,
    settings: DecodeSettings,
    *,
    row_keys: Array | None = None,
) -> SearchOutput:
    """`search` with any decoder object offering `prefill`, `step` and `reorder` (see the module
    docstring), e.g. `SlotCacheDecoder` or `PromptSharingDecoder`."""
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids must be [B, P] and attention_mask the same shape, got "
            f"{input_ids.shape} and {attention_mask.shape}"
        )
    if settings.do_sample and row_keys is None:
        raise ValueError("sampling needs row_keys")
    if settings.num_beams > 1:
        return _beam_search(decoder, input_ids, attention_mask, settings, row_keys)
    return _greedy_or_sample(decoder, input_ids, attention_mask, settings, row_keys)


def _greedy_or_sample(decoder, input_ids, attention_mask, s, row_keys):
    b, p = input_ids.shape
    n, big_l = s.rows_per_prompt, s.max_new_tokens
    r = b * n
    logits, dstate = decoder.prefill(input_ids, attention_mask, n, big_l)
    v = logits.shape[-1]
    prompt_rows = jnp.repeat(jnp.arange(b), n)
    seen = prompt_seen(input_ids, attention_mask, v)[prompt_rows]  # [R, V]
    keys = None
    if s.do_sample:
        # Row b*n+j draws from fold_in(key_b, j): independent across returned sequences.
        keys = jax.vmap(jax.random.fold_in)(row_keys[prompt_rows], jnp.tile(jnp.arange(n), b))
    fill = s.fill_token_id
    has_eos = bool(s.eos_token_ids)

    def body(state):
        i, logits, dstate, seen, tokens, alive, lengths, _ = state
        scores = process_scores(logits, seen, i, s)
        if s.do_sample:
            # Gumbel-max = a draw from softmax(scores); -inf scores are never drawn.
            tok = jnp.argmax(scores + _row_noise(keys, i, (v,)), axis=-1).astype(jnp.int32)
        else:
            tok = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        if has_eos:  # finished rows emit padding, as HF
            tok = jnp.where(alive, tok, fill)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], i, axis=1)
        lengths = jnp.where(alive, i + 1, lengths)
        seen = mark_seen(seen, tok)
        if has_eos:
            alive = alive & ~is_eos(tok, s.eos_token_ids)
        go = (i + 1 < big_l) & jnp.any(alive)
        # Feeding unconditionally (even after the last token, into the spare slot P + L - 1)
        # beats a lax.cond: a conditional forces copies of the whole cache every step.
        logits, dstate = decoder.step(dstate, tok, i)
        return i + 1, logits, dstate, seen, tokens, alive, lengths, go

    state = (
        jnp.int32(0),
        logits,
        dstate,
        seen,
        jnp.full((r, big_l), fill, jnp.int32),
        jnp.ones((r,), bool),
        jnp.zeros((r,), jnp.int32),
        jnp.bool_(True),
    )
    state = jax.lax.while_loop(lambda st: st[-1], body, state)
    tokens, lengths = state[4], state[6]
    return SearchOutput(tokens, lengths, jnp.zeros((r,), jnp.float32))


def _beam_search(decoder, input_ids, attention_mask, s, row_keys):
    b, p = input_ids.shape
    k, big_l = s.num_beams, s.max_new_tokens
    r = b * k
    c = max(2, 1 + len(s.eos_token_ids)) * k  # candidates kept per prompt (HF beams_to_keep)
    logits, dstate = decoder.prefill(input_ids, attention_mask, k, big_l)
    v = logits.shape[-1]
    seen = prompt_seen(input_ids, attention_mask, v)[jnp.repeat(jnp.arange(b), k)]  # [R, V]
    fill = s.fill_token_id
    # HF divides by the generated length ** length_penalty computed in Python (double) and then
    # rounded to fp32: tabulate those constants so the divisions are bit-identical.
    denom = jnp.asarray([float(j) ** s.length_penalty for j in range(1, big_l + 1)], jnp.float32)
    denom_max = jnp.float32(float(big_l) ** s.length_penalty)
    es_true = s.early_stopping is True
    top_mask = jnp.arange(c) < k  # only the top K candidates may finish (HF top_num_beam_mask)
    offsets = (jnp.arange(b) * k)[:, None]  # [B, 1]

    def body(state):
        (
            i,
            logits,
            dstate,
            seen,
            run_seq,
            run_score,
            fin_seq,
            fin_score,
            fin_len,
            fin,
            unsat,
            _,
        ) = state
        # a. Processed log-probs of every continuation of every running beam.
        logp = process_scores(jax.nn.log_softmax(logits, axis=-1), seen, i, s)  # [R, V]
        acc = (logp.reshape(b, k, v) + run_score[:, :, None]).reshape(b, k * v)  # [B, K*V]
        # b. Top C continuations per prompt (or C drawn without replacement when sampling:
        # Gumbel-top-k = sequential draws without replacement from softmax(acc)).
        if s.do_sample:
            _, idx = jax.lax.top_k(acc + _row_noise(row_keys, i, (k * v,)), c)
            cand_lp, order = jax.lax.top_k(jnp.take_along_axis(acc, idx, axis=1), c)
            idx = jnp.take_along_axis(idx, order, axis=1)
        else:
            cand_lp, idx = jax.lax.top_k(acc, c)  # [B, C]
        parent, tok = idx // v, (idx % v).astype(jnp.int32)
        cand_seq = jnp.take_along_axis(run_seq, parent[:, :, None], axis=1)  # [B, C, L]
        cand_seq = jnp.where((jnp.arange(big_l) == i)[None, None, :], tok[:, :, None], cand_seq)
        hits = is_eos(tok, s.eos_token_ids) | (i + 1 >= big_l)  # [B, C]
        # c. The best K candidates that did not stop keep running.
        run_cand = cand_lp + hits.astype(jnp.float32) * _NEG
        _, nxt = jax.lax.top_k(run_cand, k)  # [B, K]
        run_seq = jnp.take_along_axis(cand_seq, nxt[:, :, None], axis=1)
        run_score = jnp.take_along_axis(run_cand, nxt, axis=1)
        run_parent = jnp.take_along_axis(parent, nxt, axis=1)
        run_tok = jnp.take_along_axis(tok, nxt, axis=1)
        # d. Stopped candidates among the top K enter the finished set if they beat its worst.
        did = hits & top_mask[None, :]
        cand = true_divide(cand_lp, denom[i])
        if es_true:
            cand = cand + jnp.all(fin, axis=1, keepdims=True).astype(jnp.float32) * _NEG
        cand = cand + (~unsat)[:, None].astype(jnp.float32) * _NEG
        cand = cand + (~did).astype(jnp.float32) * _NEG
        m_score = jnp.concatenate([fin_score, cand], axis=1)  # [B, K + C]
        _, sel = jax.lax.top_k(m_score, k)
        fin_score = jnp.take_along_axis(m_score, sel, axis=1)
        fin_seq = jnp.take_along_axis(
            jnp.concatenate([fin_seq, cand_seq], axis=1), sel[:, :, None], axis=1
        )
        fin_len = jnp.take_along_axis(
            jnp.concatenate([fin_len, jnp.full((b, c), i + 1, jnp.int32)], axis=1), sel, axis=1
        )
        fin = jnp.take_along_axis(jnp.concatenate([fin, did], axis=1), sel, axis=1)
        # e. Can a running beam still beat the worst finished one? (HF early-stop heuristic)
        if s.early_stopping == "never" and s.length_penalty > 0.0:
            best = true_divide(run_score[:, 0], denom_max)
        else:
            best = true_divide(run_score[:, 0], denom[i])
        worst = jnp.where(fin, jnp.min(fin_score, axis=1, keepdims=True), _NEG)  # [B, K]
        unsat = unsat & jnp.any(best[:, None] > worst, axis=1)
        go = jnp.any(unsat) & ~jnp.all(hits)
        if es_true:
            go = go & ~jnp.all(fin)
        # f. Reorder per-row state and the cache to the new running beams, feed their tokens.
        rows = (offsets + run_parent).reshape(r)
        seen = mark_seen(seen[rows], run_tok.reshape(r))
        logits, dstate = decoder.step(decoder.reorder(dstate, rows), run_tok.reshape(r), i)
        return (
            i + 1,
            logits,
            dstate,
            seen,
            run_seq,
            run_score,
            fin_seq,
            fin_score,
            fin_len,
            fin,
            unsat,
            go,
        )

    # Only beam 0 is live at first (the others score -1e9), so the K identical beams do not all
    # propose the same tokens.
    run_score = jnp.zeros((b, k), jnp.float32).at[:, 1:].set(_NEG)
    seqs = jnp.full((b, k, big_l), fill, jnp.int32)
    state = (
        jnp.int32(0),
        logits,
        dstate,
        seen,
        seqs,
        run_score,
        seqs,
        jnp.full((b, k), _NEG, jnp.float32),
        jnp.zeros((b, k), jnp.int32),
        jnp.zeros((b, k), bool),
        jnp.ones((b,), bool),
        jnp.bool_(True),
    )
    state = jax.lax.while_loop(lambda st: st[-1], body, state)
    fin_seq, fin_score, fin_len = state[6], state[7], state[8]
    n = s.num_return_sequences
    return SearchOutput(
        fin_seq[:, :n].reshape(b * n, big_l),
        fin_len[:, :n].reshape(b * n),
        fin_score[:, :n].reshape(b * n),
    )


__all__ = [
    "PromptSharingDecoder",
    "SearchOutput",
    "SlotCacheDecoder",
    "search",
    "search_with",
]

"""Batched greedy decoding, sampling and beam search, each compiled whole, matching transformers.

The spec is transformers' `GenerationMixin.generate` (v5: `_sample`, `_beam_search` in
`generation/utils.py`, processors in `generation/logits_process.py`); this is a reimplementation
in JAX, not a port of its code. For deterministic settings `generate` returns the same tokens as
`OPTForCausalLM.generate(...)` with the same arguments.

Design (issue 4):
- The algorithms (`search`) are written against a model-agnostic step function
  `step_fn(tokens [R, T], mask [R, S], cache) -> (logits [R, V], cache)` and a cache reorder
  `reorder_fn(cache, rows [R']) -> cache`, so that tests can inject toy models (STYLE 8).
- The whole loop is one `lax.while_loop`: caches are preallocated for prompt + new tokens,
  beams are flattened into the batch (row = b * K + k), and nothing returns to the host before
  the end. The prompt is run once per prompt, not once per beam as transformers does.
- Generic models (`SlotCacheDecoder`, e.g. toy step functions) keep one cache row per beam and
  reorder beams by a gather on the cache. The Flax OPT uses `OPTBeamDecoder`: prompt keys and
  values stored once per prompt, generated ones written once and never moved, beams reordered by
  gathering a small ancestry table (about 1.75x faster than the gather on the CPU here).
- Repetition penalty keeps a per-row "seen" bitmap [R, V] instead of rescanning the sequence.
- `generate(model, ...)` adapts the Flax OPT model; compiled programs are cached per (model
  structure, settings) and per shape by `jax.jit`; parameters are arguments, not constants.

Shape legend: B prompts, K beams, R rows fed to the model (B * K for beam search, B * n for
`num_return_sequences = n` sampling), P prompt length, L `max_new_tokens`, S cache length (P + L),
V vocabulary, C beam candidates per prompt (2 K with one EOS id).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from collapse_jax import sharding

Array = jax.Array
Cache = Any
StepFn = Callable[[Array, Array, Cache], tuple[Array, Cache]]
ReorderFn = Callable[[Cache, Array], Cache]
InitCacheFn = Callable[[int, int], Cache]

# transformers marks impossible beams by adding -1e9 to their scores (not -inf): we do the same so
# that score ties and sums come out bit-identical.
_NEG = -1.0e9
# transformers' global default for `top_k` when sampling (GenerationConfig defaults).
HF_DEFAULT_TOP_K = 50


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DecodeSettings:
    """Static settings of one decoding program (hashable: one compiled program per value).

    Fields follow transformers' `GenerationConfig` after its defaults are resolved: `top_k=0`
    disables top-k, `top_p=1.0` disables top-p, `eos_token_ids=()` means no EOS.
    """

    max_new_tokens: int
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_return_sequences: int = 1

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(
                f"early_stopping must be True, False or 'never', got {self.early_stopping!r}"
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if any(e < 0 for e in self.eos_token_ids):
            raise ValueError(f"eos_token_id must be non-negative, got {self.eos_token_ids}")
        n = self.num_return_sequences
        if n < 1:
            raise ValueError(f"num_return_sequences must be >= 1, got {n}")
        if self.num_beams > 1 and n > self.num_beams:
            raise ValueError(f"num_return_sequences ({n}) must be <= num_beams ({self.num_beams})")
        if self.num_beams == 1 and not self.do_sample and n > 1:
            raise ValueError(
                "greedy decoding returns one sequence per prompt: num_return_sequences "
                f"must be 1 (got {n}); use do_sample=True or num_beams > 1"
            )

    @property
    def rows_per_prompt(self) -> int:
        """Rows fed to the model per prompt (transformers' `expand_size`)."""
        return self.num_beams if self.num_beams > 1 else self.num_return_sequences

    @property
    def min_tokens_to_keep(self) -> int:
        """Tokens the top-k / top-p warpers always keep (more for beam sampling, as in HF)."""
        if self.num_beams > 1:
            return len(self.eos_token_ids) + 1 if self.eos_token_ids else 2
        return 1

    @property
    def fill_token_id(self) -> int:
        """Token after the end of a finished sequence.

        Greedy/sampling pads with `pad_token_id` (HF falls back to the first EOS id). Beam search
        fills with HF's `pad_token_id or eos_token_id[0] if eos_token_id is not None else -1`,
        which takes the EOS id when the pad id is 0.
        """
        eos = self.eos_token_ids
        if self.num_beams > 1:
            if not eos:
                return -1
            return self.pad_token_id if self.pad_token_id else eos[0]
        if self.pad_token_id is not None:
            return self.pad_token_id
        return eos[0] if eos else 0


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


# --------------------------------------------------------------------------------------------
# Logits processors (transformers' semantics, applied in transformers' order)
# --------------------------------------------------------------------------------------------


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
        eos = _eos_mask(scores.shape[-1], s.eos_token_ids)
        scores = jnp.where(eos[None, :] & (new_len < s.min_new_tokens), -jnp.inf, scores)
    if s.do_sample:
        if s.temperature != 1.0:
            scores = true_divide(scores, s.temperature)
        if s.top_k != 0:
            scores = top_k_filter(scores, s.top_k, s.min_tokens_to_keep)
        if s.top_p < 1.0:
            scores = top_p_filter(scores, s.top_p, s.min_tokens_to_keep)
    return scores


def _eos_mask(vocab_size: int, eos_token_ids: tuple[int, ...]) -> Array:
    return (
        jnp.zeros((vocab_size,), dtype=bool).at[jnp.asarray(eos_token_ids)].set(True, mode="drop")
    )


def _is_eos(tokens: Array, eos_token_ids: tuple[int, ...]) -> Array:
    hit = jnp.zeros(tokens.shape, dtype=bool)
    for e in eos_token_ids:
        hit = hit | (tokens == e)
    return hit


def _mark_seen(seen: Array, tokens: Array) -> Array:
    """seen [R, V] with tokens [R] set."""
    return seen.at[jnp.arange(seen.shape[0]), tokens].set(True)


def _row_noise(row_keys: Array, step: Array, shape: tuple[int, ...]) -> Array:
    """Gumbel noise [rows, *shape] from per-row keys folded with the step (batch-independent)."""
    return jax.vmap(lambda k: jax.random.gumbel(jax.random.fold_in(k, step), shape))(row_keys)


# --------------------------------------------------------------------------------------------
# The search loops
# --------------------------------------------------------------------------------------------


class SlotCacheDecoder:
    """The generic model interface of the search loops: a cache with one slot per position.

    Wraps `step_fn(tokens [R, T], mask [R, S], cache) -> (logits [R, V], cache)` (writes the T
    tokens at the cache's next T slots; `mask` covers all S slots, 1 = valid token, 0 = padding or
    not yet written), `init_cache(rows, S)` and `reorder_fn(cache, rows [R']) -> cache`. The
    loop state is `(cache, mask [R, S], P)`.
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
        cache = self.init_cache(b, length)
        if p > 1:
            # Only the last prompt position's logits are used: feeding it separately leaves the
            # other positions' logits (the LM head, [B, P-1, V]) dead, and XLA removes them.
            _, cache = self.step_fn(input_ids[:, : p - 1], mask, cache)
        logits, cache = self.step_fn(input_ids[:, p - 1 :], mask, cache)
        if n > 1:
            rows = jnp.repeat(jnp.arange(b), n)
            cache = self.reorder_fn(cache, rows)
            logits, mask = logits[rows], mask[rows]
        return logits.astype(jnp.float32), (cache, mask)

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
    """`search` with any decoder object offering `prefill`, `step` and `reorder` as
    `SlotCacheDecoder` (e.g. `OPTBeamDecoder`)."""
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
        seen = _mark_seen(seen, tok)
        if has_eos:
            alive = alive & ~_is_eos(tok, s.eos_token_ids)
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
        hits = _is_eos(tok, s.eos_token_ids) | (i + 1 >= big_l)  # [B, C]
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
        seen = _mark_seen(seen[rows], run_tok.reshape(r))
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


# --------------------------------------------------------------------------------------------
# OPT adapter and the public entry point
# --------------------------------------------------------------------------------------------


class OPTBeamDecoder:
    """Decoding steps of the Flax OPT with a beam-aware KV cache (no cache reordering).

    The generic `SlotCacheDecoder` keeps one cache row per beam holding prompt + generated
    tokens and gathers the whole cache every step when beams are reordered, then attends over
    all of it: three passes over [L, B*K, P+L, D] per step. Here, since the K rows of a prompt
    share its prompt, the prompt's keys/values are stored once per prompt ([L, B, P, N, H], from
    the model's own cached forward), and generated keys/values go to a separate
    [L, B*K, L_new, N, H] buffer where row r's token i is written at (r, i) and never moved.
    A small ancestry table `src [R, L_new]` says which buffer row holds token j of beam r;
    reordering beams gathers only that table, and attention reads each generated key through it.
    Per step the cache traffic drops from 3 (B*K)(P+L) to B*P + B*K*L rows of keys and values.

    The layer arithmetic is the model's own modules (`q_proj`, LayerNorms, `fc1`, ... and the
    pre/post-LayerNorm switch of `OPTDecoderLayer`); only the attention over the split cache is
    spelled out (HF numerics: q scaled before the dot product, fp32 softmax, masked logits at the
    dtype's minimum). Parity with transformers is tested through `generate`.
    """

    def __init__(self, model: Any, *, reorders: bool = True):
        """`reorders=False` (greedy/sampling: rows never change places) attends row-locally;
        with beams the ancestry one-hot costs n^2 per prompt, fine for beam counts."""
        self.model = model
        self.reorders = reorders

    def prefill(self, input_ids: Array, attention_mask: Array, n: int, max_new_tokens: int):
        model = self.model
        b, p = input_ids.shape
        mask = attention_mask.astype(jnp.int32)
        cache = model.init_cache(b, p)
        if p > 1:  # see SlotCacheDecoder.prefill: the unused logits are dead code
            _, cache = model(input_ids[:, : p - 1], attention_mask=mask, cache=cache)
        logits, cache = model(input_ids[:, p - 1 :], attention_mask=mask, cache=cache)
        r = b * n
        layers, _, _, heads, head_dim = cache.key.shape
        gen_shape = (layers, r, max_new_tokens, heads, head_dim)
        state = dict(
            prompt_k=cache.key,  # [L, B, P, N, H]
            prompt_v=cache.value,
            prompt_mask=attention_mask != 0,  # [B, P]
            # HF positions: cumsum(mask) * mask - 1, so new token i sits at n_valid + i.
            n_valid=jnp.sum(mask, axis=1).astype(jnp.int32),  # [B]
            gen_k=jnp.zeros(gen_shape, cache.key.dtype),  # [L, R, L_new, N, H]
            gen_v=jnp.zeros(gen_shape, cache.value.dtype),
            src=jnp.zeros((r, max_new_tokens), jnp.int32),  # [R, L_new]
        )
        rows = jnp.repeat(jnp.arange(b), n)
        return logits[:, -1, :].astype(jnp.float32)[rows], state

    def reorder(self, state, rows: Array):
        return {**state, "src": state["src"][rows]}

    def step(self, state, tokens: Array, i: Array):
        model = self.model
        decoder = model.model.decoder
        b, p = state["prompt_mask"].shape
        r, big_l = state["src"].shape
        n = r // b
        src = jax.lax.dynamic_update_slice_in_dim(
            state["src"], jnp.arange(r, dtype=jnp.int32)[:, None], i, axis=1
        )
        positions = jnp.repeat(state["n_valid"], n)[:, None] + i  # [R, 1]

        x = decoder.embed_tokens(tokens[:, None])  # [R, 1, E]
        if decoder.project_in is not None:
            x = decoder.project_in(x)  # [R, 1, D]
        x = x + decoder.embed_positions(positions + opt_module().POSITION_OFFSET)
        gen_k, gen_v = state["gen_k"], state["gen_v"]
        for layer_idx, layer in enumerate(decoder.layers):
            residual = x
            if layer.pre_ln:
                x = layer.self_attn_layer_norm(x)
            attn = layer.self_attn
            q = attn.q_proj(x) * jnp.asarray(attn.scaling, x.dtype)  # [R, 1, N, H]
            k, v = attn.k_proj(x), attn.v_proj(x)  # [R, 1, N, H]
            start = (layer_idx, 0, i, 0, 0)
            gen_k = jax.lax.dynamic_update_slice(gen_k, k[None].astype(gen_k.dtype), start)
            gen_v = jax.lax.dynamic_update_slice(gen_v, v[None].astype(gen_v.dtype), start)
            x = attn.out_proj(
                self._attend(
                    q[:, 0],
                    state["prompt_k"][layer_idx],
                    state["prompt_v"][layer_idx],
                    gen_k[layer_idx],
                    gen_v[layer_idx],
                    state["prompt_mask"],
                    src if self.reorders else None,
                    i,
                )[:, None]
            )  # [R, 1, D]
            x = residual + x
            if not layer.pre_ln:
                x = layer.self_attn_layer_norm(x)
            residual = x
            if layer.pre_ln:
                x = layer.final_layer_norm(x)
            x = layer.fc2(opt_module()._ACTIVATIONS[layer.activation](layer.fc1(x)))
            x = residual + x
            if not layer.pre_ln:
                x = layer.final_layer_norm(x)
        if decoder.final_layer_norm is not None:
            x = decoder.final_layer_norm(x)
        if decoder.project_out is not None:
            x = decoder.project_out(x)  # [R, 1, E]
        if model.lm_head is None:
            table = decoder.embed_tokens.embedding[...].astype(model.dtype)  # [V, E]
            logits = jnp.einsum("bte,ve->btv", x, table, preferred_element_type=jnp.float32)
        else:
            kernel = model.lm_head.kernel[...].astype(model.dtype)  # [E, V]
            logits = jnp.einsum("bte,ev->btv", x, kernel, preferred_element_type=jnp.float32)
        state = {**state, "gen_k": gen_k, "gen_v": gen_v, "src": src}
        return logits[:, -1, :].astype(jnp.float32), state

    @staticmethod
    def _attend(q, prompt_k, prompt_v, gen_k, gen_v, prompt_mask, src, i):
        """One query per row over its prompt (shared by the prompt's rows) and its own history.

        Args:
          q: [R, N, H] queries, R = B * n rows (n per prompt).
          prompt_k, prompt_v: [B, P, N, H].
          gen_k, gen_v: [R, L_new, N, H] generated keys/values by buffer row.
          prompt_mask: [B, P] bool.
          src: [R, L_new] buffer row holding each row's token j (rows of the same prompt), or
            None when every row's history is its own buffer row (no beam reordering).
          i: the current step (slots j <= i are valid).

        Returns:
          [R, N, H].
        """
        b, p = prompt_k.shape[:2]
        r, heads, head_dim = q.shape
        n, big_l = r // b, gen_k.shape[1]
        qb = q.reshape(b, n, heads, head_dim)  # [B, n, N, H]
        s_prompt = jnp.einsum("bknh,bpnh->bknp", qb, prompt_k, preferred_element_type=jnp.float32)
        # Row k's token j lives in buffer row src[k, j] of its prompt's n rows: score against all
        # n candidates (n times the few FLOPs) and keep the right one with a one-hot, instead of
        # gathering a [R, L_new, N, H] copy of the keys every layer and step.
        gk = gen_k.reshape(b, n, big_l, heads, head_dim)  # [B, m, L_new, N, H]
        gv = gen_v.reshape(b, n, big_l, heads, head_dim)
        if src is None:
            s_gen = jnp.einsum("bknh,bkjnh->bknj", qb, gk, preferred_element_type=jnp.float32)
        else:
            s_all = jnp.einsum("bknh,bmjnh->bknmj", qb, gk, preferred_element_type=jnp.float32)
            local = (src - (jnp.arange(r) // n * n)[:, None]).reshape(b, n, big_l)  # [B, n, L]
            onehot = local[:, :, None, :] == jnp.arange(n)[None, None, :, None]  # [B, n, m, L]
            s_gen = jnp.sum(jnp.where(onehot[:, :, None], s_all, 0.0), axis=3)  # [B, n, N, L]
        low = jnp.finfo(jnp.float32).min
        valid = (jnp.arange(big_l) <= i)[None, None, None, :]
        scores = jnp.concatenate(
            [
                jnp.where(prompt_mask[:, None, None, :], s_prompt, low),
                jnp.where(valid, s_gen, low),
            ],
            axis=-1,
        )  # [B, n, N, P + L_new]
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out_prompt = jnp.einsum("bknp,bpnh->bknh", probs[..., :p], prompt_v)
        if src is None:
            out_gen = jnp.einsum("bknj,bkjnh->bknh", probs[..., p:], gv)
        else:
            weights = jnp.where(onehot[:, :, None], probs[..., None, p:], 0.0)  # [B,n,N,m,L]
            out_gen = jnp.einsum("bknmj,bmjnh->bknh", weights, gv)
        return (out_prompt + out_gen).reshape(r, heads, head_dim)


def opt_module():
    """`collapse_jax.lm.opt`, imported lazily (decode itself is model-agnostic)."""
    from collapse_jax.lm import opt

    return opt


def _is_opt(model: Any) -> bool:
    return isinstance(model, opt_module().OPTForCausalLM)


@functools.lru_cache(maxsize=64)
def compiled_search(
    graphdef: nnx.GraphDef,
    settings: DecodeSettings,
    mesh: Mesh | None = None,
    fast: bool = True,
) -> Callable[[Any, Array, Array, Array], SearchOutput]:
    """One jitted `search` program for an NNX causal LM structure and settings.

    With `fast` (default) a Flax OPT decodes through `OPTBeamDecoder`; any other model, or
    `fast=False`, through the model's own slot cache (`SlotCacheDecoder`).

    The returned function takes `(state, input_ids [B, P], attention_mask [B, P], row_keys [B])`
    where `state` comes from `nnx.split(model)`; `jax.jit` caches one executable per shape. With a
    mesh, each data-parallel shard decodes its slice of the batch independently (`shard_map`, no
    communication inside the loop); parameters are replicated.
    """

    def run(state, input_ids, attention_mask, row_keys):
        model = nnx.merge(graphdef, state)
        keys = row_keys if settings.do_sample else None
        if fast and _is_opt(model):
            decoder = OPTBeamDecoder(model, reorders=settings.num_beams > 1)
        else:

            def step_fn(tokens, mask, cache):
                logits, cache = model(tokens, attention_mask=mask, cache=cache)
                return logits[:, -1, :], cache

            decoder = SlotCacheDecoder(step_fn, model.init_cache)
        return search_with(decoder, input_ids, attention_mask, settings, row_keys=keys)

    if mesh is None:
        return jax.jit(run)
    batch = sharding.batch_spec()
    sharded = jax.shard_map(
        run,
        mesh=mesh,
        in_specs=(PartitionSpec(), batch, batch, batch),
        out_specs=SearchOutput(batch, batch, batch),
        # The loop carries mix per-shard values with constants; every value is per-shard anyway
        # (no collectives inside), so the varying-manual-axes type check adds nothing here.
        check_vma=False,
    )
    return jax.jit(sharded)


def resolve_settings(
    model: Any,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    num_beams: int = 1,
    do_sample: bool = False,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_return_sequences: int = 1,
) -> DecodeSettings:
    """`generate`'s keyword arguments -> `DecodeSettings`, with transformers' defaults.

    `eos_token_id`/`pad_token_id` None take the model config's ids (as HF's generation config
    does); pass `eos_token_id=()` for no EOS. A missing pad id falls back to the first EOS id.
    `top_k=None` is HF's default 50 (only used when sampling); `top_p=None` is 1.0.
    """
    config = getattr(model, "config", None)
    if eos_token_id is None:
        eos_token_id = getattr(config, "eos_token_id", None)
    if eos_token_id is None:
        eos: tuple[int, ...] = ()
    elif isinstance(eos_token_id, int | np.integer):
        eos = (int(eos_token_id),)
    else:
        eos = tuple(int(e) for e in eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(config, "pad_token_id", None)
    if pad_token_id is None and eos:
        pad_token_id = eos[0]
    return DecodeSettings(
        max_new_tokens=int(max_new_tokens),
        min_new_tokens=int(min_new_tokens or 0),
        num_beams=int(num_beams),
        do_sample=bool(do_sample),
        repetition_penalty=float(repetition_penalty),
        length_penalty=float(length_penalty),
        early_stopping=early_stopping,
        eos_token_ids=eos,
        pad_token_id=None if pad_token_id is None else int(pad_token_id),
        temperature=float(temperature),
        top_k=HF_DEFAULT_TOP_K if top_k is None else int(top_k),
        top_p=1.0 if top_p is None else float(top_p),
        num_return_sequences=int(num_return_sequences),
    )


def default_attention_mask(input_ids: np.ndarray, settings: DecodeSettings) -> np.ndarray:
    """HF's inferred mask: `input_ids != pad` if the pad id occurs and is no EOS id, else ones."""
    pad = settings.pad_token_id
    if pad is not None and pad not in settings.eos_token_ids and np.any(input_ids == pad):
        return (input_ids != pad).astype(np.int32)
    return np.ones(input_ids.shape, np.int32)


def prompt_keys(seed: int, rows: np.ndarray | Array) -> Array:
    """Per-prompt sampling keys [B]: `fold_in(key(seed), row)` for global prompt indices `rows`."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.asarray(rows, jnp.uint32))


def assemble(input_ids: np.ndarray, out: SearchOutput, settings: DecodeSettings) -> np.ndarray:
    """Prompt + new tokens, cropped to the longest sequence, as transformers returns them.

    Args:
      input_ids: [B, P] prompts.
      out: `search` output with B * n rows.
      settings: the settings used.

    Returns:
      [B * n, P + max(lengths)] int array (int64, like torch's LongTensor).
    """
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    n = tokens.shape[0] // input_ids.shape[0]
    new = tokens[:, : int(lengths.max())].astype(np.int64)
    # Positions past a sequence's own length hold the fill id already (see DecodeSettings).
    return np.concatenate([np.repeat(input_ids.astype(np.int64), n, axis=0), new], axis=1)


def generate(
    model: Any,
    input_ids: np.ndarray | Array,
    attention_mask: np.ndarray | Array | None = None,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    num_beams: int = 1,
    do_sample: bool = False,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_return_sequences: int = 1,
) -> np.ndarray:
    """Continues prompts like `transformers`' `model.generate(...)` with the same arguments.

    Greedy (`num_beams=1`), multinomial sampling (`do_sample=True`), beam search (`num_beams>1`)
    and beam sampling, with transformers' repetition penalty (prompt included, leading padding
    excluded), `min_new_tokens`, `length_penalty`, `early_stopping` (True, False, "never"), EOS
    handling and `num_return_sequences`. The decoding loop runs as one compiled program per
    (model structure, settings, batch shape).

    Args:
      model: an NNX causal LM with `config`, `init_cache(batch, length)` and
        `model(ids, attention_mask=mask, cache=cache) -> (logits, cache)`, e.g.
        `collapse_jax.lm.opt.load_pretrained(path)`.
      input_ids: [B, P] int prompts, left-padded.
      attention_mask: [B, P] (1 = token, 0 = padding); None infers it as transformers does.
      max_new_tokens: tokens to generate (L).
      min_new_tokens: EOS is masked until this many tokens were generated.
      num_beams: beams per prompt (K); 1 = greedy or sampling.
      do_sample: sample instead of taking the argmax / top candidates.
      repetition_penalty: CTRL penalty (> 1 discourages tokens already in the sequence).
      length_penalty: beam scores are divided by generated_length ** length_penalty.
      early_stopping: beam search stopping rule, as transformers.
      eos_token_id: EOS id(s); None = the model config's; () = none.
      pad_token_id: fill id after EOS; None = the model config's.
      seed: sampling seed; prompt b uses `fold_in(key(seed), b)`.
      temperature, top_k, top_p: sampling warpers (transformers' semantics; `top_k=None` is 50).
      num_return_sequences: sequences per prompt (<= num_beams for beam search).

    Returns:
      [B * num_return_sequences, P + G] int64 NumPy array: prompt + new tokens, G the longest
      generated length, shorter sequences padded after their EOS.
    """
    settings = resolve_settings(
        model,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        num_beams=num_beams,
        do_sample=do_sample,
        repetition_penalty=repetition_penalty,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_return_sequences=num_return_sequences,
    )
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] with length > 0, got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got {ids.dtype}")
    mask = (
        default_attention_mask(ids, settings)
        if attention_mask is None
        else np.asarray(attention_mask)
    )
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask {mask.shape} must match input_ids {ids.shape}")
    vocab = _vocab_size(model)
    if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"input_ids must lie in [0, {vocab}), got [{ids.min()}, {ids.max()}]")
    graphdef, state = nnx.split(model)
    fn = compiled_search(graphdef, settings)
    out = fn(
        state,
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(mask, jnp.int32),
        prompt_keys(seed, np.arange(ids.shape[0])),
    )
    return assemble(ids, out, settings)


def _vocab_size(model: Any) -> int | None:
    config = getattr(model, "config", None)
    v = getattr(config, "vocab_size", None)
    return None if v is None else int(v)


__all__ = [
    "DecodeSettings",
    "SearchOutput",
    "assemble",
    "compiled_search",
    "default_attention_mask",
    "generate",
    "process_scores",
    "prompt_keys",
    "prompt_seen",
    "repetition_penalty",
    "resolve_settings",
    "search",
    "top_k_filter",
    "top_p_filter",
    "true_divide",
]

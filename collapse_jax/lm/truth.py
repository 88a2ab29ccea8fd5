"""Exact collapse metrics against a ground-truth language (`collapse_jax.lm.source`).

Given the true conditionals p(. | x_<t) of a source and a model's conditionals q(. | x_<t) at the
same contexts, every quantity here is computed exactly (summed over the vocabulary), not estimated
from samples of the model:

- `kl_to_truth`: KL(p || q) per context;
- `tail_retention`: the share of the true tail (the least probable `q` of the true conditional
  mass) that the model keeps, sum_tail min(q_model, p) / sum_tail p, in [0, 1]: 1 = the truth's
  tail intact, 0 = gone;
- `tail_mass_ratio`: the model's mass on the true tail divided by `q`, unbounded (a model that
  spreads mass, e.g. a uniform one, scores above 1 = the truth's value): a diagnostic, not a
  collapse score;
- `off_support_mass`: the model's mass on tokens the truth deems impossible (the paper's
  "improbable sequences"), special ids included;
- `data_true_nll`: per-token NLL of a data set under the truth (mean and per block), the
  quantity of the paper's Fig. 1 histograms scored by the truth instead of the generation-0
  model, next to the source's entropy rate and `min_block_nll`, the least NLL per token any block
  can have (the mode's; the floor a mode-seeking decoder drives the data to);
- `support_coverage`: the share of the true transitions (and of the vocabulary) that occur in a
  data set, and the true stationary mass of those that do not (`lost_mass`);
- `data_entropy` and `repetition_rate` of a data set.

The array functions are jittable and work on arbitrary leading axes; the data-set functions take
NumPy token blocks of the source's vocabulary (any other id counts as an impossible token).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from collapse_jax.lm import tables
from collapse_jax.lm.source import (
    TOKEN_OFFSET,
    GroundTruthSource,
    MarkovSource,
    ngram_codes,
    to_source_ids,
    token_counts,
)


def _xlogy(p: jax.Array, y: jax.Array) -> jax.Array:
    """p * y with 0 * (-inf) = 0 (terms of zero true probability contribute nothing)."""
    return jnp.where(p > 0, p * jnp.where(p > 0, y, 0.0), 0.0)


def kl_to_truth(p_true: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(p_true || q) per context, summed exactly over the vocabulary.

    Args:
      p_true: [..., V] true conditionals.
      log_q: [..., V] the model's log-probabilities of the same V tokens. A model with extra
        tokens (a language model's pad/bos/eos) passes only the source tokens' columns of its
        full log-softmax, not renormalised: mass it puts on other tokens is mass missing here, and
        the result is still KL(p || q) over the model's full vocabulary (p is 0 off the source).
    Returns:
      [...] KL in nats (0 iff q = p on p's support).
    """
    log_p = jnp.log(jnp.where(p_true > 0, p_true, 1.0))
    return jnp.sum(_xlogy(p_true, log_p - log_q), axis=-1)


def tail_weights(p_true: jax.Array, q: float = 0.1) -> jax.Array:
    """Membership of every token in the true tail of its context. [..., V] -> [..., V] in [0, 1].

    Tokens are taken in increasing order of true probability (zero-probability tokens are not part
    of the distribution and never belong to the tail) until their mass reaches q; the token that
    crosses q belongs to the tail with the fraction that makes the tail's true mass exactly q
    (or the whole distribution when q >= 1).
    """
    order = jnp.argsort(p_true, axis=-1)
    p_sorted = jnp.take_along_axis(p_true, order, axis=-1)
    before = jnp.cumsum(p_sorted, axis=-1) - p_sorted  # true mass of the lighter tokens
    frac = jnp.clip((q - before) / jnp.where(p_sorted > 0, p_sorted, 1.0), 0.0, 1.0)
    frac = jnp.where(p_sorted > 0, frac, 0.0)
    inverse = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(frac, inverse, axis=-1)


def tail_retention(p_true: jax.Array, q_model: jax.Array, q: float = 0.1) -> jax.Array:
    """The share of the true tail's mass that the model keeps, bounded in [0, 1].

    sum_tail w min(q_model, p_true) / sum_tail w p_true, with w the tail membership of
    `tail_weights`: 1 when the model gives every tail token at least its true probability (the
    truth), 0 when it gives the tail nothing; mass beyond the truth's earns nothing.

    Args:
      p_true: [..., V] true conditionals; q_model: [..., V] the model's probabilities of the same
        tokens; q: the tail's true mass (default 10%).
    Returns:
      [...] in [0, 1].
    """
    w = tail_weights(p_true, q)
    true_mass = jnp.sum(w * p_true, axis=-1)
    return jnp.clip(jnp.sum(w * jnp.minimum(q_model, p_true), axis=-1) / true_mass, 0.0, 1.0)


def off_support_mass(p_true: jax.Array, log_q: jax.Array) -> jax.Array:
    """The model's mass off the true support: 1 - sum_{p > 0} q. [..., V] -> [...] in [0, 1].

    `log_q` holds the source tokens' columns of the model's full log-softmax (`kl_to_truth`), so
    mass on a model's special ids counts as off the support."""
    on = jnp.sum(jnp.where(p_true > 0, jnp.exp(log_q), 0.0), axis=-1)
    return jnp.clip(1.0 - on, 0.0, 1.0)


def tail_mass_ratio(p_true: jax.Array, q_model: jax.Array, q: float = 0.1) -> jax.Array:
    """The model's mass on the true tail of each context divided by the tail's true mass.

    Args:
      p_true: [..., V] true conditionals; q_model: [..., V] the model's probabilities of the same
        tokens; q: the tail's true mass (default 10%).
    Returns:
      [...] retention in [0, 1 / q]: the truth scores 1, a model without tail mass 0, and a model
      that spreads mass over the tail (a uniform one) more than 1. Unbounded, so not a collapse
      score on its own: see `tail_retention`.
    """
    w = tail_weights(p_true, q)
    true_mass = jnp.sum(w * p_true, axis=-1)  # = q up to rounding, min(q, 1) in general
    return jnp.sum(w * q_model, axis=-1) / true_mass


# ----------------------------------------------------------------------------------------------
# Data-set metrics (NumPy in, plain floats and arrays out).


# The probability an impossible token is scored at by the floored NLL: -log(1e-6) = 13.8 nats.
NLL_FLOOR = 1e-6


def data_true_nll(
    source: GroundTruthSource, blocks: np.ndarray, *, skip_first: bool = False
) -> dict[str, Any]:
    """Per-token NLL of token blocks under the truth.

    Every block is scored as a stand-alone window of the source (its first tokens under the
    stationary distribution), as a language model trained on the block sees it. Tokens the truth
    deems impossible (probability 0, or an id outside the vocabulary) have infinite NLL: `mean`
    leaves them out (the NLL of the possible tokens, to be read next to `invalid_rate`), and
    `floored_mean` scores them at -log(NLL_FLOOR) = 13.8 nats, so the improbable tail of a data
    set shows. Positions whose Markov context holds an impossible token have no conditional and
    are left out of both.

    Args:
      blocks: [N, T] int tokens of the source's vocabulary.
      skip_first: score positions 1..T-1 only. Position 0 is scored under the stationary unigram,
        whose entropy exceeds the entropy rate (by 1.7 nats on the README's source: +0.027
        nats/token on a 64-token block of real data); without it the mean NLL of real blocks is
        the entropy rate exactly.
    Returns:
      {"mean": mean NLL over the possible tokens, "per_block": [N] the mean of each block
      (-log NLL_FLOOR for a block without a possible token), "invalid_rate": share of
      impossible tokens, "floored_mean", "floored_per_block": the same with impossible tokens at
      -log NLL_FLOOR (a block without a scored position: -log NLL_FLOOR),
      "invalid_per_block": [N] each block's share of impossible tokens (1 without a scored
      position)}.
    """
    logp = np.asarray(source.log_prob(np.asarray(blocks, np.int32)), np.float64)  # [N, T]
    if skip_first:
        logp = logp[:, 1:]
    scored = ~np.isnan(logp)  # undefined positions (Markov context with a foreign token) left out
    valid = scored & np.isfinite(logp)
    nll = np.where(valid, -logp, 0.0)
    counts = valid.sum(1)
    floored = np.where(scored, np.minimum(np.where(scored, -logp, 0.0), -np.log(NLL_FLOOR)), 0.0)
    n_scored = scored.sum(1)
    # a block without a possible (or without a scored) token: the floor, not NaN (a metric must
    # stay finite for the run to commit; a model from scratch can write such a block)
    floor = -np.log(NLL_FLOOR)
    per_block = np.where(counts > 0, nll.sum(1) / np.maximum(counts, 1), floor)
    floored_per_block = np.where(n_scored > 0, floored.sum(1) / np.maximum(n_scored, 1), floor)
    invalid_per_block = np.where(
        n_scored > 0, (scored & ~valid).sum(1) / np.maximum(n_scored, 1), 1.0
    )
    return {
        "mean": float(nll.sum() / max(counts.sum(), 1)),
        "per_block": per_block,
        "invalid_rate": float((scored & ~valid).sum() / max(scored.sum(), 1)),
        "floored_mean": float(floored.sum() / max(n_scored.sum(), 1)),
        "floored_per_block": floored_per_block,
        "invalid_per_block": invalid_per_block,
    }


def min_block_nll(source: GroundTruthSource, length: int) -> float | None:
    """The least true NLL per token that a block of `length` tokens can have, over positions
    1..length-1 (as `data_true_nll(..., skip_first=True)`), by dynamic programming over the
    Markov chain's contexts: the NLL of the truth's most probable block. On a source whose every
    context has the same weights it is -log max_x p(x | c). None for a hidden Markov model (no
    finite-state recursion over its token sequences).
    """
    if not isinstance(source, MarkovSource) or length < 2:
        return None
    v, k = source.vocab_size, source.config.order
    contexts = v**k
    with np.errstate(divide="ignore"):
        cost_edge = -np.log(source.weights)  # [C, s], inf on zero weights
        if k == 1:
            cost = np.where(source.unigram > 0, 0.0, np.inf)  # x0 free (any possible token)
            steps = length - 1
        else:  # position 1 under p(x1 | x0): the context (x0, x1)
            joint = source.pi.reshape(v, v)
            head1 = joint / joint.sum(1, keepdims=True)
            cost = np.where(head1 > 0, -np.log(np.where(head1 > 0, head1, 1.0)), np.inf)
            cost = cost.reshape(-1)
            steps = length - 2
    next_ctx = (np.arange(contexts)[:, None] * v + source.support) % contexts
    for _ in range(steps):
        new = np.full(contexts, np.inf)
        np.minimum.at(new, next_ctx.reshape(-1), (cost[:, None] + cost_edge).reshape(-1))
        cost = new
    return float(cost.min() / (length - 1))


def support_coverage(source: GroundTruthSource, blocks: np.ndarray) -> dict[str, float]:
    """Which of the source's true transitions and tokens occur in a data set.

    Transitions are the source's `transitions()`: (k-token context, next token) pairs of positive
    probability for a k-th order Markov chain, bigrams for the HMM. Mass is stationary mass: the
    lost mass of a transition is pi(context) p(token | context), of a token its stationary
    frequency.

    Returns:
      {"support_coverage": share of the true transitions that occur, "lost_mass": their
      stationary mass that does not, "vocab_coverage", "vocab_lost_mass": the same for tokens}.
    """
    v = source.vocab_size
    k, ctx, tok, mass = source.transitions()
    seen = np.unique(ngram_codes(blocks, k, v))
    hit = np.isin(ctx * v + tok, seen)
    counts = token_counts(blocks, v)
    live = source.unigram > 0
    present = counts > 0
    return {
        "support_coverage": float(hit.mean()),
        "lost_mass": float(mass[~hit].sum()),
        "vocab_coverage": float((present & live).sum() / live.sum()),
        "vocab_lost_mass": float(source.unigram[~present].sum()),
    }


def data_entropy(blocks: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the pooled token frequencies of a data set (foreign ids pooled as one)."""
    tokens = np.asarray(blocks, np.int64).reshape(-1)
    tokens = np.where((tokens >= 0) & (tokens < vocab_size), tokens, vocab_size)
    f = np.bincount(tokens, minlength=vocab_size + 1) / max(tokens.size, 1)
    f = f[f > 0]
    return float(-(f * np.log(f)).sum())


def repetition_rate(blocks: np.ndarray, n: int = 4) -> float:
    """Share of n-grams that repeat an earlier n-gram of the same block (seq-rep-n, Welleck et
    al. 2020): 1 - distinct / total, averaged over blocks."""
    blocks = np.asarray(blocks, np.int64)
    num, t = blocks.shape
    if t < n:
        return 0.0
    grams = np.stack([blocks[:, i : t - n + 1 + i] for i in range(n)], axis=-1)  # [N, M, n]
    reps = [1.0 - len(np.unique(g, axis=0)) / len(g) for g in grams]
    return float(np.mean(reps))


def data_metrics(source: GroundTruthSource, blocks: np.ndarray) -> dict[str, Any]:
    """All data-set metrics of one generation's training data (source-vocabulary tokens).

    `data_true_nll` (possible tokens, position 0 included) with its per-block values and
    `data_invalid_rate` are the first metrics' definitions; `data_true_nll_floored` (positions
    1..T-1, impossible tokens at -log NLL_FLOOR) with `data_true_nll_floored_per_block` and
    `data_invalid_per_block` (each block's share of impossible tokens, positions 1..T-1) show
    the improbable tail too."""
    nll = data_true_nll(source, blocks)
    honest = data_true_nll(source, blocks, skip_first=True)
    return {
        "data_true_nll": nll["mean"],
        "data_true_nll_per_block": nll["per_block"].astype(np.float32),
        "data_invalid_rate": nll["invalid_rate"],
        "data_true_nll_floored": honest["floored_mean"],
        "data_true_nll_floored_per_block": honest["floored_per_block"].astype(np.float32),
        "data_invalid_per_block": honest["invalid_per_block"].astype(np.float32),
        **support_coverage(source, blocks),
        "data_entropy": data_entropy(blocks, source.vocab_size),
        "data_repetition": repetition_rate(blocks),
    }


@jax.jit
def per_context(p_true: jax.Array, log_q: jax.Array, q: float = 0.1) -> dict[str, jax.Array]:
    """Model-vs-truth quantities of every context.

    Args:
      p_true: [..., V] true conditionals; log_q: [..., V] the model's log-probabilities of the
        source tokens (see `kl_to_truth`); q: tail mass.
    Returns:
      {"kl": KL(p || q), "retention": `tail_retention` (bounded), "mass_ratio":
      `tail_mass_ratio` (unbounded),
      "off_support": `off_support_mass`, "cross": E_p[-log q] (the model's expected NLL),
      "entropy": E_p[-log p]}, each [...]; cross - entropy = kl.
    """
    p_true = jnp.asarray(p_true, jnp.float32)
    log_q = jnp.asarray(log_q, jnp.float32)
    log_p = jnp.log(jnp.where(p_true > 0, p_true, 1.0))
    return {
        "kl": kl_to_truth(p_true, log_q),
        "retention": tail_retention(p_true, jnp.exp(log_q), q),
        "mass_ratio": tail_mass_ratio(p_true, jnp.exp(log_q), q),
        "off_support": off_support_mass(p_true, log_q),
        "cross": -jnp.sum(_xlogy(p_true, log_q), axis=-1),
        "entropy": -jnp.sum(_xlogy(p_true, log_p), axis=-1),
    }


def summarize_contexts(values: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, float]:
    """Scalar metrics from `per_context` values over the contexts where `mask` holds.

    Returns:
      {"kl_to_truth": mean KL, "kl_to_truth_p90": its 90th percentile over contexts,
      "tail_retention": mean bounded retention, "tail_retention_p10/p50/p90": its quantiles over
      contexts, "model_nll": mean E_p[-log q], "true_entropy": mean E_p[-log p] (their
      difference is kl_to_truth)}; with "mass_ratio" and "off_support" values also
      "tail_mass_ratio" (mean) and "off_support_mass" (mean).
    """
    mask = np.asarray(mask, bool)
    v = {k: np.asarray(x, np.float64)[mask] for k, x in values.items()}
    p10, p50, p90 = np.quantile(v["retention"], [0.1, 0.5, 0.9])
    out = {
        "kl_to_truth": float(v["kl"].mean()),
        "kl_to_truth_p90": float(np.quantile(v["kl"], 0.9)),
        "tail_retention": float(v["retention"].mean()),
        "tail_retention_p10": float(p10),
        "tail_retention_p50": float(p50),
        "tail_retention_p90": float(p90),
        "model_nll": float(v["cross"].mean()),
        "true_entropy": float(v["entropy"].mean()),
    }
    if "mass_ratio" in v:
        out["tail_mass_ratio"] = float(v["mass_ratio"].mean())
    if "off_support" in v:
        out["off_support_mass"] = float(v["off_support"].mean())
    return out


# ----------------------------------------------------------------------------------------------
# A causal language model against the truth (the experiment's per-generation evaluation).

_FORWARD_CACHE: dict[Any, Any] = {}


def model_log_probs(model: Any, ids: np.ndarray, vocab_size: int) -> jax.Array:
    """The model's log-probabilities of the source tokens at every position.

    Args:
      model: an NNX causal LM callable as `model(input_ids)` -> logits [B, T, V_model], or a
        table model (`lm.tables`: the oracle or a count estimate).
      ids: [B, T] model ids (source token x is id x + TOKEN_OFFSET).
      vocab_size: V of the source.
    Returns:
      [B, T, V] float32: row t is log q(x_t = . | x_<t) over the source tokens, from the logits at
      position t - 1 (row 0 is 0: a block's first token has no prediction and is never scored).
      Not renormalised over the source tokens (see `kl_to_truth`).
    """
    if isinstance(model, tables.MarkovTable | tables.HMMTable):
        logq = model.log_probs(to_source_ids(ids, vocab_size))
        return logq.at[:, 0].set(0.0)
    graphdef, state = nnx.split(model)
    fn = _FORWARD_CACHE.get((graphdef, vocab_size))
    if fn is None:

        @jax.jit
        def fn(state, ids):
            logits = nnx.merge(graphdef, state)(ids).astype(jnp.float32)  # [B, T, V_model]
            logq = jax.nn.log_softmax(logits, axis=-1)[
                ..., TOKEN_OFFSET : TOKEN_OFFSET + vocab_size
            ]
            return jnp.concatenate([jnp.zeros_like(logq[:, :1]), logq[:, :-1]], axis=1)

        _FORWARD_CACHE[(graphdef, vocab_size)] = fn
    return fn(state, jnp.asarray(ids, jnp.int32))


def evaluate_model(
    model: Any, source: GroundTruthSource, ids: np.ndarray, *, batch_size: int, q: float = 0.1
) -> dict[str, Any]:
    """Exact model-vs-truth metrics over every context of held-out blocks (positions 1..T-1).

    Args:
      ids: [N, T] held-out real blocks in model ids.
    Returns:
      `summarize_contexts`' metrics plus "entropy_rate" (the source's; "_se" when estimated),
      "min_block_nll" (`min_block_nll` at the blocks' length; Markov sources) and
      "per_context_kl" / "per_context_retention" [N, T-1] arrays.
    """
    ids = np.asarray(ids, np.int32)
    tokens = to_source_ids(ids, source.vocab_size)
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(ids), batch_size):
        rows = slice(i, i + batch_size)
        log_q = model_log_probs(model, ids[rows], source.vocab_size)
        values = per_context(source.next_token_probs(tokens[rows]), log_q, q)
        for k, v in values.items():
            parts.setdefault(k, []).append(np.asarray(v)[:, 1:])
    values = {k: np.concatenate(v) for k, v in parts.items()}
    out: dict[str, Any] = summarize_contexts(values, np.ones(values["kl"].shape, bool))
    h, se = source.entropy_rate
    out["entropy_rate"] = h
    if se > 0:
        out["entropy_rate_se"] = se
    floor = min_block_nll(source, ids.shape[1])
    if floor is not None:
        out["min_block_nll"] = floor
    out["per_context_kl"] = values["kl"].astype(np.float32)
    out["per_context_retention"] = values["retention"].astype(np.float32)
    return out

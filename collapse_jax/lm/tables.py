"""Language models given by a table, the baselines of the known-language experiment.

Two learners sit next to the transformer in the same loop (`model.learner` of the LM experiment,
`lm.experiment`), with the same decoders and the same metrics:

- the *oracle*: the truth itself (`oracle_table(source)`), never refitted; whatever its data
  lose, the loss is the decoder's;
- the *exact learner*: the source family's add-alpha count estimator of the transition table
  (`fit_counts`), refitted on every generation's data; whatever it loses beyond the oracle is
  finite-sample recursion, without function-approximation error.

A table model answers the two questions the experiment asks of a model: its log-probabilities of
the source tokens at every position of given blocks (`log_probs`, the metrics of `lm.truth`), and
a decoder (`decoder()`, the `prefill` / `step` / `reorder` object of `lm.search`) whose logits over
the model ids (source token x is id x + 3; ids 0..2, OPT's <s>, <pad>, </s>, get -inf, so they are
never emitted) are log q, so beam search, sampling and their processors see the table exactly as
they see a transformer's logits. Impossible tokens (q = 0) have logit -inf.

`MarkovTable` holds a Markov chain of order k (the oracle of a Markov source, and every count
estimate); `HMMTable` the oracle of a hidden Markov model (its decoder state is the forward
filter). Both are pytrees with static sizes, so a jitted search takes them as arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.lm.decode import prompt_keys
from collapse_jax.lm.search import search_with
from collapse_jax.lm.settings import DecodeSettings
from collapse_jax.lm.source import (
    TOKEN_OFFSET,
    GroundTruthSource,
    HMMSource,
    MarkovSource,
    ngram_codes,
    token_counts,
)
from collapse_jax.rundir import fileio

# OPT's special ids (source.py: pad = 1, bos = eos = 2): the table models' own.
PAD_TOKEN_ID = 1
EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class TableConfig:
    """What `lm.experiment` reads of a model's config (`eos_token_id`, `pad_token_id`)."""

    vocab_size: int
    eos_token_id: int = EOS_TOKEN_ID
    pad_token_id: int = PAD_TOKEN_ID


def _with_specials(rows: jax.Array) -> jax.Array:
    """[..., V] log q over source tokens -> [..., V + 3] logits over model ids (specials -inf)."""
    pad = jnp.full((*rows.shape[:-1], TOKEN_OFFSET), -jnp.inf, rows.dtype)
    return jnp.concatenate([pad, rows], axis=-1)


def _source_ids(ids: jax.Array, v: int) -> jax.Array:
    """Model ids -> source tokens, clipped into the vocabulary (prompts are source tokens)."""
    return jnp.clip(ids.astype(jnp.int32) - TOKEN_OFFSET, 0, v - 1)


# ----------------------------------------------------------------------------------------------
# Markov tables.


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["log_table", "log_head0", "log_head1"],
    meta_fields=["order", "vocab_size"],
)
@dataclasses.dataclass(frozen=True)
class MarkovTable:
    """A Markov chain of order k over V source tokens, as log-probabilities.

    Attributes:
      log_table: [V^k, V] float32 log q(x | context), the context encoded as
        sum_i x_i V^(k-1-i) (as `source.MarkovSource`); -inf = impossible.
      log_head0: [V] log q(x_0), the first token of a block.
      log_head1: [V, V] log q(x_1 | x_0), the second token (order 2; order 1: the table itself).
      order, vocab_size: k and V.
    """

    log_table: jax.Array
    log_head0: jax.Array
    log_head1: jax.Array
    order: int
    vocab_size: int

    @property
    def config(self) -> TableConfig:
        return TableConfig(vocab_size=self.vocab_size + TOKEN_OFFSET)

    def log_probs(self, tokens: jax.Array) -> jax.Array:
        """log q(x_t = . | x_<t) at every position. [B, T] source tokens -> [B, T, V] float32.

        Tokens outside the vocabulary are read as token 0 in a context (the metrics score real
        blocks, which have none)."""
        return _markov_rows(self, jnp.asarray(tokens, jnp.int32))

    def decoder(self) -> _MarkovDecoder:
        return _MarkovDecoder(self)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(getattr(self, k)) for k in ("log_table", "log_head0", "log_head1")}


@jax.jit
def _markov_rows(table: MarkovTable, tokens: jax.Array) -> jax.Array:
    v, k = table.vocab_size, table.order
    b, t = tokens.shape
    safe = jnp.clip(tokens, 0, v - 1)
    ctx = jnp.zeros_like(safe)
    for i in range(1, k + 1):  # the token at t - i weighs V^(i-1)
        ctx = ctx + jnp.pad(safe, ((0, 0), (i, 0)))[:, :t] * (v ** (i - 1))
    rows = table.log_table[ctx]  # [B, T, V]
    pos = jnp.arange(t)[None, :, None]
    rows = jnp.where(pos == 0, table.log_head0[None, None, :], rows)
    if k == 2:
        rows = jnp.where(pos == 1, table.log_head1[safe[:, 0]][:, None, :], rows)
    return rows


class _MarkovDecoder:
    """`lm.search`'s decoder over a `MarkovTable`: the state is each row's context [R]."""

    def __init__(self, table: MarkovTable):
        self.table = table

    def _logits(self, ctx: jax.Array) -> jax.Array:
        return _with_specials(self.table.log_table[ctx])

    def prefill(self, input_ids, attention_mask, n, max_new_tokens):
        v, k = self.table.vocab_size, self.table.order
        b, p = input_ids.shape
        if p < k:
            raise ValueError(f"a prompt of {p} tokens has no order-{k} context")
        x = _source_ids(input_ids[:, p - k :], v)
        ctx = sum(x[:, i] * v ** (k - 1 - i) for i in range(k))
        rows = jnp.repeat(jnp.arange(b), n)
        return self._logits(ctx)[rows], ctx[rows]

    def step(self, ctx, tokens, i):
        v = self.table.vocab_size
        ctx = (ctx * v + _source_ids(tokens, v)) % (v**self.table.order)
        return self._logits(ctx), ctx

    def reorder(self, ctx, rows):
        return ctx[rows]


def _log(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, np.float64)
    return np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), -np.inf).astype(np.float32)


def _markov_table(table, head0, head1, order, v) -> MarkovTable:
    return MarkovTable(
        log_table=jnp.asarray(_log(table)),
        log_head0=jnp.asarray(_log(head0)),
        log_head1=jnp.asarray(_log(head1)),
        order=order,
        vocab_size=v,
    )


def smoothed(counts: np.ndarray, alpha: float) -> np.ndarray:
    """Add-alpha estimate of each row of counts: (n + alpha) / (sum n + alpha V); a row with no
    count and alpha = 0 is uniform. [..., V] float64."""
    counts = np.asarray(counts, np.float64)
    total = counts.sum(-1, keepdims=True) + alpha * counts.shape[-1]
    return np.where(total > 0, (counts + alpha) / np.where(total > 0, total, 1.0),
                    1.0 / counts.shape[-1])  # fmt: skip


def transition_counts(blocks: np.ndarray, order: int, vocab_size: int) -> np.ndarray:
    """Counts of every (k-token context, next token) pair within the blocks (windows holding a
    token outside the vocabulary are skipped). [V^k, V] int64."""
    v = vocab_size
    codes = ngram_codes(blocks, order, v)
    return np.bincount(codes, minlength=v ** (order + 1)).reshape(v**order, v)


def fit_counts(blocks: np.ndarray, order: int, vocab_size: int, alpha: float) -> MarkovTable:
    """The exact learner: the add-alpha count estimate of a Markov chain of order k.

    Args:
      blocks: [N, T] source tokens (ids outside the vocabulary never enter a count).
      alpha: the add-alpha smoothing (0 = maximum likelihood; an unseen transition then has
        probability 0, and the model's KL to the truth can be infinite).
    Returns:
      The table of `smoothed(transition_counts(...), alpha)`, with the first token's
      distribution from the token counts of whole blocks and (order 2) the second's from the
      bigram counts, smoothed alike.
    """
    v = vocab_size
    table = smoothed(transition_counts(blocks, order, v), alpha)
    head0 = smoothed(token_counts(blocks, v), alpha)
    head1 = table if order == 1 else smoothed(transition_counts(blocks, 1, v), alpha)
    return _markov_table(table, head0, head1, order, v)


# ----------------------------------------------------------------------------------------------
# The hidden Markov model's oracle.


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["log_transition", "log_emission", "log_initial"],
    meta_fields=["vocab_size"],
)
@dataclasses.dataclass(frozen=True)
class HMMTable:
    """A hidden Markov model as log-probabilities: [H, H] transitions, [H, V] emissions, [H] the
    initial (stationary) hidden distribution; conditionals by the forward recursion (as
    `source.HMMSource`: a token impossible under the model leaves the filter unchanged)."""

    log_transition: jax.Array
    log_emission: jax.Array
    log_initial: jax.Array
    vocab_size: int

    @property
    def config(self) -> TableConfig:
        return TableConfig(vocab_size=self.vocab_size + TOKEN_OFFSET)

    def log_probs(self, tokens: jax.Array) -> jax.Array:
        """log q(x_t = . | x_<t) at every position. [B, T] source tokens -> [B, T, V] float32."""
        tokens = jnp.asarray(tokens, jnp.int32)
        return _hmm_rows(self, tokens)

    def decoder(self) -> _HMMDecoder:
        return _HMMDecoder(self)

    def arrays(self) -> dict[str, np.ndarray]:
        names = ("log_transition", "log_emission", "log_initial")
        return {k: np.asarray(getattr(self, k)) for k in names}

    def predict(self, log_f: jax.Array) -> jax.Array:
        """log q(x | filter): [R, H] log p(h | past) -> [R, V]."""
        return jax.nn.logsumexp(log_f[:, :, None] + self.log_emission[None], axis=1)

    def update(self, log_f: jax.Array, x: jax.Array) -> jax.Array:
        """The filter of the next position after token x [R] (unchanged if x is impossible)."""
        log_px = jnp.take_along_axis(self.predict(log_f), x[:, None], axis=1)  # [R, 1]
        ok = jnp.isfinite(log_px[:, 0])
        post = log_f + self.log_emission[:, x].T - jnp.where(ok[:, None], log_px, 0.0)
        post = jnp.where(ok[:, None], post, log_f)
        return jax.nn.logsumexp(post[:, :, None] + self.log_transition[None], axis=1)


def _hmm_filter(table: HMMTable, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(filter after every token [B, H], log q rows [B, T, V]) of source tokens [B, T]."""
    log_f0 = jnp.broadcast_to(table.log_initial, (tokens.shape[0], table.log_initial.shape[0]))

    def step(log_f, x):
        return table.update(log_f, x), table.predict(log_f)

    safe = jnp.clip(tokens, 0, table.vocab_size - 1)
    log_f, rows = jax.lax.scan(step, log_f0, safe.T)
    return log_f, jnp.swapaxes(rows, 0, 1)


@jax.jit
def _hmm_rows(table: HMMTable, tokens: jax.Array) -> jax.Array:
    return _hmm_filter(table, tokens)[1]


class _HMMDecoder:
    """`lm.search`'s decoder over an `HMMTable`: the state is each row's filter [R, H]."""

    def __init__(self, table: HMMTable):
        self.table = table

    def prefill(self, input_ids, attention_mask, n, max_new_tokens):
        log_f, _ = _hmm_filter(self.table, _source_ids(input_ids, self.table.vocab_size))
        rows = jnp.repeat(jnp.arange(input_ids.shape[0]), n)
        log_f = log_f[rows]
        return _with_specials(self.table.predict(log_f)), log_f

    def step(self, log_f, tokens, i):
        log_f = self.table.update(log_f, _source_ids(tokens, self.table.vocab_size))
        return _with_specials(self.table.predict(log_f)), log_f

    def reorder(self, log_f, rows):
        return log_f[rows]


TableModel = MarkovTable | HMMTable


def oracle_table(source: GroundTruthSource) -> TableModel:
    """The truth itself as a table model (its conditionals exactly, in float32)."""
    v = source.vocab_size
    if isinstance(source, MarkovSource):
        k = source.config.order
        table = np.zeros((v**k, v))
        np.put_along_axis(table, source.support.astype(np.int64), source.weights, axis=1)
        head1 = table
        if k == 2:
            joint = source.pi.reshape(v, v)
            head1 = joint / joint.sum(1, keepdims=True)
        return _markov_table(table, source.unigram, head1, k, v)
    if isinstance(source, HMMSource):
        return HMMTable(
            log_transition=jnp.asarray(_log(source.transition)),
            log_emission=jnp.asarray(_log(source.emission)),
            log_initial=jnp.asarray(_log(source.pi)),
            vocab_size=v,
        )
    raise TypeError(f"no oracle table for a {type(source).__name__}")


# ----------------------------------------------------------------------------------------------
# Decoding and persistence.


@functools.partial(jax.jit, static_argnames=("settings",))
def _search(model, input_ids, attention_mask, row_keys, *, settings):
    keys = row_keys if settings.do_sample else None
    return search_with(model.decoder(), input_ids, attention_mask, settings, row_keys=keys)


def generate(
    model: TableModel, prompts: np.ndarray, settings: DecodeSettings, *, seed: int, batch_size: int
) -> np.ndarray:
    """New tokens after every prompt, decoded from the table by `lm.search` (as `lm.regenerate`
    decodes a transformer: prompt i samples with `fold_in(key(seed), i)`, so the result does not
    depend on the batch size).

    Args:
      prompts: [N, P] model ids (source tokens + 3), no padding.
    Returns:
      [N, max_new_tokens] int32 model ids.
    """
    prompts = np.asarray(prompts, np.int32)
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = jnp.asarray(prompts[i : i + batch_size])
        keys = prompt_keys(seed, np.arange(i, i + len(ids)))
        res = _search(model, ids, jnp.ones_like(ids), keys, settings=settings)
        out.append(np.asarray(res.tokens))
    return np.concatenate(out).astype(np.int32)


def save_table(model: TableModel, path: pathlib.Path) -> None:
    """Writes `table.json` (kind and sizes) and `table.npz` (the arrays) into folder `path`."""
    path = pathlib.Path(path)
    meta: dict[str, Any] = {"kind": type(model).__name__, "vocab_size": model.vocab_size}
    if isinstance(model, MarkovTable):
        meta["order"] = model.order
    fileio.save_npz(path / "table.npz", model.arrays())
    fileio.atomic_write_json(path / "table.json", meta)


def load_table(path: pathlib.Path) -> TableModel:
    """Reads what `save_table` wrote."""
    path = pathlib.Path(path)
    meta = json.loads((path / "table.json").read_text())
    arrays = {k: jnp.asarray(v) for k, v in fileio.load_npz(path / "table.npz").items()}
    if meta["kind"] == "MarkovTable":
        return MarkovTable(**arrays, order=int(meta["order"]), vocab_size=int(meta["vocab_size"]))
    if meta["kind"] == "HMMTable":
        return HMMTable(**arrays, vocab_size=int(meta["vocab_size"]))
    raise ValueError(f"{path / 'table.json'}: unknown table kind {meta['kind']!r}")

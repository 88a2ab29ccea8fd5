"""Perplexity of an OPT model on token blocks, sharded like training (the paper's evaluation)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from collapse_jax.jaxtools import sharding
from collapse_jax.lm import data as data_lib
from collapse_jax.lm.placement import (
    cached,
    check_blocks,
    default_mesh,
    local_value,
    pad_rows,
    padded_batch,
    shape_signature,
    split_model,
    to_global,
)
from collapse_jax.lm.steps import eval_step
from collapse_jax.lm.tokenizer import check_token_ids

# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


class Evaluator:
    """Per-block NLL of a split, sharded like training (compiled once per batch shape).

    `step` is the jitted `eval_step` (params, rest, batch) -> (row NLL sums, row counts), with
    explicit shardings; building an Evaluator allocates nothing, so `step` can be exported
    (`jax.export`) for abstract parameters.
    """

    def __init__(
        self,
        graphdef: Any,
        mesh: Mesh,
        param_shardings: Any,
        rest_shardings: Any,
        *,
        batch_size: int,
        compute_dtype: Any = None,
        pad_token_id: int | None = None,
    ):
        self.mesh = mesh
        self.batch_size = batch_size
        self.padded_batch_size = padded_batch(mesh, batch_size)
        self.pad_token_id = pad_token_id
        self.batch_sharding = sharding.batch_sharding(mesh)
        rep = sharding.replicated(mesh)
        self.step = jax.jit(
            functools.partial(eval_step, graphdef=graphdef, compute_dtype=compute_dtype),
            in_shardings=(param_shardings, rest_shardings, self.batch_sharding),
            out_shardings=(rep, rep),
        )

    def row_nll(self, params: Any, rest: Any, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-block NLL sums and target counts, each float64 [N], in block order."""
        n = len(blocks)
        sums, counts = [], []
        steps = data_lib.steps_per_epoch(n, self.batch_size)

        def batches() -> Iterator[tuple[int, dict[str, jax.Array]]]:
            for i in range(steps):
                rows = data_lib.batch_rows(0, 0, i, n, self.batch_size, shuffle=False)
                rows = pad_rows(rows, self.padded_batch_size)
                yield (
                    int((rows >= 0).sum()),
                    data_lib.global_batch(
                        blocks, rows, self.batch_sharding, pad_token_id=self.pad_token_id
                    ),
                )

        with data_lib.Prefetcher(batches(), depth=2) as it:
            for real, batch in it:
                s, c = self.step(params, rest, batch)
                sums.append(local_value(s)[:real])
                counts.append(local_value(c)[:real])
        if not sums:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(sums).astype(np.float64), np.concatenate(counts).astype(np.float64)


def perplexity(
    model: nnx.Module,
    blocks: np.ndarray,
    *,
    batch_size: int,
    per_sequence: bool = False,
    mesh: Mesh | None = None,
    pad_token_id: int | None = None,
    compute_dtype: str | None = None,
) -> float | np.ndarray:
    """Perplexity of a model on token blocks (evaluation as in the paper's code).

    Args:
      model: an OPT model (`collapse_jax.lm.opt`), called as
        `model(input_ids, attention_mask, deterministic=True, dropout_key=None)`.
      blocks: int array [N, T] of token ids (may be memory-mapped).
      batch_size: blocks per forward pass (global; rounded up internally with filler rows to a
        multiple of the mesh's data x fsdp size).
      per_sequence: return one perplexity per block instead of one for the split.
      mesh: device mesh (default: all devices on "data").
      pad_token_id: token id treated as padding (excluded); None = all tokens count.
      compute_dtype: e.g. "bfloat16" for the forward pass; None = the parameters' dtype.

    Returns:
      per_sequence=False: exp of the mean NLL over every predicted token of the split (float).
        With full blocks this is the paper's exp(mean of batch-mean losses) except that a
        smaller last batch is not over-weighted.
      per_sequence=True: float64 [N], exp of each block's mean NLL over its T-1 predicted
        tokens (the quantity of the paper's perplexity histograms).
    """
    blocks = check_blocks(blocks, "blocks")
    check_token_ids(blocks, model, "blocks")
    mesh = default_mesh() if mesh is None else sharding.with_auto_axes(mesh)
    graphdef, params, rest = split_model(model)
    p_shard = sharding.logical_to_sharding(params, mesh)
    r_shard = jax.tree.map(lambda _: sharding.replicated(mesh), rest)
    dtype = jnp.dtype(compute_dtype) if compute_dtype else None
    ev = cached(
        ("eval", graphdef, shape_signature(params), mesh, batch_size, dtype, pad_token_id),
        lambda: Evaluator(
            graphdef,
            mesh,
            p_shard,
            r_shard,
            batch_size=batch_size,
            compute_dtype=dtype,
            pad_token_id=pad_token_id,
        ),
    )
    params = to_global(params, p_shard)
    rest = to_global(rest, r_shard)
    sums, counts = ev.row_nll(params, rest, blocks)
    if per_sequence:
        return np.exp(sums / np.maximum(counts, 1.0))
    return float(np.exp(sums.sum() / max(counts.sum(), 1.0)))


def unigram_perplexity(train_blocks: np.ndarray, eval_blocks: np.ndarray, vocab_size: int) -> float:
    """Perplexity of an add-one (Laplace) unigram model of `train_blocks` on `eval_blocks`.

    The baseline a language model must beat: p(v) = (count(v) + 1) / (N + V) over every token of
    the training blocks, scored on the same targets as `perplexity` (every token of a block but
    its first, which a causal LM is never asked to predict).

    Args:
      train_blocks: [N, T] int token ids the unigram is counted on.
      eval_blocks: [M, T] int token ids it is scored on.
      vocab_size: V, the number of ids the model may emit (ids lie in [0, V)).

    Returns:
      exp of the mean negative log-likelihood per target token.
    """
    train = np.asarray(train_blocks).reshape(-1)
    targets = np.asarray(eval_blocks)[:, 1:].reshape(-1)
    if train.size == 0 or targets.size == 0:
        raise ValueError("unigram_perplexity needs non-empty train and eval blocks")
    check_token_ids(train, vocab_size, "train_blocks")
    check_token_ids(targets, vocab_size, "eval_blocks")
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts) - np.log(counts.sum())
    return float(np.exp(-logp[targets].mean()))

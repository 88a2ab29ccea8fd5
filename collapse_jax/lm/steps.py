"""The pure train and evaluation steps of OPT fine-tuning, and their placement on a mesh.

`train_step` is `(state, rest, batch, key, hparams) -> (state, metrics)` (STYLE.md 3.3): the
model is merged from its graph definition inside the step, parameters and AdamW moments follow
the logical-axis rules of `jaxtools.sharding`, and batches are split over ("data", "fsdp").
`lm.train` jits it with explicit shardings and the state donated; `lm.evaluate` jits `eval_step`.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from collapse_jax.jaxtools import sharding

# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------


def token_nll(
    logits: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per-target negative log-likelihood of a causal LM and the target weights.

    Args:
      logits: [B, T, V] (any float dtype; computed in fp32).
      input_ids: [B, T] int.
      attention_mask: [B, T], 1 = real token.
      loss_mask: [B, T], 1 = token may be a target.

    Returns:
      nll [B, T-1] fp32 (0 where not counted) and weights [B, T-1] fp32 (1 = counted): target
      t+1 is counted if it is real and in the loss mask (HF's `labels` shift).
    """
    logits = logits[:, :-1].astype(jnp.float32)  # [B, T-1, V]
    targets = input_ids[:, 1:]  # [B, T-1]
    weights = (attention_mask[:, 1:] * loss_mask[:, 1:]).astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)  # [B, T-1]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jnp.where(weights > 0, logz - picked, 0.0)
    return nll, weights


class TrainState(NamedTuple):
    """Everything a train step updates (a pytree; checkpointed as is)."""

    step: jax.Array  # int32 scalar: optimizer steps done
    params: Any  # nnx.State of the model's nnx.Param variables
    opt_state: Any  # optax state


def _cast_floating(tree: Any, dtype: Any) -> Any:
    if dtype is None:
        return tree
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def _forward_sums(
    params: Any,
    rest: Any,
    batch: dict[str, jax.Array],
    key: jax.Array | None,
    *,
    graphdef: Any,
    deterministic: bool,
    compute_dtype: Any,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """Summed NLL over the batch, (token count, per-row NLL sums [B], per-row counts [B])."""
    model = nnx.merge(graphdef, _cast_floating(params, compute_dtype), rest)
    logits = model(
        batch["input_ids"],
        batch["attention_mask"],
        deterministic=deterministic,
        dropout_key=key,
    )  # [B, T, V]
    nll, w = token_nll(logits, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    return nll.sum(), (w.sum(), nll.sum(axis=1), w.sum(axis=1))


def train_step(
    state: TrainState,
    rest: Any,
    batch: dict[str, jax.Array],
    key: jax.Array,
    hparams: dict[str, jax.Array],
    *,
    graphdef: Any,
    tx: optax.GradientTransformation,
    schedule: Callable[..., jax.Array],
    grad_accum_steps: int,
    deterministic: bool,
    compute_dtype: Any,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch (pure; jitted by `finetune`).

    The loss is the mean NLL over every counted target of the whole batch; with gradient
    accumulation the micro-batches' summed NLLs and gradients are added before dividing by the
    batch's token count, so the step equals the unaccumulated one (up to float rounding).
    A non-finite loss, gradient or updated parameter leaves the state unchanged and sets
    `metrics["finite"]` False.

    Args:
      state: current TrainState.
      rest: non-parameter model state (passed through unchanged).
      batch: `input_ids`, `attention_mask`, `loss_mask`, each [B, T].
      key: base dropout key; step and micro-batch are folded in.
      hparams: runtime schedule values ({"learning_rate", "eta_min"}) for `schedule`.
      tx: a gradient transformation at unit learning rate (`make_optimizer`).
      schedule: (step, hparams) -> learning rate; the updates of `tx` are scaled by it.

    Returns:
      (new state, metrics: loss, grad_norm, param_norm, lr, finite, tokens).
    """
    step_key = jax.random.fold_in(key, state.step)
    grad_fn = jax.value_and_grad(
        functools.partial(
            _forward_sums,
            graphdef=graphdef,
            deterministic=deterministic,
            compute_dtype=compute_dtype,
        ),
        has_aux=True,
    )
    if grad_accum_steps == 1:
        (nll_sum, (count, _, _)), grads = grad_fn(state.params, rest, batch, step_key)
    else:
        # Micro-batch j takes rows j, j + k, j + 2k, ...: every micro-batch stays spread over
        # all data-parallel devices.
        k = grad_accum_steps
        micro = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1), batch
        )

        def body(carry, xs):
            i, mb = xs
            (s, (c, _, _)), g = grad_fn(state.params, rest, mb, jax.random.fold_in(step_key, i))
            acc_s, acc_c, acc_g = carry
            return (acc_s + s, acc_c + c, jax.tree.map(jnp.add, acc_g, g)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
        (nll_sum, count, grads), _ = jax.lax.scan(body, init, (jnp.arange(k), micro))
    denom = jnp.maximum(count, 1.0)
    loss = nll_sum / denom
    grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    lr = jnp.asarray(schedule(state.step, hparams), jnp.float32)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    param_norm = optax.tree.norm(params)
    # An update can overflow even when loss and gradient are finite (a huge learning rate).
    # (Checked leaf by leaf: the norm itself overflows for finite weights above ~1e19.)
    for leaf in jax.tree.leaves(params):
        finite = finite & jnp.isfinite(leaf).all()
    new = TrainState(state.step + 1, params, opt_state)
    # Keep the last good state on NaN/inf: the host raises after seeing `finite`.
    kept = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "param_norm": param_norm,
        "lr": lr,
        "finite": finite,
        "tokens": count,
    }
    return kept, metrics


def eval_step(
    params: Any,
    rest: Any,
    batch: dict[str, jax.Array],
    *,
    graphdef: Any,
    compute_dtype: Any,
) -> tuple[jax.Array, jax.Array]:
    """Per-row NLL sums [B] and counted targets [B] (pure; jitted by `Evaluator`)."""
    _, (_, row_nll, row_count) = _forward_sums(
        params,
        rest,
        batch,
        None,
        graphdef=graphdef,
        deterministic=True,
        compute_dtype=compute_dtype,
    )
    return row_nll, row_count


# ----------------------------------------------------------------------------------------------
# Placement helpers
# ----------------------------------------------------------------------------------------------


def default_mesh() -> Mesh:
    """All devices on "data" (all local devices on one host; the global devices after
    `jax.distributed.initialize`)."""
    return sharding.make_mesh({"data": -1})


def _padded_batch(mesh: Mesh, batch_size: int, multiple: int = 1) -> int:
    """The batch size actually run: `batch_size` rounded up to a multiple of the mesh's
    data-parallel size (times `multiple`, the accumulation steps).

    The extra rows are filler with zero loss weight, so the step equals one on exactly
    `batch_size` blocks; any batch size runs on any number of devices.
    """
    sharding.validate_mesh(mesh)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    m = sharding.data_parallel_size(mesh) * multiple
    return -(-batch_size // m) * m


def _pad_rows(rows: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([rows, np.full(size - len(rows), -1, dtype=rows.dtype)])


def _to_global(tree: Any, shardings: Any) -> Any:
    """Places host-visible arrays onto (possibly multi-process) shardings as fresh buffers.

    Goes through NumPy, so the caller's arrays are never aliased (they stay valid after the
    train step donates the state) and every process contributes only its addressable shards.
    """

    def put(x: Any, s: NamedSharding) -> jax.Array:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.jit(jnp.copy, out_shardings=s)(x)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree.map(put, tree, shardings)


def opt_state_shardings(opt_shape: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of an optax state: a leaf whose path ends with a parameter's path and has its
    shape (AdamW's mu / nu) is sharded like that parameter; everything else is replicated."""
    by_path = {}
    p_leaves = jax.tree_util.tree_leaves_with_path(params)
    s_leaves = jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), s in zip(p_leaves, s_leaves, strict=True):
        by_path[tuple(path)] = (np.shape(leaf), s)
    depths = sorted({len(p) for p in by_path}, reverse=True)

    def one(path: tuple, leaf: Any) -> NamedSharding:
        for d in depths:
            hit = by_path.get(tuple(path[-d:])) if len(path) >= d else None
            if hit is not None and hit[0] == tuple(np.shape(leaf)):
                return hit[1]
        return sharding.replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, opt_shape)


def _scalar(x: jax.Array) -> float:
    """A replicated scalar as a Python float (works when the array spans several processes)."""
    return float(np.asarray(x.addressable_data(0)))


def _local_value(x: jax.Array) -> np.ndarray:
    return np.asarray(x.addressable_data(0))


# Compiled steps are reused across calls with the same model structure, mesh and settings (e.g.
# every generation of the paper's loop), so only the first call pays for XLA compilation.
_COMPILED: collections.OrderedDict[Any, Any] = collections.OrderedDict()
_COMPILED_MAX = 8


def _cached(key: Any, build: Callable[[], Any]) -> Any:
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key]
    value = build()
    _COMPILED[key] = value
    while len(_COMPILED) > _COMPILED_MAX:
        _COMPILED.popitem(last=False)
    return value


def _signature(tree: Any) -> tuple:
    return tuple(
        (jax.tree_util.keystr(p), tuple(np.shape(x)), str(x.dtype))
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
    )


def _check_blocks(blocks: Any, name: str) -> np.ndarray:
    if not hasattr(blocks, "shape") or len(blocks.shape) != 2:
        raise ValueError(f"{name} must be an int array [N, T], got shape {np.shape(blocks)}")
    if not np.issubdtype(blocks.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {blocks.dtype}")
    if blocks.shape[0] < 1 or blocks.shape[1] < 2:
        raise ValueError(f"{name} needs at least one block of >= 2 tokens, got {blocks.shape}")
    return blocks


def _split(model: nnx.Module) -> tuple[Any, Any, Any]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest

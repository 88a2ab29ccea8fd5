"""Sharded fine-tuning and evaluation of OPT on token blocks (the paper's LM experiments).

The paper's code (`curse_recurse`, `plt_model.py`) fine-tunes facebook/opt-125m on 64-token
WikiText-2 blocks with `torch.optim.AdamW(lr=2e-5)` (torch defaults: betas (0.9, 0.999),
eps 1e-8, weight decay 0.01), batch 128, 5 epochs, and `CosineAnnealingLR(T_max=epochs,
eta_min=1e-6)` stepped once per epoch: during epoch e (0-based) the learning rate is

    lr_e = eta_min + (lr_0 - eta_min) * (1 + cos(pi * e / T_max)) / 2.

The loss is Hugging Face's causal-LM loss (predict token t+1 from tokens <= t, mean over the
non-masked targets of the batch) and perplexity is exp(mean loss).

Design (STYLE.md 3.3/3.5): the model is split once (`nnx.split`) into a graph definition and
parameter state; the train step is a pure function `(state, batch, key) -> (state, metrics)`
merged back inside `jax.jit` with explicit in/out shardings and the state donated. Parameters and
AdamW moments follow the logical-axis rules of `collapse_jax.sharding` (FSDP over "fsdp", tensor
parallelism over "tensor"); batches are split over ("data", "fsdp"). Everything random is a
function of the seed and the step (shuffling: NumPy on the host per epoch; dropout:
`fold_in(key, step)` with partitionable threefry), never of the mesh, so every mesh shape and
process count gives the same loss curve, and a resumed run continues exactly.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import pathlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from collapse_jax import sharding
from collapse_jax.lm import data as data_lib
from collapse_jax.lm.tokenizer import check_token_ids

Schedule = Callable[[jax.Array | int], jax.Array]

SCHEDULES = ("paper_cosine", "warmup_cosine", "constant")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient; the state of the step before is kept."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """Hyper-parameters of `finetune` (defaults: the paper's code where it sets them).

    Attributes:
      epochs: passes over the training blocks.
      batch_size: blocks per optimizer step (global, over all devices and processes).
      learning_rate: peak learning rate (the paper: 2e-5).
      schedule: "paper_cosine" (cosine annealing per epoch, T_max = epochs), "warmup_cosine"
        (linear warmup over `warmup_steps`, then cosine per step down to `eta_min`) or "constant".
      eta_min: final learning rate of the cosine schedules (the paper: 1e-6).
      warmup_steps: warmup length of "warmup_cosine".
      weight_decay, b1, b2, eps: AdamW (torch's defaults).
      max_grad_norm: clip the global gradient norm to this (None = no clipping, as the paper).
      grad_accum_steps: split each batch into this many micro-batches (same result, less memory).
      compute_dtype: dtype of the forward/backward pass ("bfloat16"); parameters and optimizer
        state stay in their own dtype (fp32 master weights). None = the parameters' dtype.
      dropout: apply the model's dropout during training (the model's own rates).
      shuffle: reshuffle the blocks every epoch (as the paper's DataLoader).
      drop_last: drop a last partial batch (the paper keeps it).
      pad_token_id: token id treated as padding (masked from attention and loss); None = every
        token is real (the paper's blocks have no padding).
      eval_batch_size: batch size of the per-epoch validation (default `batch_size`).
      save_every_steps: save a checkpoint every this many optimizer steps (and at every epoch
        end); None = only at epoch ends.
      keep_checkpoints: how many recent step checkpoints to keep.
      prefetch: batches prepared ahead of the running step.
    """

    epochs: int
    batch_size: int
    learning_rate: float
    schedule: str = "paper_cosine"
    eta_min: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = None
    grad_accum_steps: int = 1
    compute_dtype: str | None = None
    dropout: bool = True
    shuffle: bool = True
    drop_last: bool = False
    pad_token_id: int | None = None
    eval_batch_size: int | None = None
    save_every_steps: int | None = None
    keep_checkpoints: int = 2
    prefetch: int = 2

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {SCHEDULES}")
        if self.grad_accum_steps < 1 or self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"grad_accum_steps={self.grad_accum_steps} must be >= 1 and divide "
                f"batch_size={self.batch_size}"
            )
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.save_every_steps is not None and self.save_every_steps < 1:
            raise ValueError(f"save_every_steps must be >= 1, got {self.save_every_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


# ----------------------------------------------------------------------------------------------
# Schedules and optimizer
# ----------------------------------------------------------------------------------------------


def learning_rate_at(
    step: jax.Array | int, hparams: dict[str, jax.Array | float], *, kind: str
) -> jax.Array:
    """The learning rate of optimizer step `step` (0-based) under schedule `kind`.

    Args:
      step: optimizer steps done before this one.
      hparams: "learning_rate" (peak lr_0), "eta_min" (final lr), "epochs", "steps_per_epoch",
        "warmup_steps": runtime values, so changing them (another lr, a data set of another
        size) does not recompile the train step.
      kind: "paper_cosine": torch `CosineAnnealingLR(T_max=epochs, eta_min)` stepped once per
        epoch, lr = eta_min + (lr_0 - eta_min) * (1 + cos(pi * epoch / epochs)) / 2 with
        epoch = step // steps_per_epoch; "warmup_cosine": lr_0 * step / warmup_steps during
        warmup, then a per-step cosine from lr_0 down to eta_min at the last step (optax's
        `warmup_cosine_decay_schedule`); "constant": lr_0.
    """
    f32 = jnp.float32
    lr0 = jnp.asarray(hparams["learning_rate"], f32)
    eta_min = jnp.asarray(hparams["eta_min"], f32)
    epochs = jnp.asarray(hparams["epochs"], f32)
    spe = jnp.asarray(hparams["steps_per_epoch"], jnp.int32)
    warmup = jnp.asarray(hparams["warmup_steps"], f32)
    step = jnp.asarray(step, jnp.int32)
    if kind == "paper_cosine":
        epoch = (step // spe).astype(f32)
        return eta_min + (lr0 - eta_min) * (1.0 + jnp.cos(jnp.pi * epoch / epochs)) / 2.0
    if kind == "warmup_cosine":
        total = jnp.maximum(epochs * spe.astype(f32), warmup + 1.0)
        t = step.astype(f32)
        warm = lr0 * t / jnp.maximum(warmup, 1.0)
        frac = jnp.clip((t - warmup) / (total - warmup), 0.0, 1.0)
        cos = eta_min + (lr0 - eta_min) * (1.0 + jnp.cos(jnp.pi * frac)) / 2.0
        return jnp.where(t < warmup, warm, cos)
    if kind == "constant":
        return lr0 + 0.0 * eta_min
    raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULES}")


def paper_cosine_schedule(
    learning_rate: float, epochs: int, steps_per_epoch: int, eta_min: float = 1e-6
) -> Schedule:
    """torch `CosineAnnealingLR(T_max=epochs, eta_min)` stepped once per epoch, per opt. step.

    Returns:
      step -> eta_min + (lr - eta_min) * (1 + cos(pi * (step // steps_per_epoch) / epochs)) / 2.
    """
    hp = {
        "learning_rate": learning_rate,
        "eta_min": eta_min,
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "warmup_steps": 0,
    }
    return lambda step: learning_rate_at(step, hp, kind="paper_cosine")


def _hparams(config: TrainConfig, steps_per_epoch: int) -> dict[str, float | int]:
    return {
        "learning_rate": config.learning_rate,
        "eta_min": config.eta_min,
        "epochs": config.epochs,
        "steps_per_epoch": steps_per_epoch,
        "warmup_steps": config.warmup_steps,
    }


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> Schedule:
    """The learning-rate schedule named by `config.schedule`, as a function of the opt. step."""
    hp = _hparams(config, steps_per_epoch)
    return lambda step: learning_rate_at(step, hp, kind=config.schedule)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW at unit learning rate (torch semantics: decoupled decay, scaled by the lr with the
    Adam step), optionally after gradient clipping; `train_step` multiplies its updates by the
    scheduled learning rate, which is therefore a runtime value (no recompile per lr)."""
    adamw = optax.adamw(
        1.0,
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )
    if config.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)


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


class _Compiled(NamedTuple):
    init: Callable[..., Any]
    step: Callable[..., Any]
    state_shardings: Any
    rest_shardings: Any
    batch: NamedSharding


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


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


class Evaluator:
    """Per-block NLL of a split, sharded like training (compiled once per batch shape)."""

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
        self.padded_batch_size = _padded_batch(mesh, batch_size)
        self.pad_token_id = pad_token_id
        self.batch_sharding = sharding.batch_sharding(mesh)
        rep = sharding.replicated(mesh)
        self._fn = jax.jit(
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
                rows = _pad_rows(rows, self.padded_batch_size)
                yield (
                    int((rows >= 0).sum()),
                    data_lib.global_batch(
                        blocks, rows, self.batch_sharding, pad_token_id=self.pad_token_id
                    ),
                )

        with data_lib.Prefetcher(batches(), depth=2) as it:
            for real, batch in it:
                s, c = self._fn(params, rest, batch)
                sums.append(_local_value(s)[:real])
                counts.append(_local_value(c)[:real])
        if not sums:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(sums).astype(np.float64), np.concatenate(counts).astype(np.float64)


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
    blocks = _check_blocks(blocks, "blocks")
    check_token_ids(blocks, model, "blocks")
    mesh = default_mesh() if mesh is None else sharding.with_auto_axes(mesh)
    graphdef, params, rest = _split(model)
    p_shard = sharding.logical_to_sharding(params, mesh)
    r_shard = jax.tree.map(lambda _: sharding.replicated(mesh), rest)
    dtype = jnp.dtype(compute_dtype) if compute_dtype else None
    ev = _cached(
        ("eval", graphdef, _signature(params), mesh, batch_size, dtype, pad_token_id),
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
    params = _to_global(params, p_shard)
    rest = _to_global(rest, r_shard)
    sums, counts = ev.row_nll(params, rest, blocks)
    if per_sequence:
        return np.exp(sums / np.maximum(counts, 1.0))
    return float(np.exp(sums.sum() / max(counts.sum(), 1.0)))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


class PreparedTraining(NamedTuple):
    """What `prepare_training` returns: a placed initial state and the compiled step."""

    graphdef: Any
    params: Any  # the model's (host) nnx.Param state, for signatures
    state: TrainState  # fresh state on the mesh (step 0, AdamW moments 0)
    rest: Any  # non-parameter model state on the mesh
    # (state, rest, batch, key, hparams) -> (state, metrics)
    step: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
    state_shardings: TrainState
    rest_shardings: Any
    batch: NamedSharding  # sharding of [B, T] batch arrays
    schedule: Callable[..., jax.Array]  # (step, hparams) -> lr
    hparams: dict[str, jax.Array]  # the runtime schedule values, placed on the mesh
    compute_dtype: Any


def prepare_training(
    model: nnx.Module, config: TrainConfig, *, mesh: Mesh, steps_per_epoch: int
) -> PreparedTraining:
    """Splits the model, places parameters and AdamW state on `mesh` and jits the train step.

    The jitted step (explicit in/out shardings, state donated) is cached per model structure,
    mesh and step-relevant settings, so later calls (e.g. the next generation) skip compilation.
    `finetune` is built on this; benchmarks call it to time the bare step.
    """
    lr_schedule = functools.partial(learning_rate_at, kind=config.schedule)
    tx = make_optimizer(config)
    compute_dtype = jnp.dtype(config.compute_dtype) if config.compute_dtype else None
    graphdef, params, rest = _split(model)

    def build() -> _Compiled:
        p_shard = sharding.logical_to_sharding(params, mesh)
        rest_shard = jax.tree.map(lambda _: sharding.replicated(mesh), rest)
        o_shard = opt_state_shardings(jax.eval_shape(tx.init, params), params, p_shard, mesh)
        rep = sharding.replicated(mesh)
        state_shard = TrainState(rep, p_shard, o_shard)
        batch_shard = sharding.batch_sharding(mesh)
        init = jax.jit(tx.init, in_shardings=(p_shard,), out_shardings=o_shard)
        step = jax.jit(
            functools.partial(
                train_step,
                graphdef=graphdef,
                tx=tx,
                schedule=lr_schedule,
                grad_accum_steps=config.grad_accum_steps,
                deterministic=not config.dropout,
                compute_dtype=compute_dtype,
            ),
            in_shardings=(state_shard, rest_shard, batch_shard, rep, rep),
            out_shardings=(state_shard, rep),
            donate_argnums=(0,),
        )
        return _Compiled(init, step, state_shard, rest_shard, batch_shard)

    # Only the fields that change the compiled step belong in the cache key.
    step_config = dataclasses.replace(
        config,
        learning_rate=1.0,
        eta_min=0.0,
        epochs=1,
        warmup_steps=0,
        eval_batch_size=None,
        save_every_steps=None,
        keep_checkpoints=2,
        prefetch=2,
        shuffle=True,
        drop_last=False,
        pad_token_id=None,
    )
    key = ("train", graphdef, _signature(params), mesh, step_config)
    fns = _cached(key, build)
    rep = sharding.replicated(mesh)
    hparams = {
        k: np.asarray(v, np.int32 if k in ("steps_per_epoch", "warmup_steps") else np.float32)
        for k, v in _hparams(config, steps_per_epoch).items()
    }
    params_g = _to_global(params, fns.state_shardings.params)
    rest_g = _to_global(rest, fns.rest_shardings)
    state = TrainState(_to_global(np.zeros((), np.int32), rep), params_g, fns.init(params_g))
    return PreparedTraining(
        graphdef,
        params,
        state,
        rest_g,
        fns.step,
        fns.state_shardings,
        fns.rest_shardings,
        fns.batch,
        lr_schedule,
        _to_global(hparams, {k: rep for k in hparams}),
        compute_dtype,
    )


def finetune(
    model: nnx.Module,
    train_blocks: np.ndarray,
    *,
    valid_blocks: np.ndarray | None = None,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    schedule: str = "paper_cosine",
    mesh: Mesh | None = None,
    seed: int = 0,
    checkpoint_dir: str | pathlib.Path | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    **options: Any,
) -> tuple[nnx.Module, dict[str, list[float]]]:
    """Fine-tunes an OPT model on token blocks (the paper's per-generation training).

    Args:
      model: an OPT model (`collapse_jax.lm.opt`); it is not modified.
      train_blocks: int array [N, T] of token ids (may be memory-mapped), the same on every
        process.
      valid_blocks: optional [M, T] blocks evaluated after every epoch.
      epochs: passes over `train_blocks` (the paper: 5).
      batch_size: global blocks per optimizer step (the paper: 128); any size runs on any mesh
        (filler rows with zero loss weight round it up to a multiple of data x fsdp size).
      learning_rate: peak learning rate (the paper: 2e-5).
      schedule: "paper_cosine", "warmup_cosine" or "constant" (see `TrainConfig`).
      mesh: a mesh with axes from ("data", "fsdp", "tensor"); None = all devices on "data".
      seed: seeds the data order and dropout; the loss curve depends on nothing else.
      checkpoint_dir: if set, checkpoints go there (every `save_every_steps` steps, at every
        epoch end, and the best epoch by validation loss under `best/`); a run finding a
        checkpoint there resumes from it exactly (same data order, RNG and history).
      on_step: called on the host after every optimizer step with (step, metrics).
      **options: any other `TrainConfig` field (eta_min, warmup_steps, weight_decay,
        max_grad_norm, grad_accum_steps, compute_dtype, dropout, pad_token_id, ...).

    Returns:
      (new model, history): history has "train_loss", "lr" and "grad_norm" (one entry per
      optimizer step), "valid_loss" and "valid_ppl" (one per epoch, if `valid_blocks`) and
      "epoch_end_step".

    Raises:
      NonFiniteLossError: a step produced a NaN/inf loss or gradient (names the step; the
        checkpoints written before stay the last good ones).
      ValueError: bad blocks, mesh / batch size mismatch, a checkpoint of another model or run.
    """
    from collapse_jax.lm import checkpoint as ckpt_lib

    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        schedule=schedule,
        **options,
    )
    train_blocks = _check_blocks(train_blocks, "train_blocks")
    check_token_ids(train_blocks, model, "train_blocks")
    if valid_blocks is not None:
        valid_blocks = _check_blocks(valid_blocks, "valid_blocks")
        check_token_ids(valid_blocks, model, "valid_blocks")
    mesh = default_mesh() if mesh is None else sharding.with_auto_axes(mesh)
    padded = _padded_batch(mesh, config.batch_size, config.grad_accum_steps)
    n_blocks = train_blocks.shape[0]
    spe = data_lib.steps_per_epoch(n_blocks, config.batch_size, config.drop_last)
    if spe < 1:
        raise ValueError(f"{n_blocks} blocks give no full batch of {config.batch_size}")
    total_steps = config.epochs * spe

    prep = prepare_training(model, config, mesh=mesh, steps_per_epoch=spe)
    graphdef, params, state, rest_g, step_fn = (
        prep.graphdef,
        prep.params,
        prep.state,
        prep.rest,
        prep.step,
    )
    state_shard, rest_shard, batch_shard = prep.state_shardings, prep.rest_shardings, prep.batch
    compute_dtype, sig = prep.compute_dtype, _signature(params)
    evaluator = None
    if valid_blocks is not None:
        eval_bs = config.eval_batch_size or config.batch_size
        evaluator = _cached(
            ("eval", graphdef, sig, mesh, eval_bs, compute_dtype, config.pad_token_id),
            lambda: Evaluator(
                graphdef,
                mesh,
                state_shard.params,
                rest_shard,
                batch_size=eval_bs,
                compute_dtype=compute_dtype,
                pad_token_id=config.pad_token_id,
            ),
        )

    history: dict[str, list[float]] = {
        "train_loss": [],
        "lr": [],
        "grad_norm": [],
        "valid_loss": [],
        "valid_ppl": [],
        "epoch_end_step": [],
    }
    run_meta = {
        "model": ckpt_lib.tree_signature(params),
        "train_blocks": list(train_blocks.shape),
        "config": {
            k: getattr(config, k)
            for k in (
                "epochs",
                "batch_size",
                "learning_rate",
                "schedule",
                "eta_min",
                "warmup_steps",
                "weight_decay",
                "grad_accum_steps",
                "drop_last",
                "shuffle",
            )
        },
        "seed": seed,
    }

    ckpt = None
    start = 0
    best = math.inf
    if checkpoint_dir is not None:
        ckpt = ckpt_lib.TrainCheckpointer(
            checkpoint_dir,
            keep=config.keep_checkpoints,
        )
        latest = ckpt.latest_step()
        if latest is not None:
            try:
                state, meta = ckpt.restore(latest, state, state_shard, expect=run_meta)
            except BaseException:
                ckpt.close()
                raise
            history = {k: list(v) for k, v in meta["history"].items()}
            best = meta.get("best_valid_loss", math.inf)
            start = latest

    rep = sharding.replicated(mesh)
    key = _to_global(np.asarray(jax.random.key_data(jax.random.key(seed))), rep)
    key = jax.random.wrap_key_data(key)

    def batches(first: int) -> Iterator[tuple[int, dict[str, jax.Array]]]:
        for step in range(first, total_steps):
            epoch, i = divmod(step, spe)
            rows = data_lib.batch_rows(
                seed, epoch, i, n_blocks, config.batch_size, shuffle=config.shuffle
            )
            rows = _pad_rows(rows, padded)
            yield (
                step,
                data_lib.global_batch(
                    train_blocks, rows, batch_shard, pad_token_id=config.pad_token_id
                ),
            )

    def record(step: int, metrics: dict[str, jax.Array]) -> None:
        m = {k: _scalar(v) for k, v in metrics.items()}
        if not m["finite"]:
            if ckpt is not None:
                ckpt.wait()
            where = f" (last good checkpoint: step {ckpt.latest_step()})" if ckpt else ""
            raise NonFiniteLossError(
                f"non-finite loss {m['loss']} / gradient norm {m['grad_norm']} / parameter norm "
                f"{m['param_norm']} at optimizer step {step + 1} (epoch {step // spe + 1}); "
                f"training stopped, the state before this step is kept{where}"
            )
        history["train_loss"].append(m["loss"])
        history["lr"].append(m["lr"])
        history["grad_norm"].append(m["grad_norm"])
        if on_step is not None:
            on_step(step + 1, m)

    def meta() -> dict[str, Any]:
        return {**run_meta, "history": history, "best_valid_loss": best}

    try:
        with data_lib.Prefetcher(batches(start), depth=config.prefetch) as it:
            pending: tuple[int, dict[str, jax.Array]] | None = None
            for step, batch in it:
                state, metrics = step_fn(state, rest_g, batch, key, prep.hparams)
                # Read the previous step's metrics while this one runs (no per-step stall).
                if pending is not None:
                    record(*pending)
                pending = (step, metrics)
                done = step + 1
                epoch_end = done % spe == 0
                save_now = ckpt is not None and (
                    epoch_end
                    or (config.save_every_steps is not None and done % config.save_every_steps == 0)
                )
                if not (epoch_end or save_now):
                    continue
                # Never evaluate or save a state before its loss is known to be finite.
                record(*pending)
                pending = None
                if epoch_end:
                    history["epoch_end_step"].append(done)
                    if evaluator is not None:
                        sums, counts = evaluator.row_nll(state.params, rest_g, valid_blocks)
                        vloss = float(sums.sum() / max(counts.sum(), 1.0))
                        history["valid_loss"].append(vloss)
                        history["valid_ppl"].append(math.exp(min(vloss, 700.0)))
                        if ckpt is not None and vloss < best:
                            best = vloss
                            ckpt.save_best(done, state, meta(), vloss)
                if save_now:
                    ckpt.save(done, state, meta())
            if pending is not None:
                record(*pending)
    finally:
        if ckpt is not None:
            ckpt.close()

    new_model = nnx.merge(graphdef, state.params, rest_g)
    return new_model, history


def load_checkpoint(
    model: nnx.Module,
    checkpoint_dir: str | pathlib.Path,
    *,
    best: bool = True,
    step: int | None = None,
    mesh: Mesh | None = None,
) -> nnx.Module:
    """A copy of `model` with the parameters of a `finetune` checkpoint.

    Args:
      model: a model of the same structure as the one trained (its values are not used).
      checkpoint_dir: the `checkpoint_dir` given to `finetune`.
      best: take the best checkpoint by validation loss (else the latest, or `step`).
      step: a specific step of the periodic checkpoints (implies best=False).
      mesh: mesh to place the parameters on (default: all devices on "data").

    Raises:
      FileNotFoundError: no checkpoint in the directory.
      ValueError: a corrupt checkpoint, or one of another model.
    """
    from collapse_jax.lm import checkpoint as ckpt_lib

    mesh = default_mesh() if mesh is None else sharding.with_auto_axes(mesh)
    graphdef, params, rest = _split(model)
    p_shard = sharding.logical_to_sharding(params, mesh)
    path = pathlib.Path(checkpoint_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    ck = ckpt_lib.TrainCheckpointer(path)
    try:
        use_best = best and step is None
        which = ck.best_step() if use_best else (ck.latest_step() if step is None else step)
        if which is None:
            raise FileNotFoundError(f"no {'best' if use_best else 'periodic'} checkpoint in {path}")
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
        restored = ck.restore_params(
            which,
            abstract,
            p_shard,
            expect={"model": ckpt_lib.tree_signature(params)},
            best=use_best,
        )
    finally:
        ck.close()
    return nnx.merge(
        graphdef,
        restored,
        _to_global(rest, jax.tree.map(lambda _: sharding.replicated(mesh), rest)),
    )

"""The pure train and evaluation steps of OPT fine-tuning.

`train_step` is `(state, rest, batch, key, hparams) -> (state, metrics)` (STYLE.md 3.3): the
model is merged from its graph definition inside the step, parameters and AdamW moments follow
the logical-axis rules of `jaxtools.sharding`, and batches are split over ("data", "fsdp")
(`lm.placement` places them). `lm.train` jits it with explicit shardings and the state donated;
`lm.evaluate` jits `eval_step`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

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


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Every floating leaf of `tree` cast to `dtype` (None: unchanged); other leaves as they are."""
    if dtype is None:
        return tree
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def set_compute_dtype(model: nnx.Module, dtype: Any) -> nnx.Module:
    """Sets the compute dtype of `model` and of every submodule with a `dtype` attribute.

    Flax's convention (and `lm.opt`'s): `dtype` is the dtype a module computes in (activations
    and matmul inputs), `param_dtype` the dtype its parameters are stored in. The steps merge a
    fresh model inside the traced program and call this on it, so that `compute_dtype="bfloat16"`
    runs the matmuls in bf16 whatever dtype the caller built the model with. Modules keep their
    float32 islands (LayerNorm statistics, softmax, logits). `dtype` None leaves `model` as is.

    Returns:
      `model` (modified in place).
    """
    if dtype is None:
        return model
    dtype = jnp.dtype(dtype)
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "dtype"):
            module.dtype = dtype
    return model


def forward_sums(
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
    model = nnx.merge(graphdef, cast_floating(params, compute_dtype), rest)
    set_compute_dtype(model, compute_dtype)
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
            forward_sums,
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
    _, (_, row_nll, row_count) = forward_sums(
        params,
        rest,
        batch,
        None,
        graphdef=graphdef,
        deterministic=True,
        compute_dtype=compute_dtype,
    )
    return row_nll, row_count

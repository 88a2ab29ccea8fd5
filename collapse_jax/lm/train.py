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
AdamW moments follow the logical-axis rules of `jaxtools.sharding` (FSDP over "fsdp", tensor
parallelism over "tensor"); batches are split over ("data", "fsdp"). Everything random is a
function of the seed and the step (shuffling: NumPy on the host per epoch; dropout:
`fold_in(key, step)` with partitionable threefry), never of the mesh, so every mesh shape and
process count gives the same loss curve, and a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from collapse_jax.jaxtools import sharding
from collapse_jax.lm import checkpoint as ckpt_lib
from collapse_jax.lm import data as data_lib
from collapse_jax.lm.evaluate import Evaluator

# Part of this module's public API (DESIGN.md): the paper's evaluation next to its training.
from collapse_jax.lm.evaluate import perplexity as perplexity
from collapse_jax.lm.placement import (
    cached,
    check_blocks,
    default_mesh,
    opt_state_shardings,
    pad_rows,
    padded_batch,
    scalar,
    shape_signature,
    split_model,
    to_global,
)
from collapse_jax.lm.schedule import learning_rate_at, make_optimizer, schedule_hparams
from collapse_jax.lm.steps import TrainState, train_step
from collapse_jax.lm.tokenizer import check_token_ids
from collapse_jax.lm.train_config import TrainConfig
from collapse_jax.rundir import events


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient; the state of the step before is kept."""


class _Compiled(NamedTuple):
    init: Callable[..., Any]
    step: Callable[..., Any]
    state_shardings: Any
    rest_shardings: Any
    batch: NamedSharding


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


def compile_train_step(
    graphdef: Any, params: Any, rest: Any, config: TrainConfig, *, mesh: Mesh
) -> _Compiled:
    """The jitted AdamW init and train step of a split model on `mesh` (explicit in/out
    shardings, the state donated), and their shardings. `params` and `rest` may be abstract
    (`nnx.eval_shape`): only their structure, shapes and logical axes are read (the memory plan
    of `collapse-jax run --dry-run` lowers the step without allocating a model)."""
    tx = make_optimizer(config)
    compute_dtype = jnp.dtype(config.compute_dtype) if config.compute_dtype else None
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
            schedule=functools.partial(learning_rate_at, kind=config.schedule),
            grad_accum_steps=config.grad_accum_steps,
            deterministic=not config.dropout,
            compute_dtype=compute_dtype,
        ),
        in_shardings=(state_shard, rest_shard, batch_shard, rep, rep),
        out_shardings=(state_shard, rep),
        donate_argnums=(0,),
    )
    return _Compiled(init, step, state_shard, rest_shard, batch_shard)


def prepare_training(
    model: nnx.Module, config: TrainConfig, *, mesh: Mesh, steps_per_epoch: int
) -> PreparedTraining:
    """Splits the model, places parameters and AdamW state on `mesh` and jits the train step.

    The jitted step (`compile_train_step`) is cached per model structure, mesh and step-relevant
    settings, so later calls (e.g. the next generation) skip compilation. `finetune` is built on
    this; benchmarks call it to time the bare step.
    """
    lr_schedule = functools.partial(learning_rate_at, kind=config.schedule)
    compute_dtype = jnp.dtype(config.compute_dtype) if config.compute_dtype else None
    graphdef, params, rest = split_model(model)

    def build() -> _Compiled:
        return compile_train_step(graphdef, params, rest, config, mesh=mesh)

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
        keep_best=False,
        shuffle=True,
        drop_last=False,
        pad_token_id=None,
    )
    key = ("train", graphdef, shape_signature(params), mesh, step_config)
    fns = cached(key, build)
    rep = sharding.replicated(mesh)
    hparams = {
        k: np.asarray(v, np.int32 if k in ("steps_per_epoch", "warmup_steps") else np.float32)
        for k, v in schedule_hparams(config, steps_per_epoch).items()
    }
    params_g = to_global(params, fns.state_shardings.params)
    rest_g = to_global(rest, fns.rest_shardings)
    state = TrainState(to_global(np.zeros((), np.int32), rep), params_g, fns.init(params_g))
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
        to_global(hparams, {k: rep for k in hparams}),
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
    log: events.StepLog | None = None,
    **options: Any,
) -> tuple[nnx.Module, dict[str, list[float]]]:
    """Fine-tunes an OPT model on token blocks (keyword form of `fit`).

    Args:
      epochs, batch_size, learning_rate, schedule: see `TrainConfig`.
      **options: any other `TrainConfig` field (eta_min, warmup_steps, weight_decay,
        max_grad_norm, grad_accum_steps, compute_dtype, dropout, pad_token_id, keep_best, ...).
      Everything else: see `fit`.
    """
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        schedule=schedule,
        **options,
    )
    return fit(
        model,
        train_blocks,
        config,
        valid_blocks=valid_blocks,
        mesh=mesh,
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        on_step=on_step,
        log=log,
    )


def fit(
    model: nnx.Module,
    train_blocks: np.ndarray,
    config: TrainConfig,
    *,
    valid_blocks: np.ndarray | None = None,
    mesh: Mesh | None = None,
    seed: int = 0,
    checkpoint_dir: str | pathlib.Path | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    log: events.StepLog | None = None,
) -> tuple[nnx.Module, dict[str, list[float]]]:
    """Fine-tunes an OPT model on token blocks (the paper's per-generation training).

    Args:
      model: an OPT model (`collapse_jax.lm.opt`); it is not modified.
      train_blocks: int array [N, T] of token ids (may be memory-mapped), the same on every
        process.
      config: the training settings (`TrainConfig`, e.g. the experiment's `train:` block).
      valid_blocks: optional [M, T] blocks evaluated after every epoch (with
        `config.keep_best`, the epoch with the lowest loss on them is returned).
      mesh: a mesh with axes from ("data", "fsdp", "tensor"); None = all devices on "data".
        Any batch size runs on any mesh (filler rows with zero loss weight round it up to a
        multiple of data x fsdp size).
      seed: seeds the data order and dropout; the loss curve depends on nothing else.
      checkpoint_dir: if set, checkpoints go there (every `save_every_steps` steps, at every
        epoch end, and the best epoch by validation loss under `best/`); a run finding a
        checkpoint there resumes from it exactly (same data order, RNG and history).
      on_step: called on the host after every optimizer step with (step, metrics).
      log: where the steps are reported (`rundir.events.StepLog`: metrics.jsonl records of the
        steps it names due, from the scalars the step returns anyway, one step late; the
        per-epoch validation; a progress bar); None reports nothing.

    Returns:
      (new model, history): history has "train_loss", "lr" and "grad_norm" (one entry per
      optimizer step), "valid_loss" and "valid_ppl" (one per epoch, if `valid_blocks`),
      "epoch_end_step", and "selected_epoch" (one entry: the 1-based epoch whose parameters
      were returned).

    Raises:
      NonFiniteLossError: a step produced a NaN/inf loss or gradient (names the step; the
        checkpoints written before stay the last good ones).
      ValueError: bad blocks, mesh / batch size mismatch, a checkpoint of another model or run.
    """
    train_blocks = check_blocks(train_blocks, "train_blocks")
    check_token_ids(train_blocks, model, "train_blocks")
    if valid_blocks is not None:
        valid_blocks = check_blocks(valid_blocks, "valid_blocks")
        check_token_ids(valid_blocks, model, "valid_blocks")
    mesh = default_mesh() if mesh is None else sharding.with_auto_axes(mesh)
    padded = padded_batch(mesh, config.batch_size, config.grad_accum_steps)
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
    compute_dtype, sig = prep.compute_dtype, shape_signature(params)
    evaluator = None
    if valid_blocks is not None:
        eval_bs = config.eval_batch_size or config.batch_size
        evaluator = cached(
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

    best_params = None
    rep = sharding.replicated(mesh)
    key = to_global(np.asarray(jax.random.key_data(jax.random.key(seed))), rep)
    key = jax.random.wrap_key_data(key)

    def batches(first: int) -> Iterator[tuple[int, dict[str, jax.Array]]]:
        for step in range(first, total_steps):
            epoch, i = divmod(step, spe)
            rows = data_lib.batch_rows(
                seed, epoch, i, n_blocks, config.batch_size, shuffle=config.shuffle
            )
            rows = pad_rows(rows, padded)
            yield (
                step,
                data_lib.global_batch(
                    train_blocks, rows, batch_shard, pad_token_id=config.pad_token_id
                ),
            )

    def record(step: int, metrics: dict[str, jax.Array]) -> None:
        m = {k: scalar(v) for k, v in metrics.items()}
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
        if log is not None:
            log.advance(1)
            if log.due(step + 1):
                log.step(
                    epoch=step // spe,
                    step=step + 1,
                    loss=m["loss"],
                    learning_rate=m["lr"],
                    grad_norm=m["grad_norm"],
                    units=("tokens", config.batch_size * train_blocks.shape[1]),
                )
        if on_step is not None:
            on_step(step + 1, m)

    def meta() -> dict[str, Any]:
        return {**run_meta, "history": history, "best_valid_loss": best}

    if log is not None:
        log.begin(start, total_steps)
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
                        if log is not None:
                            log.eval(
                                epoch=done // spe - 1,
                                step=done,
                                val_loss=vloss,
                                val_ppl=history["valid_ppl"][-1],
                            )
                        if vloss < best:
                            best = vloss
                            if config.keep_best:
                                # A copy: the next step donates (invalidates) `state`'s buffers.
                                best_params = jax.tree.map(jnp.copy, state.params)
                            if ckpt is not None:
                                ckpt.save_best(done, state, meta(), vloss)
                if save_now:
                    ckpt.save(done, state, meta())
            if pending is not None:
                record(*pending)
    finally:
        if ckpt is not None:
            ckpt.close()
        if log is not None:
            log.end()

    final = state.params
    history["selected_epoch"] = [config.epochs]
    if config.keep_best and history["valid_loss"]:
        vl = np.asarray(history["valid_loss"], np.float64)
        if np.isfinite(vl).any():
            epoch = int(np.nanargmin(np.where(np.isfinite(vl), vl, np.nan))) + 1
            if best_params is None and epoch != config.epochs:
                # Resumed after the best epoch: its parameters are in the `best/` checkpoint.
                best_params = _restore_best(checkpoint_dir, params, state_shard.params)
            if best_params is not None or epoch == config.epochs:
                final = state.params if best_params is None else best_params
                history["selected_epoch"] = [epoch]
    new_model = nnx.merge(graphdef, final, rest_g)
    return new_model, history


def _restore_best(checkpoint_dir: Any, params: Any, shardings: Any) -> Any:
    """The parameters of the `best/` checkpoint that `fit` wrote into `checkpoint_dir`."""
    ck = ckpt_lib.TrainCheckpointer(checkpoint_dir)
    try:
        step = ck.best_step()
        if step is None:
            raise FileNotFoundError(f"no best checkpoint in {checkpoint_dir}")
        return ck.restore_params(step, params, shardings, best=True)
    finally:
        ck.close()


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
    mesh = default_mesh() if mesh is None else sharding.with_auto_axes(mesh)
    graphdef, params, rest = split_model(model)
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
        to_global(rest, jax.tree.map(lambda _: sharding.replicated(mesh), rest)),
    )

"""The LM experiment's compiled programs, lowered from abstract shapes: no weights are loaded,
no data read and nothing allocated on the devices. The train step at the config's batch and the
regeneration's search at its batch, for the memory plan of `collapse-jax run --dry-run`
(`collapse_jax.memplan`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from collapse_jax.jaxtools import sharding
from collapse_jax.lm import decode, train
from collapse_jax.lm.placement import padded_batch, split_model
from collapse_jax.lm.schedule import make_optimizer, schedule_hparams
from collapse_jax.lm.settings import DecodeSettings
from collapse_jax.lm.steps import TrainState
from collapse_jax.lm.train_config import TrainConfig


def _placed(tree: Any, shardings: Any) -> Any:
    """`tree`'s arrays as ShapeDtypeStructs carrying `shardings` (a matching tree)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def train_step_program(
    model: nnx.Module, config: TrainConfig, *, mesh: Mesh, length: int
) -> tuple[Any, tuple[Any, ...]]:
    """The train step `train.fit` runs (`train.compile_train_step`: its `.step` is the jitted
    program) and its abstract arguments at the config's batch of `length`-token blocks (rounded
    up to the mesh as `fit` does): (state, rest, batch, key, hparams)."""
    mesh = sharding.with_auto_axes(mesh)
    graphdef, params, rest = split_model(model)
    fns = train.compile_train_step(graphdef, params, rest, config, mesh=mesh)
    opt_state = jax.eval_shape(make_optimizer(config).init, params)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt_state)
    rows = padded_batch(mesh, config.batch_size, config.grad_accum_steps)
    ids = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=fns.batch)
    batch = {name: ids for name in ("input_ids", "attention_mask", "loss_mask")}
    hparams = {
        k: np.asarray(v, np.int32 if k in ("steps_per_epoch", "warmup_steps") else np.float32)
        for k, v in schedule_hparams(config, 1).items()
    }
    args = (
        _placed(state, fns.state_shardings),
        _placed(rest, fns.rest_shardings),
        batch,
        jax.random.key(0),
        hparams,
    )
    return fns, args


def lower_train_step(
    model: nnx.Module, config: TrainConfig, *, mesh: Mesh, length: int
) -> jax.stages.Lowered:
    """`train_step_program`'s step lowered at its abstract arguments."""
    fns, args = train_step_program(model, config, mesh=mesh, length=length)
    return fns.step.lower(*args)


def search_program(
    model: nnx.Module, settings: DecodeSettings, *, mesh: Mesh, batch_size: int, length: int
) -> tuple[Any, tuple[Any, ...]]:
    """The search program `regenerate` runs (`decode.compiled_search` on `mesh`, parameters
    replicated) and its abstract arguments for `batch_size` prompts of `length` tokens (rounded
    up to the mesh as `regenerate` does): (state, ids, mask, keys)."""
    graphdef, state = nnx.split(model)
    rep, rows_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    dp = sharding.data_parallel_size(mesh)
    rows = -(-batch_size // dp) * dp
    ids = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=rows_sharding)
    keys = jax.eval_shape(lambda: decode.prompt_keys(0, np.arange(rows)))
    keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=rows_sharding)
    fn = decode.compiled_search(graphdef, settings, mesh)
    return fn, (_placed(state, jax.tree.map(lambda _: rep, state)), ids, ids, keys)


def lower_search(
    model: nnx.Module, settings: DecodeSettings, *, mesh: Mesh, batch_size: int, length: int
) -> jax.stages.Lowered:
    """`search_program` lowered at its abstract arguments."""
    fn, args = search_program(model, settings, mesh=mesh, batch_size=batch_size, length=length)
    return fn.lower(*args)

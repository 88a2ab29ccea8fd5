"""The registry of causal-LM families: which Flax port serves a Hugging Face `config.json`.

A family is picked from `model_type` in `config.json` (`family_for`); everything downstream
(trainer, decoders, experiment, bench, memory plan) works on any family's model through the
contract below, so adding a family is one model file plus one `Family` row in `FAMILIES`.

The contract a family provides:

- **config class**: a frozen dataclass with `from_hf_dict(d)` (an HF `config.json` dictionary
  -> config; raises ValueError for a dictionary of another family or unsupported options) and
  `to_hf_dict()` (the dictionary its transformers config class reads back, with `model_type`
  and `architectures`). Common attributes every config has (fields or properties), the only
  ones code outside the family reads:
    vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads (= num_attention_heads without grouped-query attention), head_dim,
    max_position_embeddings (the longest sequence the model takes), tie_word_embeddings,
    pad_token_id, bos_token_id, eos_token_id (ints; a family whose HF config has no pad id
    uses its eos id, as transformers' `generate` does).
  The constructor takes the same keyword fields, each with a default, so `random_init`
  configs can name any of them.
- **model class**: `Model(config, *, dtype, param_dtype, rngs, attention_implementation=None)`,
  an `nnx.Module` with attributes `config`, `dtype`, `param_dtype`;
  `init_cache(batch_size, max_length, dtype=None)` -> a `lm.cache.KVCache`; and
  `__call__(input_ids, attention_mask=None, *, position_ids=None, cache=None,
  deterministic=True, dropout_key=None)` -> float32 logits [B, T, V], or (logits, cache) with a
  cache, exactly as `lm.layers.CausalLM` documents: the cache protocol of `lm.cache` (the
  model's attention calls `cache.prepare` / `cache.attend`), positions from the cache or
  `cumsum(mask) * mask - 1` (left padding), dropout only with `deterministic=False`.
  `lm.layers.CausalLM` is this model class less the family's modules: a family subclasses it
  and defines `build`, `dropout_rates`, `forward` (and `call_limits` for its length limits),
  with the helpers of `lm.layers`: `lm_head`, `run_layers`, `lm_logits` (the float32 logits of
  the tied or untied head); `prepare_call` and `check_dropout` run in `CausalLM.__call__`.
  Parameters are built with `lm.layers` (leaf names `kernel`, `bias`, `embedding`, `scale`)
  and carry logical axis names from `jaxtools.sharding.DEFAULT_RULES` ("vocab", "embed",
  "heads", "kv_heads", "head_dim", "mlp"; None = replicated).
- **layout**: a `lm.convert.Layout`, each parameter's HF tensor name and layout, so every
  checkpoint format `lm.convert` reads (safetensors, sharded with an index, HF Flax msgpack,
  `pytorch_model.bin`) loads for every family, and `save_pretrained` writes what transformers
  loads.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from collapse_jax.lm import convert, gpt2, hub, llama, neox, opt


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
      name: the family's name (`random_init: {family: name}`), e.g. "opt".
      model_types: the `model_type` values of `config.json` it serves.
      config_class: its config dataclass (see the module docstring).
      model_class: its `nnx.Module` causal LM.
      layout: its HF tensor layout.
    """

    name: str
    model_types: tuple[str, ...]
    config_class: type
    model_class: type
    layout: convert.Layout


# One row per family (keep one line each: several engineers add rows).
FAMILIES: tuple[Family, ...] = (
    Family("opt", ("opt",), opt.OPTConfig, opt.OPTForCausalLM, opt.LAYOUT),
    Family("gpt2", ("gpt2",), gpt2.GPT2Config, gpt2.GPT2LMHeadModel, gpt2.LAYOUT),
    Family("llama", llama.MODEL_TYPES, llama.LlamaConfig, llama.LlamaForCausalLM, llama.LAYOUT),
    Family("gpt_neox", ("gpt_neox",), neox.NeoXConfig, neox.NeoXForCausalLM, neox.LAYOUT),
)


def supported_model_types() -> list[str]:
    """Every `model_type` some family serves, sorted."""
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_named(name: str) -> Family:
    """The family called `name` (ValueError naming the known ones otherwise)."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(
        f"unknown model family {name!r}; supported: {', '.join(f.name for f in FAMILIES)}"
    )


def family_for(config_dict: Mapping[str, Any]) -> Family:
    """The family serving an HF `config.json` dictionary, by its `model_type`.

    Raises:
      ValueError: (one line) the model_type is missing or no family serves it.
    """
    model_type = config_dict.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ValueError(
        f"model_type {model_type!r} is not supported; supported model types: "
        f"{', '.join(supported_model_types())}"
    )


def family_of(config_or_model: Any) -> Family:
    """The family of a config or a model (by its class)."""
    for family in FAMILIES:
        if isinstance(config_or_model, family.config_class | family.model_class):
            return family
    raise TypeError(f"{type(config_or_model).__name__} belongs to no registered model family")


def config_from_hf_dict(d: Mapping[str, Any]) -> Any:
    """The config of the family serving `d` (an HF `config.json` dictionary)."""
    return family_for(d).config_class.from_hf_dict(dict(d))


def abstract_model(
    config: Any,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    attention_implementation: str | None = None,
) -> nnx.Module:
    """The model of `config`'s family with shapes but no values (`nnx.eval_shape`)."""
    model_class = family_of(config).model_class
    return nnx.eval_shape(
        lambda: model_class(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=nnx.Rngs(0),
            attention_implementation=attention_implementation,
        )
    )


def init_random(
    config: Any,
    key: jax.Array,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    attention_implementation: str | None = None,
) -> nnx.Module:
    """A randomly initialised model of `config`'s family (the family's own initialisation,
    e.g. OPT's weights ~ N(0, init_std^2), biases 0, LayerNorm 1/0).

    Args:
      config: the hyper-parameters (any family's config class).
      key: a jax key.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      attention_implementation: None / "xla" or "cudnn" (see `lm.layers.attention`).
    """
    return family_of(config).model_class(
        config,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=nnx.Rngs(params=key),
        attention_implementation=attention_implementation,
    )


def load_pretrained(
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    *,
    param_dtype: Any = None,
    attention_implementation: str | None = None,
) -> nnx.Module:
    """Loads a Hugging Face model directory (or hub id) into the Flax port of its family.

    Reads `config.json` (its `model_type` picks the family) and the weights, no torch needed:
    `model.safetensors` (or sharded), else `flax_model.msgpack`, else `pytorch_model.bin` (see
    `lm.convert`).

    Args:
      path: the directory, or a Hugging Face hub id (`facebook/opt-125m`; see `lm.hub`).
      dtype: compute dtype.
      param_dtype: parameter dtype (default: `dtype`).
      attention_implementation: None / "xla" or "cudnn" (see `lm.layers.attention`).

    Returns:
      The model, with logits matching transformers' model of the same checkpoint.

    Raises:
      FileNotFoundError: if the directory, its config or its weights are missing.
      ValueError: an unsupported model_type, or a weight missing, truncated or misshapen.
    """
    directory = hub.resolve(path)  # a local folder, or a hub id through the hub's cache
    try:
        family = family_for(convert.read_config_dict(directory))
    except ValueError as e:
        raise ValueError(f"{directory / convert.CONFIG_NAME}: {e}") from e
    return convert.load_model(
        directory,
        family.config_class,
        family.model_class,
        family.layout,
        dtype=dtype,
        param_dtype=param_dtype,
        attention_implementation=attention_implementation,
    )


def state_from_hf(
    config: Any, tensors: Mapping[str, Any], *, param_dtype: Any = jnp.float32
) -> nnx.State:
    """Converts an in-memory HF state dict (NumPy arrays, names as in a checkpoint) to the nnx
    parameter state of `config`'s family (to `nnx.merge` with its model's graphdef)."""
    family = family_of(config)
    abstract = abstract_model(config, param_dtype=param_dtype)
    return convert.state_from_tensors(
        nnx.state(abstract),
        tensors,
        family.layout,
        tied_head=config.tie_word_embeddings,
        param_dtype=param_dtype,
    )


def hf_state_dict(model: nnx.Module) -> dict:
    """The model's parameters as an HF state dict of NumPy arrays (HF names and layouts, the
    parameters' own dtype, a tied head omitted)."""
    return convert.hf_state_dict(model, family_of(model).layout)


def save_pretrained(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    max_shard_size: int = convert.DEFAULT_MAX_SHARD_SIZE,
) -> None:
    """Writes `config.json` and safetensors weights (HF names) that transformers loads back:
    `model.safetensors`, or shards with `model.safetensors.index.json` above `max_shard_size`
    bytes.

    Args:
      model: the model to save; parameters are written in their own dtype.
      path: the directory (created if needed).
      max_shard_size: the most bytes of tensors per safetensors file.
    """
    convert.save_model(model, path, family_of(model).layout, max_shard_size=max_shard_size)


def num_params(model_or_config: Any) -> int:
    """Number of parameters of a model, or of a config's model (a tied head counted once)."""
    model = model_or_config
    if not isinstance(model, nnx.Module):
        model = abstract_model(model)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

"""`generate`: transformers' `model.generate(...)` for the package's causal LMs, compiled whole.

For deterministic settings `generate` returns the same tokens as transformers'
`OPTForCausalLM.generate(...)` with the same arguments (tests/parity/lm/test_decode_hf.py).
Decoding is split along its seams:

  lm/settings.py    `DecodeSettings`, the static settings of one decoding program;
  lm/cache.py       the cache protocol a model's attention talks to, and the caches (slot cache,
                    the beam-aware prompt-sharing cache);
  lm/processors.py  logits processors (repetition penalty, min-new-tokens, temperature, top-k/p);
  lm/search.py      greedy / sampling / beam search loops over a model-agnostic decoder;
  lm/decode.py      this entry point: transformers' argument defaults, one compiled program per
                    (model structure, settings, mesh) with parameters as arguments, not constants,
                    sharding over a mesh, and assembling the output as transformers does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from collapse_jax.jaxtools import sharding
from collapse_jax.lm.cache import KVCache
from collapse_jax.lm.search import (
    PromptSharingDecoder,
    SearchOutput,
    SlotCacheDecoder,
    search_with,
)
from collapse_jax.lm.settings import HF_DEFAULT_TOP_K, DecodeSettings, resolve_decode_dtype
from collapse_jax.lm.steps import cast_floating, set_compute_dtype
from collapse_jax.lm.tokenizer import check_token_ids

Array = jax.Array


@functools.lru_cache(maxsize=64)
def compiled_search(
    graphdef: nnx.GraphDef,
    settings: DecodeSettings,
    mesh: Mesh | None = None,
    fast: bool = True,
) -> Callable[[Any, Array, Array, Array], SearchOutput]:
    """One jitted `search` program for an NNX causal LM structure and settings.

    The model's own forward does every step: with `fast` (default) through a
    `PromptSharingCache` (`PromptSharingDecoder`), with `fast=False` through its slot `KVCache`
    with a reordering gather (`SlotCacheDecoder`; the reference the fast path is tested against).
    A model whose `init_cache` returns another cache type always takes the slot path.

    The returned function takes `(state, input_ids [B, P], attention_mask [B, P], row_keys [B])`
    where `state` comes from `nnx.split(model)`; `jax.jit` caches one executable per shape. With a
    mesh, each data-parallel shard decodes its slice of the batch independently (`shard_map`, no
    communication inside the loop); parameters are replicated. `settings.dtype` sets the compute
    and KV-cache dtype (None: the model's own).
    """

    dtype = resolve_decode_dtype(settings.dtype)

    def run(state, input_ids, attention_mask, row_keys):
        # `settings.dtype`: the weights are cast once, before the loop, and the model (and so
        # its KV cache, `init_cache`'s default dtype) computes in that dtype.
        model = set_compute_dtype(nnx.merge(graphdef, cast_floating(state, dtype)), dtype)
        keys = row_keys if settings.do_sample else None

        def step_fn(tokens, mask, cache):
            logits, cache = model(tokens, attention_mask=mask, cache=cache)
            return logits[:, -1, :], cache

        # Models whose init_cache gives the package's KVCache follow the cache protocol; any
        # other cache (a user's own) decodes through its slot interface and `reorder`.
        protocol = isinstance(jax.eval_shape(lambda: model.init_cache(1, 1)), KVCache)
        if fast and protocol:
            decoder = PromptSharingDecoder(
                step_fn, model.init_cache, reorders=settings.num_beams > 1
            )
        else:
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
    dtype: str | None = None,
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
        dtype=dtype,
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
    dtype: str | None = None,
) -> np.ndarray:
    """Continues prompts like `transformers`' `model.generate(...)` with the same arguments.

    Greedy (`num_beams=1`), multinomial sampling (`do_sample=True`), beam search (`num_beams>1`)
    and beam sampling, with transformers' repetition penalty (prompt included, leading padding
    excluded), `min_new_tokens`, `length_penalty`, `early_stopping` (True, False, "never"), EOS
    handling and `num_return_sequences`. The decoding loop runs as one compiled program per
    (model structure, settings, batch shape).

    Args:
      model: an NNX causal LM with `config`, `init_cache(batch, length) -> KVCache` and
        `model(ids, attention_mask=mask, cache=cache) -> (logits, cache)` whose attention
        follows `collapse_jax.lm.cache`'s protocol, e.g. `collapse_jax.lm.families.load_pretrained`.
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
      dtype: compute and KV-cache dtype while decoding: "float32", "bfloat16", "auto"
        (bfloat16 on accelerators, float32 on CPU) or None (the model's own dtype, default).

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
        dtype=dtype,
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
    check_token_ids(ids, model, "input_ids")
    graphdef, state = nnx.split(model)
    fn = compiled_search(graphdef, settings)
    out = fn(
        state,
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(mask, jnp.int32),
        prompt_keys(seed, np.arange(ids.shape[0])),
    )
    return assemble(ids, out, settings)


__all__ = [
    "assemble",
    "compiled_search",
    "default_attention_mask",
    "generate",
    "prompt_keys",
    "resolve_settings",
]

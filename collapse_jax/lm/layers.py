"""Layers shared by the causal LMs of `collapse_jax.lm` (OPT, GPT-2, GPT-NeoX, Llama).

Each layer takes `dtype` (compute) and `param_dtype` (storage) as Flax does, annotates its
parameters with logical axis names (`jaxtools.sharding.DEFAULT_RULES` maps them onto the mesh)
and keeps HF's numerics: LayerNorm statistics, softmax and logits in float32.

Parameter leaf names are fixed, because `lm.convert` maps them onto HF tensors: `kernel`
(`Linear`, [in..., out...]), `bias`, `embedding` (`Embed`, [num, dim]) and `scale` (norms).

Also what every family's `ForCausalLM` shares (the contract of `lm.families`): the base class
`CausalLM` (constructor, `init_cache` and `__call__`, with their documentation, once), and the
helpers it and the families use: `lm_head` (the untied head), `init_kv_cache`, `prepare_call`
(the input checks, positions and masks of `__call__`), `check_dropout`, `run_layers`,
`lm_logits`, and the rotary helpers of NeoX and Llama (`rotary_cos_sin`, `apply_rotary`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from collapse_jax.lm.cache import Cache, KVCache, causal_mask, mask_positions

# HF `ACT2FN` names -> jax functions (the exact erf GELU for "gelu", the tanh one for "gelu_new").
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}

ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


def check_attention_implementation(attention_implementation: str | None) -> None:
    """Raises ValueError unless it is one of `ATTENTION_IMPLEMENTATIONS`."""
    if attention_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention_implementation must be None, 'xla' or 'cudnn', "
            f"got {attention_implementation!r}"
        )


def param(
    rngs: nnx.Rngs,
    init: Callable[..., jax.Array],
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    param_dtype: Any,
) -> nnx.Param:
    """A parameter annotated with logical axes; sharded eagerly only when a mesh is active."""
    value = init(rngs.params(), shape, param_dtype)
    eager = nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
    return nnx.Param(value, out_sharding=axes, eager_sharding=eager)


def lead(x: jax.Array, ndim: int) -> jax.Array:
    """Adds leading unit axes so that `x` broadcasts explicitly (rank promotion is strict)."""
    return x.reshape((1,) * (ndim - x.ndim) + x.shape)


def inverted_dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
    """Zeroes each element of `x` with probability `rate` and scales the rest by 1 / (1 - rate)
    (torch's `nn.Dropout` in training mode), in `x`'s dtype."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


def logits_matmul(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """The LM head `einsum(spec, x, w)` with float32 logits, its gradient in the inputs' dtype.

    The logits accumulate and come out in float32 (the softmax and the loss need them there). In
    a low-precision model (bf16) the float32 cotangent of the logits would make both backward
    matmuls of the head, about a third of the model's matmul FLOPs, mixed f32 x bf16 products,
    which XLA runs as float32 matmuls; the custom VJP rounds the cotangent to the inputs' dtype
    first, so they run in bf16 like every other matmul. Float32 inputs take the plain einsum.
    """
    if x.dtype == jnp.float32 and w.dtype == jnp.float32:
        return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
    return _low_precision_logits(spec, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_precision_logits(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)


def _low_precision_logits_fwd(spec, x, w):
    return _low_precision_logits(spec, x, w), (x, w)


def _low_precision_logits_bwd(spec, residuals, g):
    x, w = residuals
    _, vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), x, w)
    return vjp(g.astype(jnp.result_type(x, w)))


_low_precision_logits.defvjp(_low_precision_logits_fwd, _low_precision_logits_bwd)


class Linear(nnx.Module):
    """`y = x . kernel + bias` contracting the trailing `len(in_shape)` axes of x (HF nn.Linear)."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        axes: tuple[str | None, ...],
        *,
        use_bias: bool,
        init_std: float,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.num_in = len(in_shape)
        self.dtype = dtype
        self.kernel = param(
            rngs, nnx.initializers.normal(init_std), in_shape + out_shape, axes, param_dtype
        )
        self.bias = (
            param(rngs, nnx.initializers.zeros, out_shape, axes[self.num_in :], param_dtype)
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.tensordot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.num_in)
        if self.bias is not None:
            y = y + lead(self.bias[...].astype(self.dtype), y.ndim)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with statistics in float32 (HF `nn.LayerNorm`)."""

    def __init__(
        self,
        dim: int,
        *,
        affine: bool,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
        eps: float = 1e-5,
    ):
        self.dtype = dtype
        self.eps = eps
        self.scale = (
            param(rngs, nnx.initializers.ones, (dim,), ("embed",), param_dtype) if affine else None
        )
        self.bias = (
            param(rngs, nnx.initializers.zeros, (dim,), ("embed",), param_dtype) if affine else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            scale = lead(self.scale[...].astype(jnp.float32), y.ndim)
            y = y * scale + lead(self.bias[...].astype(jnp.float32), y.ndim)
        return y.astype(self.dtype)


class Embed(nnx.Module):
    """Lookup table `embedding[ids]` (HF nn.Embedding); out-of-range ids give NaN rows."""

    def __init__(
        self,
        num: int,
        dim: int,
        axes: tuple[str | None, ...],
        *,
        init_std: float,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.embedding = param(
            rngs, nnx.initializers.normal(init_std), (num, dim), axes, param_dtype
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    *,
    implementation: str | None = None,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """softmax(q k^T) v in HF's numerics: q [B, T, N, H] (already scaled), k, v [B, S, K, H]
    (K = N, or a divisor of N for grouped-query attention), mask bool [B, 1, T, S] or None (plain
    causal, T == S) -> [B, T, N, H].

    The cache protocol's `AttentionFn` once `implementation` and the dropout are bound.
    """
    if dropout_key is not None and dropout_rate > 0.0:
        # jax.nn.dot_product_attention has no dropout: spell attention out in training mode.
        n, kv = q.shape[2], k.shape[2]
        if kv != n:
            k = jnp.repeat(k, n // kv, axis=2)
            v = jnp.repeat(v, n // kv, axis=2)
        logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
        if mask is None:
            t = q.shape[1]
            mask = jnp.tril(jnp.ones((t, t), bool))[None, None]  # [1, 1, T, S]
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)  # [B, N, T, S] float32
        probs = inverted_dropout(dropout_key, probs, dropout_rate).astype(v.dtype)
        return jnp.einsum("bnts,bsnh->btnh", probs, v)  # [B, T, N, H]
    # XLA (default) or cuDNN flash attention. Softmax runs in float32; masked logits get a
    # large finite negative, so the fully masked rows of left padding give uniform weights,
    # never NaN. Without padding the mask is implicit (is_causal), the case cuDNN's fused
    # kernels handle best. jax's XLA attention promotes bf16 with float32 internally, which
    # strict dtype promotion (our tests' setting for model code) rejects: allow it here only.
    with jax.numpy_dtype_promotion("standard"):
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            is_causal=mask is None,
            scale=1.0,
            implementation=implementation,
        )  # [B, T, N, H]


def lm_head(
    config: Any, dim: int, init_std: float, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs
) -> Linear | None:
    """The untied LM head [dim, V] ("embed", "vocab"), or None when `config.tie_word_embeddings`."""
    if config.tie_word_embeddings:
        return None
    return Linear(
        (dim,),
        (config.vocab_size,),
        ("embed", "vocab"),
        use_bias=False,
        init_std=init_std,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def init_kv_cache(config: Any, batch_size: int, max_length: int, dtype: Any) -> KVCache:
    """An empty `KVCache` of `config`'s layers and key/value heads, `max_length` slots each."""
    return KVCache.zeros(
        config.num_hidden_layers,
        batch_size,
        max_length,
        config.num_key_value_heads,
        config.head_dim,
        dtype,
    )


def prepare_call(
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    position_ids: jax.Array | None,
    cache: Cache | None,
    *,
    max_positions: tuple[str, int] | None = None,
    check: Callable[[int, Cache | None], None] | None = None,
    pad_position: int | None = None,
) -> tuple[Cache | None, jax.Array, jax.Array | None]:
    """The preamble of a causal LM's `__call__`: checks the inputs, returns (cache, positions,
    mask).

    Without a cache: `mask` is None (implicit causal mask, which lets cuDNN pick its fused causal
    kernel) when `attention_mask` is None, else bool [B, 1, T, T] from the [B, T] mask, and the
    default positions are `cumsum(mask) * mask - 1`. With a cache, `cache.prepare` supplies the
    advanced cache, the positions and its mask view. Given `position_ids` [B, T] replace the
    default positions.

    Args:
      max_positions: (name, limit): without a cache, a length T over `limit` raises, naming it.
      check: `check(T, cache)` runs after the rank check (a family's own length limits).
      pad_position: the position that default positions of padding slots (-1) take.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    b, t = input_ids.shape
    if check is not None:
        check(t, cache)
    if cache is None:
        if max_positions is not None and t > max_positions[1]:
            name, limit = max_positions
            raise ValueError(f"sequence length {t} exceeds {name} {limit}")
        if attention_mask is None:
            mask = None
            default_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        else:
            if attention_mask.shape != (b, t):
                raise ValueError(
                    f"attention_mask has shape {attention_mask.shape}, expected {(b, t)} "
                    "([batch, input_ids])"
                )
            attention_mask = attention_mask.astype(jnp.int32)
            default_positions = mask_positions(attention_mask, 0, t)  # [B, T]
            mask = causal_mask(attention_mask, 0, t)  # [B, 1, T, T]
    else:
        # The cache owns masking and positions; `mask` is its view for `cache.attend`.
        cache, default_positions, mask = cache.prepare((b, t), attention_mask)
    if position_ids is None:
        position_ids = default_positions
        if pad_position is not None:
            position_ids = jnp.where(position_ids < 0, pad_position, position_ids)
    elif position_ids.shape != (b, t):
        raise ValueError(f"position_ids has shape {position_ids.shape}, expected {(b, t)}")
    return cache, position_ids, mask


def check_dropout(
    deterministic: bool, rates: tuple[float, ...], dropout_key: jax.Array | None
) -> bool:
    """Whether dropout runs (not deterministic and a rate is positive); raises ValueError when it
    does without a `dropout_key`."""
    use_dropout = not deterministic and any(rate > 0.0 for rate in rates)
    if use_dropout and dropout_key is None:
        raise ValueError("deterministic=False with positive dropout needs a dropout_key")
    return use_dropout


def lm_logits(x: jax.Array, head: Linear | None, embed: Embed, dtype: Any) -> jax.Array:
    """Float32 logits [B, T, V] of x [B, T, D]: the untied `head`, or the tied `embed` table
    when `head` is None, cast to the compute `dtype` (`logits_matmul`)."""
    if head is None:
        table = embed.embedding[...].astype(dtype)  # [V, D]
        logits = logits_matmul("btd,vd->btv", x, table)
    else:
        kernel = head.kernel[...].astype(dtype)  # [D, V]
        logits = logits_matmul("btd,dv->btv", x, kernel)
    return logits.astype(jnp.float32)


def rotary_cos_sin(positions: jax.Array, inv_freq: Any, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, 1, R] of positions [B, T] for inverse frequencies [R / 2] (HF's rotary
    embedding: angles in float32, cast to `dtype`)."""
    inv_freq = jnp.asarray(inv_freq).astype(jnp.float32)[None, None, :]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, R]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`x * cos + rotate_half(x) * sin` on the first R dims of each head of x [B, T, N, H]
    (HF's half-split pairing), cos, sin [B, T, 1, R]; the other H - R dims pass unchanged."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        half = r // 2
        rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin
    if r == 0:
        return x
    rot, rest = x[..., :r], x[..., r:]
    x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = jnp.broadcast_to(cos, rot.shape), jnp.broadcast_to(sin, rot.shape)
    return jnp.concatenate([rot * cos + rotated * sin, rest], axis=-1)


def run_layers(
    layers: Any, x: jax.Array, mask: Any, cache: Cache | None, dropout_key: Any, *extra: Any
) -> tuple[jax.Array, Cache | None]:
    """x through the decoder `layers` in order, `layer(x, *extra, mask, cache, i, key)` (extra:
    e.g. the rotary tables), layer i's dropout key `fold_in(dropout_key, i)` (None without
    dropout)."""
    for i, layer in enumerate(layers):
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
        x, cache = layer(x, *extra, mask, cache, i, key)
    return x, cache


class CausalLM(nnx.Module):
    """A causal language model of `lm.families`: the constructor, `init_cache` and `__call__`
    that every family shares. A family's `ForCausalLM` subclasses it and defines `build` (its
    modules, under HF's names), `dropout_rates` and `forward` (embeddings, decoder layers,
    final norm and head), and may set `call_limits` (its length limits and the position of
    padding slots) or extend `init_cache`.

    Args:
      config: the hyper-parameters (the family's config class).
      dtype: compute dtype (activations, matmul inputs); logits are always float32.
      param_dtype: storage dtype of the parameters.
      rngs: random streams; parameters draw from `rngs.params()`.
      attention_implementation: `implementation` of `jax.nn.dot_product_attention`: None or
        "xla" (XLA, any device), or "cudnn" (cuDNN flash attention: GPU, bfloat16/float16 compute
        only; it raises where it does not apply).
    """

    def __init__(
        self,
        config: Any,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        attention_implementation: str | None = None,
    ):
        check_attention_implementation(attention_implementation)
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        self.build(
            config, dtype=dtype, param_dtype=param_dtype, impl=attention_implementation, rngs=rngs
        )

    def build(self, config: Any, *, dtype: Any, param_dtype: Any, impl: Any, rngs: nnx.Rngs):
        """Creates the family's modules (HF's attribute names: they are the checkpoint's)."""
        raise NotImplementedError

    def dropout_rates(self) -> tuple[float, ...]:
        """The config's dropout rates: dropout runs when one is positive."""
        raise NotImplementedError

    def call_limits(self) -> dict[str, Any]:
        """`prepare_call`'s family keywords: `max_positions`, `check`, `pad_position`."""
        return {}

    def forward(
        self,
        input_ids: jax.Array,
        position_ids: jax.Array,
        mask: jax.Array | None,
        cache: Cache | None,
        dropout_key: jax.Array | None,
    ) -> tuple[jax.Array, Cache | None]:
        """Float32 logits [B, T, V] and the cache, from `prepare_call`'s positions and mask;
        `dropout_key` is None when dropout does not run."""
        raise NotImplementedError

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
        """An empty `KVCache` of the model's key/value heads, `max_length` slots per sequence.

        Args:
          batch_size: B (number of sequences, beams included).
          max_length: S (prompt plus every token to be generated).
          dtype: storage dtype of keys/values (default: the compute dtype).
        """
        return init_kv_cache(
            self.config, batch_size, max_length, self.dtype if dtype is None else dtype
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        position_ids: jax.Array | None = None,
        cache: Cache | None = None,
        deterministic: bool = True,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, Cache]:
        """Runs the model on a batch of token ids.

        Args:
          input_ids: [B, T] int token ids.
          attention_mask: without cache, [B, T] (1 = token, 0 = padding; default all ones). With a
            cache, what the cache takes: for a `KVCache`, [B, S] over all cache slots (prompt and
            generated tokens 1, padding and not yet written slots 0); a `PromptSharingCache`
            tracks validity itself (None). Left padding gives HF `generate`'s positions and
            masking.
          position_ids: [B, T] 0-based positions (a family's own offset, e.g. OPT's 2, is added
            inside); default HF's `cumsum(mask) * mask - 1` at the new tokens' slots.
          cache: a cache following `collapse_jax.lm.cache.Cache`, e.g. `init_cache(B, S)`; with
            a `KVCache` the T new tokens are written at slots `[cache.index, cache.index + T)`
            and query slot i attends to slots j <= i with mask 1.
          deterministic: False enables dropout (the config's rates, `dropout_rates`).
          dropout_key: a jax key, required when `deterministic` is False and a rate is positive.

        Returns:
          Logits [B, T, V] float32, and with a cache the pair (logits, cache with index += T).
        """
        cache, position_ids, mask = prepare_call(
            input_ids, attention_mask, position_ids, cache, **self.call_limits()
        )
        use_dropout = check_dropout(deterministic, self.dropout_rates(), dropout_key)
        key = dropout_key if use_dropout else None
        logits, cache = self.forward(input_ids, position_ids, mask, cache, key)
        if cache is None:
            return logits
        return logits, cache

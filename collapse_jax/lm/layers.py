"""Layers shared by the causal LMs of `collapse_jax.lm` (OPT, GPT-2, GPT-NeoX, Llama).

Each layer takes `dtype` (compute) and `param_dtype` (storage) as Flax does, annotates its
parameters with logical axis names (`jaxtools.sharding.DEFAULT_RULES` maps them onto the mesh)
and keeps HF's numerics: LayerNorm statistics, softmax and logits in float32.

Parameter leaf names are fixed, because `lm.convert` maps them onto HF tensors: `kernel`
(`Linear`, [in..., out...]), `bias`, `embedding` (`Embed`, [num, dim]) and `scale` (norms).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

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

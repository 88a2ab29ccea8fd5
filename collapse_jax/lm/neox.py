"""GPT-NeoX (Black et al. 2022, arXiv:2204.06745) and Pythia (Biderman et al. 2023) in Flax NNX.

Parameter names follow Hugging Face `transformers.models.gpt_neox.modeling_gpt_neox`, so that
conversion is renames, transposes and reshapes only. Numerics follow HF too: rotary position
embeddings on the first `rotary_dim = int(head_dim * rotary_pct)` dims of each head (the
"rotate half" form, cos/sin computed in float32 and cast to the compute dtype), softmax in
float32, LayerNorm with the config's eps. Positions are `cumsum(mask) * mask - 1` (what HF's
`generate` passes; HF's plain forward uses `arange` whatever the padding, which agrees on
unpadded rows).

Each block is pre-LayerNorm with either the parallel residual (GPT-NeoX-20B, Pythia)

    x = x + attention(input_layernorm(x)) + mlp(post_attention_layernorm(x))

or the sequential one (`use_parallel_residual=False`):

    a = x + attention(input_layernorm(x));  x = a + mlp(post_attention_layernorm(a)).

Shape legend: B batch, T query length, S key/cache length, D hidden_size, N heads, H head_dim,
R rotary_dim, F intermediate_size, V vocab, L layers.

Parameter layout and logical sharding axes (`nnx.with_partitioning`; `jaxtools.sharding` maps
them onto mesh axes; None = replicated):

  gpt_neox.embed_in.embedding                            [V, D]       ("vocab", "embed")
  gpt_neox.layers[i].input_layernorm.scale / .bias       [D]          ("embed",)
  gpt_neox.layers[i].post_attention_layernorm.*          [D]          ("embed",)
  gpt_neox.layers[i].attention.query_key_value.kernel    [D, N, 3, H] ("embed", "heads", None,
                                                                        "head_dim")
  gpt_neox.layers[i].attention.query_key_value.bias      [N, 3, H]    ("heads", None, "head_dim")
  gpt_neox.layers[i].attention.dense.kernel              [N, H, D]    ("heads", "head_dim", "embed")
  gpt_neox.layers[i].attention.dense.bias                [D]          ("embed",)
  gpt_neox.layers[i].mlp.dense_h_to_4h.kernel [D, F] ("embed", "mlp"), .bias [F] ("mlp",)
  gpt_neox.layers[i].mlp.dense_4h_to_h.kernel [F, D] ("mlp", "embed"), .bias [D] ("embed",)
  gpt_neox.final_layer_norm.scale / .bias                [D]          ("embed",)
  embed_out.kernel                                       [D, V]       ("embed", "vocab")  if untied

HF's fused `query_key_value` splits its 3 N H output features head-major, each head holding its
query, key and value (`view(B, T, N, 3H)` then `chunk(3)`), so the kernel is HF's weight
transposed and reshaped to [D, N, 3, H]: tensor parallelism shards whole heads with their q, k
and v together. The attention biases exist only with `attention_bias` (True for every released
model). transformers 5 names the head `lm_head` in memory but reads and writes `embed_out.weight`
in files, as every GPT-NeoX checkpoint does; a tied head reuses `embed_in`.

Incremental decoding goes through the cache protocol (`collapse_jax.lm.cache`): the cache supplies
the new tokens' positions, the rotary embedding is applied to q and k, and the cache stores the
rotated keys and runs the attention. `init_cache` gives the plain slot cache (`KVCache`); the
decoder swaps in `PromptSharingCache` without a second copy of this forward pass.

Attention goes through `jax.nn.dot_product_attention` (XLA by default, cuDNN on request) except in
training mode with attention dropout. Mixed precision as in `lm.opt`: `param_dtype` is the
storage dtype, `dtype` the compute dtype; LayerNorm statistics, rotary angles, softmax and the
logits are float32. Rotary embeddings have no table, so positions are not limited by
`max_position_embeddings` (as in HF); out-of-range token ids give NaN logits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from collapse_jax.lm import convert, hub
from collapse_jax.lm.cache import Cache, KVCache, causal_mask, mask_positions
from collapse_jax.lm.opt import Embed, Linear, inverted_dropout

MODEL_TYPE = "gpt_neox"

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}

# Rotary variants (HF `rope_type`) whose frequencies do not depend on the sequence length.
ROPE_TYPES = ("default", "linear")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class NeoXConfig:
    """Hyper-parameters of a GPT-NeoX model; field names mirror HF `GPTNeoXConfig` (<= 4.x).

    The defaults are EleutherAI/pythia-160m's.

    Attributes:
      vocab_size: V, number of token ids (50304 for Pythia, padded from the tokenizer's 50277).
      hidden_size: D, width of the residual stream.
      num_hidden_layers: L, number of blocks.
      num_attention_heads: N; D must be divisible by N.
      intermediate_size: F, hidden width of the MLP.
      hidden_act: MLP nonlinearity, an HF `ACT2FN` name ("gelu" = exact erf GELU for Pythia).
      rotary_pct: fraction of each head's dims that get the rotary embedding (HF
        `partial_rotary_factor`); rotary_dim = int(head_dim * rotary_pct) must be even.
      rotary_emb_base: the rotary base theta (HF `rope_theta`).
      rope_type: "default", or "linear" (positions divided by `rope_factor`).
      rope_factor: the linear scaling factor (1.0 for "default").
      max_position_embeddings: the context length the model was trained for (no table).
      layer_norm_eps: eps of every LayerNorm.
      use_parallel_residual: the parallel (True) or sequential residual (module docstring).
      attention_bias: whether `query_key_value` and `dense` have biases.
      hidden_dropout: dropout rate on the embeddings and after attention and MLP (training only).
      attention_dropout: dropout rate on the attention probabilities (training only).
      tie_word_embeddings: whether the LM head reuses `embed_in` (False for every Pythia).
      initializer_range: standard deviation of the random initialisation.
      bos_token_id: beginning-of-sequence id (0, `<|endoftext|>`, for Pythia).
      eos_token_id: end-of-sequence id (0 for Pythia).
      pad_token_id: padding id; Pythia's config.json has none, so `from_hf_dict` takes the EOS
        id, as transformers' `generate` does.
    """

    vocab_size: int = 50304
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    attention_bias: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int = 0
    eos_token_id: int = 0
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"NeoXConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"NeoXConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ValueError(f"NeoXConfig.rotary_pct must be in [0, 1], got {self.rotary_pct!r}")
        if self.rotary_dim % 2:
            raise ValueError(
                f"NeoXConfig: rotary_dim = int(head_dim {self.head_dim} * rotary_pct "
                f"{self.rotary_pct}) = {self.rotary_dim} must be even"
            )
        if self.rotary_emb_base <= 0:
            raise ValueError(
                f"NeoXConfig.rotary_emb_base must be positive, got {self.rotary_emb_base!r}"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"NeoXConfig.rope_type {self.rope_type!r} is not supported; choose one of "
                f"{list(ROPE_TYPES)}"
            )
        if self.rope_factor <= 0 or (self.rope_type == "default" and self.rope_factor != 1.0):
            raise ValueError(
                f"NeoXConfig.rope_factor must be positive (and 1.0 for rope_type 'default'), "
                f"got {self.rope_factor!r}"
            )
        if self.layer_norm_eps <= 0:
            raise ValueError(
                f"NeoXConfig.layer_norm_eps must be positive, got {self.layer_norm_eps!r}"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            rate = getattr(self, name)
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"NeoXConfig.{name} must be in [0, 1), got {rate!r}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"NeoXConfig.hidden_act {self.hidden_act!r} is not supported; "
                f"choose one of {sorted(_ACTIVATIONS)}"
            )

    @property
    def head_dim(self) -> int:
        """H = D / N."""
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        """= num_attention_heads (GPT-NeoX has no grouped-query attention)."""
        return self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """R, the leading dims of each head that rotate (HF `rotary_ndims`)."""
        return int(self.head_dim * self.rotary_pct)

    @property
    def embed_dim(self) -> int:
        """The token-embedding width (= hidden_size: GPT-NeoX has no projection)."""
        return self.hidden_size

    @property
    def ffn_dim(self) -> int:
        """F, the MLP width (OPT's name for intermediate_size)."""
        return self.intermediate_size

    @property
    def init_std(self) -> float:
        """The random initialisation's standard deviation (OPT's name for initializer_range)."""
        return self.initializer_range

    @property
    def dropout(self) -> float:
        """The residual-stream dropout rate (OPT's name for hidden_dropout)."""
        return self.hidden_dropout

    @classmethod
    def from_hf_dict(cls, d: dict) -> NeoXConfig:
        """Builds a config from an HF `config.json` dictionary; unknown keys are ignored.

        Reads both spellings of the rotary settings: transformers 4's `rotary_pct`,
        `rotary_emb_base`, `rope_scaling` and transformers 5's `rope_parameters` (which wins, as
        in transformers).

        Raises:
          ValueError: if the dictionary is not a GPT-NeoX config or asks for an unsupported
            feature.
        """
        model_type = d.get("model_type")
        if model_type != MODEL_TYPE:
            raise ValueError(f"config is not a GPT-NeoX config: model_type={model_type!r}")
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name in d and d[field.name] is not None:
                kwargs[field.name] = d[field.name]
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"rope_parameters must be a mapping, got {rope!r}")
        if "rope_theta" in rope:
            kwargs["rotary_emb_base"] = rope["rope_theta"]
        if "partial_rotary_factor" in rope:
            kwargs["rotary_pct"] = rope["partial_rotary_factor"]
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        kwargs["rope_type"] = rope_type
        if rope_type == "linear":
            kwargs["rope_factor"] = float(rope["factor"])
        elif rope_type != "default":
            raise ValueError(
                f"GPT-NeoX rope_type {rope_type!r} is not supported; choose one of "
                f"{list(ROPE_TYPES)}"
            )
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(kwargs.get(name), list):
                kwargs[name] = int(kwargs[name][0])
        for name in (
            "rotary_pct",
            "rotary_emb_base",
            "layer_norm_eps",
            "hidden_dropout",
            "attention_dropout",
            "initializer_range",
        ):
            if name in kwargs:
                kwargs[name] = float(kwargs[name])
        config = cls(**kwargs)
        if d.get("pad_token_id") is None:  # pad with the EOS id, as transformers' generate does
            config = dataclasses.replace(config, pad_token_id=config.eos_token_id)
        return config

    def to_hf_dict(self) -> dict:
        """The `config.json` dictionary that `transformers.GPTNeoXConfig` (4.x and 5.x) reads."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del d["rope_type"], d["rope_factor"]
        rope: dict[str, Any] = {
            "rope_type": self.rope_type,
            "rope_theta": self.rotary_emb_base,
            "partial_rotary_factor": self.rotary_pct,
        }
        if self.rope_type == "linear":
            rope["factor"] = self.rope_factor
            d["rope_scaling"] = {"type": "linear", "factor": self.rope_factor}
        d["rope_parameters"] = rope
        d["model_type"] = MODEL_TYPE
        d["architectures"] = ["GPTNeoXForCausalLM"]
        d["use_cache"] = True
        return d

    @classmethod
    def pythia_160m(cls) -> NeoXConfig:
        """The configuration of EleutherAI/pythia-160m."""
        return cls()


def _param(
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


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, statistics in float32, scale and bias (HF `nn.LayerNorm`)."""

    def __init__(self, dim: int, *, eps: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.dtype = dtype
        self.eps = eps
        self.scale = _param(rngs, nnx.initializers.ones, (dim,), ("embed",), param_dtype)
        self.bias = _param(rngs, nnx.initializers.zeros, (dim,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        lead = (1,) * (y.ndim - 1)
        y = y * self.scale[...].astype(jnp.float32).reshape(lead + (-1,))
        y = y + self.bias[...].astype(jnp.float32).reshape(lead + (-1,))
        return y.astype(self.dtype)


def _logits_matmul(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """The LM head `einsum(spec, x, w)` with float32 logits and, for low-precision inputs, a
    cotangent rounded to the inputs' dtype (so the head's backward matmuls run in bf16; see
    `lm.opt`'s head, whose numerics this repeats)."""
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


def rope_inverse_frequencies(config: NeoXConfig) -> np.ndarray:
    """HF's `inv_freq` [R / 2] float32: 1 / base^(2i / R), divided by the linear factor."""
    r = config.rotary_dim
    exponents = np.arange(0, r, 2, dtype=np.float32) / np.float32(r)
    inv_freq = (1.0 / (np.float32(config.rotary_emb_base) ** exponents)).astype(np.float32)
    return inv_freq / np.float32(config.rope_factor)


def rotary_cos_sin(
    inv_freq: np.ndarray, positions: jax.Array, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, 1, R] of `positions` [B, T] (angles in float32, cast to `dtype`)."""
    freqs = (
        positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None]
    )  # [B, T, R/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, R]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the first R dims of each head of x [B, T, N, H] ("rotate half"); the rest pass."""
    r = cos.shape[-1]
    if r == 0:
        return x
    rot, rest = x[..., :r], x[..., r:]
    x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = jnp.broadcast_to(cos, rot.shape), jnp.broadcast_to(sin, rot.shape)
    return jnp.concatenate([rot * cos + rotated * sin, rest], axis=-1)


class NeoXAttention(nnx.Module):
    """Causal self-attention with the fused `query_key_value` and partial rotary embeddings."""

    def __init__(
        self,
        config: NeoXConfig,
        *,
        dtype: Any,
        param_dtype: Any,
        attention_implementation: str | None,
        rngs: nnx.Rngs,
    ):
        d, n, h = config.hidden_size, config.num_attention_heads, config.head_dim
        kw = dict(
            use_bias=config.attention_bias,
            init_std=config.initializer_range,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.query_key_value = Linear((d,), (n, 3, h), ("embed", "heads", None, "head_dim"), **kw)
        self.dense = Linear((n, h), (d,), ("heads", "head_dim", "embed"), **kw)
        self.scaling = h**-0.5
        self.attention_dropout = config.attention_dropout
        self.implementation = attention_implementation

    def __call__(
        self,
        x: jax.Array,
        rotary: tuple[jax.Array, jax.Array],
        mask: Any,
        cache: Cache | None,
        layer: int,
        dropout_key: jax.Array | None,
    ) -> tuple[jax.Array, Cache | None]:
        """x [B, T, D], rotary (cos, sin) [B, T, 1, R] -> (output [B, T, D], cache or None).

        Without a cache, `mask` is bool [B, 1, T, T] or None (plain causal); with one, the view
        its `prepare` returned.
        """
        qkv = self.query_key_value(x)  # [B, T, N, 3, H]
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]  # [B, T, N, H] each
        cos, sin = rotary
        q = apply_rotary(q, cos, sin) * jnp.asarray(self.scaling, q.dtype)
        k = apply_rotary(k, cos, sin)
        attention = functools.partial(self.attention, dropout_key=dropout_key)
        if cache is None:
            out = attention(q, k, v, mask)
        else:
            out, cache = cache.attend(layer, q, k, v, mask, attention)
        return self.dense(out), cache  # [B, T, D]

    def attention(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        mask: jax.Array | None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """softmax(q k^T) v: q [B, T, N, H] (scaled), k, v [B, S, N, H], mask bool [B, 1, T, S] or
        None (plain causal, T == S) -> [B, T, N, H]."""
        if dropout_key is not None and self.attention_dropout > 0.0:
            logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
            if mask is None:
                t = q.shape[1]
                mask = jnp.tril(jnp.ones((t, t), bool))[None, None]  # [1, 1, T, S]
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(logits, axis=-1)  # [B, N, T, S] float32
            probs = inverted_dropout(dropout_key, probs, self.attention_dropout).astype(v.dtype)
            return jnp.einsum("bnts,bsnh->btnh", probs, v)  # [B, T, N, H]
        # As in lm.opt: XLA or cuDNN, float32 softmax, finite masked logits.
        with jax.numpy_dtype_promotion("standard"):
            return jax.nn.dot_product_attention(
                q,
                k,
                v,
                mask=mask,
                is_causal=mask is None,
                scale=1.0,
                implementation=self.implementation,
            )  # [B, T, N, H]


class NeoXMLP(nnx.Module):
    """dense_4h_to_h(act(dense_h_to_4h(x))) (HF `GPTNeoXMLP`)."""

    def __init__(self, config: NeoXConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(
            use_bias=True,
            init_std=config.initializer_range,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.dense_h_to_4h = Linear((d,), (f,), ("embed", "mlp"), **kw)
        self.dense_4h_to_h = Linear((f,), (d,), ("mlp", "embed"), **kw)
        self.activation = config.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dense_4h_to_h(_ACTIVATIONS[self.activation](self.dense_h_to_4h(x)))


class NeoXLayer(nnx.Module):
    """One block: pre-LayerNorm attention and MLP, parallel or sequential residual."""

    def __init__(
        self,
        config: NeoXConfig,
        *,
        dtype: Any,
        param_dtype: Any,
        attention_implementation: str | None,
        rngs: nnx.Rngs,
    ):
        ln = dict(eps=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = LayerNorm(config.hidden_size, **ln)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, **ln)
        self.attention = NeoXAttention(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            attention_implementation=attention_implementation,
            rngs=rngs,
        )
        self.mlp = NeoXMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.parallel = config.use_parallel_residual
        self.dropout = config.hidden_dropout

    def __call__(self, x, rotary, mask, cache, layer, dropout_key):
        """x [B, T, D] -> ([B, T, D], updated cache or None)."""
        keys = [None] * 3 if dropout_key is None else list(jax.random.split(dropout_key, 3))
        attn, cache = self.attention(self.input_layernorm(x), rotary, mask, cache, layer, keys[0])
        if keys[1] is not None and self.dropout > 0.0:
            attn = inverted_dropout(keys[1], attn, self.dropout)
        if self.parallel:
            mlp = self.mlp(self.post_attention_layernorm(x))
            if keys[2] is not None and self.dropout > 0.0:
                mlp = inverted_dropout(keys[2], mlp, self.dropout)
            return mlp + attn + x, cache  # HF's order of the sum
        attn = attn + x
        mlp = self.mlp(self.post_attention_layernorm(attn))
        if keys[2] is not None and self.dropout > 0.0:
            mlp = inverted_dropout(keys[2], mlp, self.dropout)
        return mlp + attn, cache


class NeoXModel(nnx.Module):
    """Embedding, blocks and final LayerNorm (HF `GPTNeoXModel`, under `gpt_neox`)."""

    def __init__(
        self,
        config: NeoXConfig,
        *,
        dtype: Any,
        param_dtype: Any,
        attention_implementation: str | None,
        rngs: nnx.Rngs,
    ):
        self.embed_in = Embed(
            config.vocab_size,
            config.hidden_size,
            ("vocab", "embed"),
            init_std=config.initializer_range,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.layers = nnx.List(
            [
                NeoXLayer(
                    config,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    attention_implementation=attention_implementation,
                    rngs=rngs,
                )
                for _ in range(config.num_hidden_layers)
            ]
        )
        self.final_layer_norm = LayerNorm(
            config.hidden_size,
            eps=config.layer_norm_eps,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )


class NeoXForCausalLM(nnx.Module):
    """GPT-NeoX language model: `gpt_neox` plus the LM head `embed_out` (or the tied embedding).

    Args:
      config: the hyper-parameters.
      dtype: compute dtype (activations, matmul inputs); logits are always float32.
      param_dtype: storage dtype of the parameters.
      rngs: random streams; parameters draw from `rngs.params()`.
      attention_implementation: `implementation` of `jax.nn.dot_product_attention`: None or
        "xla" (XLA, any device), or "cudnn" (cuDNN flash attention: GPU, bfloat16/float16 compute
        only; it raises where it does not apply).
    """

    def __init__(
        self,
        config: NeoXConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        attention_implementation: str | None = None,
    ):
        if attention_implementation not in (None, "xla", "cudnn"):
            raise ValueError(
                f"attention_implementation must be None, 'xla' or 'cudnn', "
                f"got {attention_implementation!r}"
            )
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        self.gpt_neox = NeoXModel(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            attention_implementation=attention_implementation,
            rngs=rngs,
        )
        self.embed_out = (
            None
            if config.tie_word_embeddings
            else Linear(
                (config.hidden_size,),
                (config.vocab_size,),
                ("embed", "vocab"),
                use_bias=False,
                init_std=config.initializer_range,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        )

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
        """An empty `KVCache` with `max_length` slots per sequence.

        Args:
          batch_size: B (number of sequences, beams included).
          max_length: S (prompt plus every token to be generated).
          dtype: storage dtype of keys/values (default: the compute dtype).
        """
        cfg = self.config
        return KVCache.zeros(
            cfg.num_hidden_layers,
            batch_size,
            max_length,
            cfg.num_attention_heads,
            cfg.head_dim,
            self.dtype if dtype is None else dtype,
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
          position_ids: [B, T] rotary positions; default `cumsum(mask) * mask - 1` at the new
            tokens' slots.
          cache: a cache following `collapse_jax.lm.cache.Cache`, e.g. `init_cache(B, S)`.
          deterministic: False enables dropout (config.hidden_dropout, attention_dropout).
          dropout_key: a jax key, required when `deterministic` is False and a rate is positive.

        Returns:
          Logits [B, T, V] float32, and with a cache the pair (logits, cache with index += T).
        """
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        b, t = input_ids.shape
        if cache is None:
            if attention_mask is None:
                mask = None  # implicit causal mask: lets cuDNN pick its fused causal kernel
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
            cache, default_positions, mask = cache.prepare((b, t), attention_mask)
        if position_ids is None:
            position_ids = default_positions
        elif position_ids.shape != (b, t):
            raise ValueError(f"position_ids has shape {position_ids.shape}, expected {(b, t)}")

        use_dropout = not deterministic and (
            cfg.hidden_dropout > 0.0 or cfg.attention_dropout > 0.0
        )
        if use_dropout and dropout_key is None:
            raise ValueError("deterministic=False with positive dropout needs a dropout_key")

        model = self.gpt_neox
        x = model.embed_in(input_ids)  # [B, T, D]
        if use_dropout and cfg.hidden_dropout > 0.0:
            x = inverted_dropout(jax.random.fold_in(dropout_key, -1), x, cfg.hidden_dropout)
        rotary = rotary_cos_sin(
            rope_inverse_frequencies(cfg), position_ids, self.dtype
        )  # [B, T, 1, R] each
        for i, layer in enumerate(model.layers):
            layer_key = jax.random.fold_in(dropout_key, i) if use_dropout else None
            x, cache = layer(x, rotary, mask, cache, i, layer_key)
        x = model.final_layer_norm(x)
        if self.embed_out is None:
            table = model.embed_in.embedding[...].astype(self.dtype)  # [V, D]
            logits = _logits_matmul("btd,vd->btv", x, table)
        else:
            kernel = self.embed_out.kernel[...].astype(self.dtype)  # [D, V]
            logits = _logits_matmul("btd,dv->btv", x, kernel)
        logits = logits.astype(jnp.float32)  # [B, T, V]
        if cache is None:
            return logits
        return logits, cache


def init_random(
    config: NeoXConfig,
    key: jax.Array,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    attention_implementation: str | None = None,
) -> NeoXForCausalLM:
    """A randomly initialised model (weights ~ N(0, initializer_range^2), biases 0, LayerNorm 1/0).

    Args:
      config: the hyper-parameters.
      key: a jax key.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      attention_implementation: see `NeoXForCausalLM`.
    """
    return NeoXForCausalLM(
        config,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=nnx.Rngs(params=key),
        attention_implementation=attention_implementation,
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face conversion. Flax paths are HF module names; kernels are HF weights transposed, with
# the head axes split out ([D, N, 3, H] for query_key_value, [N, H, D] for attention.dense).

HEAD_NAME = "embed_out.weight"
# Buffers that older checkpoints store beside the weights (causal-mask and rotary caches).
_IGNORED = re.compile(r"(^|\.)(attention\.(bias|masked_bias)|rotary_emb\.inv_freq)$")
_LEAF_TO_HF = {"kernel": "weight", "bias": "bias", "embedding": "weight", "scale": "weight"}


def _hf_name(path: tuple[Any, ...]) -> str:
    *modules, leaf = path
    return ".".join([str(p) for p in modules] + [_LEAF_TO_HF[leaf]])


def _num_in_axes(path: tuple[Any, ...]) -> int:
    return 2 if path[-2] == "dense" else 1  # attention.dense contracts (N, H)


def _to_hf(path: tuple[Any, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        n_in = _num_in_axes(path)
        return np.ascontiguousarray(value.reshape(math.prod(value.shape[:n_in]), -1).T)
    if path[-1] == "bias":
        return value.reshape(-1)
    return value


def _hf_shape(path: tuple[Any, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel":
        n_in = _num_in_axes(path)
        return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
    if path[-1] == "bias":
        return (math.prod(shape),)
    return tuple(shape)


def _to_flax(path: tuple[Any, ...], tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if path[-1] == "kernel":
        return np.ascontiguousarray(tensor.T).reshape(shape)
    return tensor.reshape(shape)


def _abstract_model(
    config: NeoXConfig, dtype: Any, param_dtype: Any, attention_implementation: str | None = None
) -> NeoXForCausalLM:
    """The model with shapes but no values (`nnx.eval_shape`): the template weights fill."""
    return nnx.eval_shape(
        lambda: NeoXForCausalLM(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=nnx.Rngs(0),
            attention_implementation=attention_implementation,
        )
    )


def state_from_hf(
    config: NeoXConfig,
    tensors: Mapping[str, Any],
    *,
    param_dtype: Any = jnp.float32,
    source: str = "<memory>",
) -> nnx.State:
    """Converts an HF state dict (NumPy arrays) to the nnx parameter state.

    Args:
      config: the model's config.
      tensors: `{hf_name: array}`; the head as `embed_out.weight` (files) or `lm_head.weight`
        (transformers 5's in-memory name); the attention's mask and rotary buffers are ignored.
      param_dtype: dtype of the returned parameters.
      source: where the tensors come from, for error messages.

    Returns:
      An `nnx.State` to `nnx.merge` with the graphdef of `NeoXForCausalLM(config, ...)`.

    Raises:
      ValueError: a tensor is missing, unexpected or misshapen.
    """
    available = {
        (HEAD_NAME if k == "lm_head.weight" else k): v
        for k, v in tensors.items()
        if not _IGNORED.search(k)
    }
    abstract = nnx.state(_abstract_model(config, jnp.float32, param_dtype))
    expected = {_hf_name(p): (p, var) for p, var in nnx.to_flat_state(abstract)}
    missing = sorted(set(expected) - set(available))
    if missing:
        raise ValueError(
            f"{source}: checkpoint lacks tensors required by its config: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )
    ignorable = {HEAD_NAME} if config.tie_word_embeddings else set()
    unexpected = sorted(set(available) - set(expected) - ignorable)
    if unexpected:
        raise ValueError(
            f"{source}: checkpoint has tensors its config does not describe: "
            f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
        )
    flat = []
    for name, (path, var) in expected.items():
        tensor = np.asarray(available[name])
        want = _hf_shape(path, tuple(var.shape))
        if tuple(tensor.shape) != want:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, but the config "
                f"implies {want}"
            )
        value = _to_flax(path, tensor, tuple(var.shape))
        flat.append((path, var.replace(jnp.asarray(value, dtype=param_dtype))))
    return nnx.from_flat_state(flat)


def hf_state_dict(model: NeoXForCausalLM) -> dict[str, np.ndarray]:
    """The model's parameters as an HF state dict of NumPy arrays (a tied head omitted)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        out[_hf_name(path)] = _to_hf(path, np.asarray(jax.device_get(var[...])))
    return out


def load_pretrained(
    path: Any,
    dtype: Any = jnp.float32,
    *,
    param_dtype: Any = None,
    attention_implementation: str | None = None,
) -> NeoXForCausalLM:
    """Loads a Hugging Face GPT-NeoX / Pythia directory (config.json + model.safetensors).

    Args:
      path: the directory, or a Hugging Face hub id (`EleutherAI/pythia-160m`; see `lm.hub`).
      dtype: compute dtype.
      param_dtype: parameter dtype (default: `dtype`).
      attention_implementation: see `NeoXForCausalLM`.

    Raises:
      FileNotFoundError: if the directory, its config or its weights are missing.
      ValueError: if it is not a GPT-NeoX directory, or a weight is missing or misshapen.
    """
    from safetensors.numpy import load_file

    directory = pathlib.Path(hub.resolve(path))
    config_dict = convert.read_config_dict(directory)
    try:
        config = NeoXConfig.from_hf_dict(config_dict)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{directory / convert.CONFIG_NAME}: {e}") from e
    weights = directory / convert.SAFETENSORS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{directory}: no {convert.SAFETENSORS_NAME}")
    param_dtype = dtype if param_dtype is None else param_dtype
    graphdef, _ = nnx.split(_abstract_model(config, dtype, param_dtype, attention_implementation))
    state = state_from_hf(
        config, load_file(str(weights)), param_dtype=param_dtype, source=str(weights)
    )
    return nnx.merge(graphdef, state)


def save_pretrained(model: NeoXForCausalLM, path: Any) -> None:
    """Writes `config.json` and `model.safetensors` (HF names) that transformers loads back."""
    config = model.config.to_hf_dict()
    config["dtype"] = convert.dtype_name(model.param_dtype)
    convert.write_directory(path, hf_state_dict(model), config)


def num_params(model: NeoXForCausalLM) -> int:
    """Number of parameters (a tied head counted once)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

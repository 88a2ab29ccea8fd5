"""The Llama family in Flax NNX: Llama 2/3, SmolLM2, Qwen2/2.5 and Mistral decoders.

One model covers HF's `LlamaForCausalLM`, `Qwen2ForCausalLM` and `MistralForCausalLM`
(transformers 5.x), which differ only in switches: pre-RMSNorm blocks, rotary positions (with
the `rope_parameters` scaling variants default, linear, dynamic and llama3), a SwiGLU MLP
`down(silu(gate(x)) * up(x))`, grouped-query attention (`num_key_value_heads` K dividing the N
query heads), `head_dim` possibly != hidden_size / N, optional q/k/v biases (Qwen2: q/k/v but
not o; Llama's `attention_bias`: all four), optional MLP biases (Llama's `mlp_bias`) and an
optional tied head. Parameter names follow HF's module names, so the tensor layout (`LAYOUT`,
in `lm.convert`'s terms) is renames and transposes only; loading and saving go through
`lm.families` (family "llama", model_types llama, mistral, qwen2). Numerics follow HF too:
RMSNorm in float32 then cast back and scaled in the compute dtype, rotary cos/sin computed in
float32 from `position * inv_freq`, queries scaled after the rotation, softmax in float32,
logits in float32.

Shape legend: B batch, T query length, S key/cache length, D hidden_size, N query heads, K
key/value heads, H head_dim, F intermediate_size, V vocab, L layers.

Parameter layout and logical sharding axes (`jaxtools.sharding.DEFAULT_RULES`):

  model.embed_tokens.embedding                     [V, D]     ("vocab", "embed")
  model.layers[i].self_attn.q_proj.kernel          [D, N, H]  ("embed", "heads", "head_dim")
  model.layers[i].self_attn.{k,v}_proj.kernel      [D, K, H]  ("embed", "kv_heads", "head_dim")
  model.layers[i].self_attn.{q,k,v}_proj.bias      [N|K, H]   if config.qkv_bias
  model.layers[i].self_attn.o_proj.kernel          [N, H, D]  ("heads", "head_dim", "embed")
  model.layers[i].self_attn.o_proj.bias            [D]        if config.o_proj_bias
  model.layers[i].mlp.{gate,up}_proj.kernel        [D, F]     ("embed", "mlp")
  model.layers[i].mlp.down_proj.kernel             [F, D]     ("mlp", "embed")
  model.layers[i].mlp.*.bias                       if config.mlp_bias
  model.layers[i].{input,post_attention}_layernorm.scale, model.norm.scale  [D]  ("embed",)
  lm_head.kernel                                   [D, V]     ("embed", "vocab")  only if untied

Grouped-query attention: the cache stores the K key/value heads (N / K times less memory than
repeating them); the attention kernel (`jax.nn.dot_product_attention`, which groups query head
n with key head n // (N / K), HF's `repeat_kv` order) and `PromptSharingCache` read them
grouped, never repeated.

Mistral's (and Qwen2's `use_sliding_window`) sliding window: a query attends to the
`sliding_window` previous slots only. The window changes nothing while a sequence fits in it,
so the model runs any call whose sequence (or cache) is at most `sliding_window` slots long,
and refuses a longer one with one clear line instead of attending too far.

Dynamic RoPE (`rope_type: dynamic`) rescales the base from the longest position of each call,
`max(position_ids) + 1` over the batch, as transformers does on a freshly loaded model whose
calls do not shrink (its rotary module keeps the longest length seen across calls; ours is
stateless).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from collapse_jax.lm import convert
from collapse_jax.lm.cache import Cache, KVCache, PromptSharingCache
from collapse_jax.lm.layers import (
    ACTIVATIONS,
    CausalLM,
    Embed,
    Linear,
    apply_rotary,
    attention,
    lm_head,
    lm_logits,
    param,
    rotary_cos_sin,
    run_layers,
)

MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "dynamic", "linear", "llama3")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family model; field names mirror HF `LlamaConfig`.

    Attributes:
      model_type: "llama" (Llama 2/3, SmolLM2), "qwen2" (Qwen2/2.5) or "mistral"; it fixes
        which biases exist (see `qkv_bias`, `o_proj_bias`) and the HF class written back.
      vocab_size: V.
      hidden_size: D.
      intermediate_size: F, the SwiGLU width.
      num_hidden_layers: L.
      num_attention_heads: N query heads.
      num_key_value_heads: K key/value heads, dividing N (None: K = N).
      head_dim: H (None: D / N, then N must divide D).
      hidden_act: the MLP gate's nonlinearity, an HF `ACT2FN` name ("silu").
      max_position_embeddings: the longest sequence the positions are meant for (rotary has no
        table; dynamic RoPE and llama3 use it).
      rms_norm_eps: RMSNorm epsilon.
      rope_theta: rotary base.
      rope_type: "default", "linear" (positions / factor), "dynamic" (NTK base rescaled beyond
        max_position_embeddings) or "llama3" (Llama 3.1's frequency-dependent scaling).
      rope_factor: the scaling factor of linear, dynamic and llama3.
      rope_low_freq_factor, rope_high_freq_factor: llama3's band edges.
      rope_original_max_position_embeddings: llama3's pretraining length (None:
        max_position_embeddings).
      attention_bias: Llama's switch: q, k, v and o projections have biases ("llama" only;
        Qwen2 always has q/k/v biases and no o bias; Mistral none).
      mlp_bias: the MLP projections have biases ("llama" only).
      tie_word_embeddings: the LM head reuses `embed_tokens`.
      sliding_window: attention window of the layers that slide (None: full attention
        everywhere); see the module docstring.
      max_window_layers: Qwen2's first sliding layer (kept for writing config.json back).
      attention_dropout: dropout rate on the attention probabilities (training mode only).
      pad_token_id, bos_token_id: special ids; None (most Llama checkpoints have no pad id,
        Qwen2 no bos id) means `eos_token_id`, as transformers' `generate` pads with it.
      eos_token_id: the end-of-sequence id (of a list in config.json, the first: decoding stops
        at that one only; pass `eos_token_id=[...]` to `decode.generate` for several).
      initializer_range: standard deviation of the random initialisation.
    """

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 0
    attention_dropout: float = 0.0
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int = 2
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"LlamaConfig.model_type {self.model_type!r} is not supported; choose one of "
                f"{list(MODEL_TYPES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        n = self.num_attention_heads
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", n)
        k = self.num_key_value_heads
        if not isinstance(k, int) or k <= 0 or n % k:
            raise ValueError(
                f"LlamaConfig.num_key_value_heads ({k!r}) must be a positive divisor of "
                f"num_attention_heads ({n})"
            )
        if self.head_dim is None:
            if self.hidden_size % n:
                raise ValueError(
                    f"LlamaConfig.hidden_size ({self.hidden_size}) must be divisible by "
                    f"num_attention_heads ({n}) when head_dim is not given"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // n)
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(
                f"LlamaConfig.head_dim must be a positive even integer (rotary pairs), "
                f"got {self.head_dim!r}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"LlamaConfig.hidden_act {self.hidden_act!r} is not supported; choose one of "
                f"{sorted(ACTIVATIONS)}"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"LlamaConfig.rope_type {self.rope_type!r} is not supported; choose one of "
                f"{list(ROPE_TYPES)}"
            )
        if self.rope_type != "default" and not self.rope_factor >= 1.0:
            raise ValueError(
                f"LlamaConfig.rope_factor must be at least 1 for {self.rope_type} RoPE, "
                f"got {self.rope_factor!r}"
            )
        if self.rope_type == "llama3" and not (
            self.rope_high_freq_factor > self.rope_low_freq_factor > 0
        ):
            raise ValueError(
                "LlamaConfig: llama3 RoPE needs rope_high_freq_factor > rope_low_freq_factor > 0, "
                f"got {self.rope_high_freq_factor!r} and {self.rope_low_freq_factor!r}"
            )
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ValueError(
                f"LlamaConfig.rope_theta and rms_norm_eps must be positive, got "
                f"{self.rope_theta!r} and {self.rms_norm_eps!r}"
            )
        if self.model_type != "llama" and (self.attention_bias or self.mlp_bias):
            raise ValueError(
                f"LlamaConfig: attention_bias/mlp_bias are Llama switches; a {self.model_type} "
                "model has its fixed biases (set model_type='llama' to choose them)"
            )
        if self.sliding_window is not None and (
            not isinstance(self.sliding_window, int) or self.sliding_window <= 0
        ):
            raise ValueError(
                f"LlamaConfig.sliding_window must be a positive integer or None, "
                f"got {self.sliding_window!r}"
            )
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(
                f"LlamaConfig.attention_dropout must be in [0, 1), got {self.attention_dropout!r}"
            )
        for name in ("pad_token_id", "bos_token_id"):
            if getattr(self, name) is None:  # as transformers' generate: the eos id stands in
                object.__setattr__(self, name, self.eos_token_id)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"LlamaConfig.{name} must be a token id, got {value!r}")

    @property
    def qkv_bias(self) -> bool:
        """Whether q/k/v projections have biases (Qwen2 always; Llama with attention_bias)."""
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_proj_bias(self) -> bool:
        """Whether the attention output projection has a bias (Llama with attention_bias)."""
        return self.attention_bias

    @property
    def init_std(self) -> float:
        """The random initialisation's standard deviation (HF `initializer_range`)."""
        return self.initializer_range

    @classmethod
    def from_hf_dict(cls, d: dict) -> LlamaConfig:
        """Builds a config from an HF `config.json` dictionary; unknown keys are ignored.

        Reads the rotary settings from transformers 5's `rope_parameters` or from the older
        top-level `rope_theta` plus `rope_scaling`. Keys a file omits take transformers' defaults
        for its model_type where they differ from `LlamaConfig`'s (Mistral's 4096 window).

        Raises:
          ValueError: if it is not a Llama-family config or a setting is not supported.
        """
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"config is not a Llama-family config: model_type={model_type!r} (supported: "
                f"{', '.join(MODEL_TYPES)})"
            )
        kwargs: dict[str, Any] = {"model_type": model_type}
        plain = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "hidden_act",
            "max_position_embeddings",
            "rms_norm_eps",
            "tie_word_embeddings",
            "attention_dropout",
            "pad_token_id",
            "bos_token_id",
            "eos_token_id",
            "initializer_range",
        )
        for name in plain:
            if d.get(name) is not None:
                kwargs[name] = d[name]
        if model_type == "llama":
            kwargs["attention_bias"] = bool(d.get("attention_bias", False))
            kwargs["mlp_bias"] = bool(d.get("mlp_bias", False))
        for name in ("rms_norm_eps", "attention_dropout", "initializer_range"):
            if name in kwargs:
                kwargs[name] = float(kwargs[name])
        for name in ("pad_token_id", "bos_token_id"):
            if name not in kwargs and name in d:  # an explicit null: the eos id
                kwargs[name] = None
        if "eos_token_id" in d and d["eos_token_id"] in (None, []):
            raise ValueError("eos_token_id is null: a Llama-family model needs an EOS id")
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = int(kwargs["eos_token_id"][0])
        kwargs.update(_rope_from_hf(d))
        kwargs.update(_window_from_hf(d, model_type, kwargs.get("num_hidden_layers", 32)))
        return cls(**kwargs)

    def to_hf_dict(self) -> dict:
        """The `config.json` dictionary that transformers' class for `model_type` reads back."""
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type != "default":
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope["low_freq_factor"] = self.rope_low_freq_factor
            rope["high_freq_factor"] = self.rope_high_freq_factor
            rope["original_max_position_embeddings"] = self.original_max_position_embeddings
        d = {
            "model_type": self.model_type,
            "architectures": [_ARCHITECTURES[self.model_type]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": self.attention_dropout,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "initializer_range": self.initializer_range,
            "use_cache": True,
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = self.mlp_bias
        elif self.model_type == "qwen2":
            d["use_sliding_window"] = self.sliding_window is not None
            d["sliding_window"] = self.sliding_window
            d["max_window_layers"] = self.max_window_layers
        else:
            d["sliding_window"] = self.sliding_window
        return d

    @property
    def original_max_position_embeddings(self) -> int:
        """llama3 RoPE's pretraining length."""
        if self.rope_original_max_position_embeddings is None:
            return self.max_position_embeddings
        return self.rope_original_max_position_embeddings

    @classmethod
    def smollm2_135m(cls) -> LlamaConfig:
        """The configuration of HuggingFaceTB/SmolLM2-135M."""
        return cls(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_theta=100000.0,
            tie_word_embeddings=True,
            pad_token_id=None,
            bos_token_id=0,
            eos_token_id=0,
            initializer_range=0.041666666666666664,
        )


def _rope_from_hf(d: dict) -> dict[str, Any]:
    """The rope_* fields from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(f"rope_parameters must be a mapping, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported in the Llama family")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} is not supported; the Llama family supports "
            f"{', '.join(ROPE_TYPES)}"
        )
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise ValueError(f"partial_rotary_factor={partial} is not supported (must be 1)")
    out: dict[str, Any] = {
        "rope_type": rope_type,
        "rope_theta": float(params.get("rope_theta", d.get("rope_theta", 10000.0))),
    }
    if rope_type != "default":
        if "factor" not in params:
            raise ValueError(f"{rope_type} rope_parameters lack 'factor'")
        out["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        for key, name in (
            ("low_freq_factor", "rope_low_freq_factor"),
            ("high_freq_factor", "rope_high_freq_factor"),
        ):
            if key not in params:
                raise ValueError(f"llama3 rope_parameters lack {key!r}")
            out[name] = float(params[key])
        if params.get("original_max_position_embeddings") is not None:
            out["rope_original_max_position_embeddings"] = int(
                params["original_max_position_embeddings"]
            )
    return out


def _window_from_hf(d: dict, model_type: str, num_layers: int) -> dict[str, Any]:
    """sliding_window (None when no layer slides) and Qwen2's max_window_layers."""
    if model_type == "llama":
        return {}
    if model_type == "mistral":
        return {"sliding_window": d.get("sliding_window", 4096)}
    max_window_layers = int(d.get("max_window_layers", 28))
    window = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None
    layer_types = d.get("layer_types")
    if window is not None and layer_types is not None:
        if "sliding_attention" not in layer_types:
            window = None
    elif window is not None and max_window_layers >= num_layers:
        window = None
    return {"sliding_window": window, "max_window_layers": max_window_layers}


class RMSNorm(nnx.Module):
    """HF `LlamaRMSNorm`: `scale * (x / rms(x))`, the statistics in float32, the product in the
    compute dtype (the normalised x is cast back before the scale, as HF does)."""

    def __init__(self, dim: int, *, eps: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        scale = self.scale[...].astype(self.dtype)
        return scale.reshape((1,) * (y.ndim - 1) + scale.shape) * y


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """The rotary inverse frequencies [H / 2] float32 at lengths up to max_position_embeddings,
    computed as transformers' `ROPE_INIT_FUNCTIONS` do (float32 throughout)."""
    h = config.head_dim
    exponents = np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / np.float32(h)
    inv = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponents)).astype(np.float32)
    if config.rope_type == "linear":
        inv = (inv / np.float32(config.rope_factor)).astype(np.float32)
    elif config.rope_type == "llama3":
        factor = config.rope_factor
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        old = config.original_max_position_embeddings
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = (2 * math.pi / inv).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv).astype(np.float32)
        smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def _dynamic_inv_freq(config: LlamaConfig, seq_len: jax.Array) -> jax.Array:
    """Dynamic-NTK inverse frequencies for a call whose longest sequence is `seq_len`."""
    h = config.head_dim
    mpe = config.max_position_embeddings
    factor = config.rope_factor
    length = jnp.maximum(seq_len, mpe).astype(jnp.float32)
    base = jnp.float32(config.rope_theta) * (
        (jnp.float32(factor) * length / jnp.float32(mpe)) - jnp.float32(factor - 1)
    ) ** jnp.float32(h / (h - 2))
    exponents = jnp.asarray(np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / np.float32(h))
    dynamic = 1.0 / (base**exponents)
    return jnp.where(seq_len > mpe, dynamic, jnp.asarray(rope_inv_freq(config)))


class LlamaAttention(nnx.Module):
    """Grouped-query causal self-attention with rotary positions (HF `LlamaAttention`)."""

    def __init__(
        self,
        config: LlamaConfig,
        *,
        dtype: Any,
        param_dtype: Any,
        attention_implementation: str | None,
        rngs: nnx.Rngs,
    ):
        d, n, k, h = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        kw = dict(init_std=config.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        qkv = dict(use_bias=config.qkv_bias, **kw)
        self.q_proj = Linear((d,), (n, h), ("embed", "heads", "head_dim"), **qkv)
        self.k_proj = Linear((d,), (k, h), ("embed", "kv_heads", "head_dim"), **qkv)
        self.v_proj = Linear((d,), (k, h), ("embed", "kv_heads", "head_dim"), **qkv)
        self.o_proj = Linear(
            (n, h), (d,), ("heads", "head_dim", "embed"), use_bias=config.o_proj_bias, **kw
        )
        self.scaling = h**-0.5
        self.attention_dropout = config.attention_dropout
        self.implementation = attention_implementation

    def __call__(self, x, rope, mask, cache, layer, dropout_key):
        """x [B, T, D], rope = (cos, sin) [B, T, 1, H] -> ([B, T, D], cache or None).

        `mask` as in `OPTAttention`: bool [B, 1, T, T] or None without a cache, the cache's view
        with one.
        """
        cos, sin = rope
        q = apply_rotary(self.q_proj(x), cos, sin)  # [B, T, N, H]
        q = q * jnp.asarray(self.scaling, q.dtype)
        k = apply_rotary(self.k_proj(x), cos, sin)  # [B, T, K, H]
        v = self.v_proj(x)  # [B, T, K, H]
        attention = functools.partial(self.attention, dropout_key=dropout_key)
        if cache is None:
            out = attention(q, k, v, mask)
        else:
            out, cache = cache.attend(layer, q, k, v, mask, attention)
        return self.o_proj(out), cache

    def attention(self, q, k, v, mask, dropout_key=None):
        """softmax(q k^T) v: q [B, T, N, H] (scaled), k, v [B, S, K, H] (query head n reads key
        head n // (N / K)), mask bool [B, 1, T, S] or None (plain causal) -> [B, T, N, H]."""
        return attention(
            q,
            k,
            v,
            mask,
            implementation=self.implementation,
            dropout_rate=self.attention_dropout,
            dropout_key=dropout_key,
        )


class LlamaMLP(nnx.Module):
    """SwiGLU: `down_proj(act(gate_proj(x)) * up_proj(x))`."""

    def __init__(self, config: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(
            use_bias=config.mlp_bias,
            init_std=config.init_std,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.gate_proj = Linear((d,), (f,), ("embed", "mlp"), **kw)
        self.up_proj = Linear((d,), (f,), ("embed", "mlp"), **kw)
        self.down_proj = Linear((f,), (d,), ("mlp", "embed"), **kw)
        self.activation = config.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(ACTIVATIONS[self.activation](self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    """Pre-RMSNorm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, **kwargs: Any):
        norm = dict(
            eps=config.rms_norm_eps,
            dtype=kwargs["dtype"],
            param_dtype=kwargs["param_dtype"],
            rngs=kwargs["rngs"],
        )
        self.self_attn = LlamaAttention(config, **kwargs)
        self.mlp = LlamaMLP(
            config, dtype=kwargs["dtype"], param_dtype=kwargs["param_dtype"], rngs=kwargs["rngs"]
        )
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)

    def __call__(self, x, rope, mask, cache, layer, dropout_key):
        h, cache = self.self_attn(self.input_layernorm(x), rope, mask, cache, layer, dropout_key)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class LlamaModel(nnx.Module):
    """Embeddings, the decoder layers and the final norm (HF `LlamaModel`, prefix `model`)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, **kwargs: Any):
        dtype, param_dtype = kwargs["dtype"], kwargs["param_dtype"]
        self.embed_tokens = Embed(
            config.vocab_size,
            config.hidden_size,
            ("vocab", "embed"),
            init_std=config.init_std,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.layers = nnx.List(
            [
                LlamaDecoderLayer(config, rngs=rngs, **kwargs)
                for _ in range(config.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(
            config.hidden_size,
            eps=config.rms_norm_eps,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )


def _cache_slots(cache: Cache) -> int | None:
    """The longest sequence a cache can hold (slots), None for an unknown cache type."""
    if isinstance(cache, KVCache):
        return cache.key.shape[2]
    if isinstance(cache, PromptSharingCache):
        return cache.prompt_k.shape[2] + cache.gen_k.shape[2]
    return None


class LlamaForCausalLM(CausalLM):
    """Llama-family language model: `model` plus the (optionally tied) LM head. The
    constructor, `init_cache` and `__call__` are `lm.layers.CausalLM`'s (positions are rotary;
    the cache holds the K key/value heads); a length beyond `sliding_window` is refused."""

    def build(self, config: LlamaConfig, *, dtype, param_dtype, impl, rngs) -> None:
        self.model = LlamaModel(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            attention_implementation=impl,
            rngs=rngs,
        )
        self.lm_head = lm_head(
            config,
            config.hidden_size,
            config.init_std,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def _check_window(self, length: int) -> None:
        window = self.config.sliding_window
        if window is not None and length > window:
            raise ValueError(
                f"sequence or cache length {length} exceeds the model's sliding_window {window}: "
                "windowed attention is not implemented (it is exact only up to the window)"
            )

    def _check_call(self, length: int, cache: Cache | None) -> None:
        """`prepare_call`'s check: the call's length (without a cache) or the cache's slots fit
        the sliding window."""
        if cache is None:
            self._check_window(length)
        elif self.config.sliding_window is not None:
            slots = _cache_slots(cache)
            if slots is None:
                raise ValueError(
                    f"cannot check a {type(cache).__name__} against the model's "
                    f"sliding_window {self.config.sliding_window}"
                )
            self._check_window(slots)

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
        self._check_window(max_length)
        return super().init_cache(batch_size, max_length, dtype)

    def dropout_rates(self) -> tuple[float, ...]:
        return (self.config.attention_dropout,)

    def call_limits(self) -> dict[str, Any]:
        return {"check": self._check_call}

    def forward(self, input_ids, position_ids, mask, cache, dropout_key):
        cfg = self.config
        if cfg.rope_type == "dynamic":
            inv_freq = _dynamic_inv_freq(cfg, jnp.max(position_ids) + 1)
        else:
            inv_freq = jnp.asarray(rope_inv_freq(cfg))
        rope = rotary_cos_sin(position_ids, inv_freq, self.dtype)
        x = self.model.embed_tokens(input_ids)  # [B, T, D]
        x, cache = run_layers(self.model.layers, x, mask, cache, dropout_key, rope)
        x = self.model.norm(x)
        return lm_logits(x, self.lm_head, self.model.embed_tokens, self.dtype), cache


def _llama_tensor(path: convert.Path) -> convert.Tensor:
    # o_proj contracts (N, H); every other kernel contracts one axis.
    return convert.Tensor.mechanical(path, n_in=2 if "o_proj" in path else 1)


def _llama_name(name: str) -> str:
    # A base-model checkpoint (saved from LlamaModel) lacks the "model." prefix.
    return name if name.startswith(("model.", "lm_head.")) else "model." + name


# HF names mirror our paths; older checkpoints also stored the rotary `inv_freq` buffers.
LAYOUT = convert.Layout(
    tensor=_llama_tensor, normalise=_llama_name, ignored=(r".*rotary_emb\.inv_freq",)
)

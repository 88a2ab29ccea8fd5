"""GPT-NeoX (Black et al. 2022, arXiv:2204.06745) and Pythia (Biderman et al. 2023) in Flax NNX.

Parameter names follow Hugging Face `transformers.models.gpt_neox.modeling_gpt_neox`, so that
the tensor layout (`LAYOUT`, in `collapse_jax.lm.convert`'s terms) is transposes and reshapes
only; loading and saving go through `collapse_jax.lm.families` (model_type "gpt_neox").
Numerics follow HF too: rotary position embeddings on the first `rotary_dim = int(head_dim *
rotary_pct)` dims of each head (the "rotate half" form, cos/sin computed in float32 and cast to
the compute dtype), softmax in float32, LayerNorm with the config's eps. Positions are
`cumsum(mask) * mask - 1` (what HF's `generate` passes; HF's plain forward uses `arange` whatever
the padding, which agrees on unpadded rows).

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

Attention is `lm.layers.attention` (XLA by default, cuDNN on request). Mixed precision as in
`lm.opt`: `param_dtype` is the storage dtype, `dtype` the compute dtype; LayerNorm statistics,
rotary angles, softmax and the logits are float32. Rotary embeddings have no table, so positions
are not limited by `max_position_embeddings` (as in HF); out-of-range token ids give NaN logits.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from collapse_jax.lm import convert, hub
from collapse_jax.lm.cache import Cache
from collapse_jax.lm.layers import (
    ACTIVATIONS,
    CausalLM,
    Embed,
    LayerNorm,
    Linear,
    apply_rotary,
    attention,
    inverted_dropout,
    lm_head,
    lm_logits,
    rotary_cos_sin,
    run_layers,
)

MODEL_TYPE = "gpt_neox"


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
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"NeoXConfig.hidden_act {self.hidden_act!r} is not supported; "
                f"choose one of {sorted(ACTIVATIONS)}"
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


def rope_inverse_frequencies(config: NeoXConfig) -> np.ndarray:
    """HF's `inv_freq` [R / 2] float32: 1 / base^(2i / R), divided by the linear factor."""
    r = config.rotary_dim
    exponents = np.arange(0, r, 2, dtype=np.float32) / np.float32(r)
    inv_freq = (1.0 / (np.float32(config.rotary_emb_base) ** exponents)).astype(np.float32)
    return inv_freq / np.float32(config.rope_factor)


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
        return attention(
            q,
            k,
            v,
            mask,
            implementation=self.implementation,
            dropout_rate=self.attention_dropout,
            dropout_key=dropout_key,
        )


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
        return self.dense_4h_to_h(ACTIVATIONS[self.activation](self.dense_h_to_4h(x)))


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
        ln = dict(
            affine=True, eps=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
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
            affine=True,
            eps=config.layer_norm_eps,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )


class NeoXForCausalLM(CausalLM):
    """GPT-NeoX language model: `gpt_neox` plus the LM head `embed_out` (or the tied embedding).
    The constructor, `init_cache` and `__call__` are `lm.layers.CausalLM`'s (positions are
    rotary)."""

    def build(self, config: NeoXConfig, *, dtype, param_dtype, impl, rngs) -> None:
        self.gpt_neox = NeoXModel(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            attention_implementation=impl,
            rngs=rngs,
        )
        self.embed_out = lm_head(
            config,
            config.hidden_size,
            config.initializer_range,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def dropout_rates(self) -> tuple[float, ...]:
        return (self.config.hidden_dropout, self.config.attention_dropout)

    def forward(self, input_ids, position_ids, mask, cache, dropout_key):
        cfg, model = self.config, self.gpt_neox
        x = model.embed_in(input_ids)  # [B, T, D]
        if dropout_key is not None and cfg.hidden_dropout > 0.0:
            emb_key = jax.random.fold_in(dropout_key, cfg.num_hidden_layers)  # layers take 0..L-1
            x = inverted_dropout(emb_key, x, cfg.hidden_dropout)
        rotary = rotary_cos_sin(
            position_ids, rope_inverse_frequencies(cfg), self.dtype
        )  # [B, T, 1, R] each
        x, cache = run_layers(model.layers, x, mask, cache, dropout_key, rotary)
        x = model.final_layer_norm(x)
        return lm_logits(x, self.embed_out, model.embed_in, self.dtype), cache  # [B, T, V]


def _neox_tensor(path: convert.Path) -> convert.Tensor:
    # attention.dense contracts (N, H); query_key_value [D, N, 3, H] is HF's fused weight
    # transposed and reshaped (its 3 N H outputs are head-major with q, k, v inside each head).
    return convert.Tensor.mechanical(path, n_in=2 if path[-2] == "dense" else 1)


def _neox_name(name: str) -> str:
    # transformers 5 calls the head `lm_head` in memory and `embed_out` in files; a checkpoint
    # saved from `GPTNeoXModel` (no head) lacks the `gpt_neox.` prefix.
    if name == "lm_head.weight":
        return "embed_out.weight"
    if name.startswith(("embed_in.", "layers.", "final_layer_norm.")):
        return "gpt_neox." + name
    return name


# HF names mirror our paths. Older checkpoints store the causal-mask buffers and rotary
# frequencies beside the weights; a tied head makes a stored `embed_out.weight` redundant.
LAYOUT = convert.Layout(
    tensor=_neox_tensor,
    normalise=_neox_name,
    ignored=(
        r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)",
        r"gpt_neox\.rotary_emb\.inv_freq",
    ),
    tied=("embed_out.weight",),
)


def load_pretrained(
    path: Any,
    dtype: Any = jnp.float32,
    *,
    param_dtype: Any = None,
    attention_implementation: str | None = None,
) -> NeoXForCausalLM:
    """Loads a Hugging Face GPT-NeoX directory or hub id (`EleutherAI/pythia-160m`).

    `collapse_jax.lm.load_pretrained` loads any supported family; this one refuses a checkpoint
    of another family (one line naming its model_type). Arguments and errors as
    `lm.convert.load_model`; no torch needed.
    """
    return convert.load_model(
        hub.resolve(path),
        NeoXConfig,
        NeoXForCausalLM,
        LAYOUT,
        dtype=dtype,
        param_dtype=param_dtype,
        attention_implementation=attention_implementation,
    )


def save_pretrained(model: NeoXForCausalLM, path: Any) -> None:
    """Writes `config.json` and `model.safetensors` that transformers' GPT-NeoX loads."""
    convert.save_model(model, path, LAYOUT)

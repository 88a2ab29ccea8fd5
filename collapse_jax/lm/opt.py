"""OPT decoder (Zhang et al. 2022, arXiv:2205.01068) in Flax NNX, for every OPT size.

Parameter names follow Hugging Face `transformers.models.opt.modeling_opt`, so that the tensor
layout (`LAYOUT`, in `collapse_jax.lm.convert`'s terms) is renames and transposes only; loading
and saving go through `collapse_jax.lm.families`. Numerics follow HF too: queries are scaled
before the dot product, softmax runs in float32, LayerNorm eps is 1e-5, positions are
`cumsum(mask) * mask - 1` plus the learned-embedding offset of 2.

Shape legend: B batch, T query length, S key/cache length, D hidden_size, E word_embed_proj_dim,
N heads, H head_dim, F ffn_dim, V vocab, L layers, P max_position_embeddings + 2.

Parameter layout and logical sharding axes (`nnx.with_partitioning`; `jaxtools.sharding` maps
them onto mesh axes; None = replicated):

  model.decoder.embed_tokens.embedding         [V, E]     ("vocab", "embed")
  model.decoder.embed_positions.embedding      [P, D]     (None, "embed")
  model.decoder.project_in.kernel              [E, D]     (None, "embed")    if E != D
  model.decoder.project_out.kernel             [D, E]     ("embed", None)    if E != D
  model.decoder.layers[i].self_attn.{q,k,v}_proj.kernel [D, N, H] ("embed", "heads", "head_dim")
  model.decoder.layers[i].self_attn.{q,k,v}_proj.bias   [N, H]    ("heads", "head_dim")
  model.decoder.layers[i].self_attn.out_proj.kernel     [N, H, D] ("heads", "head_dim", "embed")
  model.decoder.layers[i].self_attn.out_proj.bias       [D]       ("embed",)
  model.decoder.layers[i].fc1.kernel [D, F] ("embed", "mlp"), fc1.bias [F] ("mlp",)
  model.decoder.layers[i].fc2.kernel [F, D] ("mlp", "embed"), fc2.bias [D] ("embed",)
  *layer_norm.scale / .bias                    [D]        ("embed",)
  lm_head.kernel                               [E, V]     ("embed", "vocab")  only if untied

q/k/v kernels are stored split into heads ([D, N, H]) so that tensor parallelism shards whole
heads and the attention einsums need no reshapes; HF's [N*H, D] weights are transposed and
reshaped on conversion. The tied LM head reuses `embed_tokens` (no `lm_head` parameter).

Incremental decoding: the attention takes a cache object (`collapse_jax.lm.cache`): it hands each
layer's new keys/values to the cache, which stores them and runs the attention, and the cache also
supplies the new tokens' positions and masks. `init_cache` gives the plain slot cache (`KVCache`);
the decoder swaps in a beam-aware one (`PromptSharingCache`) without a second copy of this
forward pass.

Attention goes through `jax.nn.dot_product_attention` (XLA by default; `attention_implementation=
"cudnn"` selects cuDNN flash attention on GPU) except in training mode with attention dropout,
which that function lacks. Mixed precision: `param_dtype` is the storage dtype, `dtype` the compute
dtype; LayerNorm statistics, softmax and the logits are float32. Token ids or positions beyond
the tables give NaN logits (`jnp.take` fills out-of-range rows), never a silent wrong row.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from collapse_jax.lm import convert, hub
from collapse_jax.lm.cache import Cache
from collapse_jax.lm.layers import (
    ACTIVATIONS,
    CausalLM,
    Embed,
    LayerNorm,
    Linear,
    attention,
    inverted_dropout,
    lm_head,
    lm_logits,
    run_layers,
)

# Offset of OPT's learned positions: HF `OPTLearnedPositionalEmbedding.offset` (fairseq legacy).
POSITION_OFFSET = 2


def _opt_tensor(path: convert.Path) -> convert.Tensor:
    # out_proj contracts (N, H); every other kernel contracts one axis.
    return convert.Tensor.mechanical(path, n_in=2 if "out_proj" in path else 1)


def _opt_name(name: str) -> str:
    # Checkpoints saved from OPTModel (the original facebook/opt-* files) lack the "model." prefix.
    return "model." + name if name.startswith("decoder.") else name


# HF names mirror our paths; a tied head's stored `lm_head.weight` is skipped.
LAYOUT = convert.Layout(tensor=_opt_tensor, normalise=_opt_name)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class OPTConfig:
    """Hyper-parameters of an OPT model; field names mirror HF `OPTConfig`.

    Attributes:
      vocab_size: V, number of token ids (50272 for every released OPT).
      hidden_size: D, width of the residual stream.
      num_hidden_layers: L, number of decoder layers.
      ffn_dim: F, hidden width of the MLP.
      num_attention_heads: N; D must be divisible by N.
      max_position_embeddings: number of learned positions (the table has 2 more rows).
      do_layer_norm_before: pre-LayerNorm (True, every OPT but 350m) or post-LayerNorm.
      word_embed_proj_dim: E, token-embedding width; None means E = D. E != D adds
        `project_in` / `project_out` (opt-350m).
      enable_bias: whether linear layers have biases.
      layer_norm_elementwise_affine: whether LayerNorms have scale and bias.
      remove_final_layer_norm: HF `_remove_final_layer_norm` (pre-v4.20 fine-tuned checkpoints).
      dropout: dropout rate after attention and after the MLP (training mode only).
      attention_dropout: dropout rate on the attention probabilities (training mode only).
      activation_function: MLP nonlinearity, an HF `ACT2FN` name ("relu" for OPT).
      pad_token_id: padding token id.
      bos_token_id: beginning-of-sequence id (`</s>` = 2 for OPT).
      eos_token_id: end-of-sequence id (`</s>` = 2 for OPT).
      tie_word_embeddings: whether the LM head reuses `embed_tokens`.
      init_std: standard deviation of the random initialisation (HF `init_std`).
    """

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    remove_final_layer_norm: bool = False
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_function: str = "relu"
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    tie_word_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "ffn_dim",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"OPTConfig.{name} must be a positive integer, got {value!r}")
        if self.word_embed_proj_dim is not None and self.word_embed_proj_dim <= 0:
            raise ValueError(
                f"OPTConfig.word_embed_proj_dim must be positive or None, "
                f"got {self.word_embed_proj_dim!r}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"OPTConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        for name in ("dropout", "attention_dropout"):
            rate = getattr(self, name)
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"OPTConfig.{name} must be in [0, 1), got {rate!r}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"OPTConfig.activation_function {self.activation_function!r} is not supported; "
                f"choose one of {sorted(ACTIVATIONS)}"
            )

    @property
    def head_dim(self) -> int:
        """H = D / N."""
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        """OPT has no grouped-query attention: as many key/value heads as query heads."""
        return self.num_attention_heads

    @property
    def embed_dim(self) -> int:
        """E, the token-embedding width (word_embed_proj_dim, or hidden_size if None)."""
        return self.hidden_size if self.word_embed_proj_dim is None else self.word_embed_proj_dim

    @property
    def has_final_layer_norm(self) -> bool:
        """HF builds `decoder.final_layer_norm` only for pre-LN models not marked as removed."""
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @classmethod
    def from_hf_dict(cls, d: dict) -> OPTConfig:
        """Builds a config from an HF `config.json` dictionary; unknown keys are ignored.

        Raises:
          ValueError: if the dictionary is not an OPT config.
        """
        model_type = d.get("model_type")
        if model_type != "opt":
            raise ValueError(f"config is not an OPT config: model_type={model_type!r}")
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            hf_name = (
                "_remove_final_layer_norm"
                if field.name == "remove_final_layer_norm"
                else (field.name)
            )
            if hf_name in d and d[hf_name] is not None:
                kwargs[field.name] = d[hf_name]
        eos = kwargs.get("eos_token_id")
        if isinstance(eos, list):
            kwargs["eos_token_id"] = int(eos[0])
        for name in ("dropout", "attention_dropout", "init_std"):
            if name in kwargs:
                kwargs[name] = float(kwargs[name])
        if d.get("layerdrop", 0.0):
            raise ValueError(f"OPT layerdrop={d['layerdrop']} is not supported (must be 0)")
        return cls(**kwargs)

    def to_hf_dict(self) -> dict:
        """The `config.json` dictionary that `transformers.OPTConfig` reads back."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["_remove_final_layer_norm"] = d.pop("remove_final_layer_norm")
        d["word_embed_proj_dim"] = self.embed_dim
        d["model_type"] = "opt"
        d["architectures"] = ["OPTForCausalLM"]
        d["layerdrop"] = 0.0
        d["use_cache"] = True
        return d

    @classmethod
    def opt_125m(cls) -> OPTConfig:
        """The configuration of facebook/opt-125m (the paper's model)."""
        return cls(word_embed_proj_dim=768)


class OPTAttention(nnx.Module):
    """Multi-head causal self-attention with an optional stacked KV cache."""

    def __init__(
        self,
        config: OPTConfig,
        *,
        dtype: Any,
        param_dtype: Any,
        attention_implementation: str | None,
        rngs: nnx.Rngs,
    ):
        d, n, h = config.hidden_size, config.num_attention_heads, config.head_dim
        kw = dict(
            use_bias=config.enable_bias,
            init_std=config.init_std,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        qkv_axes = ("embed", "heads", "head_dim")
        self.k_proj = Linear((d,), (n, h), qkv_axes, **kw)
        self.v_proj = Linear((d,), (n, h), qkv_axes, **kw)
        self.q_proj = Linear((d,), (n, h), qkv_axes, **kw)
        self.out_proj = Linear((n, h), (d,), ("heads", "head_dim", "embed"), **kw)
        self.scaling = h**-0.5
        self.attention_dropout = config.attention_dropout
        self.implementation = attention_implementation

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        cache: Cache | None = None,
        layer: int = 0,
        dropout_key: jax.Array | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        """x [B, T, D] -> (output [B, T, D], updated cache or None).

        Without a cache, `mask` is bool [B, 1, T, T], or None for plain causal attention (no
        padding). With a cache, `mask` is the `view` its `prepare` returned, and the cache stores
        this layer's keys/values and runs the attention (see `collapse_jax.lm.cache`).
        """
        q = self.q_proj(x) * jnp.asarray(self.scaling, x.dtype)  # [B, T, N, H]; HF scales q first
        k = self.k_proj(x)  # [B, T, N, H]
        v = self.v_proj(x)  # [B, T, N, H]
        attention = functools.partial(self.attention, dropout_key=dropout_key)
        if cache is None:
            out = attention(q, k, v, mask)
        else:
            out, cache = cache.attend(layer, q, k, v, mask, attention)
        return self.out_proj(out), cache  # [B, T, D]

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


class OPTDecoderLayer(nnx.Module):
    """One transformer block, pre- or post-LayerNorm (HF `OPTDecoderLayer`)."""

    def __init__(
        self,
        config: OPTConfig,
        *,
        dtype: Any,
        param_dtype: Any,
        attention_implementation: str | None,
        rngs: nnx.Rngs,
    ):
        d, f = config.hidden_size, config.ffn_dim
        kw = dict(
            use_bias=config.enable_bias,
            init_std=config.init_std,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        ln = dict(
            affine=config.layer_norm_elementwise_affine,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.self_attn = OPTAttention(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            attention_implementation=attention_implementation,
            rngs=rngs,
        )
        self.self_attn_layer_norm = LayerNorm(d, **ln)
        self.fc1 = Linear((d,), (f,), ("embed", "mlp"), **kw)
        self.fc2 = Linear((f,), (d,), ("mlp", "embed"), **kw)
        self.final_layer_norm = LayerNorm(d, **ln)
        self.pre_ln = config.do_layer_norm_before
        self.activation = config.activation_function
        self.dropout = config.dropout

    def __call__(self, x, mask, cache, layer, dropout_key):
        """x [B, T, D] -> ([B, T, D], updated cache or None); see `OPTAttention`."""
        keys = [None] * 3 if dropout_key is None else list(jax.random.split(dropout_key, 3))
        residual = x
        if self.pre_ln:
            x = self.self_attn_layer_norm(x)
        x, cache = self.self_attn(x, mask, cache, layer, keys[0])
        if keys[1] is not None and self.dropout > 0.0:
            x = inverted_dropout(keys[1], x, self.dropout)
        x = residual + x
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        residual = x
        if self.pre_ln:
            x = self.final_layer_norm(x)
        x = self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))  # [B, T, F] -> [B, T, D]
        if keys[2] is not None and self.dropout > 0.0:
            x = inverted_dropout(keys[2], x, self.dropout)
        x = residual + x
        if not self.pre_ln:
            x = self.final_layer_norm(x)
        return x, cache


class OPTDecoder(nnx.Module):
    """Embeddings, the decoder layers and the final norm/projection (HF `OPTDecoder`)."""

    def __init__(
        self,
        config: OPTConfig,
        *,
        dtype: Any,
        param_dtype: Any,
        attention_implementation: str | None,
        rngs: nnx.Rngs,
    ):
        d, e = config.hidden_size, config.embed_dim
        emb = dict(init_std=config.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed_tokens = Embed(config.vocab_size, e, ("vocab", "embed"), **emb)
        self.embed_positions = Embed(
            config.max_position_embeddings + POSITION_OFFSET, d, (None, "embed"), **emb
        )
        proj = dict(
            use_bias=False,
            init_std=config.init_std,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.project_in = Linear((e,), (d,), (None, "embed"), **proj) if e != d else None
        self.project_out = Linear((d,), (e,), ("embed", None), **proj) if e != d else None
        self.final_layer_norm = (
            LayerNorm(
                d,
                affine=config.layer_norm_elementwise_affine,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            if config.has_final_layer_norm
            else None
        )
        self.layers = nnx.List(
            [
                OPTDecoderLayer(
                    config,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    attention_implementation=attention_implementation,
                    rngs=rngs,
                )
                for _ in range(config.num_hidden_layers)
            ]
        )
        self.dropout = config.dropout


class OPTModel(nnx.Module):
    """Holds the decoder under HF's `model.decoder` prefix."""

    def __init__(self, config: OPTConfig, *, rngs: nnx.Rngs, **kwargs: Any):
        self.decoder = OPTDecoder(config, rngs=rngs, **kwargs)


class OPTForCausalLM(CausalLM):
    """OPT language model: `model.decoder` plus the (tied) LM head. The constructor, `init_cache`
    and `__call__` are `lm.layers.CausalLM`'s; positions get OPT's offset of 2 inside."""

    def build(self, config: OPTConfig, *, dtype, param_dtype, impl, rngs) -> None:
        self.model = OPTModel(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            attention_implementation=impl,
            rngs=rngs,
        )
        self.lm_head = lm_head(
            config,
            config.embed_dim,
            config.init_std,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def dropout_rates(self) -> tuple[float, ...]:
        return (self.config.dropout, self.config.attention_dropout)

    def call_limits(self) -> dict[str, Any]:
        return {"max_positions": ("max_position_embeddings", self.config.max_position_embeddings)}

    def forward(self, input_ids, position_ids, mask, cache, dropout_key):
        decoder = self.model.decoder
        x = decoder.embed_tokens(input_ids)  # [B, T, E]
        if decoder.project_in is not None:
            x = decoder.project_in(x)  # [B, T, D]
        x = x + decoder.embed_positions(position_ids + POSITION_OFFSET)  # [B, T, D]
        x, cache = run_layers(decoder.layers, x, mask, cache, dropout_key)
        if decoder.final_layer_norm is not None:
            x = decoder.final_layer_norm(x)
        if decoder.project_out is not None:
            x = decoder.project_out(x)  # [B, T, E]
        return lm_logits(x, self.lm_head, decoder.embed_tokens, self.dtype), cache  # [B, T, V]


def load_pretrained(
    path: Any,
    dtype: Any = jnp.float32,
    *,
    param_dtype: Any = None,
    attention_implementation: str | None = None,
) -> OPTForCausalLM:
    """Loads a Hugging Face OPT directory or hub id (`facebook/opt-125m`) into the Flax port.

    `collapse_jax.lm.load_pretrained` loads any supported family; this one refuses a checkpoint
    of another family (one line naming its model_type). Arguments and errors as
    `lm.convert.load_model`; no torch needed.
    """
    return convert.load_model(
        hub.resolve(path),
        OPTConfig,
        OPTForCausalLM,
        LAYOUT,
        dtype=dtype,
        param_dtype=param_dtype,
        attention_implementation=attention_implementation,
    )


def save_pretrained(model: OPTForCausalLM, path: Any) -> None:
    """Writes `config.json` and `model.safetensors` (HF names) that transformers' OPT loads."""
    convert.save_model(model, path, LAYOUT)

"""GPT-2 (Radford et al. 2019) in Flax NNX, as transformers' `GPT2LMHeadModel`.

Learned absolute positions, pre-LayerNorm blocks (eps `layer_norm_epsilon`), the tanh GELU
("gelu_new"), attention scaled by 1/sqrt(H) (`scale_attn_weights`) and optionally by 1/(layer + 1)
(`scale_attn_by_inverse_layer_idx`), the LM head tied to `wte` (untied when
`tie_word_embeddings` is False). Softmax, LayerNorm statistics and the logits are float32, as
`reorder_and_upcast_attn` asks of transformers (so that flag changes nothing here). Positions are
the cache's `cumsum(mask) * mask - 1`, with padding slots at position 1 as transformers'
`generate` sets them (a padded row's own positions never reach a real token).

Shape legend: B batch, T query length, S key/cache length, D n_embd, N n_head, H head_dim,
F n_inner (4 D by default), V vocab, P n_positions.

Parameter layout and logical sharding axes (HF's Conv1D stores weights [in, out]; `LAYOUT` maps
each parameter onto HF's tensors, splitting the fused `c_attn` [D, 3 D] into q, k, v):

  transformer.wte.embedding                      [V, D]     ("vocab", "embed")
  transformer.wpe.embedding                      [P, D]     (None, "embed")
  transformer.h[i].ln_1 / ln_2 .scale, .bias     [D]        ("embed",)
  transformer.h[i].attn.{q,k,v}_proj.kernel      [D, N, H]  ("embed", "heads", "head_dim")
  transformer.h[i].attn.{q,k,v}_proj.bias        [N, H]     ("heads", "head_dim")
  transformer.h[i].attn.c_proj.kernel            [N, H, D]  ("heads", "head_dim", "embed")
  transformer.h[i].mlp.c_fc.kernel [D, F] ("embed", "mlp"), c_proj.kernel [F, D] ("mlp", "embed")
  transformer.ln_f.scale, .bias                  [D]        ("embed",)
  lm_head.kernel                                 [D, V]     ("embed", "vocab")  only if untied

The forward pass goes through the cache protocol of `collapse_jax.lm.cache` (see
`lm.opt.OPTForCausalLM` for the contract, which this model keeps exactly).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from collapse_jax.lm import convert
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

# transformers' `GPT2Config.attribute_map`: the common names it also accepts.
_ALIASES = {
    "hidden_size": "n_embd",
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "max_position_embeddings": "n_positions",
    "intermediate_size": "n_inner",
}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GPT2Config:
    """Hyper-parameters of a GPT-2 model; field names mirror HF `GPT2Config` (which also takes
    hidden_size, num_hidden_layers, num_attention_heads, max_position_embeddings and
    intermediate_size for n_embd, n_layer, n_head, n_positions and n_inner: so does
    `from_hf_dict`).

    Attributes:
      vocab_size: V (50257 for the released GPT-2).
      n_positions: number of learned positions (1024).
      n_embd: D, width of the residual stream.
      n_layer: number of blocks.
      n_head: N; D must be divisible by N.
      n_inner: F, the MLP's hidden width; None means 4 D.
      activation_function: MLP nonlinearity, an HF `ACT2FN` name ("gelu_new").
      resid_pdrop, embd_pdrop, attn_pdrop: dropout rates (training mode only).
      layer_norm_epsilon: LayerNorm eps.
      initializer_range: std of the random initialisation.
      scale_attn_weights: divide attention scores by sqrt(H).
      scale_attn_by_inverse_layer_idx: also divide them by layer index + 1.
      reorder_and_upcast_attn: transformers' float32 attention option (ours always is).
      bos_token_id, eos_token_id: 50256 (`<|endoftext|>`).
      pad_token_id: padding id; GPT-2 has none, so None in config.json means the eos id.
      tie_word_embeddings: whether the LM head reuses `wte`.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise ValueError(f"GPT2Config.n_inner must be positive or None, got {self.n_inner!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPT2Config.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            rate = getattr(self, name)
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"GPT2Config.{name} must be in [0, 1), got {rate!r}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"GPT2Config.activation_function {self.activation_function!r} is not supported; "
                f"choose one of {sorted(ACTIVATIONS)}"
            )
        if self.pad_token_id is None:  # GPT-2 has no pad token: pad with eos, as generate does
            object.__setattr__(self, "pad_token_id", self.eos_token_id)

    # The common properties of `lm.families`' config contract.
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_key_value_heads(self) -> int:
        return self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    @property
    def intermediate_size(self) -> int:
        """F: n_inner, or 4 D when None."""
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

    @classmethod
    def from_hf_dict(cls, d: dict) -> GPT2Config:
        """Builds a config from an HF `config.json` dictionary; unknown keys are ignored.

        Raises:
          ValueError: if the dictionary is not a GPT-2 config or asks for what we lack.
        """
        model_type = d.get("model_type")
        if model_type != "gpt2":
            raise ValueError(f"config is not a GPT-2 config: model_type={model_type!r}")
        if d.get("add_cross_attention"):
            raise ValueError("GPT-2 with add_cross_attention=True is not supported")
        d = {_ALIASES.get(k, k): v for k, v in d.items()}
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name in d and (d[field.name] is not None or field.name == "n_inner"):
                kwargs[field.name] = d[field.name]
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(kwargs.get(name), list):
                kwargs[name] = int(kwargs[name][0])
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon"):
            if name in kwargs:
                kwargs[name] = float(kwargs[name])
        return cls(**kwargs)

    def to_hf_dict(self) -> dict:
        """The `config.json` dictionary that `transformers.GPT2Config` reads back."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["model_type"] = "gpt2"
        d["architectures"] = ["GPT2LMHeadModel"]
        d["use_cache"] = True
        return d


def _gpt2_tensor(path: convert.Path) -> convert.Tensor:
    """GPT-2's HF tensor of each parameter: Conv1D weights [in, out]; q/k/v from `c_attn`."""
    if len(path) > 4 and path[3] == "attn" and path[4] in ("q_proj", "k_proj", "v_proj"):
        _, _, i, _, proj, leaf = path
        kind = "conv1d" if leaf == "kernel" else "bias"
        name = f"transformer.h.{i}.attn.c_attn.{'weight' if leaf == 'kernel' else 'bias'}"
        part = ("q_proj", "k_proj", "v_proj").index(proj)
        return convert.Tensor(name, kind, split=(3, -1), part=part)
    if path[-1] == "kernel" and path[0] == "transformer":
        n_in = 2 if path[-3:-1] == ("attn", "c_proj") else 1
        return convert.Tensor.mechanical(path, n_in=n_in, kind="conv1d")
    return convert.Tensor.mechanical(path)


def _gpt2_name(name: str) -> str:
    # The hub's gpt2 files were saved from GPT2Model: no "transformer." prefix.
    return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name


# Old checkpoints store each layer's causal mask (`attn.bias`, `attn.masked_bias`): buffers.
LAYOUT = convert.Layout(
    tensor=_gpt2_tensor,
    normalise=_gpt2_name,
    ignored=(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)",),
)


class GPT2Attention(nnx.Module):
    """Causal self-attention; `c_attn` held as separate q/k/v projections."""

    def __init__(self, config: GPT2Config, layer: int, *, dtype, param_dtype, impl, rngs):
        d, n, h = config.n_embd, config.n_head, config.head_dim
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        std = config.initializer_range
        qkv_axes = ("embed", "heads", "head_dim")
        self.q_proj = Linear((d,), (n, h), qkv_axes, init_std=std, **kw)
        self.k_proj = Linear((d,), (n, h), qkv_axes, init_std=std, **kw)
        self.v_proj = Linear((d,), (n, h), qkv_axes, init_std=std, **kw)
        # HF's init scales residual projections by 1/sqrt(2 L) (GPT-2 paper, section 2.3).
        proj_std = std / math.sqrt(2 * config.n_layer)
        self.c_proj = Linear((n, h), (d,), ("heads", "head_dim", "embed"), init_std=proj_std, **kw)
        scaling = 1.0
        if config.scale_attn_weights:
            scaling = h**-0.5
        if config.scale_attn_by_inverse_layer_idx:
            scaling /= float(layer + 1)
        self.scaling = scaling
        self.attn_pdrop = config.attn_pdrop
        self.implementation = impl

    def __call__(self, x, mask, cache, layer, dropout_key):
        """x [B, T, D] -> (output [B, T, D], updated cache or None), as `OPTAttention`."""
        q = self.q_proj(x) * jnp.asarray(self.scaling, x.dtype)  # [B, T, N, H]
        k = self.k_proj(x)  # [B, T, N, H]
        v = self.v_proj(x)  # [B, T, N, H]
        fn = functools.partial(
            attention,
            implementation=self.implementation,
            dropout_rate=self.attn_pdrop,
            dropout_key=dropout_key,
        )
        if cache is None:
            out = fn(q, k, v, mask)
        else:
            out, cache = cache.attend(layer, q, k, v, mask, fn)
        return self.c_proj(out), cache  # [B, T, D]


class GPT2MLP(nnx.Module):
    def __init__(self, config: GPT2Config, *, dtype, param_dtype, rngs):
        d, f = config.n_embd, config.intermediate_size
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        std = config.initializer_range
        self.c_fc = Linear((d,), (f,), ("embed", "mlp"), init_std=std, **kw)
        self.c_proj = Linear(
            (f,), (d,), ("mlp", "embed"), init_std=std / math.sqrt(2 * config.n_layer), **kw
        )
        self.activation = config.activation_function

    def __call__(self, x):
        return self.c_proj(ACTIVATIONS[self.activation](self.c_fc(x)))  # [B, T, F] -> [B, T, D]


class GPT2Block(nnx.Module):
    """Pre-LN block: x + attn(ln_1(x)), then + mlp(ln_2(x)) (HF `GPT2Block`)."""

    def __init__(self, config: GPT2Config, layer: int, *, dtype, param_dtype, impl, rngs):
        ln = dict(
            affine=True,
            eps=config.layer_norm_epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.ln_1 = LayerNorm(config.n_embd, **ln)
        self.attn = GPT2Attention(
            config, layer, dtype=dtype, param_dtype=param_dtype, impl=impl, rngs=rngs
        )
        self.ln_2 = LayerNorm(config.n_embd, **ln)
        self.mlp = GPT2MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resid_pdrop = config.resid_pdrop

    def __call__(self, x, mask, cache, layer, dropout_key):
        keys = [None] * 3 if dropout_key is None else list(jax.random.split(dropout_key, 3))
        a, cache = self.attn(self.ln_1(x), mask, cache, layer, keys[0])
        if keys[1] is not None and self.resid_pdrop > 0.0:
            a = inverted_dropout(keys[1], a, self.resid_pdrop)
        x = x + a
        m = self.mlp(self.ln_2(x))
        if keys[2] is not None and self.resid_pdrop > 0.0:
            m = inverted_dropout(keys[2], m, self.resid_pdrop)
        return x + m, cache


class GPT2Model(nnx.Module):
    """Embeddings, blocks and the final LayerNorm under HF's `transformer` prefix."""

    def __init__(self, config: GPT2Config, *, dtype, param_dtype, impl, rngs):
        emb = dict(
            init_std=config.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.wte = Embed(config.vocab_size, config.n_embd, ("vocab", "embed"), **emb)
        self.wpe = Embed(config.n_positions, config.n_embd, (None, "embed"), **emb)
        self.h = nnx.List(
            [
                GPT2Block(config, i, dtype=dtype, param_dtype=param_dtype, impl=impl, rngs=rngs)
                for i in range(config.n_layer)
            ]
        )
        self.ln_f = LayerNorm(
            config.n_embd,
            affine=True,
            eps=config.layer_norm_epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )


class GPT2LMHeadModel(CausalLM):
    """GPT-2 language model: `transformer` plus the (tied) LM head. The constructor,
    `init_cache` and `__call__` are `lm.layers.CausalLM`'s; default positions of padding slots
    take HF's 1 (a learned table has no row -1)."""

    def build(self, config: GPT2Config, *, dtype, param_dtype, impl, rngs) -> None:
        self.transformer = GPT2Model(
            config, dtype=dtype, param_dtype=param_dtype, impl=impl, rngs=rngs
        )
        self.lm_head = lm_head(
            config,
            config.n_embd,
            config.initializer_range,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def dropout_rates(self) -> tuple[float, ...]:
        cfg = self.config
        return (cfg.resid_pdrop, cfg.embd_pdrop, cfg.attn_pdrop)

    def call_limits(self) -> dict[str, Any]:
        return {"max_positions": ("n_positions", self.config.n_positions), "pad_position": 1}

    def forward(self, input_ids, position_ids, mask, cache, dropout_key):
        cfg, tr = self.config, self.transformer
        x = tr.wte(input_ids) + tr.wpe(position_ids)  # [B, T, D]
        if dropout_key is not None and cfg.embd_pdrop > 0.0:
            x = inverted_dropout(jax.random.fold_in(dropout_key, cfg.n_layer), x, cfg.embd_pdrop)
        x, cache = run_layers(tr.h, x, mask, cache, dropout_key)
        x = tr.ln_f(x)
        return lm_logits(x, self.lm_head, tr.wte, self.dtype), cache  # [B, T, V]

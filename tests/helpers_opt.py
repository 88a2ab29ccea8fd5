"""Shared test helpers for the OPT port: random tiny Hugging Face OPT directories and references.

Imported by the OPT, decode and training tests. Everything here needs torch and transformers; call
`pytest.importorskip("torch")` before importing this module in a test file that may run without.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Distinct odd sizes so that transposes and shape mix-ups cannot cancel out (STYLE.md 3.8).
TINY_OPT: dict[str, Any] = dict(
    vocab_size=53,
    hidden_size=24,
    num_attention_heads=3,
    ffn_dim=40,
    num_hidden_layers=3,
    max_position_embeddings=37,
    word_embed_proj_dim=24,
    dropout=0.0,
    attention_dropout=0.0,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=2,
)


def make_hf_opt_dir(
    tmp_path: os.PathLike | str,
    *,
    seed: int = 0,
    init_std: float = 0.02,
    randomize: bool = True,
    name: str = "hf_opt",
    safe_serialization: bool = True,
    **config_overrides: Any,
) -> pathlib.Path:
    """Saves a randomly initialised `transformers.OPTForCausalLM` and returns its directory.

    The config is `TINY_OPT` updated with `config_overrides` (any HF `OPTConfig` keyword, e.g.
    `do_layer_norm_before=False`, `_remove_final_layer_norm=True`). Weights are drawn under
    `torch.manual_seed(seed)`: every matrix and embedding ~ N(0, init_std^2); with `randomize`,
    LayerNorm scales ~ 1 + N(0, 0.2^2) and every bias and LayerNorm shift ~ N(0, 0.1^2), so that a
    mapping bug in a parameter HF initialises to 0/1 cannot hide (MaxText's habit).

    Args:
      tmp_path: parent folder; the model goes to `tmp_path / name`.
      seed: torch seed for the weights.
      init_std: standard deviation of the weight matrices and embeddings.
      randomize: randomise LayerNorm parameters and biases (see above).
      name: sub-folder name, so one tmp_path can hold several models.
      safe_serialization: write `model.safetensors` (True) or `pytorch_model.bin` (False).
      **config_overrides: fields of `transformers.OPTConfig`.

    Returns:
      The directory holding `config.json` and the weights.
    """
    import torch
    import transformers

    cfg = dict(TINY_OPT)
    cfg.update(config_overrides)
    if "word_embed_proj_dim" not in config_overrides:
        cfg["word_embed_proj_dim"] = cfg["hidden_size"]
    torch.manual_seed(seed)
    model = transformers.OPTForCausalLM(transformers.OPTConfig(**cfg))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "layer_norm" in pname and pname.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if randomize else torch.ones_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p) if randomize else torch.zeros_like(p))
            else:
                p.copy_(init_std * torch.randn_like(p))
    model.eval()
    transformers.utils.logging.disable_progress_bar()
    path = pathlib.Path(tmp_path) / name
    model.save_pretrained(path)
    if not safe_serialization:
        # transformers 5 always writes safetensors; write the legacy torch pickle ourselves.
        torch.save(model.state_dict(), path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    return path


def load_hf_model(path: os.PathLike | str):
    """Loads an HF OPT directory as a float32 PyTorch `OPTForCausalLM` in eval mode."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model = transformers.OPTForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def hf_forward(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None):
    """Runs the torch model; returns (logits [B, T, V] float32 NumPy, loss with labels=ids or None).

    The loss uses transformers' own `labels=` path. Labels are -100 at padding and at each row's
    first token (whose predictor would be a padding position, where logits are unspecified), so
    the loss is the mean over next-token predictions made from real tokens to real tokens.
    """
    import torch

    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask))
    labels = torch.as_tensor(hf_labels(input_ids, attention_mask), dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    return out.logits.float().numpy(), float(out.loss)


def hf_labels(input_ids: np.ndarray, attention_mask: np.ndarray | None) -> np.ndarray:
    """`labels=` for transformers: ids, with -100 at padding and at each left-padded row's first
    token (predicted from a padding position)."""
    labels = np.array(input_ids, dtype=np.int64)
    if attention_mask is not None:
        mask = np.asarray(attention_mask) != 0
        first = np.zeros_like(mask)
        first[:, 1:] = mask[:, 1:] & ~mask[:, :-1]
        labels[~mask | first] = -100
    return labels


def random_batch(
    seed: int, vocab_size: int, lengths: list[int], total: int | None = None, pad_id: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded random token batch: ids [B, T] int32 and mask [B, T] int32 (1 = token)."""
    rng = np.random.default_rng(seed)
    total = max(lengths) if total is None else total
    ids = np.full((len(lengths), total), pad_id, dtype=np.int32)
    mask = np.zeros((len(lengths), total), dtype=np.int32)
    for b, n in enumerate(lengths):
        ids[b, total - n :] = rng.integers(3, vocab_size, size=n)
        ids[b, total - n] = 2  # BOS, as the OPT tokenizer prepends </s>
        mask[b, total - n :] = 1
    return ids, mask


_JIT_FORWARD = None


def jit_forward(model, input_ids, attention_mask=None, *, position_ids=None, cache=None):
    """`model(...)` under plain `jax.jit` through `nnx.split`/`nnx.merge`.

    The compiled function is keyed on the graphdef (config, dtypes) and shapes, so tests that
    share a config share one compilation. Returns what `model(...)` returns.
    """
    global _JIT_FORWARD
    import jax
    import jax.numpy as jnp
    from flax import nnx

    if _JIT_FORWARD is None:

        def fwd(graphdef, state, ids, mask, pos, cache):
            return nnx.merge(graphdef, state)(ids, mask, position_ids=pos, cache=cache)

        _JIT_FORWARD = jax.jit(fwd, static_argnums=0)
    graphdef, state = nnx.split(model)
    as_jnp = lambda x: None if x is None else jnp.asarray(x)
    return _JIT_FORWARD(
        graphdef, state, as_jnp(input_ids), as_jnp(attention_mask), as_jnp(position_ids), cache
    )

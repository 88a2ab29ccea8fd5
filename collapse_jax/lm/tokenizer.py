"""The OPT tokenizer from a local Hugging Face directory, through transformers.

OPT uses GPT-2's byte-level BPE with fairseq ids: `</s>` = 2 is BOS, EOS and UNK, `<pad>` = 1, and
the tokenizer prepends `</s>`. A directory may hold a serialised fast tokenizer (`tokenizer.json`)
or only `vocab.json` + `merges.txt` (optionally with the hub's `tokenizer_config.json`, which names
no tokenizer class for OPT, so `AutoTokenizer` cannot use it without the model's config.json).

transformers 5 trap: `GPT2Tokenizer(vocab_file=..., merges_file=...)` (the v4 keywords) silently
builds a 2-token vocabulary; v5 takes `vocab=` and `merges=`. We check the result's size.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

# OPT's special tokens (facebook/opt-* special_tokens_map.json).
_OPT_SPECIAL = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
_MIN_VOCAB = 256  # a byte-level BPE has at least the 256 byte tokens


def _token(value: Any) -> str:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts.
    return value["content"] if isinstance(value, dict) else str(value)


def load_tokenizer(path: os.PathLike | str, *, padding_side: str = "right") -> Any:
    """Loads the OPT tokenizer from a local directory.

    Args:
      path: directory with `tokenizer.json`, or with `vocab.json` + `merges.txt` (and optionally
        `tokenizer_config.json`).
      padding_side: "right" (transformers' default for OPT) or "left" (for batched generation).

    Returns:
      A transformers tokenizer giving OPT ids, e.g. "Today is a beautiful day and I want to" ->
      [2, 5625, 16, 10, 2721, 183, 8, 38, 236, 7].

    Raises:
      FileNotFoundError: if the directory or its tokenizer files are missing.
      ValueError: if the files give an implausible tokenizer or padding_side is invalid.
    """
    # transformers logs "PyTorch was not found ..." at import when torch is absent: not an
    # error for us (we only use its tokenizers), so keep it out of every LM run's output.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import transformers

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
    config_file = directory / "tokenizer_config.json"
    tok_config: dict[str, Any] = {}
    if config_file.is_file():
        try:
            tok_config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}: invalid JSON ({e})") from e

    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if (directory / "tokenizer.json").is_file():
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(directory), local_files_only=True
        )
    elif vocab.is_file() and merges.is_file():
        special = {k: _token(tok_config.get(k, v)) for k, v in _OPT_SPECIAL.items()}
        tokenizer = transformers.GPT2Tokenizer(
            vocab=str(vocab),
            merges=str(merges),
            add_bos_token=bool(tok_config.get("add_bos_token", True)),
            add_prefix_space=bool(tok_config.get("add_prefix_space", False)),
            errors=tok_config.get("errors", "replace"),
            **special,
        )
    else:
        raise FileNotFoundError(
            f"{directory}: no tokenizer files (expected tokenizer.json, or vocab.json and "
            "merges.txt)"
        )
    if len(tokenizer) < _MIN_VOCAB:
        raise ValueError(
            f"{directory}: tokenizer has only {len(tokenizer)} tokens; the vocabulary files were "
            "not read"
        )
    tokenizer.padding_side = padding_side
    return tokenizer


def check_token_ids(ids: Any, vocab: Any, name: str) -> None:
    """Raises one clear `ValueError` if token ids fall outside the vocabulary.

    The one vocabulary check of the package (decoding, regeneration, training and evaluation call
    it): ids beyond the embedding table would give NaN logits deep inside a compiled program.

    Args:
      ids: an int array of token ids (any shape). A memory-mapped array is not scanned: reading
        a large on-disk store whole here would defeat the mapping (the data pipeline wrote it).
      vocab: the vocabulary size V, or a model with `config.vocab_size` (a model without one is
        not checked).
      name: what `ids` is, for the message.
    """
    if not isinstance(vocab, int | np.integer):
        vocab = getattr(getattr(vocab, "config", None), "vocab_size", None)
    if vocab is None or isinstance(ids, np.memmap) or np.size(ids) == 0:
        return
    lo, hi = int(np.min(ids)), int(np.max(ids))
    if lo < 0 or hi >= vocab:
        raise ValueError(
            f"{name} must lie in [0, {vocab}): got token ids in [{lo}, {hi}], outside the "
            "vocabulary"
        )

"""The OPT tokenizer from a local Hugging Face directory, through `tokenizers` (no transformers).

OPT uses GPT-2's byte-level BPE with fairseq ids: `</s>` = 2 is BOS, EOS and UNK, `<pad>` = 1, and
the tokenizer prepends `</s>`. A directory may hold a serialised fast tokenizer (`tokenizer.json`)
or only `vocab.json` + `merges.txt` (optionally with the hub's `tokenizer_config.json`, which names
no tokenizer class for OPT). From vocab and merges the pipeline is transformers 5's
`GPT2Tokenizer`, built the same way: `BPE(vocab, merges, continuing_subword_prefix="",
end_of_word_suffix="", fuse_unk=False)`, a `ByteLevel(add_prefix_space)` pre-tokenizer and decoder,
the special tokens as unnormalised special added tokens, and a `TemplateProcessing` post-processor
that prepends `</s>` (add_bos_token). tests/parity/lm/test_tokenizer_parity.py checks the ids and
decodings against transformers on WikiText-2.

`OPTTokenizer` offers the part of transformers' tokenizer API the package uses: `tok(texts)`
(`input_ids`, `attention_mask`; `padding=True` pads on `padding_side`), `decode`, `len`,
`get_vocab`, the special token ids and `save_pretrained`.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

# OPT's special tokens (facebook/opt-* special_tokens_map.json).
_OPT_SPECIAL = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
_MIN_VOCAB = 256  # a byte-level BPE has at least the 256 byte tokens


def _token(value: Any) -> str:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts.
    return value["content"] if isinstance(value, dict) else str(value)


class Encoding(dict):
    """`{"input_ids": ..., "attention_mask": ...}`, also readable as attributes (as transformers'
    BatchEncoding)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


class OPTTokenizer:
    """OPT's tokenizer over a `tokenizers.Tokenizer` (see the module docstring)."""

    def __init__(
        self, backend: tokenizers.Tokenizer, special: dict[str, str], padding_side: str = "right"
    ):
        self.backend = backend
        self.special = dict(special)
        self.padding_side = padding_side
        for name, token in self.special.items():
            if backend.token_to_id(token) is None:
                raise ValueError(f"special token {name}={token!r} is not in the vocabulary")

    def _id(self, name: str) -> int:
        return self.backend.token_to_id(self.special[name])

    @property
    def bos_token_id(self) -> int:
        return self._id("bos_token")

    @property
    def eos_token_id(self) -> int:
        return self._id("eos_token")

    @property
    def unk_token_id(self) -> int:
        return self._id("unk_token")

    @property
    def pad_token_id(self) -> int:
        return self._id("pad_token")

    @property
    def all_special_ids(self) -> list[int]:
        """The special tokens' ids, each once, in bos, eos, unk, pad order."""
        ids = [self._id(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
        return list(dict.fromkeys(ids))

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def __call__(self, text: str | Sequence[str], *, padding: bool = False) -> Encoding:
        """Token ids (with the leading `</s>`) and attention masks of one text or a list."""
        if isinstance(text, str):
            ids = self.backend.encode(text).ids
            return Encoding(input_ids=ids, attention_mask=[1] * len(ids))
        rows = [e.ids for e in self.backend.encode_batch(list(text))]
        masks = [[1] * len(r) for r in rows]
        if padding and rows:
            width = max(map(len, rows))
            pad = self.pad_token_id
            for k, r in enumerate(rows):
                fill = width - len(r)
                if self.padding_side == "left":
                    rows[k], masks[k] = [pad] * fill + r, [0] * fill + masks[k]
                else:
                    rows[k], masks[k] = r + [pad] * fill, masks[k] + [0] * fill
        return Encoding(input_ids=rows, attention_mask=masks)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, path: os.PathLike | str) -> None:
        """Writes `tokenizer.json` and `tokenizer_config.json` (which `load_tokenizer` and
        transformers read back)."""
        directory = pathlib.Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {**self.special, "padding_side": self.padding_side}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _from_vocab_and_merges(
    vocab: pathlib.Path, merges: pathlib.Path, tok_config: dict[str, Any], special: dict[str, str]
) -> tokenizers.Tokenizer:
    vocab_map, merge_list = models.BPE.read_file(str(vocab), str(merges))
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab_map,
            merge_list,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    prefix_space = bool(tok_config.get("add_prefix_space", False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [
            tokenizers.AddedToken(t, special=True, normalized=False)
            for t in dict.fromkeys(special.values())
        ]
    )
    if bool(tok_config.get("add_bos_token", True)):
        bos = special["bos_token"]
        bos_id = backend.token_to_id(bos)
        if bos_id is None:
            raise ValueError(f"{vocab}: the BOS token {bos!r} is not in the vocabulary")
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)],
        )
    return backend


def special_tokens(directory: pathlib.Path, tok_config: dict[str, Any]) -> dict[str, str]:
    """The bos/eos/unk/pad tokens of a tokenizer directory.

    Each is read from `tokenizer_config.json`, else `special_tokens_map.json`. A directory that
    names none of them (the OPT files: vocab and merges only) gets OPT's. Otherwise a token the
    files leave out takes a named one's place, as transformers' `generate` does for a model
    without a pad token: pad and unk fall back to eos, bos and eos to each other (GPT-2, Pythia
    and SmolLM2 name `<|endoftext|>` and no pad token).
    """
    map_file = directory / "special_tokens_map.json"
    token_map: dict[str, Any] = {}
    if map_file.is_file():
        try:
            token_map = json.loads(map_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{map_file}: invalid JSON ({e})") from e
    named = {k: tok_config.get(k) or token_map.get(k) for k in _OPT_SPECIAL}
    named = {k: _token(v) for k, v in named.items() if v}
    if not named:
        return dict(_OPT_SPECIAL)
    bos = named.get("bos_token") or named.get("eos_token")
    eos = named.get("eos_token") or bos
    if eos is None:
        raise ValueError(f"{directory}: the tokenizer files name no bos or eos token")
    return {
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": named.get("unk_token") or eos,
        "pad_token": named.get("pad_token") or eos,
    }


def load_tokenizer(path: os.PathLike | str, *, padding_side: str = "right") -> OPTTokenizer:
    """Loads a byte-level BPE tokenizer (OPT's, or GPT-2's, Pythia's, SmolLM2's) from a local
    directory; the special tokens as `special_tokens` finds them.

    Args:
      path: directory with `tokenizer.json`, or with `vocab.json` + `merges.txt` (and optionally
        `tokenizer_config.json`).
      padding_side: "right" (transformers' default for OPT) or "left" (for batched generation).

    Returns:
      An `OPTTokenizer` giving OPT ids, e.g. "Today is a beautiful day and I want to" ->
      [2, 5625, 16, 10, 2721, 183, 8, 38, 236, 7].

    Raises:
      FileNotFoundError: if the directory or its tokenizer files are missing.
      ValueError: if the files give an implausible tokenizer or padding_side is invalid.
    """
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
    special = special_tokens(directory, tok_config)

    vocab, merges, serialised = (
        directory / "vocab.json",
        directory / "merges.txt",
        directory / "tokenizer.json",
    )
    if serialised.is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(serialised))
        except Exception as e:  # noqa: BLE001 -- tokenizers raises a bare Exception
            raise ValueError(f"{serialised}: cannot read the tokenizer ({e})") from e
    elif vocab.is_file() and merges.is_file():
        backend = _from_vocab_and_merges(vocab, merges, tok_config, special)
    else:
        raise FileNotFoundError(
            f"{directory}: no tokenizer files (expected tokenizer.json, or vocab.json and "
            "merges.txt)"
        )
    if backend.get_vocab_size(with_added_tokens=True) < _MIN_VOCAB:
        raise ValueError(
            f"{directory}: tokenizer has only {backend.get_vocab_size()} tokens; the vocabulary "
            "files were not read"
        )
    return OPTTokenizer(backend, special, padding_side)


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

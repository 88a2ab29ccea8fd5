"""The OPT tokenizer loads from local directories in every layout and gives OPT's ids."""

import json
import shutil

import pytest

from collapse_jax.lm.tokenizer import load_tokenizer

PROMPT = "Today is a beautiful day and I want to"
PROMPT_IDS = [2, 5625, 16, 10, 2721, 183, 8, 38, 236, 7]  # facebook/opt-125m's tokenizer

# The hub's facebook/opt-125m tokenizer_config.json (AddedToken dicts, no tokenizer_class).
_TOKEN = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
HUB_CONFIG = {
    "errors": "replace",
    "unk_token": {"content": "</s>", **_TOKEN},
    "bos_token": {"content": "</s>", **_TOKEN},
    "eos_token": {"content": "</s>", **_TOKEN},
    "pad_token": {"content": "<pad>", **_TOKEN},
    "add_prefix_space": False,
    "add_bos_token": True,
}


@pytest.fixture(scope="module")
def tok_dir(data_dir):
    return data_dir / "opt-125m-tokenizer"


def test_vocab_and_merges_only(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert tok(PROMPT).input_ids == PROMPT_IDS
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 2, 1)
    assert len(tok) == 50265
    assert tok.decode(PROMPT_IDS, skip_special_tokens=True) == PROMPT


def test_hub_layout_with_tokenizer_config(tok_dir, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tok_dir / name, tmp_path / name)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(HUB_CONFIG))
    assert load_tokenizer(tmp_path)(PROMPT).input_ids == PROMPT_IDS


def test_saved_fast_tokenizer_round_trip(tok_dir, tmp_path):
    load_tokenizer(tok_dir).save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.json").is_file()
    tok = load_tokenizer(tmp_path / "saved")
    assert tok(PROMPT).input_ids == PROMPT_IDS


def test_left_padding(tok_dir):
    tok = load_tokenizer(tok_dir, padding_side="left")
    batch = tok(["Hi", PROMPT], padding=True)
    assert batch.input_ids[1] == PROMPT_IDS
    n = len(PROMPT_IDS) - len(tok("Hi").input_ids)
    assert batch.input_ids[0][:n] == [1] * n
    assert batch.attention_mask[0][:n] == [0] * n


def test_errors(tok_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    shutil.copy(tok_dir / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="padding_side"):
        load_tokenizer(tok_dir, padding_side="middle")


def test_no_transformers_needed(tok_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    tok = load_tokenizer(tok_dir)
    assert tok(PROMPT).input_ids == PROMPT_IDS


@pytest.mark.parametrize("where", ["tokenizer_config.json", "special_tokens_map.json"])
def test_gpt2_style_folder_without_pad_token(tok_dir, tmp_path, where):
    """GPT-2, Pythia and SmolLM2 folders: a `tokenizer.json` without a BOS template and special
    tokens naming `<|endoftext|>` only (no pad): pad and unk take the eos token, nothing is
    prepended, and OPT's `<pad>` is not assumed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    backend = Tokenizer(
        models.BPE.from_file(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.save(str(tmp_path / "tokenizer.json"))
    eot = "<|endoftext|>"  # id 50260 in OPT's vocabulary
    (tmp_path / where).write_text(json.dumps({"bos_token": eot, "eos_token": eot}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (
        (50260,) * 4
    )
    assert tok(PROMPT).input_ids == PROMPT_IDS[1:]  # no `</s>` prepended

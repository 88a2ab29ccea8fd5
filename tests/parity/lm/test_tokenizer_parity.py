"""Our `tokenizers`-based OPT tokenizer against transformers' GPT2Tokenizer (the reference it
replaced): the same ids on every row of WikiText-2 valid and test, the same decodings, the same
special ids; and transformers reads the tokenizer we save."""

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from collapse_jax.lm import data  # noqa: E402
from collapse_jax.lm.tokenizer import load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def pair(data_dir):
    d = data_dir / "opt-125m-tokenizer"
    ref = transformers.GPT2Tokenizer(
        vocab=str(d / "vocab.json"),
        merges=str(d / "merges.txt"),
        add_bos_token=True,
        add_prefix_space=False,
        errors="replace",
        bos_token="</s>",
        eos_token="</s>",
        unk_token="</s>",
        pad_token="<pad>",
    )
    return load_tokenizer(d), ref


@pytest.mark.parametrize("split", ["valid", "test"])
def test_same_ids_on_wikitext(pair, data_dir, split):
    ours, ref = pair
    rows = data.load_wikitext_lines(data_dir / "wikitext-2-raw", split)
    assert ours(rows)["input_ids"] == ref(rows)["input_ids"]


def test_same_decodings_and_specials(pair):
    ours, ref = pair
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.integers(0, len(ours), size=int(rng.integers(1, 40))).tolist()
        ids[0] = int(rng.choice([0, 1, 2, 3, ids[0]]))  # special and unknown-ish tokens too
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip
            )
    assert ours.all_special_ids == ref.all_special_ids and len(ours) == len(ref)
    assert ours.get_vocab() == ref.get_vocab()
    for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        assert getattr(ours, name) == getattr(ref, name), name


def test_transformers_reads_what_we_save(pair, tmp_path):
    ours, _ = pair
    ours.save_pretrained(tmp_path)
    back = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    text = "Today is a beautiful day and I want to"
    assert back(text).input_ids == ours(text).input_ids

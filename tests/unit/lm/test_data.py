"""WikiText-2 blocks (run_clm grouping) and the sharded, shuffled, prefetched input pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from collapse_jax.jaxtools import sharding
from collapse_jax.lm import data


class ToyTokenizer:
    """Whitespace 'tokenizer' with a BOS per row, like OPT's (ids: BOS=2, word -> len(word)+3)."""

    def __call__(self, rows):
        return {"input_ids": [[2] + [len(w) + 3 for w in r.split()] for r in rows]}


@pytest.fixture(scope="module")
def opt_tokenizer(data_dir):
    from transformers import GPT2Tokenizer

    d = data_dir / "opt-125m-tokenizer"
    return GPT2Tokenizer(
        vocab=str(d / "vocab.json"),
        merges=str(d / "merges.txt"),
        bos_token="</s>",
        eos_token="</s>",
        unk_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
    )


def test_rows_follow_hf_layout(tmp_path):
    (tmp_path / "wiki.valid.raw").write_text(" \n = Title = \n \n Some text here . \n")
    rows = data.load_wikitext_lines(tmp_path, "validation")
    assert rows == ["", " = Title = \n", "", " Some text here . \n"]


def test_group_blocks_concatenates_and_drops_remainder():
    blocks = data.group_blocks([[1, 2, 3], [4], [], [5, 6, 7, 8, 9]], block_size=4)
    np.testing.assert_array_equal(blocks, [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert blocks.dtype == np.int32


def test_blocks_with_toy_tokenizer(tmp_path):
    (tmp_path / "wiki.test.raw").write_text(" \n a bb \n \n ccc \n")
    blocks = data.load_wikitext_blocks(tmp_path, "test", ToyTokenizer(), block_size=3)
    # rows: "" -> [2]; " a bb \n" -> [2, 4, 5]; "" -> [2]; " ccc \n" -> [2, 6]  (7 tokens)
    np.testing.assert_array_equal(blocks, [[2, 2, 4], [5, 2, 2]])


def test_real_wikitext_valid_blocks(data_dir, opt_tokenizer):
    src = data_dir / "wikitext-2-raw"
    blocks = data.load_wikitext_blocks(src, "valid", opt_tokenizer, block_size=64)
    rows = data.load_wikitext_lines(src, "valid")
    assert len(rows) == 3760  # the HF dataset card's num_examples for validation
    n_tokens = sum(len(ids) for ids in opt_tokenizer(rows)["input_ids"])
    assert blocks.shape == (n_tokens // 64, 64)
    assert blocks.dtype == np.int32
    # The first row is blank -> a lone BOS; the second is " = Homarus gammarus = \n" with BOS.
    head = opt_tokenizer(rows[1])["input_ids"]
    np.testing.assert_array_equal(blocks[0, : 1 + len(head)], [2] + head)
    assert blocks.max() < 50272 and blocks.min() >= 0
    by_path = data.load_wikitext_blocks(src, "valid", data_dir / "opt-125m-tokenizer")
    np.testing.assert_array_equal(by_path, blocks)


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_wikitext_lines(tmp_path / "nope", "train")
    (tmp_path / "wiki.valid.raw").write_text("x\n")
    with pytest.raises(FileNotFoundError, match="wiki.train.raw"):
        data.load_wikitext_lines(tmp_path, "train")
    with pytest.raises(ValueError, match="unknown WikiText split"):
        data.load_wikitext_lines(tmp_path, "dev")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="save_to_disk"):
        data.load_wikitext_lines(empty, "train")
    (empty / "dataset_dict.json").write_text("{}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="datasets"):
            data.load_wikitext_lines(empty, "train")


def test_epoch_order_is_a_permutation_and_deterministic():
    rows = [data.batch_rows(3, 1, s, 10, 4) for s in range(data.steps_per_epoch(10, 4))]
    flat = np.concatenate(rows)
    assert flat.shape == (12,)
    assert (flat[-2:] == -1).all()  # last partial batch: 2 filler rows
    assert sorted(flat[:10].tolist()) == list(range(10))
    np.testing.assert_array_equal(rows[0], data.batch_rows(3, 1, 0, 10, 4))
    assert not np.array_equal(rows[0], data.batch_rows(3, 2, 0, 10, 4))  # new order per epoch


def test_host_batch_masks():
    blocks = np.arange(12, dtype=np.int32).reshape(4, 3)
    blocks[2, 2] = 1  # a pad token
    b = data.host_batch(blocks, np.array([2, 0, -1]), pad_token_id=1)
    np.testing.assert_array_equal(b["input_ids"][:2], [[6, 7, 1], [0, 1, 2]])
    np.testing.assert_array_equal(b["attention_mask"], [[1, 1, 0], [1, 0, 1], [1, 1, 1]])
    np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 0], [1, 0, 1], [0, 0, 0]])


@pytest.mark.parametrize("shape", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_global_batch_is_sharded_and_exact(shape, tmp_path):
    blocks = np.random.default_rng(0).integers(0, 100, size=(37, 5)).astype(np.int32)
    path = tmp_path / "blocks.npy"
    data.save_blocks(path, blocks)
    mm = np.load(path, mmap_mode="r")
    mesh = sharding.make_mesh(shape)
    rows = data.batch_rows(0, 0, 4, 37, 8)  # last partial batch: 5 real rows, 3 filler
    b = data.global_batch(mm, rows, sharding.batch_sharding(mesh))
    assert b["input_ids"].sharding.spec == sharding.batch_spec(mesh)
    want = data.host_batch(blocks, rows)
    for k in want:
        np.testing.assert_array_equal(np.asarray(b[k]), want[k])
    assert np.asarray(b["loss_mask"]).sum() == 5 * 5


def test_prefetcher_order_and_errors():
    with data.Prefetcher(iter(range(20)), depth=3) as p:
        assert list(p) == list(range(20))

    def boom():
        yield 1
        raise RuntimeError("producer failed")

    p = data.Prefetcher(boom())
    assert next(p) == 1
    with pytest.raises(RuntimeError, match="producer failed"):
        next(p)
    p.close()

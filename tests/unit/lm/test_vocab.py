"""The corpus vocabulary (`vocabulary: corpus`): built from the training blocks only, every id
it has not seen (a validation or test token) mapped to the UNK bucket."""

import numpy as np
import pytest

from collapse_jax import config as config_lib
from collapse_jax.lm.data import LMCorpus
from collapse_jax.lm.experiment import OPTLearner
from collapse_jax.lm.vocab import Vocab


def test_unknown_ids_map_to_the_unk_bucket():
    v = Vocab(np.array([1, 2, 3, 7, 40000]), 50272, unk_id=3)
    compact = v.to_model(np.array([[7, 5, 40000, 50271]]))
    assert compact.tolist() == [[3, 2, 4, 2]]
    assert v.to_source(compact).tolist() == [[7, 3, 40000, 3]]
    # An id past the source's id space goes to the bucket too.
    assert v.to_model(np.array([60000])).tolist() == [2]
    with pytest.raises(ValueError, match="unk_id 5 is not one of"):
        Vocab(np.array([1, 2, 3]), 10, unk_id=5)


def _learner(corpus: LMCorpus) -> OPTLearner:
    cfg = config_lib.from_dict({"name": "x", "model": {"kind": "opt", "vocabulary": "corpus"}})
    learner = OPTLearner(cfg.model)
    learner.corpus = lambda: corpus  # a fixed corpus instead of WikiText files
    return learner


def test_the_vocabulary_is_built_from_the_training_blocks_only():
    train = np.array([[2, 10, 11, 12], [2, 12, 13, 10]], np.int32)
    valid = np.array([[2, 10, 500, 11]], np.int32)  # 500: only in the validation blocks
    test = np.array([[2, 10, 900, 13]], np.int32)  # 900: only in the test blocks
    corpus = LMCorpus(train, valid, test, 50272, (1, 2), None, unk_id=3)
    vocab = _learner(corpus).vocab()
    assert vocab.ids.tolist() == [1, 2, 3, 10, 11, 12, 13]
    unk = vocab.to_model(np.array([3]))[0]
    assert vocab.to_model(test)[0, 2] == unk and vocab.to_model(valid)[0, 2] == unk
    assert vocab.to_source(vocab.to_model(test)).tolist() == [[2, 10, 3, 13]]
    assert np.array_equal(vocab.to_source(vocab.to_model(train)), train)


def test_a_corpus_vocabulary_needs_an_unk_id():
    blocks = np.array([[2, 10, 11, 12]], np.int32)
    corpus = LMCorpus(blocks, None, blocks, 50272, (1, 2), None)
    with pytest.raises(ValueError, match="unknown-token id"):
        _learner(corpus).vocab()


def test_wikitext_corpus_has_the_opt_unk_bucket(data_dir):
    from collapse_jax.lm.data import WikiTextConfig

    corpus = WikiTextConfig(
        source=str(data_dir / "wikitext-2-raw"),
        tokenizer_path=str(data_dir / "opt-125m-tokenizer"),
        train_split="valid",
        valid_split=None,
        max_train_blocks=64,
        eval_split="test",
        max_eval_blocks=64,
    ).load()
    assert corpus.unk_id == 3  # OPT's `<unk>`, not its UNK `</s>` (= BOS = EOS)
    vocab = _learner(corpus).vocab()
    unseen = np.setdiff1d(np.unique(corpus.eval), np.unique(corpus.train))
    assert len(unseen) > 0  # the test blocks hold ids the training blocks do not
    mapped = vocab.to_model(corpus.eval)
    assert np.all(mapped[np.isin(corpus.eval, unseen)] == vocab.to_model(np.array([3]))[0])

"""Best-epoch selection on validation blocks (the paper's ModelCheckpoint(monitor="val_loss"))."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from collapse_jax.jaxtools import sharding
from collapse_jax.lm import evaluate, train
from tests.multihost_worker import TINY, tiny_blocks, tiny_model


def _mesh():
    return sharding.make_mesh({"data": 8}, devices=jax.devices()[:8])


def _reverse_blocks(n: int = 8) -> np.ndarray:
    """Validation blocks whose next token is the previous one minus 1: the opposite of what the
    training blocks (mostly +1 steps) teach, so validation soon gets worse with training."""
    fwd = tiny_blocks(n, seed=3)
    return (fwd[:, :1] - (fwd - fwd[:, :1])) % TINY["vocab_size"]


def _valid_ppl(model, blocks):
    return evaluate.perplexity(model, blocks, batch_size=8, mesh=_mesh())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    model, blocks, valid = tiny_model(), tiny_blocks(), _reverse_blocks()
    kw = dict(valid_blocks=valid, mesh=_mesh(), epochs=3, batch_size=8, learning_rate=1e-2, seed=1)
    ckdir = tmp_path_factory.mktemp("best")
    best, h_best = train.finetune(model, blocks, keep_best=True, checkpoint_dir=ckdir, **kw)
    last, h_last = train.finetune(model, blocks, **kw)
    return model, blocks, valid, kw, ckdir, (best, h_best), (last, h_last)


def test_a_later_worse_epoch_is_not_kept(runs):
    _, _, valid, _, _, (best, h), (last, h_last) = runs
    vl = h["valid_loss"]
    best_i = int(np.argmin(vl))
    assert (
        len(vl) == 3 and best_i < 2 and vl[-1] > vl[best_i]
    )  # the premise: a later epoch is worse
    assert h["selected_epoch"] == [best_i + 1]
    # The returned model is the selected epoch's, not the last one.
    assert _valid_ppl(best, valid) == pytest.approx(math.exp(vl[best_i]), rel=1e-5)
    assert h_last["selected_epoch"] == [3]
    assert _valid_ppl(last, valid) == pytest.approx(math.exp(vl[-1]), rel=1e-5)
    assert h_last["valid_loss"] == pytest.approx(vl, rel=1e-6)


def test_resume_after_the_best_epoch_restores_it(runs):
    model, blocks, valid, kw, ckdir, (best, h), _ = runs
    # Run again on the finished checkpoint folder: nothing to train, the best epoch is read back.
    again, h2 = train.finetune(model, blocks, keep_best=True, checkpoint_dir=ckdir, **kw)
    assert h2["selected_epoch"] == h["selected_epoch"]
    assert _valid_ppl(again, valid) == pytest.approx(_valid_ppl(best, valid), rel=1e-6)

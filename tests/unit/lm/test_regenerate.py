"""The data-set regeneration driver: sharding invariance, padding of the last batch, resume."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from collapse_jax.jaxtools import sharding
from collapse_jax.lm import decode, families, opt, regenerate

T = 8
N = 13  # not a multiple of any batch size used: the last batch is padded and cropped
PAPER_LIKE = dict(num_beams=3, max_new_tokens=6, min_new_tokens=6, repetition_penalty=3.0)


@pytest.fixture(scope="module")
def model():
    # std 0.5 keeps next-token scores far apart, so batch-size-dependent float rounding of the
    # matmuls (1 row per device vs 5 on one device) cannot flip a near tie.
    cfg = opt.OPTConfig(
        vocab_size=31,
        hidden_size=16,
        num_hidden_layers=2,
        ffn_dim=24,
        num_attention_heads=2,
        max_position_embeddings=24,
        dropout=0.0,
        init_std=0.5,
    )
    return families.init_random(cfg, jax.random.key(0))


@pytest.fixture(scope="module")
def blocks():
    return np.random.default_rng(0).integers(3, 31, size=(N, T)).astype(np.int32)


def one_device():
    return sharding.make_mesh(devices=jax.devices()[:1])


@pytest.mark.parametrize(
    "kw", [PAPER_LIKE, dict(max_new_tokens=6, do_sample=True, seed=3)], ids=["beam", "sample"]
)
def test_sharded_equals_unsharded(model, blocks, tmp_path, kw):
    """8 fake devices as a (2, 2, 2) mesh (batch over 4 shards, batch 5 rounded up to 8) give
    the same tokens as one device with batch 5, and as `decode.generate` on all blocks at once."""
    single = regenerate.regenerate(
        model, blocks, tmp_path / "one", batch_size=5, mesh=one_device(), progress=False, **kw
    )
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = regenerate.regenerate(
        model, blocks, tmp_path / "eight", batch_size=5, mesh=mesh, progress=False, **kw
    )
    assert single.shape == (N, 6) and single.dtype == np.int32
    np.testing.assert_array_equal(single, sharded)
    # Without a store (out_path None: what a multi-process run uses) the same tokens, no files.
    files = sorted(tmp_path.rglob("*"))
    kept = regenerate.regenerate(model, blocks, None, batch_size=5, mesh=mesh, progress=False, **kw)
    np.testing.assert_array_equal(kept, sharded)
    assert sorted(tmp_path.rglob("*")) == files
    if not kw.get("do_sample"):
        whole = decode.generate(model, blocks, **kw)
        np.testing.assert_array_equal(single, whole[:, T:])
    else:  # different blocks draw differently
        assert len({tuple(r) for r in single}) > N // 2


def test_resume_after_interruption(model, blocks, tmp_path, monkeypatch):
    """A run killed after two batches resumes at the third and ends with the same tokens."""
    ref = regenerate.regenerate(
        model,
        blocks,
        tmp_path / "ref",
        batch_size=5,
        mesh=one_device(),
        progress=False,
        **PAPER_LIKE,
    )
    real = decode.compiled_search
    calls = []

    def counting(*args, fail_after=None):
        fn = real(*args)

        def wrapped(*a):
            calls.append(1)
            if fail_after is not None and len(calls) > fail_after:
                raise KeyboardInterrupt("simulated kill")
            return fn(*a)

        return wrapped

    out = tmp_path / "resumed"
    monkeypatch.setattr(decode, "compiled_search", lambda *a: counting(*a, fail_after=2))
    with pytest.raises(KeyboardInterrupt):
        regenerate.regenerate(
            model, blocks, out, batch_size=5, mesh=one_device(), progress=False, **PAPER_LIKE
        )
    assert json.loads((out / "progress.json").read_text())["rows_done"] == 10
    calls.clear()
    monkeypatch.setattr(decode, "compiled_search", lambda *a: counting(*a))
    got = regenerate.regenerate(
        model, blocks, out, batch_size=5, mesh=one_device(), progress=False, **PAPER_LIKE
    )
    assert len(calls) == 1  # only the last batch (rows 10..12) was decoded again
    np.testing.assert_array_equal(got, ref)
    calls.clear()
    again = regenerate.regenerate(
        model, blocks, out, batch_size=5, mesh=one_device(), progress=False, **PAPER_LIKE
    )
    assert not calls  # finished: just loads
    np.testing.assert_array_equal(again, ref)


def test_mismatched_store_and_bad_input_raise(model, blocks, tmp_path):
    out = tmp_path / "store"
    regenerate.regenerate(
        model, blocks[:2], out, batch_size=2, mesh=one_device(), progress=False, max_new_tokens=2
    )
    with pytest.raises(ValueError, match="settings"):
        regenerate.regenerate(
            model,
            blocks[:2],
            out,
            batch_size=2,
            mesh=one_device(),
            progress=False,
            max_new_tokens=2,
            num_beams=2,
        )
    with pytest.raises(ValueError, match="blocks_sha256"):
        regenerate.regenerate(
            model,
            blocks[2:4],
            out,
            batch_size=2,
            mesh=one_device(),
            progress=False,
            max_new_tokens=2,
        )
    with pytest.raises(ValueError, match="num_blocks"):
        regenerate.regenerate(
            model,
            blocks[:3],
            out,
            batch_size=2,
            mesh=one_device(),
            progress=False,
            max_new_tokens=2,
        )
    with pytest.raises(ValueError, match="blocks must"):
        regenerate.regenerate(model, blocks[0], tmp_path / "x", batch_size=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="token ids"):
        regenerate.regenerate(model, blocks + 40, tmp_path / "x", batch_size=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="batch_size"):
        regenerate.regenerate(model, blocks, tmp_path / "x", batch_size=0, max_new_tokens=2)

"""Checkpoints: exact resume after a kill, restore onto another mesh, best-by-validation, errors."""

from __future__ import annotations

import math
import shutil

import jax
import numpy as np
import pytest

from collapse_jax.jaxtools import sharding
from collapse_jax.lm import train
from tests.multihost_worker import tiny_blocks, tiny_model

# Same model, mesh and settings as test_train.py's reference run, so the compiled step is reused.
RUN = dict(epochs=2, batch_size=8, learning_rate=1e-2, seed=1)


def _mesh(shape):
    return sharding.make_mesh(shape, devices=jax.devices()[: math.prod(shape.values())])


class Killed(Exception):
    """Stands in for a preemption: raised from the step hook, after the step completed."""


def _kill_at(step):
    def hook(s, metrics):
        if s == step:
            raise Killed(f"killed after step {s}")

    return hook


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model, blocks = tiny_model(), tiny_blocks()
    ckdir = tmp_path_factory.mktemp("full")
    _, hist = train.finetune(
        model,
        blocks,
        valid_blocks=blocks[:8],
        mesh=_mesh({"data": 8}),
        checkpoint_dir=ckdir,
        save_every_steps=2,
        **RUN,
    )
    return model, blocks, ckdir, hist


def test_kill_and_resume_gives_identical_losses(uninterrupted, tmp_path):
    model, blocks, _, hist = uninterrupted
    kw = dict(valid_blocks=blocks[:8], mesh=_mesh({"data": 8}), save_every_steps=2, **RUN)
    with pytest.raises(Killed):
        train.finetune(model, blocks, checkpoint_dir=tmp_path, on_step=_kill_at(5), **kw)
    steps = sorted(int(p.name) for p in (tmp_path / "steps").iterdir() if p.name.isdigit())
    assert steps[-1] == 4  # saved at 2 and 3 (epoch end) and 4; killed after step 5
    resumed_steps = []
    _, h2 = train.finetune(
        model, blocks, checkpoint_dir=tmp_path, on_step=lambda s, m: resumed_steps.append(s), **kw
    )
    assert resumed_steps == [5, 6]
    assert h2["train_loss"] == hist["train_loss"]  # bit-identical: same data order and RNG
    assert h2["valid_loss"] == hist["valid_loss"]
    assert h2["lr"] == hist["lr"]


@pytest.mark.slow  # a fine-tune restored on a mesh: the integration tier (CI's -m '')
def test_restore_onto_another_mesh(uninterrupted, tmp_path):
    model, blocks, ckdir, hist = uninterrupted
    # Continue the uninterrupted run's step-4 checkpoint on a (2, 2, 2) mesh.
    shutil.copytree(ckdir, tmp_path / "ck")
    for p in (tmp_path / "ck" / "steps").iterdir():
        if p.name.isdigit() and int(p.name) > 4:
            shutil.rmtree(p)
    _, h2 = train.finetune(
        model,
        blocks,
        valid_blocks=blocks[:8],
        mesh=_mesh({"data": 2, "fsdp": 2, "tensor": 2}),
        checkpoint_dir=tmp_path / "ck",
        save_every_steps=2,
        **RUN,
    )
    np.testing.assert_array_equal(h2["train_loss"][:4], hist["train_loss"][:4])
    np.testing.assert_allclose(h2["train_loss"][4:], hist["train_loss"][4:], rtol=1e-5)
    np.testing.assert_allclose(h2["valid_loss"], hist["valid_loss"], rtol=1e-5)


def test_best_checkpoint_is_lowest_validation_loss(uninterrupted):
    model, blocks, ckdir, hist = uninterrupted
    best_epoch = int(np.argmin(hist["valid_loss"]))
    mesh = _mesh({"fsdp": 4})
    best = train.load_checkpoint(model, ckdir, mesh=mesh)
    ppl = train.perplexity(best, blocks[:8], batch_size=8, mesh=mesh)
    assert ppl == pytest.approx(hist["valid_ppl"][best_epoch], rel=1e-5)


def test_checkpoint_of_another_model_or_run_is_refused(uninterrupted, tmp_path):
    model, blocks, ckdir, _ = uninterrupted
    other = tiny_model(hidden_size=24)
    names_the_array = (
        r"another model: .*embed_tokens.*checkpoint \[\[61, 16\], 'float32'\] vs model \[\[61, 24\]"
    )
    with pytest.raises(ValueError, match=names_the_array):
        train.load_checkpoint(other, ckdir)
    shutil.copytree(ckdir, tmp_path / "ck")
    with pytest.raises(ValueError, match="another model"):
        train.finetune(other, blocks, checkpoint_dir=tmp_path / "ck", **RUN)
    with pytest.raises(ValueError, match="another run: seed"):
        train.finetune(model, blocks, checkpoint_dir=tmp_path / "ck", **{**RUN, "seed": 2})


# A failed tensorstore read inside orbax can leave a callback on its closed asyncio loop, which
# Python reports later as "unraisable"; the error we check is raised properly regardless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_checkpoint_gives_clear_error(uninterrupted, tmp_path):
    model, blocks, ckdir, _ = uninterrupted
    shutil.copytree(ckdir, tmp_path / "ck")
    latest = max(int(p.name) for p in (tmp_path / "ck" / "steps").iterdir() if p.name.isdigit())
    state_dir = tmp_path / "ck" / "steps" / str(latest) / "state"
    for f in state_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name.lower():
            f.write_bytes(b"\0garbage" * 4)
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        train.finetune(model, blocks, checkpoint_dir=tmp_path / "ck", **RUN)
    meta_dir = tmp_path / "ck" / "steps" / str(latest) / "meta"
    for f in meta_dir.rglob("*"):
        if f.is_file():
            f.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        train.finetune(model, blocks, checkpoint_dir=tmp_path / "ck", **RUN)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.load_checkpoint(model, tmp_path / "missing")

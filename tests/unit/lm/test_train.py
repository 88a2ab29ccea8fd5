"""Training step, schedules, mesh equivalence, evaluation and a real-WikiText run.

Sharded results are compared with one device at fp32 tolerance (rtol 1e-5, STYLE.md 3.8): only
the order of floating-point reductions differs between meshes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from collapse_jax.jaxtools import sharding
from collapse_jax.lm import data, schedule, steps, train
from collapse_jax.lm.train_config import TrainConfig
from tests.multihost_worker import tiny_blocks, tiny_model

RUN = dict(epochs=2, batch_size=8, learning_rate=1e-2, seed=1)


def _mesh(shape):
    n = math.prod(shape.values())
    return sharding.make_mesh(shape, devices=jax.devices()[:n])


# ---------------------------------------------------------------------------------------------
# Schedules and loss
# ---------------------------------------------------------------------------------------------


def test_paper_schedule_matches_formula_and_torch():
    torch = pytest.importorskip("torch")
    lr0, eta_min, epochs, spe = 2e-5, 1e-6, 5, 3
    f = schedule.paper_cosine_schedule(lr0, epochs, spe, eta_min)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=eta_min)
    ours = np.asarray(f(jnp.arange(epochs * spe)))
    for epoch in range(epochs):
        want = eta_min + (lr0 - eta_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2
        assert sched.get_last_lr()[0] == pytest.approx(want, rel=1e-12)
        np.testing.assert_allclose(ours[epoch * spe : (epoch + 1) * spe], want, rtol=1e-6)
        opt.step()
        sched.step()


def test_warmup_cosine_and_constant():
    cfg = TrainConfig(
        epochs=2, batch_size=4, learning_rate=1.0, schedule="warmup_cosine", warmup_steps=4
    )
    f = schedule.make_schedule(cfg, steps_per_epoch=10)
    assert float(f(0)) == 0.0 and float(f(2)) == pytest.approx(0.5)
    assert float(f(4)) == pytest.approx(1.0)
    assert float(f(20)) == pytest.approx(cfg.eta_min, abs=1e-7)
    const = schedule.make_schedule(
        TrainConfig(epochs=1, batch_size=1, learning_rate=0.3, schedule="constant"), 5
    )
    assert float(const(4)) == pytest.approx(0.3)
    ref = optax.warmup_cosine_decay_schedule(0.0, 1.0, 4, 20, cfg.eta_min)
    steps = jnp.arange(21)
    np.testing.assert_allclose(np.asarray(f(steps)), np.asarray(ref(steps)), rtol=1e-5, atol=1e-7)


def test_token_nll_is_hf_causal_loss_with_masks():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
    ids = rng.integers(0, 7, size=(2, 5)).astype(np.int32)
    attn = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)
    loss_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]], np.int32)
    nll, w = steps.token_nll(jnp.asarray(logits), ids, attn, loss_mask)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_array_equal(np.asarray(w), [[1, 1, 1, 1], [1, 1, 0, 0]])
    np.testing.assert_allclose(np.asarray(nll), want * np.asarray(w), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Mesh equivalence of loss and gradients
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _model_and_batch():
    model = tiny_model()
    rows = np.arange(8)
    return model, tiny_blocks(), rows


def _loss_and_grads_on(mesh):
    model, blocks, rows = _model_and_batch()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    p_shard = sharding.logical_to_sharding(params, mesh)
    b_shard = sharding.batch_sharding(mesh)

    def f(params, rest, batch, key):
        fwd = functools.partial(
            steps.forward_sums, graphdef=graphdef, deterministic=False, compute_dtype=None
        )
        (s, (n, _, _)), g = jax.value_and_grad(fwd, has_aux=True)(params, rest, batch, key)
        return s / n, jax.tree.map(lambda x: x / n, g)

    fn = jax.jit(f, out_shardings=(sharding.replicated(mesh), p_shard))
    batch = data.global_batch(blocks, rows, b_shard)
    loss, grads = fn(jax.device_put(params, p_shard), rest, batch, jax.random.key(7))
    for leaf, s in zip(
        jax.tree.leaves(grads),
        jax.tree.leaves(p_shard, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)),
        strict=True,
    ):
        assert leaf.sharding.is_equivalent_to(s, leaf.ndim)
    return float(loss), [np.asarray(g) for g in jax.tree.leaves(grads)]


@pytest.fixture(scope="module")
def single_device_loss_and_grads():
    return _loss_and_grads_on(_mesh({"data": 1}))


@pytest.mark.parametrize(
    "shape",
    # data parallel in the default tier; the other meshes in the integration tier (CI's -m '')
    [
        {"data": 8},
        pytest.param({"fsdp": 8}, marks=pytest.mark.slow),
        pytest.param({"data": 2, "fsdp": 2, "tensor": 2}, marks=pytest.mark.slow),
    ],
    ids=["data", "fsdp", "data+fsdp+tensor"],
)
def test_meshes_give_single_device_loss_and_grads(shape, single_device_loss_and_grads):
    """Dropout on: the masks must not depend on the mesh either (partitionable threefry)."""
    loss1, grads1 = single_device_loss_and_grads
    loss, grads = _loss_and_grads_on(_mesh(shape))
    assert loss == pytest.approx(loss1, rel=1e-5)
    # atol relative to the largest gradient: some gradients are exactly 0 in exact arithmetic
    # (the key bias: softmax is shift-invariant) and only rounding noise ~1e-11 in float.
    scale = max(np.abs(g).max() for g in grads1)
    for g, g1 in zip(grads, grads1, strict=True):
        np.testing.assert_allclose(g, g1, rtol=1e-5, atol=1e-6 * scale)


def test_grad_accumulation_equals_full_batch():
    model, blocks, rows = _model_and_batch()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(jnp.asarray, params)
    tx = optax.sgd(1.0)  # new params = params - grads: compares the gradients themselves
    state = steps.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    batch = data.host_batch(blocks, np.concatenate([rows, [-1, -1]]))  # 8 real + 2 filler rows
    outs = []
    for k in (1, 2):
        step = jax.jit(
            functools.partial(
                steps.train_step,
                graphdef=graphdef,
                tx=tx,
                schedule=lambda step, hp: hp["learning_rate"],
                grad_accum_steps=k,
                deterministic=True,
                compute_dtype=None,
            )
        )
        outs.append(step(state, rest, batch, jax.random.key(0), {"learning_rate": 1.0}))
    (s1, m1), (s2, m2) = outs
    assert float(m1["tokens"]) == float(m2["tokens"]) == 8 * 7
    assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-6)
    assert float(m2["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert not np.array_equal(
        np.asarray(jax.tree.leaves(s1.params)[0]), np.asarray(jax.tree.leaves(params)[0])
    )


# ---------------------------------------------------------------------------------------------
# finetune / perplexity
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run():
    """The uninterrupted run every other finetune test compares with (data-parallel, 8 devices)."""
    model = tiny_model()
    blocks = tiny_blocks()
    before = [np.asarray(x).copy() for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    new, hist = train.finetune(
        model, blocks, valid_blocks=blocks[:8], mesh=_mesh({"data": 8}), **RUN
    )
    return model, blocks, before, new, hist


def test_finetune_history_schedule_and_copy(reference_run):
    model, blocks, before, new, hist = reference_run
    spe = 3  # 24 blocks / batch 8
    assert len(hist["train_loss"]) == len(hist["lr"]) == RUN["epochs"] * spe
    assert hist["epoch_end_step"] == [3, 6]
    for step, lr in enumerate(hist["lr"]):
        e = step // spe
        want = 1e-6 + (RUN["learning_rate"] - 1e-6) * (1 + math.cos(math.pi * e / 2)) / 2
        assert lr == pytest.approx(want, rel=1e-6)
    assert np.mean(hist["train_loss"][3:]) < np.mean(hist["train_loss"][:3])
    assert hist["valid_ppl"] == pytest.approx(np.exp(hist["valid_loss"]), rel=1e-9)
    # The caller's model is untouched; the returned one evaluates to the last validation loss.
    for a, b in zip(before, jax.tree.leaves(nnx.state(model, nnx.Param)), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    ppl = train.perplexity(new, blocks[:8], batch_size=8, mesh=_mesh({"data": 8}))
    assert ppl == pytest.approx(hist["valid_ppl"][-1], rel=1e-5)


@pytest.mark.slow  # a second fine-tune on a mesh: the integration tier (CI's -m '')
def test_finetune_same_curve_on_another_mesh(reference_run):
    model, blocks, _, _, hist = reference_run
    mesh = _mesh({"data": 2, "fsdp": 2, "tensor": 2})
    new, h2 = train.finetune(model, blocks, valid_blocks=blocks[:8], mesh=mesh, **RUN)
    np.testing.assert_allclose(h2["train_loss"], hist["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(h2["valid_loss"], hist["valid_loss"], rtol=1e-5)
    leaf = nnx.state(new, nnx.Param)["model"]["decoder"]["layers"][0]["fc1"]["kernel"]
    assert leaf.get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_perplexity_per_sequence(reference_run):
    _, blocks, _, new, _ = reference_run
    mesh = _mesh({"data": 8})
    per = train.perplexity(new, blocks[:8], batch_size=8, per_sequence=True, mesh=mesh)
    whole = train.perplexity(new, blocks[:8], batch_size=8, mesh=mesh)
    assert per.shape == (8,) and per.dtype == np.float64
    # Equal-length blocks: exp(mean of per-block mean NLL) is the split's perplexity.
    assert np.exp(np.mean(np.log(per))) == pytest.approx(whole, rel=1e-6)
    assert len(set(np.round(per, 6))) == 8  # one value per block, not a broadcast
    # A batch size the 8 devices do not divide: filler rows pad it, results are unchanged.
    per5 = train.perplexity(new, blocks[:8], batch_size=5, per_sequence=True, mesh=mesh)
    np.testing.assert_allclose(per5, per, rtol=1e-6)


def test_bf16_compute_keeps_fp32_master_weights(reference_run):
    model, blocks, _, _, hist = reference_run
    new, h = train.finetune(
        model, blocks, mesh=_mesh({"data": 8}), compute_dtype="bfloat16", **{**RUN, "epochs": 1}
    )
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(new, nnx.Param)))
    # bf16 has 8 bits of mantissa: relative error of a mean of O(100) log-probs ~ 2^-8.
    np.testing.assert_allclose(h["train_loss"], hist["train_loss"][:3], rtol=2e-2)


def test_nonfinite_loss_stops_naming_the_step(tmp_path, reference_run):
    """lr = 1e30: step 1 leaves finite (huge) weights, step 2's forward overflows to NaN."""
    model, blocks, _, _, _ = reference_run
    seen = []
    with pytest.raises(
        train.NonFiniteLossError, match="optimizer step 2 .*last good checkpoint: step 1"
    ):
        train.finetune(
            model,
            blocks,
            mesh=_mesh({"data": 8}),
            checkpoint_dir=tmp_path,
            save_every_steps=1,
            on_step=lambda s, m: seen.append(s),
            **{**RUN, "learning_rate": 1e30},
        )
    assert seen == [1]
    good = train.load_checkpoint(model, tmp_path, best=False)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(good)))


def test_bad_inputs(reference_run):
    model, blocks, _, _, _ = reference_run
    mesh = _mesh({"data": 8})
    with pytest.raises(ValueError, match="integer token ids"):
        train.finetune(model, blocks.astype(np.float32), mesh=mesh, **RUN)
    with pytest.raises(ValueError, match=r"int array \[N, T\]"):
        train.perplexity(model, blocks[0], batch_size=8)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        train.finetune(model, blocks + 100, mesh=mesh, **RUN)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        train.finetune(model, blocks, mesh=mesh, **{**RUN, "batch_size": 0})
    with pytest.raises(ValueError, match="unknown schedule"):
        train.finetune(model, blocks, mesh=mesh, **{**RUN, "schedule": "linear"})
    with pytest.raises(ValueError, match="grad_accum_steps"):
        train.finetune(model, blocks, mesh=mesh, grad_accum_steps=3, **RUN)
    with pytest.raises(TypeError):
        train.finetune(model, blocks, mesh=mesh, no_such_option=1, **RUN)


# ---------------------------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_opt_on_real_wikitext_lowers_test_perplexity(data_dir):
    """Trains on 64 blocks of WikiText-2 valid, evaluates on 16 blocks of test (real vocab)."""
    from collapse_jax.lm import tokenizer

    tok = tokenizer.load_tokenizer(data_dir / "opt-125m-tokenizer")
    src = data_dir / "wikitext-2-raw"
    train_blocks = data.load_wikitext_blocks(src, "valid", tok)[:64]
    test_blocks = data.load_wikitext_blocks(src, "test", tok)[:16]
    model = tiny_model(vocab_size=50272, max_position_embeddings=64, hidden_size=32, dropout=0.0)
    mesh = _mesh({"data": 8})
    before = train.perplexity(model, test_blocks, batch_size=8, mesh=mesh)
    assert before > 10_000  # ~uniform over 50k tokens
    _, hist = train.finetune(
        model,
        train_blocks,
        valid_blocks=test_blocks,
        epochs=2,
        batch_size=8,
        learning_rate=1e-2,
        mesh=mesh,
    )
    assert hist["valid_ppl"][1] < hist["valid_ppl"][0] < before / 2

"""The gpu lane: what has to hold on a GPU that the CPU suite cannot show.

- a bf16 OPT training step (bf16 compute, float32 parameters) lowers the loss;
- the attention: cuDNN's fused kernel (`attention_implementation="cudnn"`) against XLA's in
  bf16, and XLA's float32 attention on the GPU against the CPU, through the whole model's logits;
- the paper's beam search (and greedy decoding) of a tiny model on the GPU is token-identical to
  the float32 decoder on the CPU at the highest matmul precision;
- `collapse-jax bench --suite quick` runs and reports MFU;
- the memory plan of `--dry-run` reads the GPU's memory limit.

Run with `pytest -m gpu` (docs/performance.md); tests/gpu/conftest.py skips these with the reason
when no GPU is visible.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from collapse_jax import cli, memplan
from collapse_jax import config as config_lib
from collapse_jax.jaxtools import sharding
from collapse_jax.lm import data as data_lib
from collapse_jax.lm import decode, train
from collapse_jax.lm.families import init_random
from collapse_jax.lm.opt import OPTConfig
from collapse_jax.lm.train_config import TrainConfig

# A tiny OPT whose head width (16) cuDNN's fused attention accepts (a multiple of 8).
TINY = OPTConfig(
    vocab_size=96,
    hidden_size=64,
    num_hidden_layers=2,
    ffn_dim=128,
    num_attention_heads=4,
    max_position_embeddings=160,
    dropout=0.0,
    attention_dropout=0.0,
)
# Benchmarks `bench --suite quick` runs here (comma-separated; default all): a knob for checking
# the lane on a CPU, where the whole quick suite takes minutes.
BENCH_ONLY_ENV = "COLLAPSE_JAX_GPU_LANE_BENCH_ONLY"


def _on(device: jax.Device, model: nnx.Module) -> nnx.Module:
    """A copy of `model` whose arrays live on `device`."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, device))


def _blocks(rows: int, length: int, seed: int) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(3, TINY.vocab_size, (rows, length)).astype(np.int32)
    ids[:, 0] = 2
    return ids


def test_bf16_training_steps_lower_the_loss(accelerator):
    model = _on(accelerator, init_random(TINY, jax.random.key(0)))
    blocks = _blocks(8, 32, seed=0)
    mesh = sharding.make_mesh({"data": 1}, devices=[accelerator])
    cfg = TrainConfig(
        epochs=1, batch_size=8, learning_rate=3e-3, compute_dtype="bfloat16", dropout=False
    )
    prep = train.prepare_training(model, cfg, mesh=mesh, steps_per_epoch=1_000_000)
    batch = data_lib.global_batch(blocks, np.arange(8), prep.batch)
    state, losses = prep.state, []
    for step in range(30):  # the same batch: memorising it must lower the loss
        state, metrics = prep.step(state, prep.rest, batch, jax.random.key(step), prep.hparams)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)), losses
    # From log(96) = 4.56 a 30-step fit of one batch falls well below; a broken bf16 step (no
    # gradient, NaN, a wrong cast) stays near the start.
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert {d for x in jax.tree.leaves(state.params) for d in x.devices()} == {accelerator}


def test_xla_attention_on_the_accelerator_matches_the_cpu(accelerator, cpu, highest_precision):
    model = init_random(TINY, jax.random.key(1))
    ids = _blocks(4, 48, seed=1)
    ref = np.asarray(_on(cpu, model)(jax.device_put(ids, cpu))[0])
    got = np.asarray(_on(accelerator, model)(jax.device_put(ids, accelerator))[0])
    # float32 at the highest precision: only summation order differs (measured ~1e-6).
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_cudnn_attention_matches_xla_in_bf16(accelerator):
    if accelerator.platform != "gpu":
        pytest.skip("cuDNN attention needs a GPU (this is the lane's CPU check)")
    ids = jax.device_put(_blocks(4, 64, seed=2), accelerator)
    logits = {}
    for impl in ("xla", "cudnn"):
        model = init_random(
            TINY, jax.random.key(2), dtype=jnp.bfloat16, attention_implementation=impl
        )
        logits[impl] = np.asarray(_on(accelerator, model)(ids)[0], np.float32)
    # Both compute in bf16 (8 significant bits) with float32 softmax; the fused kernel orders
    # its sums differently, so they agree to bf16 rounding of O(1) logits.
    np.testing.assert_allclose(logits["cudnn"], logits["xla"], atol=5e-2, rtol=5e-2)
    assert np.mean(logits["cudnn"].argmax(-1) == logits["xla"].argmax(-1)) > 0.95


@pytest.mark.parametrize(
    "settings",
    [
        dict(num_beams=1, max_new_tokens=24),
        dict(num_beams=5, max_new_tokens=24, min_new_tokens=24, repetition_penalty=3.0),
    ],
    ids=["greedy", "paper_beam"],
)
def test_decode_on_the_accelerator_is_token_identical_to_the_cpu(
    accelerator, cpu, highest_precision, settings
):
    model = init_random(TINY, jax.random.key(3))
    prompts = _blocks(6, 16, seed=3)
    with jax.default_device(cpu):
        ref = decode.generate(_on(cpu, model), prompts, **settings)
    with jax.default_device(accelerator):
        got = decode.generate(_on(accelerator, model), prompts, **settings)
    np.testing.assert_array_equal(got, ref)


def test_bench_quick_runs_and_reports_mfu(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "--suite", "quick", "--out", str(out)]
    only = os.environ.get(BENCH_ONLY_ENV)
    if only:
        argv += ["--only", only]
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert rows and all(r["value"] > 0 for r in rows.values())
    if "train_step" in rows:
        assert 0 < rows["train_step"]["mfu"] < 1


def test_the_memory_plan_knows_the_gpu_memory(accelerator):
    if accelerator.platform != "gpu":
        pytest.skip("a CPU reports no memory limit (this is the lane's CPU check)")
    limit = memplan.device_memory(accelerator)
    assert limit is not None and limit > 2**30
    cfg = config_lib.load_config(
        config_lib.find_config("theory_gaussian"),
        ["generation.num_trials=1024", "generation.num_generations=3"],
    )
    rows = memplan.plan(cfg)["theory_gaussian"]
    assert rows and all(0 < r.total < limit for r in rows)
    assert "device memory unknown" not in memplan.format_table({"g": rows}, accelerator)

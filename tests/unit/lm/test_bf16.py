"""Mixed precision of the language model, read from the traced programs.

`compute_dtype: bfloat16` must run the matmuls of the train and eval steps in bf16 (the model
was built in float32: a model that casts its inputs back up still trains, so only the program
shows it), and `decode.dtype` the decoder's matmuls and KV cache; softmax, logsumexp and the loss
stay float32 in both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from collapse_jax.jaxtools import sharding
from collapse_jax.jaxtools.jaxprs import equations, matmul_dtypes
from collapse_jax.lm import decode, experiment, train
from collapse_jax.lm.settings import DecodeSettings, resolve_decode_dtype
from collapse_jax.lm.train_config import TrainConfig
from tests.multihost_worker import TINY, tiny_blocks, tiny_model

LAYERS = TINY["num_hidden_layers"]
F32 = "float32 x float32 -> float32"
# The backward of the attention scores: the cotangent of the float32 softmax meets a bf16 query
# or key (inside jax.nn.dot_product_attention); two per layer, about 1% of the FLOPs at T = 64.
SCORES_BWD = "float32 x bfloat16 -> float32"


def _train_jaxpr(compute_dtype):
    model = tiny_model(dropout=0.1)
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    cfg = TrainConfig(
        epochs=1, batch_size=4, learning_rate=1e-3, compute_dtype=compute_dtype, dropout=True
    )
    prep = train.prepare_training(model, cfg, mesh=mesh, steps_per_epoch=10)
    ids = jnp.asarray(tiny_blocks(4))
    ones = jnp.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}
    args = (prep.state, prep.rest, batch, jax.random.key(0), prep.hparams)
    return jax.make_jaxpr(prep.step)(*args), jax.eval_shape(prep.step, *args)[1]


def _float_ops(jaxpr, names=("exp", "log", "reduce_max", "rsqrt")):
    """Dtypes of the softmax / logsumexp / LayerNorm building blocks in the program."""
    return [str(e.outvars[0].aval.dtype) for e in equations(jaxpr) if e.primitive.name in names]


def test_train_step_matmuls_are_float32_without_compute_dtype():
    dots = matmul_dtypes(_train_jaxpr(None)[0])
    assert list(dots) == [F32], dots


def test_train_step_matmuls_run_in_bf16_and_the_softmax_and_loss_in_float32():
    jaxpr, metrics = _train_jaxpr("bfloat16")
    dots = matmul_dtypes(jaxpr)
    assert dots.pop(SCORES_BWD) == 2 * LAYERS, dots
    # Everything else, forward and backward (the LM head's too), multiplies bf16 by bf16.
    assert dots and all(k.startswith("bfloat16 x bfloat16") for k in dots), dots
    ops = _float_ops(jaxpr)
    # max, exp per softmax; max, exp, log per logsumexp; rsqrt per LayerNorm (2 per layer + 1)
    assert len(ops) >= 2 * LAYERS + 3 + 2 * LAYERS + 1
    assert set(ops) == {"float32"}, ops
    assert metrics["loss"].dtype == jnp.float32


def test_bf16_train_step_decreases_the_loss():
    new, hist = train.finetune(
        tiny_model(dropout=0.0),
        tiny_blocks(32),
        epochs=4,
        batch_size=8,
        learning_rate=1e-2,
        schedule="constant",
        compute_dtype="bfloat16",
        mesh=sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]),
    )
    # The returned model keeps float32 weights and still computes in float32 outside training.
    assert new.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(new, nnx.Param)))
    loss = np.asarray(hist["train_loss"])
    assert np.all(np.isfinite(loss))
    # 16 steps at lr 1e-2 on blocks that mostly count up by one: the loss falls by far more than
    # bf16 rounding could move it (it starts near log(61) = 4.1).
    assert loss[-4:].mean() < loss[:4].mean() - 0.5, loss


def _decode_jaxpr(dtype):
    model = tiny_model(dropout=0.0)
    settings = DecodeSettings(max_new_tokens=3, num_beams=2, repetition_penalty=2.0, dtype=dtype)
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(tiny_blocks(2))
    fn = decode.compiled_search(graphdef, settings)
    return jax.make_jaxpr(fn)(state, ids, jnp.ones_like(ids), decode.prompt_keys(0, np.arange(2)))


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_decoder_matmuls_are_float32_by_default(dtype):
    assert list(matmul_dtypes(_decode_jaxpr(dtype))) == [F32]


def test_decoder_matmuls_and_kv_cache_run_in_bf16_with_softmax_in_float32():
    jaxpr = _decode_jaxpr("bfloat16")
    dots = matmul_dtypes(jaxpr)
    assert dots and all(k.startswith("bfloat16 x bfloat16") for k in dots), dots
    # Attention scores and the logits accumulate in float32; softmax and the beam scores'
    # log-softmax are float32.
    assert any(k.endswith("-> float32") for k in dots), dots
    ops = _float_ops(jaxpr)
    assert ops and set(ops) == {"float32"}, ops
    # The KV cache: the generated keys/values buffers [L, R, new, N, H] are bf16.
    cache_shape = (LAYERS, 4, 3, TINY["num_attention_heads"], 8)
    buffers = [
        str(v.aval.dtype)
        for e in equations(jaxpr)
        for v in e.outvars
        if getattr(v.aval, "shape", None) == cache_shape
    ]
    assert buffers and set(buffers) == {"bfloat16"}, buffers


def test_float32_decode_dtype_is_the_default_program():
    # So `decode.dtype: float32` (the CPU default) keeps the token-exact parity with transformers
    # that tests/parity checks for the default.
    assert str(_decode_jaxpr("float32")) == str(_decode_jaxpr(None))


@pytest.mark.slow  # compiles two decoders
def test_bf16_decoding_runs_and_mostly_agrees_with_float32():
    model = tiny_model(dropout=0.0)
    ids = tiny_blocks(8)
    kw = dict(max_new_tokens=4, num_beams=2)
    base = decode.generate(model, ids, **kw, dtype="float32")
    low = decode.generate(model, ids, **kw, dtype="bfloat16")
    assert low.shape == base.shape
    np.testing.assert_array_equal(low[:, :8], base[:, :8])  # the prompts
    assert np.mean(low[:, 8] == base[:, 8]) >= 0.5  # the first new token rarely flips


def test_auto_decode_dtype_is_decided_by_the_backend_and_recorded(tmp_path):
    want = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    assert resolve_decode_dtype("auto") == want
    assert resolve_decode_dtype(None) is None
    with pytest.raises(ValueError, match="dtype must be one of"):
        DecodeSettings(max_new_tokens=1, dtype="float16")
    cfg = experiment.OPTExperimentConfig()
    assert cfg.decode.dtype == "auto"  # the paper's decode block
    learner = experiment.OPTLearner(cfg)
    assert learner._decode_settings(tiny_model()).dtype == want
    learner.prepare(tmp_path)
    learner.prepare(tmp_path)  # a resume on the same backend adds nothing
    record = __import__("json").loads((tmp_path / "decode.json").read_text())
    assert record == {
        "resolved": [{"setting": "auto", "backend": jax.default_backend(), "dtype": want}]
    }

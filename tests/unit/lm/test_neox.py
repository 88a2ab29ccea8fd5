"""GPT-NeoX port (`collapse_jax.lm.neox`) checks that need no torch: config round trip and
validation, cached == uncached forward, rotary positions, bf16, dropout, logical axes and the
sharded forward. Parity with transformers is the harness's (tests/parity/lm/test_families.py)."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from collapse_jax.lm import families, neox

CFG = neox.NeoXConfig(
    vocab_size=61,
    hidden_size=32,
    num_attention_heads=4,
    intermediate_size=40,
    num_hidden_layers=2,
    rotary_pct=0.5,
    initializer_range=0.3,
)
LENGTHS = [9, 5, 1, 7]  # left padding, a one-token row; 4 rows for the (2, 2, 2) mesh


def batch(seed: int, lengths: list[int], vocab: int = 61) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded random ids and mask [B, max(lengths)] int32."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = rng.integers(1, vocab, size=(len(lengths), t)).astype(np.int32)
    mask = (np.arange(t)[None] >= t - np.asarray(lengths)[:, None]).astype(np.int32)
    return ids * mask, mask


@functools.cache
def _jit():
    def fwd(graphdef, state, ids, mask, pos, cache):
        return nnx.merge(graphdef, state)(ids, mask, position_ids=pos, cache=cache)

    return jax.jit(fwd, static_argnums=0)


def forward(model, ids, mask=None, position_ids=None, cache=None):
    graphdef, state = nnx.split(model)
    as_jnp = lambda x: None if x is None else jnp.asarray(x)
    return _jit()(graphdef, state, as_jnp(ids), as_jnp(mask), as_jnp(position_ids), cache)


@pytest.fixture(scope="module")
def model():
    return families.init_random(CFG, jax.random.key(0))


def test_config_round_trip_and_validation():
    cfg = neox.NeoXConfig(
        vocab_size=61,
        hidden_size=48,
        num_attention_heads=3,
        intermediate_size=56,
        num_hidden_layers=2,
        rotary_pct=0.5,
        rope_type="linear",
        rope_factor=4.0,
        use_parallel_residual=False,
        tie_word_embeddings=True,
        eos_token_id=5,
        pad_token_id=5,
    )
    d = cfg.to_hf_dict()
    assert d["model_type"] == "gpt_neox" and d["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert families.config_from_hf_dict(d) == cfg
    # transformers 4's spelling (pythia's config.json): no pad id -> the EOS id.
    old = {
        "model_type": "gpt_neox",
        "rotary_pct": 0.25,
        "rotary_emb_base": 10000,
        "eos_token_id": 0,
        "bos_token_id": 0,
        "hidden_size": 768,
        "num_attention_heads": 12,
    }
    pythia = neox.NeoXConfig.from_hf_dict(old)
    assert pythia == neox.NeoXConfig.pythia_160m() and pythia.rotary_dim == 16
    assert pythia.num_key_value_heads == 12 and pythia.pad_token_id == 0
    linear = neox.NeoXConfig.from_hf_dict(dict(old, rope_scaling={"type": "linear", "factor": 2}))
    assert (linear.rope_type, linear.rope_factor) == ("linear", 2.0)
    with pytest.raises(ValueError, match="not a GPT-NeoX config"):
        neox.NeoXConfig.from_hf_dict({"model_type": "opt"})
    with pytest.raises(ValueError, match="rope_type 'dynamic' is not supported"):
        neox.NeoXConfig.from_hf_dict(dict(old, rope_scaling={"type": "dynamic", "factor": 2.0}))
    with pytest.raises(ValueError, match="divisible"):
        neox.NeoXConfig(hidden_size=48, num_attention_heads=5)
    with pytest.raises(ValueError, match="must be even"):
        neox.NeoXConfig(hidden_size=48, num_attention_heads=3, rotary_pct=0.1)
    with pytest.raises(ValueError, match="hidden_act"):
        neox.NeoXConfig(hidden_act="gelu_fast_and_wrong")
    with pytest.raises(ValueError, match="rope_factor"):
        neox.NeoXConfig(rope_factor=2.0)


def test_rotary_frequencies_and_positions(model):
    """HF's inv_freq; rotary attention sees relative positions only (a shift changes nothing,
    spreading them does), and with rotary_pct 0 none at all."""
    np.testing.assert_allclose(
        neox.rope_inverse_frequencies(CFG), 1.0 / 10000.0 ** (np.arange(0, 4, 2) / 4), rtol=1e-6
    )
    ids, _ = batch(1, [6, 6])
    pos = np.broadcast_to(np.arange(6, dtype=np.int32), (2, 6))
    base = np.asarray(forward(model, ids))
    np.testing.assert_allclose(np.asarray(forward(model, ids, position_ids=pos)), base, atol=1e-6)
    shifted = np.asarray(forward(model, ids, position_ids=pos + 3))
    np.testing.assert_allclose(shifted, base, atol=1e-4)
    assert np.abs(np.asarray(forward(model, ids, position_ids=2 * pos)) - base).max() > 1e-2
    flat = families.init_random(
        neox.NeoXConfig(**{**_fields(CFG), "rotary_pct": 0.0}), jax.random.key(0)
    )
    np.testing.assert_allclose(
        np.asarray(forward(flat, ids, position_ids=2 * pos)),
        np.asarray(forward(flat, ids)),
        atol=1e-5,
    )


def _fields(cfg):
    return {name: getattr(cfg, name) for name in cfg.__dataclass_fields__}


def test_cache_equals_full_forward(model):
    """Prompt chunks and single tokens through a KVCache give the uncached logits."""
    ids, mask = batch(2, LENGTHS)
    full = np.asarray(forward(model, ids, mask))
    b, t = ids.shape
    slots = np.zeros((b, 12), np.int32)
    slots[:, :t] = mask
    cache, outs, start = model.init_cache(b, 12), [], 0
    for size in (4, 1, 1, 1, 1, 1):
        logits, cache = forward(model, ids[:, start : start + size], slots, cache=cache)
        outs.append(np.asarray(logits))
        start += size
    assert int(cache.index) == t and cache.key.shape == (2, 4, 12, 4, 8)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(outs, 1)[valid], full[valid], atol=1e-5, rtol=0)


def test_bf16_close_to_float32_with_strict_promotion(model):
    ids, mask = batch(3, LENGTHS)
    ref = np.asarray(forward(model, ids, mask))
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state)
    low = families.init_random(CFG, jax.random.key(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    nnx.update(low, state)
    with jax.numpy_dtype_promotion("strict"):
        logits = forward(low, ids, mask)
    assert logits.dtype == jnp.float32
    valid = mask.astype(bool)
    # bf16 keeps 8 mantissa bits (relative step 0.4%); through 2 layers the error stays a few
    # percent of the logit scale; 0.1 * max|logit| still catches a wrong cast.
    assert np.abs(np.asarray(logits) - ref)[valid].max() < 0.1 * np.abs(ref[valid]).max()


def test_dropout_training_mode():
    """deterministic=False: reproducible per key, different across keys, eval mode unaffected."""
    cfg = neox.NeoXConfig(**{**_fields(CFG), "hidden_dropout": 0.1, "attention_dropout": 0.1})
    model = families.init_random(cfg, jax.random.key(2))
    graphdef, state = nnx.split(model)
    ids, mask = map(jnp.asarray, batch(4, [8, 5]))
    train = jax.jit(
        lambda s, k: nnx.merge(graphdef, s)(ids, mask, deterministic=False, dropout_key=k)
    )
    a, b, c = (np.asarray(train(state, jax.random.key(k))) for k in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(a).all() and np.abs(a - c).max() > 1e-3
    evaluation = np.asarray(model(ids, mask))
    np.testing.assert_array_equal(evaluation, np.asarray(model(ids, mask, dropout_key=None)))
    assert np.abs(a - evaluation).max() > 1e-3
    with pytest.raises(ValueError, match="dropout_key"):
        model(ids, mask, deterministic=False)


def test_logical_axes_and_sharded_forward(model):
    from collapse_jax.jaxtools import sharding

    allowed = {"vocab", "embed", "heads", "head_dim", "mlp", None}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata()["out_sharding"]
        assert len(names) == var[...].ndim and set(names) <= allowed, path
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    ids, mask = batch(5, LENGTHS)
    ref = np.asarray(forward(model, ids, mask))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.logical_to_sharding(state, mesh))
    qkv = state["gpt_neox"]["layers"][0]["attention"]["query_key_value"]["kernel"]
    assert qkv[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None, None)
    fwd = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))
    out = fwd(state, jax.device_put(jnp.asarray(ids), sharding.batch_sharding(mesh)), mask)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)


def test_input_validation(model):
    ids = jnp.ones((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(ids, jnp.ones((2, 5), jnp.int32))
    with pytest.raises(ValueError, match="input_ids"):
        model(jnp.ones((4,), jnp.int32))
    with pytest.raises(ValueError, match="cache"):
        model(ids, cache=model.init_cache(3, 8))
    with pytest.raises(ValueError, match="attention_implementation"):
        families.init_random(CFG, jax.random.key(0), attention_implementation="flash")


def test_save_and_load_through_the_registry(model, tmp_path):
    """neox.save_pretrained -> lm.load_pretrained picks the family from model_type; the OPT
    loader refuses the folder in one line."""
    import collapse_jax.lm as lm
    from collapse_jax.lm import opt

    neox.save_pretrained(model, tmp_path)
    assert families.family_for(json.loads((tmp_path / "config.json").read_text())).name == (
        "gpt_neox"
    )
    ids, mask = batch(6, LENGTHS)
    want = np.asarray(forward(model, ids, mask))
    for loaded in (lm.load_pretrained(tmp_path), neox.load_pretrained(tmp_path)):
        assert isinstance(loaded, neox.NeoXForCausalLM) and loaded.config == model.config
        np.testing.assert_array_equal(np.asarray(forward(loaded, ids, mask)), want)
    with pytest.raises(ValueError, match=r"config\.json: config is not an OPT config"):
        opt.load_pretrained(tmp_path)

"""Parity of the Flax OPT port with transformers' PyTorch `OPTForCausalLM` (CPU, float32).

Reference models are random tiny HF OPTs (odd sizes, LayerNorm and biases randomised, weights with
std 0.3 so that logits are O(1-10) and a wrong mapping shows), saved with `save_pretrained` and
loaded through our `load_pretrained`. Tolerance: 1e-4 on logits for the whole model in float32
(STYLE.md 3.8), over non-padding positions only (HF leaves padded rows unspecified).
"""

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from collapse_jax.lm.cache import KVCache  # noqa: E402
from collapse_jax.lm.families import init_random, load_pretrained, num_params  # noqa: E402
from collapse_jax.lm.opt import OPTConfig, OPTForCausalLM  # noqa: E402
from tests.helpers_opt import (  # noqa: E402
    TINY_OPT,
    hf_forward,
    hf_labels,
    load_hf_model,
    make_hf_opt_dir,
    random_batch,
)
from tests.helpers_opt import jit_forward as forward  # noqa: E402

ATOL = 1e-4
STD = 0.3
LENGTHS = [9, 5, 1, 7]  # left padding, different lengths, a BOS-only row

SWITCHES = {
    "pre_ln": {},
    "post_ln": dict(do_layer_norm_before=False),
    "project_in_out_350m_style": dict(word_embed_proj_dim=16, do_layer_norm_before=False),
    "project_in_out_pre_ln": dict(word_embed_proj_dim=16),
    "no_bias": dict(enable_bias=False),
    "no_ln_affine": dict(layer_norm_elementwise_affine=False),
    "remove_final_ln": dict(_remove_final_layer_norm=True),
    "untied_head": dict(tie_word_embeddings=False),
    "gelu": dict(activation_function="gelu"),
}


def causal_lm_loss(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> float:
    """transformers' `labels=` loss (see `hf_forward`): predictions from a real token of the next
    real token, mean over them."""
    logits = np.asarray(logits, np.float64)[:, :-1]
    labels, valid = ids[:, 1:], (mask[:, 1:] * mask[:, :-1]).astype(bool)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return float(((logz - picked) * valid).sum() / valid.sum())


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("opt_switches")
    return {
        name: make_hf_opt_dir(root, name=name, seed=i, init_std=STD, **overrides)
        for i, (name, overrides) in enumerate(SWITCHES.items())
    }


@pytest.mark.torch
@pytest.mark.parametrize("switch", list(SWITCHES))
def test_parity_every_switch(hf_dirs, switch):
    ids, mask = random_batch(1, TINY_OPT["vocab_size"], LENGTHS)
    ref_logits, ref_loss = hf_forward(load_hf_model(hf_dirs[switch]), ids, mask)
    model = load_pretrained(hf_dirs[switch])
    # The uncompiled path once, the jitted one for the rest.
    run = (lambda *a: model(*a)) if switch == "pre_ln" else functools.partial(forward, model)
    logits = run(jnp.asarray(ids), jnp.asarray(mask))
    assert logits.shape == ref_logits.shape and logits.dtype == jnp.float32
    logits = np.asarray(logits)
    assert np.isfinite(logits).all()  # padded rows too: they must not poison anything
    valid = mask.astype(bool)
    assert np.abs(ref_logits[valid]).max() > 1.0  # the comparison has teeth
    np.testing.assert_allclose(logits[valid], ref_logits[valid], atol=ATOL, rtol=0)
    # Same loss as transformers' labels= path (float32 on both sides: 1e-5 relative).
    assert causal_lm_loss(logits, ids, mask) == pytest.approx(ref_loss, rel=1e-5)


@pytest.mark.torch
def test_no_mask_and_explicit_positions(hf_dirs):
    model = load_pretrained(hf_dirs["pre_ln"])
    hf = load_hf_model(hf_dirs["pre_ln"])
    ids, mask = random_batch(2, TINY_OPT["vocab_size"], [6, 6])
    ref, _ = hf_forward(hf, ids, None)
    np.testing.assert_allclose(np.asarray(forward(model, ids)), ref, atol=ATOL, rtol=0)
    # position_ids override the mask-derived positions (shifted positions change the logits).
    pos = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (2, 6))
    np.testing.assert_allclose(
        np.asarray(forward(model, ids, position_ids=pos)), ref, atol=ATOL, rtol=0
    )
    shifted = np.asarray(forward(model, ids, position_ids=pos + 3))
    assert np.abs(shifted - ref).max() > 1e-2
    # The explicit XLA implementation is the default one.
    xla = load_pretrained(hf_dirs["pre_ln"], attention_implementation="xla")
    np.testing.assert_allclose(np.asarray(forward(xla, ids)), ref, atol=ATOL, rtol=0)


@pytest.mark.torch
@pytest.mark.slow
def test_parity_opt_125m_full_size(tmp_path):
    """The real facebook/opt-125m architecture, random weights, one short left-padded batch."""
    hf_cfg = transformers.OPTConfig()  # HF's defaults are opt-125m's shape
    cfg = OPTConfig.from_hf_dict(hf_cfg.to_dict())
    assert cfg == OPTConfig.opt_125m()
    sizes = dict(
        vocab_size=50272,
        hidden_size=768,
        num_hidden_layers=12,
        ffn_dim=3072,
        num_attention_heads=12,
        max_position_embeddings=2048,
        word_embed_proj_dim=768,
    )
    path = make_hf_opt_dir(tmp_path, seed=0, init_std=0.02, **sizes)
    ids, mask = random_batch(3, cfg.vocab_size, [12, 8])
    ref, ref_loss = hf_forward(load_hf_model(path), ids, mask)
    model = load_pretrained(path)
    assert num_params(model) == 125_239_296  # facebook/opt-125m's published count
    logits = np.asarray(forward(model, ids, mask))
    valid = mask.astype(bool)
    np.testing.assert_allclose(logits[valid], ref[valid], atol=ATOL, rtol=0)
    assert causal_lm_loss(logits, ids, mask) == pytest.approx(ref_loss, rel=1e-5)


def _decode_incrementally(model, ids, mask, chunks, max_len):
    """Feeds ids [B, T] in the given chunk sizes through a cache; returns logits [B, T, V]."""
    b, t = ids.shape
    cache = model.init_cache(b, max_len)
    slot_mask = np.zeros((b, max_len), np.int32)
    slot_mask[:, :t] = mask
    outs, start = [], 0
    for size in chunks:
        logits, cache = forward(model, ids[:, start : start + size], slot_mask, cache=cache)
        outs.append(np.asarray(logits))
        start += size
    assert start == t and int(cache.index) == t
    return np.concatenate(outs, axis=1), cache


@pytest.mark.torch
@pytest.mark.parametrize("switch", ["pre_ln", "project_in_out_350m_style"])
def test_cache_equals_full_forward(hf_dirs, switch):
    model = load_pretrained(hf_dirs[switch])
    ids, mask = random_batch(4, TINY_OPT["vocab_size"], LENGTHS)
    full = np.asarray(forward(model, ids, mask))
    valid = mask.astype(bool)
    for chunks in ([ids.shape[1]], [4, 1, 1, 1, 1, 1], [1] * ids.shape[1]):
        inc, cache = _decode_incrementally(model, ids, mask, chunks, max_len=13)
        # Same math, different reduction lengths (13 cache slots vs 9): float32 round-off only.
        np.testing.assert_allclose(inc[valid], full[valid], atol=1e-5, rtol=0)
        assert cache.key.shape == (3, 4, 13, 3, 8)


@pytest.mark.torch
def test_cache_matches_hf_generation_steps(hf_dirs):
    """Prompt + generated tokens through our cache == HF full forward on the whole sequence."""
    model = load_pretrained(hf_dirs["pre_ln"])
    hf = load_hf_model(hf_dirs["pre_ln"])
    ids, mask = random_batch(5, TINY_OPT["vocab_size"], [6, 3], total=6)
    new = np.random.default_rng(0).integers(3, TINY_OPT["vocab_size"], size=(2, 4)).astype(np.int32)
    cache = model.init_cache(2, 10)
    slot_mask = np.zeros((2, 10), np.int32)
    slot_mask[:, :6] = mask
    _, cache = forward(model, ids, slot_mask, cache=cache)
    steps = []
    for i in range(4):
        slot_mask[:, 6 + i] = 1
        logits, cache = forward(model, new[:, i : i + 1], slot_mask, cache=cache)
        steps.append(np.asarray(logits)[:, 0])
    full_ids = np.concatenate([ids, new], axis=1)
    ref, _ = hf_forward(hf, full_ids, slot_mask)
    np.testing.assert_allclose(np.stack(steps, 1), ref[:, 6:], atol=ATOL, rtol=0)


def test_cache_reorder(key):
    cfg = OPTConfig(
        **{
            k: TINY_OPT[k]
            for k in (
                "vocab_size",
                "hidden_size",
                "ffn_dim",
                "num_attention_heads",
                "num_hidden_layers",
                "max_position_embeddings",
            )
        }
    )
    model = init_random(cfg, key)
    ids = jax.random.randint(jax.random.key(1), (3, 5), 3, cfg.vocab_size, dtype=jnp.int32)
    _, cache = forward(model, ids, cache=model.init_cache(3, 8))
    beam_idx = jnp.array([2, 0, 0], jnp.int32)
    reordered = cache.reorder(beam_idx)
    assert isinstance(reordered, KVCache) and int(reordered.index) == 5
    np.testing.assert_array_equal(reordered.key[:, 1], cache.key[:, 0])
    np.testing.assert_array_equal(reordered.value[:, 0], cache.value[:, 2])
    # Continuing from the reordered cache equals continuing the reordered batch.
    nxt = jnp.array([[7], [8], [9]], jnp.int32)
    a, _ = forward(model, nxt, cache=reordered)
    _, cache_b = forward(model, ids[beam_idx], cache=model.init_cache(3, 8))
    b, _ = forward(model, nxt, cache=cache_b)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def test_dropout_training_mode(key):
    """deterministic=False: jitted through split/merge, differentiable, reproducible per key."""
    cfg = OPTConfig(
        vocab_size=53,
        hidden_size=24,
        num_attention_heads=3,
        ffn_dim=40,
        num_hidden_layers=2,
        max_position_embeddings=37,
        dropout=0.1,
        attention_dropout=0.1,
        word_embed_proj_dim=16,
    )
    model = init_random(cfg, key)
    graphdef, state = nnx.split(model)
    ids, mask = random_batch(6, cfg.vocab_size, [8, 5])
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    def loss_fn(state, dropout_key):
        logits = nnx.merge(graphdef, state)(ids, mask, deterministic=False, dropout_key=dropout_key)
        logp = jax.nn.log_softmax(logits[:, :-1])
        picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return -(picked * mask[:, 1:]).sum() / mask[:, 1:].sum()

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    train1, grads = grad_fn(state, jax.random.key(3))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.isfinite(g).all() and np.abs(g).max() > 0, jax.tree_util.keystr(path)
    train2, _ = grad_fn(state, jax.random.key(3))
    train3, _ = grad_fn(state, jax.random.key(4))
    assert train1 == train2 and train1 != train3
    eval_logits = np.asarray(forward(model, ids, mask))
    assert np.isfinite(eval_logits).all()
    with pytest.raises(ValueError, match="dropout_key"):
        model(ids, mask, deterministic=False)


def test_dropout_statistics(key):
    """Dropout zeroes a `rate` fraction and rescales the rest by 1/(1-rate) (unbiased).

    With N = 200_000 draws the zero fraction has SE sqrt(p(1-p)/N); we allow 5 SE (two-sided
    false-failure probability 6e-7), and the scaled mean likewise.
    """
    from collapse_jax.lm.layers import inverted_dropout

    n, rate = 200_000, 0.3
    out = np.asarray(inverted_dropout(key, jnp.ones((n,), jnp.float32), rate))
    zero = (out == 0).mean()
    assert abs(zero - rate) < 5 * np.sqrt(rate * (1 - rate) / n)
    assert set(np.unique(out)) <= {0.0, np.float32(1 / (1 - rate))}
    se_mean = np.sqrt(rate / (1 - rate) / n)  # Var of the rescaled Bernoulli is p / (1 - p)
    assert abs(out.mean() - 1.0) < 5 * se_mean


@pytest.mark.torch
def test_gradients_match_torch(hf_dirs):
    """d(loss)/d(params) equals torch's autograd through transformers (float32, 1e-5)."""
    path = hf_dirs["project_in_out_350m_style"]
    hf = load_hf_model(path)
    ids, mask = random_batch(7, TINY_OPT["vocab_size"], [7, 4])
    labels = torch.as_tensor(hf_labels(ids, mask))
    out = hf(
        input_ids=torch.as_tensor(ids, dtype=torch.long),
        attention_mask=torch.as_tensor(mask),
        labels=labels,
    )
    out.loss.backward()
    ref = {n: p.grad.numpy() for n, p in hf.named_parameters()}

    model = load_pretrained(path)
    graphdef, state = nnx.split(model)

    def loss_fn(state):
        logits = nnx.merge(graphdef, state)(jnp.asarray(ids), jnp.asarray(mask))
        logp = jax.nn.log_softmax(logits[:, :-1])
        picked = jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], axis=-1)[..., 0]
        m = jnp.asarray(mask)[:, 1:] * jnp.asarray(mask)[:, :-1]  # as hf_labels
        return -(picked * m).sum() / m.sum()

    grads = jax.jit(jax.grad(loss_fn))(state)
    from collapse_jax.lm.opt import LAYOUT

    for p, g in nnx.to_flat_state(grads):
        tensor = LAYOUT.tensor(p)
        np.testing.assert_allclose(
            tensor.to_hf([np.asarray(g[...])]),
            ref[tensor.name],
            atol=1e-5,
            rtol=0,
            err_msg=tensor.name,
        )


@pytest.mark.torch
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_mixed_precision(hf_dirs, param_dtype):
    """bfloat16 compute stays close to float32 and keeps float32 logits."""
    path = hf_dirs["pre_ln"]
    ids, mask = random_batch(8, TINY_OPT["vocab_size"], LENGTHS)
    ref = np.asarray(forward(load_pretrained(path), ids, mask))
    model = load_pretrained(path, dtype=jnp.bfloat16, param_dtype=param_dtype)
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
        assert leaf.dtype == param_dtype
    with jax.numpy_dtype_promotion("strict"):  # no silent float32 promotion in model code
        logits = forward(model, ids, mask)
    assert logits.dtype == jnp.float32
    valid = mask.astype(bool)
    err = np.abs(np.asarray(logits) - ref)[valid]
    # bfloat16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); through 3 layers with logits of
    # magnitude ~5 the error stays a few percent of the logit scale. 0.1 * max|logit| is a loose
    # bound that a wrong cast (e.g. float16 overflow, int truncation) would still break.
    assert err.max() < 0.1 * np.abs(ref[valid]).max()
    assert err.mean() < 0.02 * np.abs(ref[valid]).max()
    if param_dtype != jnp.bfloat16:
        return
    # A bfloat16 cache works and matches the full bfloat16 forward to bfloat16 precision.
    inc, cache = _decode_incrementally(model, ids, mask, [5, 1, 1, 1, 1], max_len=9)
    assert cache.key.dtype == jnp.bfloat16
    full = np.asarray(logits)
    assert np.abs(inc - full)[valid].max() < 0.05 * np.abs(full[valid]).max()
    assert load_pretrained(path, dtype=jnp.bfloat16).param_dtype == jnp.bfloat16


def test_logical_axis_annotations(key):
    """Every parameter names one allowed logical axis (or None) per dimension."""
    allowed = {"vocab", "embed", "heads", "head_dim", "mlp", None}
    cfg = OPTConfig(
        vocab_size=53,
        hidden_size=24,
        num_attention_heads=3,
        ffn_dim=40,
        num_hidden_layers=2,
        max_position_embeddings=37,
        word_embed_proj_dim=16,
        tie_word_embeddings=False,
    )
    model = init_random(cfg, key)
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    seen = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata()["out_sharding"]
        assert len(names) == var[...].ndim and set(names) <= allowed, path
        seen += 1
    assert seen == len(jax.tree.leaves(specs))
    layer = model.model.decoder.layers[0]
    assert layer.self_attn.q_proj.kernel.get_metadata()["out_sharding"] == (
        "embed",
        "heads",
        "head_dim",
    )
    assert layer.fc1.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")


def test_sharded_forward_matches(key):
    """On the (2, 2, 2) data x fsdp x tensor CPU mesh, sharded params give the same logits."""
    from collapse_jax.jaxtools import sharding

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    cfg = OPTConfig(
        vocab_size=54,
        hidden_size=24,
        num_attention_heads=4,
        ffn_dim=40,
        num_hidden_layers=2,
        max_position_embeddings=37,
        tie_word_embeddings=True,
    )
    model = init_random(cfg, key)
    ids, mask = random_batch(9, cfg.vocab_size, [8, 5, 3, 8])
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    ref = np.asarray(forward(model, ids, mask))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, state = nnx.split(model)
    shardings = sharding.logical_to_sharding(state, mesh)
    state = jax.device_put(state, shardings)
    q = state["model"]["decoder"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
    assert q[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    fwd = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))
    out = fwd(state, jax.device_put(ids, sharding.batch_sharding(mesh)), mask)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)


def test_config_round_trip_and_validation():
    cfg = OPTConfig(
        vocab_size=53,
        hidden_size=24,
        num_attention_heads=3,
        ffn_dim=40,
        num_hidden_layers=2,
        max_position_embeddings=37,
        word_embed_proj_dim=16,
        do_layer_norm_before=False,
        remove_final_layer_norm=True,
        enable_bias=False,
    )
    hf_cfg = transformers.OPTConfig(**cfg.to_hf_dict())
    assert hf_cfg._remove_final_layer_norm and hf_cfg.word_embed_proj_dim == 16
    assert OPTConfig.from_hf_dict(hf_cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="not an OPT config"):
        OPTConfig.from_hf_dict({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="divisible"):
        OPTConfig(hidden_size=24, num_attention_heads=5)
    with pytest.raises(ValueError, match="dropout"):
        OPTConfig(dropout=1.0)
    with pytest.raises(ValueError, match="activation_function"):
        OPTConfig(activation_function="gelu_fast_and_wrong")
    with pytest.raises(ValueError, match="vocab_size"):
        OPTConfig(vocab_size=0)


def test_input_validation(key):
    cfg = OPTConfig(
        vocab_size=53,
        hidden_size=24,
        num_attention_heads=3,
        ffn_dim=40,
        num_hidden_layers=2,
        max_position_embeddings=10,
    )
    model = OPTForCausalLM(cfg, rngs=nnx.Rngs(params=key))
    ids = jnp.ones((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(ids, jnp.ones((2, 5), jnp.int32))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(jnp.ones((1, 11), jnp.int32))
    with pytest.raises(ValueError, match="cache"):
        model(ids, cache=model.init_cache(3, 8))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, jnp.ones((2, 4), jnp.int32), cache=model.init_cache(2, 8))
    with pytest.raises(ValueError, match="input_ids"):
        model(jnp.ones((4,), jnp.int32))
    with pytest.raises(ValueError, match="attention_implementation"):
        init_random(cfg, key, attention_implementation="flash")

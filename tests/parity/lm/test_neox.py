"""Parity of the Flax GPT-NeoX port with transformers' `GPTNeoXForCausalLM` (CPU, float32).

Reference models are random pythia-160m configurations shrunk to 3 layers with odd sizes (head_dim
16, so rotary_pct 0.25 rotates 4 dims), LayerNorms and biases randomised and weights with std 0.3
so that logits are O(1-10) and a wrong mapping shows. Tolerance 1e-4 on logits (STYLE.md 3.8),
over non-padding positions. HF's plain forward numbers positions 0.. whatever the padding, while
its `generate` (and our model) count valid tokens only, so the left-padded comparisons hand HF
the mask-derived `position_ids`.
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from collapse_jax.lm import decode, neox  # noqa: E402
from tests.helpers_opt import random_batch  # noqa: E402

pytestmark = pytest.mark.torch

ATOL = 1e-4
STD = 0.3
LENGTHS = [9, 5, 1, 7]
TINY = dict(
    vocab_size=61,
    hidden_size=48,
    num_hidden_layers=3,
    num_attention_heads=3,
    intermediate_size=56,
    max_position_embeddings=160,
    rotary_pct=0.25,
    rotary_emb_base=10000,
    bos_token_id=0,
    eos_token_id=0,
)
SWITCHES = {
    "pythia": {},
    "sequential_residual": dict(use_parallel_residual=False),
    "no_attention_bias": dict(attention_bias=False),
    "tied_head": dict(tie_word_embeddings=True),
    "full_rotary_gelu_new": dict(rotary_pct=1.0, hidden_act="gelu_new", rotary_emb_base=500),
    "linear_rope_eps": dict(rope_scaling={"type": "linear", "factor": 2.0}, layer_norm_eps=1e-3),
    "no_rotary": dict(rotary_pct=0.0),
}


def make_hf_neox_dir(root, *, name="neox", seed=0, init_std=STD, **overrides) -> pathlib.Path:
    """Saves a random `transformers.GPTNeoXForCausalLM` (TINY + overrides) and returns its folder.

    Every matrix ~ N(0, init_std^2); LayerNorm scales ~ 1 + N(0, 0.2^2), biases and shifts
    ~ N(0, 0.1^2), so that a mapping bug in a parameter HF initialises to 0/1 cannot hide.
    """
    cfg = dict(TINY)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**cfg))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(init_std * torch.randn_like(p))
    model.eval()
    transformers.utils.logging.disable_progress_bar()
    path = pathlib.Path(root) / name
    model.save_pretrained(path)
    return path


def load_hf(path):
    transformers.utils.logging.disable_progress_bar()
    model = transformers.GPTNeoXForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def hf_logits(model, ids, mask=None) -> np.ndarray:
    """HF logits with `generate`'s positions (valid tokens counted from 0)."""
    kw = {}
    if mask is not None:
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        kw = dict(
            attention_mask=torch.as_tensor(mask),
            position_ids=torch.as_tensor(pos, dtype=torch.long),
        )
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long), **kw)
    return out.logits.float().numpy()


@functools.cache
def _jit_forward():
    def fwd(graphdef, state, ids, mask, cache):
        return nnx.merge(graphdef, state)(ids, mask, cache=cache)

    return jax.jit(fwd, static_argnums=0)


def forward(model, ids, mask=None, cache=None):
    graphdef, state = nnx.split(model)
    as_jnp = lambda x: None if x is None else jnp.asarray(x)
    return _jit_forward()(graphdef, state, as_jnp(ids), as_jnp(mask), cache)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("neox_switches")
    return {
        name: make_hf_neox_dir(root, name=name, seed=i, **overrides)
        for i, (name, overrides) in enumerate(SWITCHES.items())
    }


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_logits_match_every_switch(hf_dirs, switch):
    ids, mask = random_batch(1, TINY["vocab_size"], LENGTHS)
    ref = hf_logits(load_hf(hf_dirs[switch]), ids, mask)
    model = neox.load_pretrained(hf_dirs[switch])
    run = (lambda *a: model(*a)) if switch == "pythia" else functools.partial(forward, model)
    logits = run(jnp.asarray(ids), jnp.asarray(mask))
    assert logits.shape == ref.shape and logits.dtype == jnp.float32
    logits = np.asarray(logits)
    assert np.isfinite(logits).all()
    valid = mask.astype(bool)
    assert np.abs(ref[valid]).max() > 1.0  # the comparison has teeth
    np.testing.assert_allclose(logits[valid], ref[valid], atol=ATOL, rtol=0)


def test_unpadded_and_cached_forward_match(hf_dirs):
    model = neox.load_pretrained(hf_dirs["pythia"])
    hf = load_hf(hf_dirs["pythia"])
    ids, mask = random_batch(2, TINY["vocab_size"], [8, 8])
    ref = hf_logits(hf, ids)  # HF's own positions: no padding
    np.testing.assert_allclose(np.asarray(forward(model, ids)), ref, atol=ATOL, rtol=0)
    # A KVCache fed in chunks gives the uncached logits (prompt, then one token at a time).
    ids, mask = random_batch(3, TINY["vocab_size"], LENGTHS)
    full = np.asarray(forward(model, ids, mask))
    b, t = ids.shape
    slots = np.zeros((b, 12), np.int32)
    slots[:, :t] = mask
    cache, outs, start = model.init_cache(b, 12), [], 0
    for size in (4, 1, 1, 3):
        logits, cache = forward(model, ids[:, start : start + size], slots, cache)
        outs.append(np.asarray(logits))
        start += size
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(outs, 1)[valid], full[valid], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def decode_models(tmp_path_factory):
    # std 0.5: log-probs spread over several units, so no compared score gap is a rounding tie.
    path = make_hf_neox_dir(tmp_path_factory.mktemp("neox_decode"), seed=11, init_std=0.5)
    torch.set_num_threads(1)
    return load_hf(path), neox.load_pretrained(path)


def _compare_generate(models, ids, mask, **kw):
    hf, jm = models
    with torch.no_grad():
        ref = hf.generate(
            torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            **kw,
        ).numpy()
    got = decode.generate(jm, ids, mask, **kw)
    assert got.shape == ref.shape
    bad = np.flatnonzero((got != ref).any(axis=1))
    assert bad.size == 0, f"{kw}: rows {bad} differ:\n{ref[bad[:3]]}\n{got[bad[:3]]}"
    return ref


@pytest.mark.parametrize(
    "kw",
    [
        dict(max_new_tokens=16),
        dict(num_beams=4, max_new_tokens=16, min_new_tokens=16, repetition_penalty=3.0),
        dict(num_beams=3, max_new_tokens=10, repetition_penalty=1.3, eos_token_id=[0, 7]),
    ],
    ids=["greedy", "beam_paper", "beam_eos"],
)
def test_generate_matches_hf(decode_models, kw):
    lengths = list(np.random.default_rng(4).integers(1, 24, size=8))
    ids, mask = random_batch(4, TINY["vocab_size"], lengths, total=24)
    _compare_generate(decode_models, ids, mask, pad_token_id=1, **kw)


def test_save_load_in_transformers(hf_dirs, tmp_path):
    model = neox.load_pretrained(hf_dirs["linear_rope_eps"])
    neox.save_pretrained(model, tmp_path / "out")
    back = load_hf(tmp_path / "out")
    ids, mask = random_batch(5, TINY["vocab_size"], LENGTHS)
    ref = hf_logits(back, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(forward(model, ids, mask))[valid], ref[valid], atol=ATOL)
    assert neox.load_pretrained(tmp_path / "out").config == model.config


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
    )
    hf_cfg = transformers.GPTNeoXConfig(**cfg.to_hf_dict())
    assert hf_cfg.rope_parameters["partial_rotary_factor"] == 0.5
    assert neox.NeoXConfig.from_hf_dict(hf_cfg.to_dict()) == cfg
    assert (
        neox.NeoXConfig.from_hf_dict(transformers.GPTNeoXConfig(**TINY).to_dict()).rotary_dim == 4
    )
    with pytest.raises(ValueError, match="not a GPT-NeoX config"):
        neox.NeoXConfig.from_hf_dict({"model_type": "opt"})
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        neox.NeoXConfig.from_hf_dict(
            {"model_type": "gpt_neox", "rope_scaling": {"type": "dynamic", "factor": 2.0}}
        )
    with pytest.raises(ValueError, match="divisible"):
        neox.NeoXConfig(hidden_size=48, num_attention_heads=5)
    with pytest.raises(ValueError, match="must be even"):
        neox.NeoXConfig(hidden_size=48, num_attention_heads=3, rotary_pct=0.1)
    with pytest.raises(ValueError, match="hidden_act"):
        neox.NeoXConfig(hidden_act="gelu_fast_and_wrong")


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_mixed_precision(hf_dirs, param_dtype):
    """bfloat16 compute stays close to float32, keeps float32 logits, no silent promotion."""
    path = hf_dirs["pythia"]
    ids, mask = random_batch(8, TINY["vocab_size"], LENGTHS)
    ref = np.asarray(forward(neox.load_pretrained(path), ids, mask))
    model = neox.load_pretrained(path, dtype=jnp.bfloat16, param_dtype=param_dtype)
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
        assert leaf.dtype == param_dtype
    with jax.numpy_dtype_promotion("strict"):
        logits = forward(model, ids, mask)
    assert logits.dtype == jnp.float32
    valid = mask.astype(bool)
    err = np.abs(np.asarray(logits) - ref)[valid]
    # bfloat16's relative step is 2^-8; through 3 layers the error stays a few percent of the
    # logit scale; 0.1 * max|logit| still catches a wrong cast.
    assert err.max() < 0.1 * np.abs(ref[valid]).max()


def test_gradients_match_torch(hf_dirs):
    """d(loss)/d(params) equals torch's autograd (float32, 1e-5), sequential residual model."""
    path = hf_dirs["sequential_residual"]
    hf = load_hf(path)
    ids = np.random.default_rng(7).integers(0, TINY["vocab_size"], size=(2, 7))
    out = hf(input_ids=torch.as_tensor(ids), labels=torch.as_tensor(ids))
    out.loss.backward()
    ref = {
        ("embed_out.weight" if n == "lm_head.weight" else n): p.grad.numpy()
        for n, p in hf.named_parameters()
    }
    model = neox.load_pretrained(path)
    graphdef, state = nnx.split(model)

    def loss_fn(state):
        logits = nnx.merge(graphdef, state)(jnp.asarray(ids))
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], axis=-1).mean()

    grads = nnx.merge(graphdef, jax.jit(jax.grad(loss_fn))(state))
    for name, g in neox.hf_state_dict(grads).items():
        np.testing.assert_allclose(g, ref[name], atol=1e-5, rtol=0, err_msg=name)


def test_logical_axes_and_sharded_forward(key):
    """Every parameter names allowed logical axes; on the (2, 2, 2) CPU mesh the sharded model
    gives the same logits."""
    from collapse_jax.jaxtools import sharding

    cfg = neox.NeoXConfig(
        vocab_size=64,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=40,
        num_hidden_layers=2,
        rotary_pct=0.5,
    )
    model = neox.init_random(cfg, key)
    allowed = {"vocab", "embed", "heads", "head_dim", "mlp", None}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata()["out_sharding"]
        assert len(names) == var[...].ndim and set(names) <= allowed, path
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    ids, mask = random_batch(9, cfg.vocab_size, [8, 5, 3, 8])
    ref = np.asarray(forward(model, ids, mask))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.logical_to_sharding(state, mesh))
    qkv = state["gpt_neox"]["layers"][0]["attention"]["query_key_value"]["kernel"]
    assert qkv[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None, None)
    fwd = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))
    out = fwd(state, jax.device_put(jnp.asarray(ids), sharding.batch_sharding(mesh)), mask)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)


def test_sampling_follows_model_softmax(decode_models):
    """20000 sampled first tokens follow HF's softmax of the last logits: chi-square p-value
    > 1e-5 (false-failure probability 1e-5); categories expecting < 5 draws are pooled."""
    import scipy.stats

    hf, jm = decode_models
    ids = np.array([[0, 17, 5, 44, 30, 9]])
    n = 20000
    out = decode.generate(
        jm, ids, max_new_tokens=1, do_sample=True, top_k=0, num_return_sequences=n, seed=3
    )
    counts = np.bincount(out[:, -1], minlength=TINY["vocab_size"]).astype(float)
    p = torch.softmax(torch.as_tensor(hf_logits(hf, ids)[0, -1], dtype=torch.float64), -1).numpy()
    big = n * p >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(n * p[big], n * p[~big].sum())
    keep = expected > 0
    res = scipy.stats.chisquare(observed[keep], expected[keep] * observed.sum() / expected.sum())
    assert res.pvalue > 1e-5, (observed, expected)


@pytest.mark.slow
def test_pythia_160m_full_size(tmp_path):
    """EleutherAI/pythia-160m's real dimensions, random weights at HF's init, one left-padded
    batch; the parameter count is the published 162,322,944."""
    hf_cfg = transformers.GPTNeoXConfig(
        vocab_size=50304,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        bos_token_id=0,
        eos_token_id=0,
    )
    assert neox.NeoXConfig.from_hf_dict(hf_cfg.to_dict()) == neox.NeoXConfig.pythia_160m()
    torch.manual_seed(0)
    hf = transformers.GPTNeoXForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "pythia")
    model = neox.load_pretrained(tmp_path / "pythia")
    assert neox.num_params(model) == 162_322_944
    ids, mask = random_batch(3, 50304, [12, 8])
    ref = hf_logits(hf, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(forward(model, ids, mask))[valid], ref[valid], atol=ATOL)

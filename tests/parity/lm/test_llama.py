"""Llama-family checks beyond the one parity harness (tests/parity/lm/test_families.py, which has
the family's logits, formats, save, hub and generate rows): the rope scaling variants at full
weight scale, the grouped-query cache against the full forward, gradients against torch, bf16,
the sliding-window refusal, sharding and the config's HF spellings.

Reference models are random HF models (norm scales 1 + N(0, 0.2^2), biases N(0, 0.1^2), weights
std 0.3, or 2 / sqrt(D) at full width, see `_std`) saved by transformers and loaded through
`families.load_pretrained`. Logits: 1e-4 over non-padding positions (STYLE.md 3.8).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from collapse_jax.lm import decode, families, llama  # noqa: E402
from tests.helpers_opt import jit_forward as forward  # noqa: E402
from tests.helpers_opt import random_batch  # noqa: E402

pytestmark = pytest.mark.torch

ATOL = 1e-4
V = 97
LENGTHS = [9, 5, 1, 7]

# name -> (transformers class, config kwargs). Real configurations shrunk to 2 layers.
CASES = {
    # HuggingFaceTB/SmolLM2-135M at full width (GQA 9/3, tied head, theta 1e5), 2 layers.
    "smollm2_135m_2layers": (
        "LlamaForCausalLM",
        dict(
            vocab_size=V,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=2,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_theta=100000.0,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    # Llama 3.1's rope (llama3 scaling), untied, all attention and MLP biases.
    "llama3_rope_biases": (
        "LlamaForCausalLM",
        dict(
            vocab_size=V,
            hidden_size=48,
            intermediate_size=72,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            attention_bias=True,
            mlp_bias=True,
            max_position_embeddings=64,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "linear_rope": (
        "LlamaForCausalLM",
        dict(
            vocab_size=V,
            hidden_size=48,
            intermediate_size=72,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=3.0),
        ),
    ),
    # max_position_embeddings 6 < the test's lengths: the NTK rescaling is active.
    "dynamic_rope": (
        "LlamaForCausalLM",
        dict(
            vocab_size=V,
            hidden_size=48,
            intermediate_size=72,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=6,
            rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
        ),
    ),
}
# Qwen2 and Mistral configs for the HF round trip (their logits are harness rows).
ROUND_TRIP = [
    (
        "Qwen2ForCausalLM",
        dict(
            vocab_size=V,
            hidden_size=36,
            num_attention_heads=6,
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=64,
            max_window_layers=1,
            num_hidden_layers=2,
        ),
    ),
    ("MistralForCausalLM", dict(vocab_size=V, hidden_size=40, num_attention_heads=8, head_dim=12)),
]


def hf_config(cls_name: str, kw: dict):
    cfg_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    return cfg_cls(**{"pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2, **kw})


def make_hf_dir(root, name: str, cls_name: str, kw: dict, *, seed: int, std: float):
    """Saves a random HF model (norms 1 + N(0, 0.2^2), biases N(0, 0.1^2), weights N(0, std^2))."""
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(hf_config(cls_name, kw))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    transformers.utils.logging.disable_progress_bar()
    path = root / name
    model.save_pretrained(path)
    return path


def load_hf(path):
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def hf_logits(model, ids, mask=None) -> np.ndarray:
    """HF logits with HF generate's positions (cumsum(mask) - 1, padding 0) passed explicitly."""
    kw = {}
    if mask is not None:
        kw["attention_mask"] = torch.as_tensor(mask)
        kw["position_ids"] = torch.as_tensor(np.clip(np.cumsum(mask, 1) - 1, 0, None))
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long), **kw).logits.float().numpy()


def _std(width: int) -> float:
    """Weight std: 0.3 for the narrow models, 2 / sqrt(D) for the full-width ones (float32 error
    grows with the activations' scale: std 0.3 at D = 576 gives logits in the hundreds)."""
    return min(0.3, 2.0 / np.sqrt(width))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_cases")
    return {
        name: make_hf_dir(root, name, cls, kw, seed=i, std=_std(kw["hidden_size"]))
        for i, (name, (cls, kw)) in enumerate(CASES.items())
    }


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(hf_dirs, case):
    ids, mask = random_batch(1, V, LENGTHS)
    ref = hf_logits(load_hf(hf_dirs[case]), ids, mask)
    model = families.load_pretrained(hf_dirs[case])
    assert model.config.model_type == CASES[case][0].replace("ForCausalLM", "").lower()
    logits = np.asarray(forward(model, ids, mask))
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    valid = mask.astype(bool)
    assert np.abs(ref[valid]).max() > 1.0
    np.testing.assert_allclose(logits[valid], ref[valid], atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["smollm2_135m_2layers", "dynamic_rope"])
def test_cache_equals_full_forward(hf_dirs, case):
    """Chunked decoding through the GQA cache (K heads stored) equals the full forward."""
    model = families.load_pretrained(hf_dirs[case])
    cfg = model.config
    ids, mask = random_batch(4, V, LENGTHS)
    valid = mask.astype(bool)
    slot_mask = np.zeros((4, 13), np.int32)
    slot_mask[:, :9] = mask
    if case == "dynamic_rope":  # dynamic frequencies follow each call's longest position
        chunks = [9]
    else:
        chunks = [4, 1, 1, 1, 1, 1]
    full = np.asarray(forward(model, ids, mask))
    cache = model.init_cache(4, 13)
    assert cache.key.shape == (2, 4, 13, cfg.num_key_value_heads, cfg.head_dim)
    outs, start = [], 0
    for size in chunks:
        logits, cache = forward(model, ids[:, start : start + size], slot_mask, cache=cache)
        outs.append(np.asarray(logits))
        start += size
    inc = np.concatenate(outs, axis=1)
    # Same math, different reduction lengths (13 cache slots vs 9) at full width: float32
    # round-off only, within the whole-model tolerance.
    np.testing.assert_allclose(inc[valid], full[valid], atol=ATOL, rtol=0)


def test_config_round_trip_and_validation():
    for cls_name, kw in list(CASES.values()) + ROUND_TRIP:
        hf_cfg = hf_config(cls_name, kw)
        cfg = llama.LlamaConfig.from_hf_dict(hf_cfg.to_dict())
        back = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))(**cfg.to_hf_dict())
        assert llama.LlamaConfig.from_hf_dict(back.to_dict()) == cfg
    # transformers 4's spelling: top-level rope_theta and rope_scaling with "type".
    old = dict(
        model_type="llama",
        hidden_size=32,
        num_attention_heads=4,
        rope_theta=5e5,
        rope_scaling={"type": "linear", "factor": 2.0},
    )
    cfg = llama.LlamaConfig.from_hf_dict(old)
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_theta) == ("linear", 2.0, 5e5)
    assert cfg.num_key_value_heads == 4 and cfg.head_dim == 8
    with pytest.raises(ValueError, match="not a Llama-family config.*llama, mistral, qwen2"):
        llama.LlamaConfig.from_hf_dict({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        llama.LlamaConfig.from_hf_dict(dict(old, rope_scaling={"rope_type": "yarn", "factor": 2}))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        llama.LlamaConfig(num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(ValueError, match="divisible"):
        llama.LlamaConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="attention_bias"):
        llama.LlamaConfig(model_type="qwen2", attention_bias=True)
    with pytest.raises(ValueError, match="hidden_act"):
        llama.LlamaConfig(hidden_act="gelu_fast_and_wrong")


def _tiny(**kw) -> llama.LlamaConfig:
    base = dict(
        vocab_size=53,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return llama.LlamaConfig(**{**base, **kw})


def test_sliding_window_refuses_longer_sequences(key):
    model = families.init_random(_tiny(model_type="mistral", sliding_window=8), key)
    model(jnp.ones((1, 8), jnp.int32))  # within the window: exact
    with pytest.raises(ValueError, match="exceeds the model's sliding_window 8"):
        model(jnp.ones((1, 9), jnp.int32))
    with pytest.raises(ValueError, match="sliding_window"):
        model.init_cache(1, 9)
    with pytest.raises(ValueError, match="sliding_window"):
        decode.generate(model, np.full((1, 5), 3), max_new_tokens=4, num_beams=2)


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_mixed_precision(hf_dirs, param_dtype):
    path = hf_dirs["llama3_rope_biases"]
    ids, mask = random_batch(8, V, LENGTHS)
    ref = np.asarray(forward(families.load_pretrained(path), ids, mask))
    model = families.load_pretrained(path, dtype=jnp.bfloat16, param_dtype=param_dtype)
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
        assert leaf.dtype == param_dtype
    with jax.numpy_dtype_promotion("strict"):
        logits = forward(model, ids, mask)
    assert logits.dtype == jnp.float32
    valid = mask.astype(bool)
    err = np.abs(np.asarray(logits) - ref)[valid]
    # bfloat16's relative step 2^-8 through 2 layers: a few percent of the logit scale; a wrong
    # cast (float16 overflow, int truncation) breaks the 0.1 bound.
    assert err.max() < 0.1 * np.abs(ref[valid]).max()


def test_gradients_match_torch(hf_dirs):
    """d(loss)/d(params) equals torch's autograd (float32, 1e-5), GQA and every bias included."""
    path = hf_dirs["llama3_rope_biases"]
    hf = load_hf(path)
    ids, mask = random_batch(7, V, [7, 4])
    labels = np.where(mask == 1, ids, -100)
    labels[:, :1] = -100
    labels[1, :4] = -100  # row 1's first token (predicted from padding)
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    out = hf(
        input_ids=torch.as_tensor(ids, dtype=torch.long),
        attention_mask=torch.as_tensor(mask),
        position_ids=torch.as_tensor(pos),
        labels=torch.as_tensor(labels, dtype=torch.long),
    )
    out.loss.backward()
    ref = {n: p.grad.numpy() for n, p in hf.named_parameters()}
    model = families.load_pretrained(path)
    graphdef, state = nnx.split(model)
    keep = jnp.asarray(labels[:, 1:] != -100)

    def loss_fn(state):
        logits = nnx.merge(graphdef, state)(jnp.asarray(ids), jnp.asarray(mask))
        logp = jax.nn.log_softmax(logits[:, :-1])
        picked = jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], axis=-1)[..., 0]
        return -(picked * keep).sum() / keep.sum()

    grads = jax.jit(jax.grad(loss_fn))(state)
    hf_grads = families.hf_state_dict(nnx.merge(graphdef, grads))
    for name, g in hf_grads.items():
        np.testing.assert_allclose(g, ref[name], atol=1e-5, rtol=0, err_msg=name)


def test_logical_axes_and_sharded_forward(key):
    """Every parameter names logical axes; on the (2, 2, 2) CPU mesh the logits are unchanged."""
    from collapse_jax.jaxtools import sharding

    cfg = _tiny(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2)
    model = families.init_random(cfg, key)
    allowed = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", None}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata()["out_sharding"]
        assert len(names) == var[...].ndim and set(names) <= allowed, path
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.kernel.get_metadata()["out_sharding"] == ("embed", "kv_heads", "head_dim")
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    ids, mask = random_batch(9, cfg.vocab_size, [8, 5, 3, 8])
    ref = np.asarray(forward(model, ids, mask))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.logical_to_sharding(state, mesh))
    k = state["model"]["layers"][0]["self_attn"]["k_proj"]["kernel"]
    assert k[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    fwd = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))
    out = fwd(state, jax.device_put(jnp.asarray(ids), sharding.batch_sharding(mesh)), mask)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)


def test_attention_dropout_training_mode(key):
    model = families.init_random(_tiny(attention_dropout=0.2), key)
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(random_batch(6, 53, [8, 5])[0])

    @functools.partial(jax.jit, static_argnums=2)
    def run(state, k, deterministic):
        return nnx.merge(graphdef, state)(ids, deterministic=deterministic, dropout_key=k)

    a, b = run(state, jax.random.key(1), False), run(state, jax.random.key(1), False)
    c, d = run(state, jax.random.key(2), False), run(state, jax.random.key(1), True)
    assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, d)
    with pytest.raises(ValueError, match="dropout_key"):
        model(ids, deterministic=False)

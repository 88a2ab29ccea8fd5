"""The one parity harness of every model family (`collapse_jax.lm.families`) with transformers.

Each row of `CASES` is a family's transformers class and config, shrunk to 2-3 layers with odd,
distinct sizes (plus one row per family at its real dimensions, checked without decoding). The
checks, the same for every row:

- logits: a random transformers model (PyTorch, float32; LayerNorm scales and biases randomised
  too, so a mapping bug in a 0/1-initialised parameter cannot hide) saved by transformers and
  loaded by `families.load_pretrained` gives the same logits on a left-padded batch (HF called
  with the positions its `generate` uses), within float32 tolerance;
- formats: safetensors, sharded safetensors with an index, `pytorch_model.bin` (with the names
  a base-model checkpoint uses and with buffers such as GPT-2's causal masks), and, for families
  that had HF Flax models, `flax_model.msgpack`, all give the same parameters;
- save: our random model -> `families.save_pretrained` (one file, and sharded) -> transformers
  `AutoModelForCausalLM.from_pretrained` -> the same logits as ours;
- hub: a hub cache built here loads by id with HF_HUB_OFFLINE=1;
- decoding (small rows): greedy and beam search with the repetition penalty token-identical to
  transformers' `generate` on left-padded prompts, with a second EOS id the model really emits;
  sampling's first token follows transformers' warped softmax (chi-square; the two samplers'
  random streams differ, so token identity cannot be asked of sampling).

Adding a family = its model file, its `Family` row in `lm.families.FAMILIES` and rows here.

Ties in decoding: the decode rows use weights of std 0.5, which spreads next-token log-probs
over several units, so no compared score gap is near the frameworks' ~1e-6 rounding difference
(see tests/parity/lm/test_decode_hf.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
from flax import serialization  # noqa: E402

from collapse_jax.lm import decode, families  # noqa: E402

pytestmark = pytest.mark.torch

SHA = "00112233445566778899aabbccddeeff00112233"


@dataclasses.dataclass(frozen=True)
class Case:
    """One parity row.

    Attributes:
      id: the test id.
      hf_model: transformers' causal-LM class name.
      config: transformers config keywords (with `model_type`'s config class `hf_config`).
      hf_config: transformers' config class name.
      family: the family `families.family_for` must pick.
      decode: run the generate checks (off for the real-dimension rows: they are slow).
      base_prefix: the prefix a base-model checkpoint (saved without the LM head) lacks.
      flax_embeddings: module names HF Flax stored as `nn.Embed`; None = the family had no HF
        Flax model (no msgpack to read).
      buffers: stored non-parameter tensors a checkpoint may carry, {name: shape}.
    """

    id: str
    hf_model: str
    hf_config: str
    config: dict[str, Any]
    family: str
    decode: bool = True
    base_prefix: str = ""
    flax_embeddings: tuple[str, ...] | None = None
    buffers: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    @property
    def vocab(self) -> int:
        return self.config["vocab_size"]


_OPT_TINY = dict(
    vocab_size=53,
    hidden_size=24,
    num_attention_heads=3,
    ffn_dim=40,
    num_hidden_layers=3,
    max_position_embeddings=120,
    dropout=0.0,
    attention_dropout=0.0,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=2,
)
_OPT = dict(
    hf_model="OPTForCausalLM",
    hf_config="OPTConfig",
    family="opt",
    base_prefix="model.",
    flax_embeddings=("embed_tokens", "embed_positions"),
)

CASES: tuple[Case, ...] = (
    Case("opt", config=dict(_OPT_TINY, word_embed_proj_dim=24), **_OPT),
    Case(
        "opt-post-ln-proj-untied",
        config=dict(
            _OPT_TINY,
            word_embed_proj_dim=16,
            do_layer_norm_before=False,
            tie_word_embeddings=False,
            num_hidden_layers=2,
        ),
        **_OPT,
    ),
    Case(
        "opt-125m-dims",
        config=dict(
            vocab_size=50272,
            hidden_size=768,
            num_attention_heads=12,
            ffn_dim=3072,
            num_hidden_layers=2,
            max_position_embeddings=2048,
            word_embed_proj_dim=768,
            dropout=0.0,
        ),
        decode=False,
        **_OPT,
    ),
)

_GPT2_TINY = dict(
    vocab_size=61,
    n_embd=30,
    n_head=5,
    n_layer=3,
    n_positions=90,
    n_inner=44,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    bos_token_id=60,
    eos_token_id=60,
)
_GPT2 = dict(
    hf_model="GPT2LMHeadModel",
    hf_config="GPT2Config",
    family="gpt2",
    base_prefix="transformer.",
    flax_embeddings=("wte", "wpe"),
)

CASES += (
    Case(
        "gpt2",
        config=_GPT2_TINY,
        buffers={"h.0.attn.bias": (1, 1, 90, 90), "h.1.attn.masked_bias": ()},
        **_GPT2,
    ),
    Case(
        "gpt2-untied-layer-scaled-gelu",
        config=dict(
            _GPT2_TINY,
            n_layer=2,
            n_inner=None,
            tie_word_embeddings=False,
            scale_attn_by_inverse_layer_idx=True,
            activation_function="gelu",
            layer_norm_epsilon=1e-4,
        ),
        **_GPT2,
    ),
    Case(
        "gpt2-124m-dims",
        config=dict(
            vocab_size=50257,
            n_layer=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=50256,
            eos_token_id=50256,
        ),
        decode=False,
        **_GPT2,
    ),
)

_LLAMA = dict(
    hf_model="LlamaForCausalLM",
    hf_config="LlamaConfig",
    family="llama",
    base_prefix="model.",
    flax_embeddings=("embed_tokens",),  # transformers 4 had FlaxLlamaForCausalLM
)
_QWEN2 = dict(
    hf_model="Qwen2ForCausalLM", hf_config="Qwen2Config", family="llama", base_prefix="model."
)
_MISTRAL = dict(
    hf_model="MistralForCausalLM",
    hf_config="MistralConfig",
    family="llama",
    base_prefix="model.",
    flax_embeddings=("embed_tokens",),
)
# HuggingFaceTB/SmolLM2-135M: GQA 9/3, tied head, rope theta 1e5, bos = eos = 0, no pad id.
_SMOLLM2 = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=None,
)
_ROTARY_BUFFER = {"layers.0.self_attn.rotary_emb.inv_freq": (32,)}  # older checkpoints' buffer

CASES += (
    Case(
        "smollm2-135m-2-layers",
        config=dict(_SMOLLM2, vocab_size=211, num_hidden_layers=2),
        buffers=_ROTARY_BUFFER,
        **_LLAMA,
    ),
    Case(
        "smollm2-135m-dims",
        config=dict(_SMOLLM2, vocab_size=49152, num_hidden_layers=30),
        decode=False,
        **_LLAMA,
    ),
    # Qwen/Qwen2.5-0.5B's width (GQA 14/2, q/k/v biases, tied head, theta 1e6), 2 layers.
    Case(
        "qwen2.5-0.5b-2-layers",
        config=dict(
            vocab_size=151,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=2,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            use_sliding_window=False,
            sliding_window=32768,
            max_window_layers=21,
            bos_token_id=150,
            eos_token_id=150,
        ),
        decode=False,
        **_QWEN2,
    ),
    Case(
        "qwen2-tiny-untied",
        config=dict(
            vocab_size=59,
            hidden_size=36,
            intermediate_size=52,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            bos_token_id=57,
            eos_token_id=58,
        ),
        **_QWEN2,
    ),
    # Mistral-7B's proportions: GQA 4:1, head_dim 12 != 40 / 8, a window longer than every
    # sequence here.
    Case(
        "mistral-tiny",
        config=dict(
            vocab_size=61,
            hidden_size=40,
            intermediate_size=56,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=12,
            max_position_embeddings=4096,
            sliding_window=4096,
            bos_token_id=1,
            eos_token_id=2,
        ),
        **_MISTRAL,
    ),
    # Llama 3.1's rope scaling, attention and MLP biases, untied head.
    Case(
        "llama3-rope-biases",
        config=dict(
            vocab_size=67,
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
            bos_token_id=1,
            eos_token_id=2,
        ),
        decode=False,
        **_LLAMA,
    ),
)

PROMPT = 24  # prompt length of the decode checks (left padding to it)
NEW = 16  # new tokens of the decode checks


def _special(case: Case) -> set[int]:
    c = case.config
    return {c.get(k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")} - {None}


def _prompts(case: Case, n: int, seed: int, total: int = PROMPT):
    """n left-padded prompts of lengths 1..total (BOS first where the family has one)."""
    rng = np.random.default_rng(seed)
    pad = case.config.get("pad_token_id")
    pad = case.config.get("eos_token_id", 0) if pad is None else pad
    bos = case.config.get("bos_token_id")
    ordinary = np.setdiff1d(np.arange(case.vocab), list(_special(case)))
    ids = np.full((n, total), pad, np.int64)
    mask = np.zeros((n, total), np.int64)
    for b, length in enumerate(rng.integers(1, total + 1, size=n)):
        ids[b, total - length :] = rng.choice(ordinary, size=length)
        if bos is not None:
            ids[b, total - length] = bos
        mask[b, total - length :] = 1
    return ids, mask


def _hf_random(case: Case, seed: int, std: float):
    """transformers' model of the case with random weights: matrices ~ N(0, std^2), norm scales
    1 + N(0, 0.2^2), biases N(0, 0.1^2)."""
    config = getattr(transformers, case.hf_config)(**case.config)
    torch.manual_seed(seed)
    model = getattr(transformers, case.hf_model)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return model.eval()


def _hf_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """HF logits with the positions `generate` gives left-padded rows (cumsum(mask) - 1)."""
    ids_t, mask_t = torch.as_tensor(ids), torch.as_tensor(mask)
    positions = (mask_t.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids_t, attention_mask=mask_t, position_ids=positions)
    return out.logits.float().numpy()


def _ours_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(model(jax.numpy.asarray(ids, np.int32), jax.numpy.asarray(mask, np.int32)))


def _assert_logits_close(ours, ref, mask, what: str):
    """Equal within float32 tolerance at the real tokens (padding positions are unspecified)."""
    keep = mask.astype(bool)
    scale = max(1.0, float(np.abs(ref[keep]).max()))
    np.testing.assert_allclose(ours[keep], ref[keep], rtol=0, atol=1e-4 * scale, err_msg=what)


def _assert_same_params(a, b):
    sa, sb = families.hf_state_dict(a), families.hf_state_dict(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def reference(request, tmp_path_factory):
    """(case, HF model, its saved directory) with weights of std 0.3."""
    case = request.param
    torch.set_num_threads(1)  # tiny models: threads only add noise on a shared CPU
    transformers.utils.logging.disable_progress_bar()
    model = _hf_random(case, seed=0, std=0.3 if case.decode else 0.02)
    path = tmp_path_factory.mktemp(case.id) / "hf"
    model.save_pretrained(path)
    return case, model, path


def test_family_is_picked_from_model_type(reference):
    case, hf, path = reference
    config = json.loads((path / "config.json").read_text())
    assert families.family_for(config).name == case.family
    ours = families.config_from_hf_dict(config)
    # The common properties every family's config has (the module docstring's contract), as
    # transformers' config names them.
    for name in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "tie_word_embeddings",
    ):
        assert getattr(ours, name) == getattr(hf.config, name), name
    heads = getattr(hf.config, "num_key_value_heads", None) or hf.config.num_attention_heads
    assert ours.num_key_value_heads == heads
    head_dim = getattr(hf.config, "head_dim", None)
    assert ours.head_dim == (head_dim or hf.config.hidden_size // hf.config.num_attention_heads)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        assert isinstance(getattr(ours, name), int), name
    assert families.config_from_hf_dict(ours.to_hf_dict()) == ours


def test_logits_match_transformers(reference):
    case, hf, path = reference
    ids, mask = _prompts(case, 6, seed=1, total=20)
    ours = families.load_pretrained(path)
    assert families.family_of(ours).name == case.family
    _assert_logits_close(_ours_logits(ours, ids, mask), _hf_logits(hf, ids, mask), mask, case.id)


def _flax_tree(case: Case, state: dict[str, np.ndarray], tied: bool) -> dict:
    """A torch state dict as HF Flax's parameter tree: 2-D weights become `kernel` = weight.T
    (nn.Dense, and GPT-2's FlaxConv1D, which stores [out, in]), embeddings `embedding`, 1-D
    weights (norms) `scale`; a tied model has no `lm_head` there."""
    tree: dict = {}
    for name, value in state.items():
        if tied and name.startswith("lm_head."):
            continue
        *modules, leaf = name.split(".")
        if leaf == "weight":
            if modules[-1] in case.flax_embeddings:
                leaf = "embedding"
            elif value.ndim == 1:
                leaf = "scale"
            else:
                leaf, value = "kernel", value.T
        node = tree
        for m in modules:
            node = node.setdefault(m, {})
        node[leaf] = np.ascontiguousarray(value)
    return tree


def _torch_state(hf) -> dict[str, Any]:
    return {k: v for k, v in hf.state_dict().items() if not k.endswith("inv_freq")}


def test_every_weight_format_gives_the_same_parameters(reference, tmp_path, monkeypatch):
    case, hf, path = reference
    want = families.load_pretrained(path)
    tied = want.config.tie_word_embeddings
    config_json = path / "config.json"

    def folder(name):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(config_json, d / "config.json")
        return d

    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    _assert_same_params(families.load_pretrained(sharded), want)

    state = _torch_state(hf)
    d = folder("bin")
    torch.save(state, d / "pytorch_model.bin")
    _assert_same_params(families.load_pretrained(d), want)

    # A base-model checkpoint: names without the prefix, no LM head; plus stored buffers.
    if tied and case.base_prefix:
        d = folder("bin_base")
        base = {
            k.removeprefix(case.base_prefix): v
            for k, v in state.items()
            if not k.startswith("lm_head.")
        }
        for name, shape in case.buffers.items():
            base[name] = torch.zeros(shape)
        torch.save(base, d / "pytorch_model.bin")
        _assert_same_params(families.load_pretrained(d), want)

    d = folder("bin_no_torch")
    torch.save(state, d / "pytorch_model.bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # the zip format needs no torch
    _assert_same_params(families.load_pretrained(d), want)
    monkeypatch.undo()

    if case.flax_embeddings is not None:
        d = folder("flax")
        numpy_state = {k: v.detach().numpy() for k, v in state.items()}
        tree = _flax_tree(case, numpy_state, tied)
        (d / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
        _assert_same_params(families.load_pretrained(d), want)


@pytest.mark.parametrize("max_shard_size", [None, 20_000], ids=["one_file", "sharded"])
def test_save_then_transformers_loads_the_same_logits(reference, tmp_path, max_shard_size):
    case, _, path = reference
    config = families.config_from_hf_dict(json.loads((path / "config.json").read_text()))
    ours = families.init_random(config, jax.random.key(3))
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    families.save_pretrained(ours, tmp_path / "saved", **kw)
    sharded = (tmp_path / "saved" / "model.safetensors.index.json").is_file()
    assert sharded == (max_shard_size is not None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert type(hf).__name__ == case.hf_model
    ids, mask = _prompts(case, 4, seed=2, total=12)
    _assert_logits_close(
        _ours_logits(ours, ids, mask), _hf_logits(hf.eval(), ids, mask), mask, case.id
    )
    _assert_same_params(families.load_pretrained(tmp_path / "saved"), ours)


def test_hub_id_loads_offline_from_the_hub_cache(reference, tmp_path, monkeypatch):
    case, _, path = reference
    repo = f"someone/{case.id}"
    base = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / SHA
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(SHA)
    for f in path.iterdir():
        shutil.copy(f, snap / f.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _assert_same_params(families.load_pretrained(repo), families.load_pretrained(path))


# --- decoding --------------------------------------------------------------------------------

DECODE_CASES = [c for c in CASES if c.decode]


@pytest.fixture(scope="module", params=DECODE_CASES, ids=[c.id for c in DECODE_CASES])
def decode_models(request, tmp_path_factory):
    """(case, HF model, our model, a second EOS id the model often emits) at weight std 0.5."""
    case = request.param
    torch.set_num_threads(1)
    hf = _hf_random(case, seed=1, std=0.5)
    path = tmp_path_factory.mktemp(case.id + "-decode") / "hf"
    hf.save_pretrained(path)
    ours = families.load_pretrained(path)
    ids, mask = _prompts(case, 10, seed=3)
    greedy = _hf_generate(hf, ids, mask, max_new_tokens=NEW)[:, PROMPT:]
    counts = np.bincount(greedy.ravel(), minlength=case.vocab)
    counts[list(_special(case))] = 0
    return case, hf, ours, int(counts.argmax())


def _hf_generate(hf, ids, mask, **kw) -> np.ndarray:
    with torch.no_grad():
        return hf.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), **kw).numpy()


def _compare(decode_models, ids, mask, **kw):
    case, hf, ours, _ = decode_models
    ref = _hf_generate(hf, ids, mask, **kw)
    got = decode.generate(ours, ids.astype(np.int32), mask.astype(np.int32), **kw)
    assert got.shape == ref.shape, (kw, got.shape, ref.shape)
    bad = np.flatnonzero((got != ref).any(axis=1))
    assert bad.size == 0, f"{case.id} {kw}: rows {bad} differ:\n{ref[bad[:3]]}\n{got[bad[:3]]}"
    return ref


def _eos(decode_models) -> list[int]:
    case, _, _, common = decode_models
    return [case.config["eos_token_id"], common]


def test_greedy_with_repetition_penalty_matches_generate(decode_models):
    ids, mask = _prompts(decode_models[0], 10, seed=4)
    eos = _eos(decode_models)
    out = _compare(
        decode_models,
        ids,
        mask,
        max_new_tokens=NEW,
        repetition_penalty=1.5,
        min_new_tokens=2,
        eos_token_id=eos,
    )
    assert np.isin(out[:, PROMPT:], eos).any(), "no row reached an EOS id"


def test_paper_beam_search_matches_generate(decode_models):
    """5 beams, a fixed number of new tokens, repetition penalty 3.0 (the paper's setting)."""
    ids, mask = _prompts(decode_models[0], 10, seed=5)
    _compare(
        decode_models,
        ids,
        mask,
        num_beams=5,
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        repetition_penalty=3.0,
    )


def test_beam_search_with_reached_eos_matches_generate(decode_models):
    ids, mask = _prompts(decode_models[0], 10, seed=6)
    eos = _eos(decode_models)
    out = _compare(
        decode_models,
        ids,
        mask,
        num_beams=4,
        num_return_sequences=2,
        max_new_tokens=NEW,
        repetition_penalty=1.3,
        length_penalty=1.5,
        eos_token_id=eos,
    )
    assert np.isin(out[:, PROMPT:], eos).any(), "no beam reached an EOS id"


def test_sampling_follows_the_warped_softmax(decode_models):
    """20000 first tokens for one prompt follow the model's warped softmax as transformers
    computes it: chi-square p-value > 1e-5 (false-failure probability 1e-5); tokens HF's
    top-k/top-p remove are never drawn. Categories with expected count < 5 are pooled."""
    import scipy.stats
    from transformers.generation import logits_process as lp

    case, hf, ours, _ = decode_models
    ids, _ = _prompts(case, 1, seed=7, total=6)
    mask = np.ones_like(ids)
    n = 20000
    out = decode.generate(
        ours,
        ids.astype(np.int32),
        mask.astype(np.int32),
        max_new_tokens=1,
        do_sample=True,
        num_return_sequences=n,
        eos_token_id=[],
        temperature=0.8,
        top_k=20,
        top_p=0.95,
        seed=11,
    )
    counts = np.bincount(out[:, -1], minlength=case.vocab).astype(float)
    with torch.no_grad():
        logits = hf(torch.as_tensor(ids)).logits[:, -1].float()
    procs = lp.LogitsProcessorList(
        [lp.TemperatureLogitsWarper(0.8), lp.TopKLogitsWarper(20), lp.TopPLogitsWarper(0.95)]
    )
    p = torch.softmax(procs(torch.as_tensor(ids), logits).double(), dim=-1)[0].numpy()
    assert counts[p == 0].sum() == 0
    big = n * p >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(n * p[big], n * p[~big].sum())
    keep = expected > 0
    res = scipy.stats.chisquare(observed[keep], expected[keep] * observed.sum() / expected.sum())
    assert res.pvalue > 1e-5, (observed, expected)

"""Token-for-token parity of `collapse_jax.lm.decode.generate` with transformers' `generate`.

One random tiny OPT is saved by transformers and loaded by both frameworks from that directory
(PyTorch CPU fp32 vs JAX CPU fp32). Every comparison is exact: a single differing token fails.

Ties: both sides break exact ties towards the lower index (`torch.topk`/`argmax` and
`lax.top_k`/`argmax`), but the two frameworks' logits differ by float rounding (~1e-6), so a
*near* tie between two candidates could flip either way. Random OPTs initialised at HF's std 0.02
have nearly flat next-token distributions; the test model uses std 0.5, which spreads its
log-probs over several units and makes every compared score gap many orders of magnitude larger
than the rounding noise, so the outcome does not depend on rounding.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from collapse_jax.lm import (  # noqa: E402
    decode,
    families,  # noqa: E402
    processors,
)
from collapse_jax.lm.settings import DecodeSettings  # noqa: E402
from tests.helpers_opt import load_hf_model, make_hf_opt_dir, random_batch  # noqa: E402

pytestmark = pytest.mark.torch

V = 53
PROMPT = 64
BATCH = 10
COMMON = 36  # a token the test model generates often: a second EOS id that is really reached


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = make_hf_opt_dir(
        tmp_path_factory.mktemp("decode_hf"), seed=0, init_std=0.5, max_position_embeddings=140
    )
    torch.set_num_threads(1)  # tiny model: threads only add noise on a shared CPU
    return load_hf_model(path), families.load_pretrained(path)


def prompts(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """n left-padded prompts of lengths 1..64 (BOS first), as ids and mask [n, 64]."""
    lengths = list(np.random.default_rng(seed).integers(1, PROMPT + 1, size=n))
    return random_batch(seed, V, lengths, total=PROMPT)


def hf_generate(hf, ids, mask, **kw) -> np.ndarray:
    with torch.no_grad():
        out = hf.generate(
            torch.as_tensor(ids, dtype=torch.long),
            attention_mask=None if mask is None else torch.as_tensor(mask, dtype=torch.long),
            **kw,
        )
    return out.numpy()


def compare(models, ids, mask, **kw) -> list[np.ndarray]:
    """Runs both in batches of BATCH prompts; asserts identical arrays; returns HF's outputs."""
    hf, jm = models
    outs = []
    for s in range(0, len(ids), BATCH):
        i = ids[s : s + BATCH]
        m = None if mask is None else mask[s : s + BATCH]
        ref = hf_generate(hf, i, m, **kw)
        got = decode.generate(jm, i, m, **kw)
        assert got.shape == ref.shape, (kw, s, got.shape, ref.shape)
        bad = np.flatnonzero((got != ref).any(axis=1))
        assert bad.size == 0, f"{kw}: prompts {s} + {bad} differ:\n{ref[bad[:3]]}\n{got[bad[:3]]}"
        outs.append(ref)
    return outs


def eos_rows(outs, eos_ids) -> tuple[int, int]:
    """(rows whose new tokens contain an EOS, total rows)."""
    hit = sum(int(np.isin(o[:, PROMPT:], eos_ids).any(axis=1).sum()) for o in outs)
    return hit, sum(len(o) for o in outs)


@pytest.mark.parametrize(
    "kw",
    [
        dict(max_new_tokens=24),
        dict(max_new_tokens=24, repetition_penalty=1.5, min_new_tokens=4, eos_token_id=[2, COMMON]),
    ],
    ids=["plain", "penalty_min_eos2"],
)
def test_greedy_matches_hf_on_50_left_padded_prompts(models, kw):
    ids, mask = prompts(50)
    outs = compare(models, ids, mask, **kw)
    hit, _ = eos_rows(outs, kw.get("eos_token_id", [2]))
    assert hit > 0, "no sequence reached EOS"


def test_paper_beam_search_matches_hf_on_50_left_padded_prompts(models):
    """The paper's setting: 5 beams, 64 new tokens, at least 64, repetition penalty 3.0."""
    ids, mask = prompts(50, seed=2)
    outs = compare(
        models,
        ids,
        mask,
        num_beams=5,
        max_new_tokens=64,
        min_new_tokens=64,
        repetition_penalty=3.0,
    )
    assert all(o.shape == (BATCH, PROMPT + 64) for o in outs)


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_beams=3, num_return_sequences=2),
        dict(num_beams=4, early_stopping=True, length_penalty=2.0),
        dict(num_beams=4, early_stopping="never", length_penalty=-0.5),
        dict(num_beams=2, early_stopping="never", length_penalty=1.5, repetition_penalty=1.3),
        dict(num_beams=6, early_stopping=False, length_penalty=0.0, min_new_tokens=3),
    ],
    ids=["k3_ret2", "k4_es_true_lp2", "k4_never_lp-0.5", "k2_never_lp1.5_rp", "k6_lp0_min3"],
)
def test_beam_variants_match_hf_with_reached_eos(models, kw):
    ids, mask = prompts(20, seed=3)
    eos = [2, COMMON]
    outs = compare(models, ids, mask, max_new_tokens=12, eos_token_id=eos, **kw)
    hit, _ = eos_rows(outs, eos)
    assert hit > 0


def test_beam_without_eos_and_inferred_mask(models):
    """No attention_mask: transformers infers it from the pad id, and so must we; no EOS id
    (eos_token_id=[] on both sides) so every beam runs to max_new_tokens."""
    ids, _ = prompts(10, seed=4)
    compare(models, ids, None, num_beams=3, max_new_tokens=10, repetition_penalty=2.0)
    full = np.random.default_rng(5).integers(3, V, size=(10, 7))
    compare(
        models, full, None, num_beams=3, max_new_tokens=10, eos_token_id=[], early_stopping=True
    )


def _hf_probs(hf, ids, **warp) -> np.ndarray:
    """Next-token probabilities after HF's own warpers, from HF's logits (float64)."""
    from transformers.generation import logits_process as lp

    with torch.no_grad():
        logits = hf(torch.as_tensor(ids, dtype=torch.long)).logits[:, -1].float()
    procs = lp.LogitsProcessorList()
    if warp.get("temperature", 1.0) != 1.0:
        procs.append(lp.TemperatureLogitsWarper(warp["temperature"]))
    if warp.get("top_k"):
        procs.append(lp.TopKLogitsWarper(warp["top_k"]))
    if warp.get("top_p", 1.0) < 1.0:
        procs.append(lp.TopPLogitsWarper(warp["top_p"]))
    scores = procs(torch.as_tensor(ids), logits)
    return torch.softmax(scores.double(), dim=-1)[0].numpy()


@pytest.mark.parametrize(
    "warp", [dict(top_k=0), dict(temperature=0.7, top_k=10, top_p=0.9)], ids=["plain", "warped"]
)
def test_sampling_follows_model_softmax(models, warp):
    """20000 independent first tokens for one prompt follow the model's (warped) softmax as
    computed by transformers: chi-square p-value > 1e-5 (false-failure probability 1e-5), and
    tokens that HF's top-k/top-p remove are never drawn. Categories with expected count < 5 are
    pooled."""
    hf, jm = models
    ids = np.array([[2, 17, 5, 44, 30, 9]])
    n = 20000
    out = decode.generate(
        jm,
        ids,
        max_new_tokens=1,
        do_sample=True,
        num_return_sequences=n,
        eos_token_id=[],
        seed=7,
        **warp,
    )
    counts = np.bincount(out[:, -1], minlength=V).astype(float)
    p = _hf_probs(hf, ids, **warp)
    assert counts[p == 0].sum() == 0
    big = n * p >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(n * p[big], n * p[~big].sum())
    keep = expected > 0
    import scipy.stats

    res = scipy.stats.chisquare(observed[keep], expected[keep] * observed.sum() / expected.sum())
    assert res.pvalue > 1e-5, (observed, expected)


def test_processors_match_hf_exactly():
    """Repetition penalty (with HF v5's left-padding exclusion), top-k (and min_tokens_to_keep),
    top-p and temperature give bit-identical scores to transformers' processors."""
    from transformers.generation import logits_process as lp

    rng = np.random.default_rng(0)
    r, v, p = 6, 40, 9
    scores = (rng.normal(size=(r, v)) * 3).astype(np.float32)
    ids = rng.integers(0, v, size=(r, p))
    mask = np.ones((r, p), np.int64)
    mask[1, :4] = mask[3, :8] = 0
    pad_len = torch.as_tensor(mask).ne(0).int().argmax(dim=1)
    t_ids, t_scores = torch.as_tensor(ids), torch.as_tensor(scores)
    import jax.numpy as jnp

    seen = processors.prompt_seen(jnp.asarray(ids), jnp.asarray(mask), v)
    ref = lp.RepetitionPenaltyLogitsProcessor(2.5, prompt_ignore_length=pad_len)(t_ids, t_scores)
    np.testing.assert_array_equal(
        processors.repetition_penalty(jnp.asarray(scores), seen, 2.5), ref
    )
    for k, keep in [(5, 1), (1, 2), (v + 3, 1)]:
        ref = lp.TopKLogitsWarper(k, min_tokens_to_keep=keep)(t_ids, t_scores.clone())
        np.testing.assert_array_equal(processors.top_k_filter(jnp.asarray(scores), k, keep), ref)
    for top_p, keep in [(0.9, 1), (0.5, 1), (0.05, 2), (1.0, 1)]:
        ref = lp.TopPLogitsWarper(top_p, min_tokens_to_keep=keep)(t_ids, t_scores.clone())
        np.testing.assert_array_equal(
            processors.top_p_filter(jnp.asarray(scores), top_p, keep), ref
        )
    s = DecodeSettings(max_new_tokens=1, do_sample=True, temperature=0.7, top_k=7, top_p=0.8)
    procs = lp.LogitsProcessorList(
        [lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(7), lp.TopPLogitsWarper(0.8)]
    )
    np.testing.assert_array_equal(
        processors.process_scores(jnp.asarray(scores), seen, jnp.int32(0), s),
        procs(t_ids, t_scores.clone()),
    )

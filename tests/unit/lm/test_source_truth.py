"""The exact collapse metrics (collapse_jax.lm.truth) on hand-computed cases and on sources."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_jax.lm import source as S
from collapse_jax.lm import truth


@pytest.fixture(scope="module")
def src():
    return S.build_source(S.SourceConfig(vocab_size=12, order=1, support=5, zipf_a=1.0, seed=2))


def _random_conditionals(seed, shape, v, zeros=3):
    p = np.random.default_rng(seed).dirichlet(np.ones(v), shape)
    p[..., :zeros] = 0.0  # some tokens impossible in every context
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def test_truth_has_zero_kl_and_full_retention():
    p = _random_conditionals(0, (4, 7), 9)
    v = truth.per_context(p, jnp.log(p))
    np.testing.assert_allclose(v["kl"], 0.0, atol=1e-6)
    np.testing.assert_allclose(v["retention"], 1.0, atol=1e-5)
    np.testing.assert_allclose(v["cross"], v["entropy"], atol=1e-5)


def test_kl_matches_direct_sum_and_counts_mass_off_the_source():
    p = np.asarray(_random_conditionals(1, (5,), 6), np.float64)
    # A model over 6 source tokens + 3 special tokens: its mass on specials is lost to the source.
    full = np.random.default_rng(2).dirichlet(np.ones(9), 5)
    log_q = np.log(full[:, :6])
    want = np.array([sum(pi * np.log(pi / qi) for pi, qi in zip(pr, qr) if pi > 0)
                     for pr, qr in zip(p, full[:, :6])])  # fmt: skip
    np.testing.assert_allclose(truth.kl_to_truth(p, log_q), want, rtol=1e-5)
    assert np.all(want > 0)


def test_tail_weights_by_hand():
    p = jnp.array([0.5, 0.3, 0.15, 0.05, 0.0])
    w = truth.tail_weights(p, 0.1)
    # Lightest first: 0.0 is not in the distribution; 0.05 fully in; 0.15 with 0.05 / 0.15.
    np.testing.assert_allclose(w, [0.0, 0.0, 1 / 3, 1.0, 0.0], atol=1e-6)
    q_model = jnp.array([0.25, 0.25, 0.25, 0.15, 0.10])
    np.testing.assert_allclose(
        truth.tail_mass_ratio(p, q_model, 0.1), (0.15 + 0.25 / 3) / 0.1, rtol=1e-5
    )
    # A model that dropped the tail tokens retains nothing; q >= 1 takes the whole distribution.
    cut = jnp.array([0.6, 0.4, 0.0, 0.0, 0.0])
    assert float(truth.tail_mass_ratio(p, cut, 0.1)) == 0.0
    np.testing.assert_allclose(truth.tail_weights(p, 1.0), [1, 1, 1, 1, 0])


def test_tail_mass_is_q_for_random_conditionals():
    p = _random_conditionals(3, (50,), 20)
    for q in (0.05, 0.1, 0.3):
        w = truth.tail_weights(p, q)
        np.testing.assert_allclose((w * p).sum(-1), q, atol=1e-6)


def test_summarize_contexts_uses_the_mask():
    values = {"kl": np.array([1.0, 3.0, 100.0]), "retention": np.array([0.5, 1.0, 0.0]),
              "cross": np.array([2.0, 4.0, 0.0]), "entropy": np.array([1.0, 1.0, 0.0])}  # fmt: skip
    out = truth.summarize_contexts(values, np.array([True, True, False]))
    assert out["kl_to_truth"] == 2.0 and out["tail_retention"] == 0.75
    assert out["model_nll"] - out["true_entropy"] == out["kl_to_truth"]


def test_data_true_nll_of_source_samples_is_the_entropy_rate(src):
    """Mean NLL of stationary samples = entropy rate within 5 SE (false failure < 1e-6)."""
    x = np.asarray(src.sample(jax.random.key(3), 300, 40))
    out = truth.data_true_nll(src, x)
    assert out["invalid_rate"] == 0.0 and out["per_block"].shape == (300,)
    h, _ = src.entropy_rate
    per = -np.asarray(src.log_prob(x), np.float64)[:, 1:].mean(1)
    assert abs(per.mean() - h) < 5 * per.std(ddof=1) / np.sqrt(len(per))
    np.testing.assert_allclose(out["mean"], out["per_block"].mean(), rtol=1e-6)


def test_data_true_nll_counts_impossible_tokens(src):
    x = np.asarray(src.sample(jax.random.key(4), 2, 10))
    impossible = next(t for t in range(12) if t not in src.support[x[0, 4]])
    bad = x.copy()
    bad[0, 5] = impossible  # zero true probability; position 6's context is still defined
    bad[1, 9] = 99  # not a source token
    out = truth.data_true_nll(src, bad)
    lpb = -np.asarray(src.log_prob(bad), np.float64)
    assert lpb[0, 5] == np.inf and lpb[1, 9] == np.inf
    # Position 6 of block 0 may be impossible too (its context changed). The foreign token is
    # block 1's last, so no position has an undefined context.
    invalid = np.isinf(lpb)
    assert not np.isnan(lpb).any()
    assert out["invalid_rate"] == pytest.approx(invalid.mean())
    want = [lpb[b][~invalid[b]].mean() for b in range(2)]
    np.testing.assert_allclose(out["per_block"], want, rtol=1e-6)


def test_support_coverage_by_hand(src):
    k, ctx, tok, mass = src.transitions()
    # All transitions present -> coverage 1, nothing lost.
    blocks = np.stack([ctx, tok], axis=1)
    full = truth.support_coverage(src, blocks)
    assert full["support_coverage"] == 1.0 and full["lost_mass"] == pytest.approx(0.0, abs=1e-12)
    assert full["vocab_coverage"] == 1.0 and full["vocab_lost_mass"] == 0.0
    # One block with two transitions (one of them twice) and one foreign token.
    a, b = (ctx[0], tok[0]), (ctx[7], tok[7])
    one = np.array([[a[0], a[1], 99, b[0], b[1], 99, a[0], a[1]]])
    out = truth.support_coverage(src, one)
    assert out["support_coverage"] == pytest.approx(2 / len(ctx))
    assert out["lost_mass"] == pytest.approx(1 - mass[0] - mass[7])
    toks = {a[0], a[1], b[0], b[1]}
    assert out["vocab_coverage"] == pytest.approx(len(toks) / 12)
    assert out["vocab_lost_mass"] == pytest.approx(1 - src.unigram[list(toks)].sum())


def test_entropy_and_repetition_by_hand():
    blocks = np.array([[0, 1, 0, 1, 0, 1], [2, 2, 2, 2, 2, 2]])
    # Frequencies 3/12, 3/12, 6/12.
    want = -(2 * 0.25 * np.log(0.25) + 0.5 * np.log(0.5))
    assert truth.data_entropy(blocks, 3) == pytest.approx(want)
    # Bigrams: block 0 has (0,1),(1,0),(0,1),(1,0),(0,1): 2 distinct of 5; block 1: 1 of 5.
    assert truth.repetition_rate(blocks, n=2) == pytest.approx(((1 - 2 / 5) + (1 - 1 / 5)) / 2)


def test_hmm_data_metrics(key):
    hmm = S.build_source(S.SourceConfig(kind="hmm", vocab_size=10, support=4, hidden_states=4,
                                        hidden_support=2, entropy_sequences=64,
                                        entropy_length=64))  # fmt: skip
    x = np.asarray(hmm.sample(key, 64, 64))
    m = truth.data_metrics(hmm, x)
    assert m["data_invalid_rate"] == 0.0 and 0 < m["support_coverage"] <= 1
    assert m["data_true_nll_per_block"].shape == (64,)
    # Exact conditionals of the truth under its own metrics.
    p = hmm.next_token_probs(x)
    out = truth.summarize_contexts(truth.per_context(p, jnp.log(p)), np.ones(x.shape, bool))
    assert out["kl_to_truth"] == pytest.approx(0.0, abs=1e-6)
    assert out["tail_retention"] == pytest.approx(1.0, abs=1e-5)


def test_tail_retention_is_bounded_one_for_the_truth_zero_without_tail():
    p = _random_conditionals(5, (50, 3), 9)
    np.testing.assert_allclose(truth.tail_retention(p, p, 0.1), 1.0, atol=1e-5)
    w = np.asarray(truth.tail_weights(p, 0.1))
    no_tail = np.where(w > 0, 0.0, p)  # every (even partial) tail token gets nothing
    np.testing.assert_array_equal(truth.tail_retention(p, no_tail, 0.1), 0.0)
    rng = np.random.default_rng(6)
    for a in (0.05, 1.0, 20.0):  # random models, peaked to flat
        q = rng.dirichlet(np.full(9, a), (50, 3)).astype(np.float32)
        kept = np.asarray(truth.tail_retention(p, q, 0.1))
        assert np.all((kept >= 0) & (kept <= 1))
    # A uniform model keeps all of a tail whose tokens are each below 1/V, where the old
    # unbounded retention scores above 1.
    p1 = np.array([0.6, 0.3, 0.06, 0.04], np.float32)
    u = np.full(4, 0.25, np.float32)
    assert float(truth.tail_retention(p1, u, 0.1)) == pytest.approx(1.0)
    assert float(truth.tail_mass_ratio(p1, u, 0.1)) == pytest.approx(5.0)


def test_off_support_mass_counts_impossible_and_special_tokens():
    p = np.array([0.5, 0.5, 0.0], np.float32)
    # A model over 3 source tokens + 2 specials: 0.1 on the impossible token, 0.2 on specials.
    q = np.array([0.4, 0.3, 0.1, 0.1, 0.1], np.float32)
    got = truth.off_support_mass(p, jnp.log(q[:3]))
    assert float(got) == pytest.approx(0.3, abs=1e-6)
    assert float(truth.off_support_mass(p, jnp.log(p))) == pytest.approx(0.0, abs=1e-6)


def test_floored_nll_scores_impossible_tokens_and_skips_position_0(src):
    x = np.asarray(src.sample(jax.random.key(4), 2, 10))
    bad = x.copy()
    bad[1, 9] = 99  # not a source token: its NLL floored at -log 1e-6
    out = truth.data_true_nll(src, bad, skip_first=True)
    lpb = np.minimum(-np.asarray(src.log_prob(bad), np.float64)[:, 1:], -np.log(truth.NLL_FLOOR))
    np.testing.assert_allclose(out["floored_per_block"], lpb.mean(1), rtol=1e-6)
    np.testing.assert_allclose(out["invalid_per_block"], [0.0, 1 / 9])
    assert out["floored_mean"] > out["mean"]


@pytest.mark.parametrize("skip_first", [False, True])
def test_a_block_without_a_possible_token_scores_the_floor_not_nan(src, skip_first):
    # a from-scratch model can write such a block; a NaN metric would stop the run
    x = np.array(src.sample(jax.random.key(4), 2, 10))
    x[1] = 99  # no source token at all: nothing possible, nothing scored after position 0
    out = truth.data_true_nll(src, x, skip_first=skip_first)
    floor = -np.log(truth.NLL_FLOOR)
    for k in ("per_block", "floored_per_block"):
        assert np.isfinite(out[k]).all() and out[k][1] == pytest.approx(floor)
    assert out["invalid_per_block"][1] == 1.0
    clean = truth.data_true_nll(src, x[:1], skip_first=skip_first)
    assert out["per_block"][0] == clean["per_block"][0] and out["mean"] == clean["mean"]


@pytest.mark.parametrize("order", [1, 2])
def test_min_block_nll_is_the_best_block_by_brute_force(order):
    """Heterogeneous weights (Zipf over 2 to 4 continuations), every block of 5 tokens."""
    s = S.build_source(S.SourceConfig(vocab_size=4, order=order, support=4, support_min=2,
                                      zipf_a=1.3, seed=1))  # fmt: skip
    every = np.array(list(itertools.product(range(4), repeat=5)), np.int32)
    nll = -np.asarray(s.log_prob(every), np.float64)[:, 1:].mean(1)
    assert truth.min_block_nll(s, 5) == pytest.approx(nll.min(), rel=1e-5)

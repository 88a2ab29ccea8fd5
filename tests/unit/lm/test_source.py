"""Exactness of the ground-truth sources (collapse_jax.lm.source).

Enumerated probabilities are compared with independent NumPy references (the chain's arrays, or a
brute-force sum over hidden paths); samplers pass a chi-square test at p > 0.01 (fixed keys, so a
false failure has probability < 1% per test, and the seeds never change).
"""

import itertools

import jax
import numpy as np
import pytest
from scipy import stats

from collapse_jax.config import ConfigError
from collapse_jax.lm import source as S

TINY = {
    "markov1": S.SourceConfig(kind="markov", vocab_size=4, order=1, support=3, zipf_a=1.0, seed=3),
    "markov2": S.SourceConfig(kind="markov", vocab_size=4, order=2, support=2, zipf_a=1.5, seed=1),
    "hmm": S.SourceConfig(
        kind="hmm", vocab_size=4, support=3, hidden_states=3, hidden_support=2, zipf_a=0.7,
        seed=2, entropy_sequences=64, entropy_length=64,
    ),
}  # fmt: skip
T = 3


def _all_sequences(v: int, t: int) -> np.ndarray:
    return np.array(list(itertools.product(range(v), repeat=t)), np.int32)  # [V^T, T]


def _reference_probs(src: S.GroundTruthSource, seqs: np.ndarray) -> np.ndarray:
    """Sequence probabilities computed directly from the source's arrays (no JAX code)."""
    v = src.vocab_size
    if isinstance(src, S.HMMSource):
        hs = src.pi.shape[0]
        out = np.zeros(len(seqs))
        for i, x in enumerate(seqs):
            for path in itertools.product(range(hs), repeat=len(x)):
                p = src.pi[path[0]] * src.emission[path[0], x[0]]
                for t in range(1, len(x)):
                    p *= src.transition[path[t - 1], path[t]] * src.emission[path[t], x[t]]
                out[i] += p
        return out
    k = src.config.order
    dense = np.zeros((v**k, v))
    np.put_along_axis(dense, src.support.astype(np.int64), src.weights, axis=1)
    out = np.zeros(len(seqs))
    for i, x in enumerate(seqs):
        if len(x) < k:  # a prefix shorter than the order: marginal of the stationary k-gram
            out[i] = src.pi.reshape((v,) * k)[tuple(x)].sum()
            continue
        c = int(sum(x[j] * v ** (k - 1 - j) for j in range(k)))
        p = src.pi[c]
        for t in range(k, len(x)):
            p *= dense[c, x[t]]
            c = (c * v + int(x[t])) % v**k
        out[i] = p
    return out


@pytest.mark.parametrize("name", sorted(TINY))
def test_enumerated_probabilities_are_exact(name):
    src = S.build_source(TINY[name])
    seqs = _all_sequences(4, T)
    logp = np.asarray(src.log_prob(seqs), np.float64)  # [64, T]
    p = np.exp(logp.sum(1))
    ref = _reference_probs(src, seqs)
    np.testing.assert_allclose(p.sum(), 1.0, atol=1e-5)
    np.testing.assert_allclose(p, ref, atol=1e-6, rtol=1e-4)
    # next_token_probs is the distribution log_prob reads from, and sums to one everywhere.
    rows = np.asarray(src.next_token_probs(seqs), np.float64)  # [64, T, V]
    np.testing.assert_allclose(rows.sum(-1), 1.0, atol=1e-5)
    picked = np.take_along_axis(rows, seqs[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.log(np.maximum(picked, 1e-30)), np.maximum(logp, np.log(1e-30)),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    # Conditionals equal ratios of enumerated prefix probabilities: p(x_t | x_<t) =
    # p(x_<=t) / p(x_<t), the brute-force marginalisation (over hidden paths for the HMM).
    # Position t of a full sequence only looks at its prefix, so `rows` serves every prefix.
    for t in range(T):
        num = _reference_probs(src, _all_sequences(4, t + 1)).reshape(-1, 4)  # [V^t, V]
        want = num / np.maximum(num.sum(1, keepdims=True), 1e-300)
        got = rows[:: 4 ** (T - t), t]  # sequences are in lexicographic order: one per prefix
        live = num.sum(1) > 0
        np.testing.assert_allclose(got[live], want[live], atol=2e-6)


@pytest.mark.parametrize("name", sorted(TINY))
def test_sampled_frequencies_pass_chi_square(name):
    """Chi-square of 40000 sampled sequences against the enumerated probabilities (p > 0.01)."""
    src = S.build_source(TINY[name])
    seqs = _all_sequences(4, T)
    ref = _reference_probs(src, seqs)
    # The compiled path, and (for one source: it is slow) the uncompiled one.
    runs = ((40_000, False), (2_000, True)) if name == "markov1" else ((40_000, False),)
    for n, disable in runs:
        with jax.disable_jit(disable):
            x = np.asarray(src.sample(jax.random.key(7), n, T))
        assert x.shape == (n, T) and x.dtype == np.int32
        codes = (x * 4 ** np.arange(T - 1, -1, -1)).sum(1)
        counts = np.bincount(codes, minlength=len(seqs))
        assert counts[ref == 0].sum() == 0, "sampled an impossible sequence"
        expected = ref * n
        big = expected >= 5  # pool the rare cells (chi-square validity)
        obs = np.append(counts[big], counts[~big].sum())
        exp = np.append(expected[big], expected[~big].sum())
        if exp[-1] == 0:
            obs, exp = obs[:-1], exp[:-1]
        assert stats.chisquare(obs, exp).pvalue > 0.01


def test_markov_stationary_and_exact_entropy_rate():
    """pi P = pi, and the exact rate matches -mean log p of a long sample within 5 SE
    (false-failure probability < 1e-6)."""
    src = S.build_source(S.SourceConfig(vocab_size=32, order=2, support=6, zipf_a=1.1, seed=4))
    k, ctx, tok, mass = src.transitions()
    assert k == 2
    np.testing.assert_allclose(mass.sum(), 1.0, atol=1e-12)
    # The mass flowing into context (b, c) is the stationary probability of (b, c).
    inflow = np.bincount((ctx % 32) * 32 + tok, weights=mass, minlength=32 * 32)
    np.testing.assert_allclose(inflow, src.pi, atol=1e-12)
    h, se = src.entropy_rate
    assert se == 0.0
    x = src.sample(jax.random.key(1), 400, 200)
    nll = -np.asarray(src.log_prob(x), np.float64)[:, 2:].mean(1)  # stationary positions
    assert abs(nll.mean() - h) < 5 * nll.std(ddof=1) / np.sqrt(len(nll))


def test_hmm_entropy_rate_estimate():
    """The MC rate agrees with -mean log p of an independent sample's late positions within 5
    combined SE, and the bound gap is small (false-failure probability < 1e-5)."""
    cfg = S.SourceConfig(kind="hmm", vocab_size=16, support=6, hidden_states=6, hidden_support=3,
                         seed=5, entropy_sequences=128, entropy_length=96)  # fmt: skip
    src = S.build_source(cfg)
    h, se = src.entropy_rate
    assert 0 < se < 0.05 and 0 <= src.entropy_rate_gap < 0.01
    x = src.sample(jax.random.key(11), 128, 96)  # the estimate's shapes: no new compilation
    nll = -np.asarray(src.log_prob(x), np.float64)[:, 48:].mean(1)
    se2 = nll.std(ddof=1) / np.sqrt(len(nll))
    assert abs(nll.mean() - h) < 5 * np.hypot(se, se2)


def test_tokens_outside_the_vocabulary():
    """Out-of-vocabulary ids are impossible (-inf); Markov contexts holding one are undefined."""
    src = S.build_source(TINY["markov1"])
    lp = np.asarray(src.log_prob(np.array([[0, 7, 1, 2]], np.int32)))
    assert lp[0, 1] == -np.inf and np.isnan(lp[0, 2]) and np.isfinite(lp[0, 0])
    hmm = S.build_source(TINY["hmm"])
    lp = np.asarray(hmm.log_prob(np.array([[0, -1, 1, 2]], np.int32)))
    assert lp[0, 1] == -np.inf and np.isfinite(lp[0, 2:]).all()


def test_build_is_deterministic_and_saved(tmp_path):
    cfg = S.SourceConfig(vocab_size=16, support=5, seed=9)
    a = S.MarkovSource(cfg)
    b = S.MarkovSource(cfg)
    np.testing.assert_array_equal(a.support, b.support)
    assert (
        S.MarkovSource(S.SourceConfig(vocab_size=16, support=5, seed=10)).summary()["checksum"]
        != a.summary()["checksum"]
    )
    S.save_source(a, tmp_path)
    back = S.load_source(tmp_path)
    assert back.summary() == a.summary()
    # A tampered saved source is refused with one line naming the file.
    text = (tmp_path / "source.json").read_text().replace(a.summary()["checksum"], "0" * 16)
    (tmp_path / "source.json").write_text(text)
    with pytest.raises(ValueError, match="source.json"):
        S.load_source(tmp_path)


@pytest.mark.parametrize(
    "kw, key",
    [({"order": 3}, "source.order"), ({"support": 1}, "source.support"),
     ({"vocab_size": 8, "support": 9}, "source.support"), ({"zipf_a": -1.0}, "source.zipf_a")],
)  # fmt: skip
def test_bad_config_names_the_key(kw, key):
    with pytest.raises(ConfigError, match=key):
        S.SourceConfig(**kw)


def test_heterogeneous_supports_and_dirichlet_weights():
    cfg = dict(vocab_size=16, support=6, seed=3)
    base = S.build_source(S.SourceConfig(**cfg))
    het = S.build_source(S.SourceConfig(**cfg, support_min=2))
    diri = S.build_source(S.SourceConfig(**cfg, weights="dirichlet", dirichlet_alpha=0.5))
    sizes = (het.weights > 0).sum(1)
    assert sizes.min() >= 2 and sizes.max() <= 6 and len(set(sizes.tolist())) > 1
    for s in (het, diri):
        np.testing.assert_allclose(s.weights.sum(1), 1.0)
        # The same supports as the homogeneous source (up to the forced item's rank).
        assert all(set(a) == set(b) for a, b in zip(s.support, base.support))
        x = np.asarray(s.sample(jax.random.key(0), 50, 30))
        assert np.isfinite(np.asarray(s.log_prob(x))).all()  # zero weights are never drawn
    # Dirichlet rows: the mode's probability differs from context to context.
    assert np.ptp(diri.weights[:, 0]) > 0.2
    with pytest.raises(Exception, match="source.support_min"):
        S.SourceConfig(kind="hmm", support_min=2)


def test_a_pretrained_base_is_refused_where_the_related_language_is_undefined():
    """The base's related language changes the Zipf exponent; a Dirichlet-weights source has
    none to change, so `pretrain:` would pretrain on the truth itself: refused in one line."""
    from collapse_jax import config as config_lib

    path = config_lib.find_config("lm/truth_markov_beam")
    with pytest.raises(config_lib.ConfigError, match="weights: dirichlet has none"):
        config_lib.load_config(path, ["model.data.source.weights=dirichlet"])
    with pytest.raises(config_lib.ConfigError, match="no base to pretrain"):
        config_lib.load_config(path, ["model.kind=ngram"])
    cfg = config_lib.load_config(
        path, ["model.data.source.weights=dirichlet", "model.pretrain=null"]
    )
    assert cfg.model.pretrain is None

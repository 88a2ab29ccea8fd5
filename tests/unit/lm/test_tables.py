"""The table learners of the known language (collapse_jax.lm.tables): the oracle is the truth,
the exact learner's estimate is the counts, and the decoders treat a table like a transformer."""

import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_jax import config as config_lib
from collapse_jax.lm import source as S
from collapse_jax.lm import tables, truth
from collapse_jax.lm.experiment import ORIGIN_REAL, OPTLearner, blocks_of
from collapse_jax.lm.processors import process_scores
from collapse_jax.lm.settings import DecodeSettings


def _markov(**kw):
    return S.build_source(S.SourceConfig(**{"vocab_size": 12, "support": 5, "seed": 2, **kw}))


@pytest.mark.parametrize(
    "cfg",
    [
        dict(kind="markov", order=1),
        dict(kind="markov", order=2),
        dict(kind="hmm", vocab_size=10, support=4, hidden_states=4, hidden_support=2),
    ],
)
def test_the_oracle_is_the_truth(cfg, key):
    src = _markov(**cfg)
    x = np.asarray(src.sample(key, 6, 9))
    want = np.log(np.asarray(src.next_token_probs(x)))
    got = np.asarray(tables.oracle_table(src).log_probs(x))
    np.testing.assert_allclose(np.exp(got), np.exp(want), atol=1e-6)


@pytest.mark.parametrize("order", [1, 2])
def test_the_exact_learner_is_the_counts(order):
    v, alpha = 5, 0.3
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, v, (7, 11)).astype(np.int32)
    blocks[2, 4] = -1  # an impossible token: the windows holding it are not counted
    counts = np.zeros((v**order, v))
    for row in blocks:
        for t in range(order, len(row)):
            w = row[t - order : t + 1]
            if (w >= 0).all():
                ctx = sum(int(w[i]) * v ** (order - 1 - i) for i in range(order))
                counts[ctx, w[-1]] += 1
    want = (counts + alpha) / (counts.sum(1, keepdims=True) + alpha * v)
    table = tables.fit_counts(blocks, order, v, alpha)
    np.testing.assert_allclose(np.exp(np.asarray(table.log_table)), want, rtol=1e-6)
    np.testing.assert_array_equal(tables.transition_counts(blocks, order, v), counts)
    # alpha = 0 is the maximum-likelihood estimate (unseen rows uniform).
    mle = np.exp(np.asarray(tables.fit_counts(blocks, order, v, 0.0).log_table))
    seen = counts.sum(1) > 0
    np.testing.assert_allclose(
        mle[seen], counts[seen] / counts[seen].sum(1, keepdims=True), rtol=1e-6
    )
    np.testing.assert_allclose(mle[~seen], 1.0 / v)


def _learner(kind="opt", **model):
    data = {"kind": "source", "source": {"vocab_size": 12, "support": 5, "seed": 2,
            **model.pop("source", {})}, "num_train_blocks": 64, "num_eval_blocks": 8,
            "block_size": 24}  # fmt: skip
    raw = dict(data=data, example_prompt=None, generate_batch_size=32, eval_batch_size=8, **model)
    cls = config_lib.model_config_class(kind)
    return OPTLearner(config_lib.build(cls, raw, "model"))


@pytest.mark.parametrize("zipf_a", [0.0, 1.0])
@pytest.mark.parametrize("beams", [1, 5])
def test_the_oracle_under_greedy_and_beam_reaches_the_minimum_nll(zipf_a, beams):
    """Every context of these sources has the same weights, so the per-token floor is
    -log max_x p(x | c) = -log w_1 everywhere (log s for uniform weights): greedy attains it at
    every step, and so does beam search (the greedy path is always a top candidate)."""
    learner = _learner(
        kind="oracle",
        source={"zipf_a": zipf_a},
        decode={
            "max_new_tokens": 24,
            "min_new_tokens": 24,
            "num_beams": beams,
            "repetition_penalty": 1.0,
        },  # fmt: skip
    )
    src = learner.ground_truth()
    params = learner.init(jax.random.key(0))
    data = blocks_of(learner.sample(jax.random.key(1), params, 64))
    floor = -np.log(S.zipf_weights(5, zipf_a)[0])
    nll = truth.data_true_nll(src, S.to_source_ids(data, 12))
    assert nll["invalid_rate"] == 0.0
    # The first token of a block is scored under the unigram (above the floor): positions 1..T-1.
    logp = np.asarray(src.log_prob(S.to_source_ids(data, 12)))[:, 1:]
    np.testing.assert_allclose(-logp.mean(1), floor, rtol=1e-5)
    assert truth.min_block_nll(src, 24) == pytest.approx(floor, rel=1e-6)


def test_the_oracle_under_sampling_keeps_the_entropy_rate(key):
    """T=1 sampling from the oracle: every generation's blocks are exact stationary samples, so
    their true NLL per token (positions 1..T-1, whose law is the stationary one) has mean H.
    Each generation's mean is within 3.5 standard errors of H (per-block means are independent
    across blocks): false-failure probability <= 4 x 4.7e-4 < 0.2% over the 4 generations."""
    learner = _learner(
        kind="oracle",
        decode={
            "max_new_tokens": 24,
            "min_new_tokens": 24,
            "num_beams": 1,
            "do_sample": True,
            "top_k": 0,
            "repetition_penalty": 1.0,
        },  # fmt: skip
    )
    src = learner.ground_truth()
    h, _ = src.entropy_rate
    params = learner.init(jax.random.key(0))
    data = learner.real_data(jax.random.key(0))
    for g in range(4):
        params = learner.fit(jax.random.key(10 + g), data, params)
        data = learner.stamp(learner.sample(jax.random.fold_in(key, g), params, 64), g)
        assert np.all(data["origin"] == g)
        nll = truth.data_true_nll(src, S.to_source_ids(data["data"], 12), skip_first=True)
        per_block = nll["per_block"]
        se = per_block.std(ddof=1) / np.sqrt(len(per_block))
        assert abs(nll["mean"] - h) < 3.5 * se, (g, nll["mean"], h, se)
        assert nll["invalid_rate"] == 0.0


def test_the_counts_learner_fits_and_persists(tmp_path):
    learner = _learner(kind="ngram", count_smoothing=0.5)
    data = learner.real_data(jax.random.key(0))
    params = learner.fit(jax.random.key(1), data, learner.init(jax.random.key(0)))
    assert np.all(data["origin"] == ORIGIN_REAL)
    blocks = S.to_source_ids(data["data"], 12)
    want = tables.smoothed(tables.transition_counts(blocks, 1, 12), 0.5)
    np.testing.assert_allclose(np.exp(np.asarray(params.model.log_table)), want, rtol=1e-6)
    learner.save_params(tmp_path, params)
    back = learner.load_params(tmp_path, None)
    np.testing.assert_array_equal(back.model.log_table, params.model.log_table)
    m = learner.evaluate(jax.random.key(2), params, learner.reference(None))
    assert 0 < m["kl_to_truth"] < 1 and m["ppl"] > 1


def test_table_logits_forbid_special_ids():
    src = _markov()
    table = tables.oracle_table(src)
    ids = jnp.asarray(S.to_model_ids(np.asarray(src.sample(jax.random.key(0), 3, 6))))
    logits, _ = table.decoder().prefill(ids, jnp.ones_like(ids), 2, 4)
    assert logits.shape == (6, 12 + S.TOKEN_OFFSET)
    assert np.all(np.isneginf(np.asarray(logits[:, : S.TOKEN_OFFSET])))
    # Sampling T=1 with top_k 0 draws from the whole table: every support token appears.
    settings = DecodeSettings(max_new_tokens=40, do_sample=True, eos_token_ids=(2,))
    new = tables.generate(table, np.repeat(np.asarray(ids[:1]), 200, 0), settings, seed=0,
                          batch_size=100)  # fmt: skip
    first = S.to_source_ids(new[:, 0], 12)
    ctx = int(S.to_source_ids(np.asarray(ids[0, -1]), 12))
    assert set(first.tolist()) == set(src.support[ctx].tolist())
    assert list(itertools.chain(*new.tolist())) and new.min() >= S.TOKEN_OFFSET


def test_table_learners_need_a_source():
    with pytest.raises(Exception, match="model.kind: 'oracle' needs a ground-truth source"):
        config_lib.build(config_lib.model_config_class("oracle"), {}, "model")
    with pytest.raises(Exception, match="model.kind: 'ngram' estimates a Markov chain"):
        _learner(kind="ngram", source={"kind": "hmm"})


def test_data_metrics_of_the_synthetic_part_next_to_the_pool():
    learner = _learner(
        kind="oracle",
        decode={
            "max_new_tokens": 24,
            "min_new_tokens": 24,
            "num_beams": 3,
            "repetition_penalty": 1.0,
        },  # fmt: skip
    )
    real = learner.real_data(jax.random.key(0))
    params = learner.init(jax.random.key(0))
    synth = learner.stamp(learner.sample(jax.random.key(1), params, 48), 0)
    pool = learner.concat([synth, learner.draw_real(jax.random.key(2), 16)])
    assert pool["origin"].tolist() == [0] * 48 + [ORIGIN_REAL] * 16
    m = learner.data_metrics(pool)
    assert m["synthetic_share"] == 0.75
    alone = learner.data_metrics({"data": synth["data"], "origin": synth["origin"]})
    for k in ("support_coverage", "lost_mass", "data_true_nll", "data_repetition"):
        assert m[f"synthetic_{k}"] == alone[k]
    # Beam search from the oracle loses support that the kept real blocks put back.
    assert m["support_coverage"] > m["synthetic_support_coverage"]
    assert "synthetic_support_coverage" not in learner.data_metrics(real)
    sub = learner.subset(jax.random.key(3), pool, 10)
    for row, origin in zip(sub["data"], sub["origin"]):  # every block keeps its provenance
        (i,) = np.nonzero((pool["data"] == row).all(1))[0][:1]
        assert pool["origin"][i] == origin


def test_sampling_configs_draw_from_the_whole_distribution():
    """`top_k: 0` is no truncation (not transformers' default 50), and the T=1 sampling configs
    set every knob of the paper's decode block back (beams 1, no penalty)."""
    configs = pathlib.Path(__file__).resolve().parents[3] / "collapse_jax" / "configs" / "lm"
    for name in ("truth_markov_sample", "truth_oracle_sample", "truth_counts_sample"):
        d = config_lib.load_config(configs / f"{name}.yaml").model.decode
        assert (d.do_sample, d.num_beams, d.top_k, d.top_p) == (True, 1, 0, 1.0), name
        assert (d.temperature, d.repetition_penalty) == (1.0, 1.0), name
    scores = jax.random.normal(jax.random.key(0), (4, 67))
    seen = jnp.zeros((4, 67), bool)
    full = DecodeSettings(max_new_tokens=1, do_sample=True, top_k=0)
    np.testing.assert_array_equal(process_scores(scores, seen, jnp.int32(0), full), scores)
    cut = DecodeSettings(max_new_tokens=1, do_sample=True, top_k=50)
    kept = np.isfinite(np.asarray(process_scores(scores, seen, jnp.int32(0), cut)))
    assert kept.sum(1).tolist() == [50] * 4

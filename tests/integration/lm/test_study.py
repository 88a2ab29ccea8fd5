"""The LM study (`collapse_jax.lm.study`), its quick version shrunk further, run end to end; the
checks read the figures' data (seed means, the decomposition, the provenance histograms), not
only the files."""

import csv
import json

import numpy as np
import pytest

from collapse_jax import config as config_lib
from collapse_jax.lm import study, study_data

pytestmark = pytest.mark.slow

# The quick study, smaller still: 3 generations, 32 blocks of 16 tokens, a width-16 OPT, a base
# pretrained on 128 blocks; three learners, two decoders, the policy that keeps real blocks.
EXTRA = {
    "generation.num_generations": 3,
    "model.data.num_train_blocks": 32,
    "model.data.num_eval_blocks": 16,
    "model.train.epochs": 1,
    "model.random_init.hidden_size": 16,
    "model.random_init.ffn_dim": 32,
    "model.pretrain.num_blocks": 128,
    "model.pretrain.train.epochs": 1,
    "model.generate_batch_size": 32,
    "model.eval_batch_size": 16,
}
GRID = dict(learners=("oracle", "counts", "base"), decoders=("beam", "sample"), policies=("mix10",))


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return study.run_study(out, "quick", extra=EXTRA, **GRID)


def test_the_grid_is_one_product_with_per_learner_blocks(done):
    assert len(done.points) == 3 * 2 * 1 * 3
    by = {(p["overrides"]["learner"], p["overrides"]["seed"]): c
          for p, c in zip(done.points, done.configs)}  # fmt: skip
    assert by[("oracle", "0")].model.pretrain is None and by[("oracle", "0")].model.kind == "oracle"
    assert by[("base", "1")].model.pretrain.num_blocks == 128 and by[("base", "1")].seed == 1
    assert by[("base", "1")].model.data.seed == 1
    spec = json.loads((done.out / "sweep.json").read_text())
    assert spec["choices"]["learner"]["counts"]["model.kind"] == "ngram"
    assert (done.out / "points" / "p000-learner=oracle-decoder=beam-seed=0").is_dir()
    with pytest.raises(config_lib.ConfigError, match="study learners"):
        study.grid("quick", learners=("oracle", "nope"))


def test_the_heterogeneous_source_runs_without_the_base():
    """`source: heterogeneous` sets Dirichlet weights and 4-16 continuations in every point and
    leaves out the base learner, whose related language it does not define (refused if named)."""
    axes = dict(study.grid("full", source="heterogeneous"))
    assert [c.label for c in axes["learner"]] == ["oracle", "counts", "scratch"]
    for choice in axes["learner"]:
        assert choice.overrides["model.data.source.weights"] == "dirichlet"
        assert choice.overrides["model.data.source.support_min"] == 4
    with pytest.raises(config_lib.ConfigError, match="'base' needs source zipf"):
        study.grid("full", source="heterogeneous", learners=("oracle", "base"))
    with pytest.raises(config_lib.ConfigError, match="study source"):
        study.grid("full", source="nope")
    zipf = dict(study.grid("full"))
    assert [c.label for c in zipf["learner"]] == list(study.LEARNERS)
    assert "model.data.source.weights" not in zipf["learner"][0].overrides


def test_the_oracle_under_sampling_writes_data_at_the_entropy_rate(done):
    table = study_data.cells(done)
    h = float(np.nanmean(table[("oracle", "sample", "mix10")]["entropy_rate"]))
    # every synthetic block of generations 1-2 (3 seeds), each block's mean true NLL over
    # positions 1.. (independent blocks): the mean is the entropy rate; 4 s.e. (false failure
    # about 6e-5 for a normal mean)
    blocks = np.concatenate(
        [
            study_data.histogram_data(done, g, "mix10")[("oracle", "sample")]["synthetic"]
            for g in (1, 2)
        ]
    )
    se = blocks.std(ddof=1) / np.sqrt(blocks.size)
    assert abs(blocks.mean() - h) < 4 * se, (blocks.mean(), h, se)
    # the seed means the figure draws are the same data
    mean, se_seeds, n = study_data.mean_se(
        table[("oracle", "sample", "mix10")]["synthetic_data_true_nll_floored"]
    )
    assert (n[1:] == 3).all() and np.isfinite(se_seeds[1:]).all()
    # beam search on the truth writes far more probable blocks than the language (the decoder)
    beam = table[("oracle", "beam", "mix10")]["synthetic_data_true_nll_floored"][:, 1:]
    assert np.all(beam < h - 0.5)
    kl = table[("oracle", "sample", "mix10")]["kl_to_truth"]
    assert np.all(np.abs(kl) < 1e-5)


def test_the_decomposition_parts_sum_to_the_total(done):
    table = study_data.cells(done)
    for name in study_data.DECOMPOSED:
        parts = study_data.decomposition(table, name)
        assert set(parts) == set(table)
        for (learner, dec, _), d in parts.items():
            total = sum(d[p] for p in study_data.PARTS)
            np.testing.assert_allclose(total[:, 1:], d["total"][:, 1:], rtol=1e-9, atol=1e-12)
            if learner != "base":  # the exact learner and the oracle: no approximation part
                np.testing.assert_array_equal(d["approximation"], 0.0)
            if learner == "oracle":
                np.testing.assert_array_equal(d["recursion"], 0.0)
            if dec == "sample":
                np.testing.assert_array_equal(d["decoder"], 0.0)
        # the oracle's decoder part of the lost mass under beam search is what beam does to
        # the truth's own samples: positive at every generation and seed
        if name == "synthetic_lost_mass":
            assert np.all(parts[("oracle", "beam", "mix10")]["decoder"][:, 1:] > 0)


def test_metrics_csv_and_provenance_histograms(done):
    table = study_data.cells(done)
    rows = list(csv.DictReader((done.out / "metrics.csv").open()))
    assert len(rows) == 3 * 2 * 3  # (learner, decoder) x generations 0-2
    row = next(
        r
        for r in rows
        if (r["learner"], r["decoder"], r["generation"]) == ("counts", "sample", "2")
    )
    mean, se, n = study_data.mean_se(table[("counts", "sample", "mix10")]["kl_to_truth"])
    assert float(row["kl_to_truth"]) == pytest.approx(mean[2], rel=1e-5)
    assert float(row["kl_to_truth_se"]) == pytest.approx(se[2], rel=1e-5)
    assert row["kl_to_truth_n"] == "3"
    hist = study_data.histogram_data(done, 2, "mix10")
    for d in hist.values():  # 10 % of 32 blocks are real, in each of the 3 seeds
        assert d["real"].size == 3 * 3 and d["synthetic"].size == 3 * 29
    files = {p.name for p in (done.out / "figures").iterdir()}
    want = {"study_kl_to_truth.png", "study_nll_mix10.png", "study_decomposition_kl_to_truth.png",
            "study_decomposition_synthetic_lost_mass.png"}  # fmt: skip
    assert want <= files

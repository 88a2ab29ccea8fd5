"""The paper's LM experiment as a learner: the shrunk real-text CPU config through two
generations, its nested config blocks, the corpus vocabulary and the unigram baseline."""

import json

import numpy as np
import pytest

from collapse_jax import config as config_lib
from collapse_jax import loop, plots
from collapse_jax.lm import evaluate, families
from collapse_jax.lm.vocab import Vocab
from collapse_jax.rundir import fileio, reader


def _cfg(data_dir, *overrides):
    """collapse_jax/configs/lm/opt_wikitext_cpu_keep10.yaml, shrunk to seconds (its own shipped
    blocks)."""
    import pathlib

    path = (
        pathlib.Path(__file__).resolve().parents[3]
        / "collapse_jax/configs/lm/opt_wikitext_cpu_keep10.yaml"
    )
    base = dict(
        o.split("=", 1)
        for o in [
            "name=opt_smoke",
            f"model.data.source={data_dir / 'wikitext-2-raw'}",
            f"model.data.tokenizer_path={data_dir / 'opt-125m-tokenizer'}",
            "model.data.max_train_blocks=12",
            "model.data.valid_holdout=8",
            "model.data.max_eval_blocks=8",
            "model.random_init.hidden_size=16",
            "model.random_init.ffn_dim=32",
            "model.train.epochs=2",
            "model.train.batch_size=8",
            "model.decode.num_beams=2",
            "model.generate_batch_size=12",
            "generation.num_generations=2",
            "generation.alpha=0.75",
            "generation.gamma=0.25",
        ]
    )
    base.update(o.split("=", 1) for o in overrides)
    return config_lib.load_config(path, [f"{k}={v}" for k, v in base.items()])


def test_partial_blocks_lie_over_the_papers_defaults(data_dir):
    cfg = _cfg(data_dir)
    assert cfg.model.decode.repetition_penalty == 3.0 and cfg.model.decode.num_beams == 2
    assert cfg.model.decode.min_new_tokens == 64 and cfg.model.train.keep_best


# Two runs (seeds) in one directory; blocks and continuations of 16 tokens (not 64) make the
# beam search 4x shorter without changing what is checked.
SMALL = (
    "generation.num_trials=2",
    "model.data.block_size=16",
    "model.decode.max_new_tokens=16",
    "model.decode.min_new_tokens=16",
)


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
    cfg = _cfg(data_dir, *SMALL)
    return cfg, loop.run_generations(cfg, tmp_path_factory.mktemp("lm") / "full")


def test_two_runs_two_generations_and_the_papers_figures(full_run):
    """Two runs in one directory: their data, models and per-run arrays, and the paper's
    figures over both."""
    cfg, full = full_run
    assert [r["generation"] for r in full.rows] == [0, 1]
    for r in full.rows:
        assert np.isfinite(r["ppl"]) and r["ppl"] > 1
        assert r["unigram_ppl"] == full.rows[0]["unigram_ppl"] > 1
        assert r["selected_epoch"] in (1.0, 2.0, 1.5)  # the mean over the two runs
    run = reader.Run(full.run_dir)
    data0 = fileio.load_npz(run.data_path(0))["data"]
    data1 = fileio.load_npz(run.data_path(1))["data"]
    # Run 1 lives in chain_00001/ with its own seed: the same real data, its own regeneration.
    other1 = fileio.load_npz(full.run_dir / "data" / "chain_00001" / "gen_00001.npz")["data"]
    assert np.array_equal(
        fileio.load_npz(full.run_dir / "data" / "chain_00001" / "gen_00000.npz")["data"], data0
    )
    assert other1.shape == data1.shape and not np.array_equal(other1, data1)
    # Each run trains from its own random init: the runs' perplexities differ.
    ppl_runs = run.arrays(0)["trials/ppl"]
    assert ppl_runs.shape == (2,) and ppl_runs[0] != ppl_runs[1]
    assert data0.shape == data1.shape == (12, 16) and data1.dtype == np.int32
    # Saved data are OPT ids (not the model's compact ids): 9 regenerated blocks, 3 original.
    real = {tuple(b) for b in data0}
    assert sum(tuple(b) in real for b in data1) == 3
    assert data1.max() > 1000
    # The model is saved in the Hugging Face layout with its compact vocabulary and id map.
    p1 = run.params_dir(1)
    ids = np.load(p1 / "token_ids.npy")
    assert json.loads((p1 / "config.json").read_text())["vocab_size"] == len(ids)
    assert set(np.unique(data0)) <= set(ids.tolist())
    arrays = run.arrays(1)
    assert arrays["trials/per_sequence_ppl"].shape == (2, 8)
    assert arrays["trials/valid_ppl_curve"].shape == (2, 2)
    assert arrays["trials/example_continuation"].shape == (2, 16)
    # The paper's figures and Example 1.
    files = plots.make_figures(run, loop.make_learner(cfg))
    assert {f.name for f in files} >= {
        "lm_test_perplexity.png",
        "perplexity_histograms.png",
        "train_perplexity_under_gen0.png",
        "train_perplexity_under_gen0_3d.png",
        "example_continuations.txt",
    }
    text = (full.run_dir / "example_continuations.txt").read_text()
    assert "Input: " in text and "Gen 0, run 1: " in text and "Gen 1, run 2: " in text
    under0 = [
        fileio.load_npz(full.run_dir / "analysis" / f"train_ppl_under_gen0_{g:05d}.npz")["ppl"]
        for g in (0, 1)
    ]
    assert under0[0].shape == under0[1].shape == (24,)  # both runs' blocks, pooled
    assert np.all(np.isfinite(under0[1])) and np.all(under0[1] > 1)


def test_killed_after_generation_0_resumes_identically(full_run, tmp_path):
    """Killed after generation 0, then resumed: the same metrics, byte for byte (timings
    aside), and the same data in every run."""
    cfg, full = full_run
    loop.run_generations(cfg, tmp_path / "part", stop_after=1)
    loop.run_generations(cfg, tmp_path / "part")

    def strip(rows):
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]

    part = json.loads((tmp_path / "part" / "metrics.json").read_text())
    assert strip(part) == strip(full.rows)
    for chain in ("", "chain_00001/"):
        want = fileio.load_npz(full.run_dir / "data" / f"{chain}gen_00001.npz")["data"]
        got = fileio.load_npz(tmp_path / "part" / "data" / f"{chain}gen_00001.npz")["data"]
        assert np.array_equal(got, want), chain or "run 0"


def test_bad_paths_are_named(data_dir, tmp_path):
    cfg = _cfg(data_dir, f"model.data.source={tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match="nowhere.*COLLAPSE_JAX_DATA"):
        loop.run_generations(cfg, tmp_path / "run")


def test_config_blocks_name_bad_keys():
    def build(model):
        return config_lib.from_dict({"name": "x", "model": {"kind": "opt", **model}})

    with pytest.raises(config_lib.ConfigError, match=r"model\.train\.epoch\b.*epochs"):
        build({"train": {"epoch": 3}})
    with pytest.raises(config_lib.ConfigError, match=r"model\.decode\.beams.*num_beams"):
        build({"decode": {"beams": 3}})
    with pytest.raises(config_lib.ConfigError, match=r"model\.data\.sourc\b.*source"):
        build({"data": {"sourc": "x"}})
    with pytest.raises(config_lib.ConfigError, match=r"model\.data\.kind.*wikitext"):
        build({"data": {"kind": "nope"}})
    with pytest.raises(config_lib.ConfigError, match=r"model\.decode.*min_new_tokens"):
        build({"decode": {"max_new_tokens": 8, "min_new_tokens": -1}})
    with pytest.raises(config_lib.ConfigError, match=r"model\.vocabulary"):
        build({"model_path": "facebook/opt-125m", "vocabulary": "corpus"})
    with pytest.raises(config_lib.ConfigError, match=r"model\.data.*valid_split: null"):
        build({"data": {"valid_holdout": 8}})
    # The defaults are the paper's protocol, and a config round-trips through its YAML.
    cfg = build({})
    assert cfg.model.decode.num_beams == 5 and cfg.model.decode.repetition_penalty == 3.0
    assert cfg.model.train.epochs == 5 and cfg.model.train.learning_rate == 2e-5
    assert cfg.model.train.keep_best and cfg.model.data.kind == "wikitext"
    again = config_lib.from_dict(config_lib.to_dict(cfg))
    assert again == cfg


def test_vocab_maps_both_ways():
    v = Vocab(np.array([1, 2, 7, 40000]), 50272)
    blocks = np.array([[2, 40000, 7], [1, 1, 2]])
    compact = v.to_model(blocks)
    assert compact.tolist() == [[1, 3, 2], [0, 0, 1]]
    assert np.array_equal(v.to_source(compact), blocks)
    with pytest.raises(ValueError, match=r"\[5\]"):
        v.to_model(np.array([[5, 7]]))


def test_unigram_perplexity_exact():
    # Train tokens: 0 x3, 1 x1 over V = 3 -> add-one p = (4, 2, 1) / 7.
    train = np.array([[0, 0, 0, 1]])
    evals = np.array([[2, 0, 1], [2, 2, 0]])  # targets (the first token is no target): 0 1 2 0
    p = np.array([4, 2, 1]) / 7
    want = np.exp(-np.mean(np.log(p[[0, 1, 2, 0]])))
    assert evaluate.unigram_perplexity(train, evals, 3) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        evaluate.unigram_perplexity(train, evals, 2)


def test_plan_estimates_disk():
    from collapse_jax.lm.experiment import OPTLearner

    cfg = config_lib.from_dict(
        {
            "name": "x",
            "model": {"kind": "opt", "model_path": "facebook/opt-125m"},
            "generation": {"num_generations": 10, "samples_per_generation": None},
        }
    )
    plan = OPTLearner(cfg.model).plan(cfg)
    assert plan["generations"] == 10 and plan["runs"] == 1
    # 125M float32 parameters: ~0.5 GB per kept model.
    assert plan["disk_bytes_estimate"] > 0.5e9


def test_plan_reads_the_model_size_from_a_local_folder_or_the_hub_cache(tmp_path, monkeypatch):
    """`--dry-run` sizes the model from its config.json when at hand without a download: a
    local folder, or a hub id already in the hub cache (network off); the count is the model's
    own parameter count (tied head once)."""
    import jax

    from collapse_jax.lm import opt
    from collapse_jax.lm.experiment import OPTLearner

    arch = opt.OPTConfig(
        vocab_size=300,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=24,
        max_position_embeddings=40,
    )
    want = families.num_params(families.init_random(arch, jax.random.key(0)))
    snap = tmp_path / "hub/models--someone--opt-mini/snapshots/0123456789abcdef"
    snap.mkdir(parents=True)
    (tmp_path / "hub/models--someone--opt-mini/refs").mkdir()
    (tmp_path / "hub/models--someone--opt-mini/refs/main").write_text("0123456789abcdef")
    (snap / "config.json").write_text(json.dumps(arch.to_hf_dict()))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def plan(path, keep="all"):
        cfg = config_lib.from_dict(
            {
                "name": "x",
                "model": {"kind": "opt", "model_path": str(path)},
                "generation": {"num_generations": 4, "keep_params": keep},
            }
        )
        return OPTLearner(cfg.model).plan(cfg)

    for path in (snap, "someone/opt-mini"):
        p = plan(path)
        assert p["parameters"] == want and p["models_kept_per_run"] == 4
    assert "hub cache" in plan("someone/opt-mini")["parameters_from"]
    # Keeping the first and last model writes less; an id not in the cache assumes OPT-125m.
    assert plan(snap, "first_last")["disk_bytes_estimate"] < p["disk_bytes_estimate"]
    assert plan("someone/elsewhere")["parameters"] == 125_239_296

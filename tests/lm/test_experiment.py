"""The paper's LM experiment as a learner: a tiny random OPT through two generations."""

import json

import numpy as np
import pytest

from collapse_jax import config as config_lib
from collapse_jax import generation, plots, records

pytestmark = pytest.mark.slow


def _cfg(data_dir, **gen):
    raw = {
        "name": "opt_smoke",
        "seed": 0,
        "model": {
            "kind": "opt",
            "random_init": {
                "hidden_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "ffn_dim": 32,
                "max_position_embeddings": 140,
                "seed": 0,
            },
            "tokenizer_path": str(data_dir / "opt-125m-tokenizer"),
            "data_source": str(data_dir / "wikitext-2-raw"),
            "train_split": "valid",
            "eval_split": "test",
            "max_train_blocks": 12,
            "max_eval_blocks": 8,
            "epochs": 1,
            "batch_size": 8,
            "learning_rate": 1e-3,
            "eval_batch_size": 8,
            "num_beams": 2,
            "max_new_tokens": 64,
            "min_new_tokens": 64,
            "generate_batch_size": 12,
        },
        # One device: the tiny model gains nothing from 8 simulated ones on 2 cores.
        "mesh": {"data": 1},
        "generation": {
            "num_generations": 2,
            "samples_per_generation": None,
            "policy": "mix",
            "alpha": 0.75,
            "beta": 0.0,
            "gamma": 0.25,
            "keep_params": "all",
            **gen,
        },
    }
    return config_lib.from_dict(raw)


def test_two_generations_resume_identically(data_dir, tmp_path):
    cfg = _cfg(data_dir)
    full = generation.run_generations(cfg, tmp_path / "full")
    assert [r["generation"] for r in full.rows] == [0, 1]
    assert all(np.isfinite(r["ppl"]) and r["ppl"] > 1 for r in full.rows)
    run = records.Run(full.run_dir)
    data0 = records.load_npz(run.data_path(0))["data"]
    data1 = records.load_npz(run.data_path(1))["data"]
    assert data0.shape == data1.shape == (12, 64) and data1.dtype == np.int32
    # 9 regenerated blocks (never real text) and 3 original blocks (gamma = 0.25).
    real = {tuple(b) for b in data0}
    assert sum(tuple(b) in real for b in data1) == 3
    # Each generation's model is saved in the Hugging Face layout.
    assert (run.params_dir(1) / "config.json").is_file()
    seq_ppl = run.arrays(1)["trials/per_sequence_ppl"]
    assert seq_ppl.shape == (1, 8)
    # The paper's histograms: every generation's training blocks under the generation-0 model.
    files = plots.make_figures(run, generation.make_learner(cfg))
    assert {f.name for f in files} >= {
        "perplexity_histograms.png",
        "train_perplexity_under_gen0.png",
    }
    under0 = [
        records.load_npz(full.run_dir / "analysis" / f"train_ppl_under_gen0_{g:05d}.npz")["ppl"]
        for g in (0, 1)
    ]
    assert under0[0].shape == under0[1].shape == (12,)
    assert np.all(np.isfinite(under0[1])) and np.all(under0[1] > 1)

    # Killed after generation 0, then resumed: the same metrics, byte for byte.
    generation.run_generations(cfg, tmp_path / "part", stop_after=1)
    generation.run_generations(cfg, tmp_path / "part")
    assert json.loads((tmp_path / "part" / "metrics.json").read_text()) == full.rows
    assert np.array_equal(
        records.load_npz(records.Run(tmp_path / "part").data_path(1))["data"], data1
    )


def test_bad_paths_are_named(data_dir, tmp_path):
    cfg = _cfg(data_dir)
    bad = config_lib.from_dict(
        {
            **config_lib.to_dict(cfg),
            "model": {**config_lib.to_dict(cfg.model), "data_source": str(tmp_path / "nowhere")},
        }
    )
    with pytest.raises(FileNotFoundError, match="nowhere"):
        generation.run_generations(bad, tmp_path / "run")


def test_config_validation():
    with pytest.raises(config_lib.ConfigError, match="model.min_new_tokens"):
        config_lib.from_dict({"name": "x", "model": {"kind": "opt", "min_new_tokens": 65}})
    with pytest.raises(config_lib.ConfigError, match="model.do_sample"):
        config_lib.from_dict({"name": "x", "model": {"kind": "opt", "do_sample": True}})

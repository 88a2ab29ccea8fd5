"""The memory plan of `collapse-jax run --dry-run` (collapse_jax.memplan): every compiled program
of a run lowered from abstract shapes, its per-device sizes, nothing run or written."""

from __future__ import annotations

import yaml

from collapse_jax import cli, memplan
from collapse_jax import config as config_lib

TINY_LM = {
    "name": "tiny_lm",
    "seed": 0,
    "model": {
        "kind": "opt",
        "model_path": None,
        "random_init": {
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "ffn_dim": 64,
            "max_position_embeddings": 80,
            "vocab_size": 128,
        },
        "vocabulary": "full",
        "train": {"batch_size": 8, "epochs": 1, "compute_dtype": "bfloat16"},
        "decode": {"max_new_tokens": 8, "min_new_tokens": 8, "num_beams": 3},
        "generate_batch_size": 4,
    },
    "mesh": {"data": 1},
    "generation": {"num_generations": 2, "samples_per_generation": None},
}
# 32-wide, 1 layer, 128 tokens, 82 positions (OPT's offset of 2), tied head.
TINY_LM_PARAMS = 128 * 32 + 82 * 32 + (4 * (32 * 32 + 32) + 2 * 32 * 64 + 64 + 32 + 4 * 32) + 64


def test_the_lm_plan_has_the_train_step_and_the_search_with_positive_sizes():
    planned = memplan.plan(config_lib.from_dict(TINY_LM))
    (train, search) = planned["tiny_lm"]
    assert train.name == "train step (8 x 64 tokens, bfloat16 compute)"
    assert search.name == "regeneration (4 prompts x 3 beams, 8 new tokens, float32)"  # CPU
    for r in (train, search):
        assert r.source == "compiled memory_analysis"
        assert r.argument > 0 and r.output > 0 and r.temp > 0 and r.total > 0
    # The step takes float32 parameters and AdamW's two moments, and donates them (aliased).
    assert train.argument >= 3 * 4 * TINY_LM_PARAMS
    assert train.alias >= 3 * 4 * TINY_LM_PARAMS
    # The search takes the parameters (float32) and returns [4, 8] tokens and scores.
    assert search.argument >= 4 * TINY_LM_PARAMS


def test_the_block_programs_of_a_jittable_learner_are_planned():
    cfg = config_lib.load_config(
        config_lib.find_config("theory_gaussian"),
        ["generation.num_trials=64", "generation.num_generations=5", "generation.block_size=4"],
    )
    rows = memplan.plan(cfg)["theory_gaussian"]
    assert [r.name for r in rows] == [
        "block: generation 0 (64 chains)",
        "block: generations 1-3 scanned (64 chains)",
    ]
    assert all(r.argument > 0 and r.output > 0 and r.total > 0 for r in rows)


def test_dry_run_prints_one_table_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "tiny_lm.yaml"
    path.write_text(yaml.safe_dump(TINY_LM))
    out = tmp_path / "run"
    assert cli.main(["run", str(path), "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    table = [line for line in text.splitlines() if line.startswith("# ")]
    head = next(i for i, line in enumerate(table) if "memory plan per device" in line)
    assert "device memory unknown" in table[head]  # the CPU does not say
    assert "train step (8 x 64 tokens" in table[head + 2]
    assert "regeneration (4 prompts x 3 beams" in table[head + 3]
    assert table[head + 4] == "# sizes from: compiled memory_analysis"
    assert not out.exists()

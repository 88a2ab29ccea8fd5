"""The known-language experiment with a GPT-NeoX from random init (truth_markov_beam_pythia.yaml
shrunk): two generations with the pretrained base; every saved model is a GPT-NeoX that loads
back by its config.json's model_type."""

import json
import pathlib

import numpy as np
import pytest

from collapse_jax import config as config_lib
from collapse_jax import loop
from collapse_jax.lm import families, neox
from tests.integration.lm.test_source_experiment import SHRINK

pytestmark = pytest.mark.slow

CONFIGS = pathlib.Path(__file__).resolve().parents[3] / "collapse_jax" / "configs" / "lm"
CONFIG = CONFIGS / "truth_markov_beam_pythia.yaml"


def test_known_language_experiment_runs_from_a_random_pythia(tmp_path):
    cfg = config_lib.load_config(CONFIG, SHRINK)
    assert cfg.model.random_init.family == "gpt_neox"
    result = loop.run_generations(cfg, tmp_path / "run")
    assert [r["generation"] for r in result.rows] == [0, 1]
    for row in result.rows:
        assert np.isfinite(row["kl_to_truth"]) and row["kl_to_truth"] > 0
    saved = [
        p
        for p in sorted((tmp_path / "run").rglob("config.json"))
        if json.loads(p.read_text()).get("model_type") is not None
    ]
    assert saved, "no model saved"
    for path in saved:
        model = families.load_pretrained(path.parent)
        assert isinstance(model, neox.NeoXForCausalLM)
        assert model.config.rotary_dim == 2  # head_dim 16 / 2 = 8, x rotary_pct 0.25
        assert model.config.use_parallel_residual and not model.config.tie_word_embeddings

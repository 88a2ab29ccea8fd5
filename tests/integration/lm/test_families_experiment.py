"""The LM experiment with model families other than OPT (`lm.families`): the paper-protocol
configs of GPT-2, Pythia and SmolLM2 parse and dry-run plan from a config.json in a hub cache
built here (no download), and the known-language experiment runs from a random init of GPT-2."""

import json
import pathlib

import pytest

from collapse_jax import config as config_lib
from collapse_jax import loop
from collapse_jax.lm import families, gpt2
from collapse_jax.lm.experiment import OPTLearner
from tests.integration.lm.test_source_experiment import SHRINK

pytestmark = pytest.mark.slow

CONFIGS = pathlib.Path(__file__).resolve().parents[3] / "collapse_jax" / "configs" / "lm"
SHA = "0123456789abcdef0123456789abcdef01234567"

# Each hub model's config.json (the fields that matter) and its parameter count as transformers
# reports it (`sum(p.numel() for p in model.parameters())`, a tied head counted once).
HUB_MODELS = {
    "gpt2_wikitext2": (
        "openai-community/gpt2",
        dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12,
             n_positions=1024, activation_function="gelu_new"),
        124_439_808,
    ),
    "pythia160m_wikitext2": (
        "EleutherAI/pythia-160m",
        dict(model_type="gpt_neox", vocab_size=50304, hidden_size=768, num_hidden_layers=12,
             num_attention_heads=12, intermediate_size=3072, max_position_embeddings=2048,
             rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True,
             tie_word_embeddings=False, hidden_act="gelu", layer_norm_eps=1e-5,
             bos_token_id=0, eos_token_id=0),
        162_322_944,
    ),
    "smollm2_135m_wikitext2": (
        "HuggingFaceTB/SmolLM2-135M",
        dict(model_type="llama", vocab_size=49152, hidden_size=576, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
             max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
             tie_word_embeddings=True, hidden_act="silu", bos_token_id=0, eos_token_id=0),
        134_515_008,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(HUB_MODELS))
def test_paper_protocol_configs_parse_and_plan_from_the_hub_cache(name, tmp_path, monkeypatch):
    repo, config_json, want_params = HUB_MODELS[name]
    cfg = config_lib.load_config(CONFIGS / f"{name}.yaml")
    assert cfg.model.model_path == repo
    base = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    (base / "snapshots" / SHA).mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(SHA)
    (base / "snapshots" / SHA / "config.json").write_text(json.dumps(config_json))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if config_json["model_type"] not in families.supported_model_types():
        pytest.skip(f"model_type {config_json['model_type']} has no family on this branch yet")
    plan = OPTLearner(cfg.model).plan(cfg)
    assert plan["parameters_from"] == f"hub cache ({repo})"
    assert plan["parameters"] == want_params


def test_known_language_experiment_runs_from_a_random_gpt2(tmp_path):
    """truth_markov_beam_gpt2.yaml shrunk: two generations, pretrained base included; every
    saved model is a GPT-2 that loads back by its config.json's model_type."""
    cfg = config_lib.load_config(CONFIGS / "truth_markov_beam_gpt2.yaml", SHRINK)
    assert cfg.model.random_init.family == "gpt2"
    result = loop.run_generations(cfg, tmp_path / "run")
    assert len(result.rows) == 2
    for row in result.rows:
        assert row["kl_to_truth"] > 0
    saved = sorted((tmp_path / "run").rglob("config.json"))
    assert saved, "no model saved"
    for path in saved:
        if json.loads(path.read_text()).get("model_type") is not None:
            model = families.load_pretrained(path.parent)
            assert isinstance(model, gpt2.GPT2LMHeadModel)


def test_unknown_random_init_family_is_one_clear_line():
    with pytest.raises(config_lib.ConfigError, match="random_init.family"):
        config_lib.load_config(
            CONFIGS / "truth_markov_beam.yaml", ["model.random_init.family=bert"]
        )


def test_dry_run_programs_lower_for_a_gpt2(tmp_path):
    """The memory plan's programs (train step, regeneration search) lower for a GPT-2."""
    cfg = config_lib.load_config(CONFIGS / "truth_markov_beam_gpt2.yaml", SHRINK)
    programs = OPTLearner(cfg.model).programs(cfg)
    assert len(programs) == 2
    for name, lower in programs:
        assert lower() is not None, name

"""The trainer is family-agnostic: every registered family (`lm.families`) fine-tunes on a
data-parallel + tensor-parallel mesh with bf16 compute and keeps its best epoch on validation."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from collapse_jax.jaxtools import sharding
from collapse_jax.lm import evaluate, families, train
from collapse_jax.lm.train_config import TrainConfig
from tests.multihost_worker import tiny_blocks


def _tiny(family: str):
    fam = families.family_named(family)
    config = fam.config_class.from_hf_dict(
        {
            "model_type": fam.model_types[0],
            "vocab_size": 64,
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "intermediate_size": 32,
            "ffn_dim": 32,
            "max_position_embeddings": 64,
            "pad_token_id": 1,
            "bos_token_id": 2,
            "eos_token_id": 2,
        }
    )
    return families.init_random(config, jax.random.key(0))


@pytest.mark.parametrize("family", [f.name for f in families.FAMILIES])
def test_fit_bf16_on_a_sharded_mesh_keeps_the_best_epoch(family):
    model = _tiny(family)
    blocks = tiny_blocks() % 64
    # Validation blocks that run backwards: training on forward steps soon makes them worse.
    valid = (blocks[:8, :1] - (blocks[:8] - blocks[:8, :1])) % 64
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    cfg = TrainConfig(
        epochs=3,
        batch_size=8,
        learning_rate=1e-2,
        compute_dtype="bfloat16",
        keep_best=True,
    )
    best, history = train.fit(model, blocks, cfg, valid_blocks=valid, mesh=mesh, seed=1)
    assert type(best) is type(model)
    losses = history["train_loss"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    vl = history["valid_loss"]
    best_i = int(np.argmin(vl))
    assert history["selected_epoch"] == [best_i + 1]
    got = evaluate.perplexity(best, valid, batch_size=8, mesh=mesh, compute_dtype="bfloat16")
    assert got == pytest.approx(math.exp(vl[best_i]), rel=1e-4)

"""Helpers shared by the training tests, and the worker process of the multi-process test.

As a script: `python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_JSON` joins a local
JAX cluster (coordinator on 127.0.0.1:PORT, CPU, 2 devices per process), fine-tunes the tiny
model below on a global ("data" x "fsdp") mesh and writes its loss history as JSON.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

TINY = dict(
    vocab_size=61,
    hidden_size=16,
    num_hidden_layers=2,
    ffn_dim=32,
    num_attention_heads=2,
    max_position_embeddings=16,
)
BLOCK = 8


def tiny_model(seed: int = 0, **overrides):
    """A tiny random OPT (vocab 61, hidden 16, 2 layers), dropout 0.1 unless overridden.

    Weights come from NumPy (matrices ~ N(0, 0.05^2), LayerNorm 1 + N(0, 0.1^2), biases
    N(0, 0.02^2)) into an abstract model: no eager JAX ops, so building one costs ~0.2 s instead
    of compiling every initializer, and every process builds the same model.
    """
    import jax
    from flax import nnx

    from collapse_jax.lm import families, opt

    cfg = opt.OPTConfig(**{**TINY, "dropout": 0.1, **overrides})
    model = nnx.eval_shape(lambda: families.init_random(cfg, jax.random.key(0)))
    rng = np.random.default_rng(seed)

    def fill(path, v):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(v.shape).astype(np.float32)
        if "scale" in name:
            return 1.0 + 0.1 * noise
        if "bias" in name:
            return 0.02 * noise
        return 0.05 * noise

    nnx.update(model, jax.tree_util.tree_map_with_path(fill, nnx.state(model)))
    return model


def tiny_blocks(n: int = 24, seed: int = 0, vocab: int = TINY["vocab_size"]) -> np.ndarray:
    """Synthetic token blocks [n, 8] with learnable structure (token t+1 = token t + 1 often)."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, vocab, size=(n, 1))
    steps = np.where(rng.random((n, BLOCK)) < 0.8, 1, rng.integers(0, vocab, size=(n, BLOCK)))
    steps[:, 0] = 0
    return ((start + np.cumsum(steps, axis=1)) % vocab).astype(np.int32)


# The settings of test_train.py's reference run, so the single-process side reuses its compile.
MULTIHOST_RUN = dict(epochs=2, batch_size=8, learning_rate=1e-2, seed=1)


def main(argv: list[str]) -> int:
    pid, nproc, port, out = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from collapse_jax.lm import distributed

    distributed.initialize(
        distributed.DistributedConfig(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=nproc,
            process_id=pid,
            initialization_timeout=60,
        )
    )
    from collapse_jax.jaxtools import sharding
    from collapse_jax.lm import train

    assert jax.process_count() == nproc and jax.local_device_count() == 2
    mesh = sharding.make_mesh({"data": 2, "fsdp": -1})  # global: 2 x (2 * nproc / 2)
    model = tiny_model()
    blocks = tiny_blocks()
    _, hist = train.finetune(model, blocks, valid_blocks=blocks[:8], mesh=mesh, **MULTIHOST_RUN)
    ppl = train.perplexity(model, blocks[:8], batch_size=8, mesh=mesh, per_sequence=True)
    with open(out, "w") as f:
        json.dump({"history": hist, "ppl": ppl.tolist(), "devices": jax.device_count()}, f)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

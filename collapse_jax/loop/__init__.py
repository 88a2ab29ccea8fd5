"""The model-agnostic generational loop: mix -> fit -> evaluate, persisted and resumable.

```
data_0 = real data
for n in 0..G-1:
    data_n    = mix(synthetic=alpha, previous=beta, real=gamma) of model_{n-1}   (n >= 1)
    model_n   = fit(learner, data_n)
    metrics_n = evaluate(model_n, real reference)
```

Modules, in import order: `learner` (what the loop needs from a model family), `keys` (one key
derivation everywhere), `selection` and `policy` (how a generation's training set is built),
`core` (one generation of one chain, `chain_generation`, and of a batch of chains), `blocks`
(blocks of generations of a chunk of chains; `simulate_chains`), `summary` and `commit` (rows,
arrays and the commit to a run directory), `jittable` and `sequential` (the two run drivers) and
`driver` (`run_generations`, `run_batch`).

The jittable entry points (`run_generations` for jittable learners, every `theory.*.simulate`
through `simulate_chains`, the GMM figure replay through `replay_data`) go through
`chain_generation`, so the same key gives the same per-chain numbers whichever ran them (up to
float rounding of batched versus single-chain arithmetic). The loop alone owns the schedule: the
mixing policy (`Policy`), the sample sizes and the keys; learners are told how many points to
draw (see `collapse_jax.loop.learner`).

Jittable learners run `R = num_trials` chains under `vmap`, `block_size` generations per
`lax.scan`, `chunk_size` chains at a time; each finished block is committed to the run directory.
A learner with a batched fit over chains (`fit_chains`, e.g. GMM's compaction of converged EM
chains) is stepped one generation at a time from Python instead, its fit called on the whole
chunk. Other learners (SGD, beam search) run their chains one after the other in Python, a
generation of every chain before the next generation, committing after every generation and
keeping each chain's fit and sample resumable inside `work/gen_XXXXX/[chain_XXXXX/]`.
"""

from collapse_jax.loop.blocks import SCAN_BLOCK, simulate_chains
from collapse_jax.loop.core import chain_generation, one_generation, replay_data
from collapse_jax.loop.driver import (
    Result,
    make_learner,
    prepare_run_dir,
    run_batch,
    run_generations,
)
from collapse_jax.loop.jittable import batch_key
from collapse_jax.loop.keys import (
    NOISE_STREAM,
    base_key,
    chain_keys,
    generation_keys,
    reference_key,
)
from collapse_jax.loop.learner import AbstractLearner
from collapse_jax.loop.policy import Carry, Policy
from collapse_jax.loop.summary import summarize

__all__ = [
    "NOISE_STREAM",
    "SCAN_BLOCK",
    "AbstractLearner",
    "Carry",
    "Policy",
    "Result",
    "base_key",
    "batch_key",
    "chain_generation",
    "chain_keys",
    "generation_keys",
    "make_learner",
    "one_generation",
    "prepare_run_dir",
    "reference_key",
    "replay_data",
    "run_batch",
    "run_generations",
    "simulate_chains",
    "summarize",
]

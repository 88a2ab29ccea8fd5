"""The model-agnostic generational loop: mix -> fit -> evaluate, persisted and resumable.

```
data_0 = real data
for n in 0..G-1:
    data_n    = mix(synthetic=alpha, previous=beta, real=gamma) of model_{n-1}   (n >= 1)
    model_n   = fit(learner, data_n)
    metrics_n = evaluate(model_n, real reference)
```

Modules, in import order: `learner` (what the loop needs from a model family), `keys` (one key
derivation everywhere), `schedule` (the `Schedule` of a run: its static `Policy` and its sizes),
`filtering` and `policy` (how a generation's training set is built), `core` (one generation of
one chain in steps, `draw_pool`, `build_data`, the fit and `finish`, and of a batch of chains),
`blocks` (blocks of generations of a chunk of chains: `iter_blocks`, which `simulate_chains` and
the jittable run driver both consume), `summary` and `commit` (rows, arrays and the commit to a
run directory), `jittable` and `sequential` (the two run drivers; a sweep batch is one stream
per point in the jittable one) and `driver` (`run_generations`, `run_batch`; with several
processes `send_resume_point` / `follow_generations`).

Every entry point goes through the core's steps (`draw_pool`, `build_data`, the fit,
`finish`): the jittable run driver and `simulate_chains` (every `theory.*.simulate`) through
`chain_generation` inside the vmapped, scanned `core.block`, a learner's batched fit through
`core.one_generation`, the GMM figure replay through `replay_data` and the sequential driver
around its own persistence. The same key therefore gives the same per-chain numbers whichever
ran them (up to float rounding of batched versus single-chain arithmetic). The loop alone owns
the schedule (`Schedule`: the mixing policy and the sample sizes) and the keys; learners are
told how many points to draw (see `collapse_jax.loop.learner`).

Jittable learners run `R = num_trials` chains under `vmap`, `block_size` generations per
`lax.scan`, `chunk_size` chains at a time; each finished block is committed to the run directory.
A learner with a batched fit over chains (`BatchedFit`, e.g. GMM's compaction of converged EM
chains) is stepped one generation at a time from Python instead, its fit called on the whole
chunk. Other learners (SGD, beam search) run their chains one after the other in Python, a
generation of every chain before the next generation, committing after every generation and
keeping each chain's fit and sample resumable inside `work/gen_XXXXX/[chain_XXXXX/]`.
"""

from collapse_jax.loop.blocks import SCAN_BLOCK, simulate_chains
from collapse_jax.loop.core import (
    build_data,
    chain_generation,
    draw_pool,
    finish,
    one_generation,
    replay_data,
)
from collapse_jax.loop.driver import (
    LeaderFailed,
    Result,
    follow_generations,
    make_learner,
    prepare_run_dir,
    run_batch,
    run_generations,
    send_failure,
    send_resume_point,
)
from collapse_jax.loop.jittable import batch_key, block_programs
from collapse_jax.loop.keys import (
    NOISE_STREAM,
    base_key,
    chain_keys,
    generation_keys,
    reference_key,
)
from collapse_jax.loop.learner import (
    AbstractLearner,
    BatchedFit,
    HasPrograms,
    Knobbed,
    KnobbedLearner,
    Plannable,
    PresampledNoise,
    Scorable,
)
from collapse_jax.loop.policy import Carry
from collapse_jax.loop.schedule import Policy, Schedule
from collapse_jax.loop.summary import summarize

__all__ = [
    "NOISE_STREAM",
    "SCAN_BLOCK",
    "AbstractLearner",
    "BatchedFit",
    "Carry",
    "HasPrograms",
    "Knobbed",
    "KnobbedLearner",
    "LeaderFailed",
    "Plannable",
    "Policy",
    "PresampledNoise",
    "Result",
    "Schedule",
    "Scorable",
    "base_key",
    "batch_key",
    "block_programs",
    "build_data",
    "chain_generation",
    "chain_keys",
    "draw_pool",
    "finish",
    "follow_generations",
    "generation_keys",
    "make_learner",
    "one_generation",
    "prepare_run_dir",
    "reference_key",
    "replay_data",
    "run_batch",
    "run_generations",
    "send_failure",
    "send_resume_point",
    "simulate_chains",
    "summarize",
]

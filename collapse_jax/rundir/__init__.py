"""The run directory: resolved config, per-generation metrics and arrays, resumable state.

Layout of one experiment's run directory:

```
config.yaml                 the resolved config, written first
env.json                    versions, devices, git revision
generations/gen_00007.json  one summary row per finished generation (chain mean, SE, quantiles)
arrays/gen_00007.npz        per-chain values of the first `record_trials` chains, and chain means
                            of vector-valued metrics ("mean/<metric>")
state/                      what the next generation needs (data, params, next generation index)
params/gen_00007/           fitted parameters of every generation (keep_params: all)
data/gen_00007.npz          training data of non-jittable learners' generations
work/gen_00007/             a non-jittable learner's resumable scratch (checkpoints, ...)
metrics.json, metrics.csv   all summary rows; summary.txt; figures/*.png
source/, analysis/          run-wide inputs (committed), cached analyses (recomputed when lost)
.collapse-jax               the identity of the run directory (this tool, the run's own id)
.lock                       who holds the lock (flock on the folder itself) or held it last
state/manifest.json         size and SHA-256 of every committed file (`commits`)
```

Every file is written to a temporary name and renamed, so a killed run leaves either the old or
the new version, never a torn one. `state/` is the commit point of a generation: it is replaced
only after the generation's rows and arrays are on disk; the first commit (no generation yet) is
made when the directory is created, so it is resumable whenever a run stops. The tool touches only
what it wrote: a non-empty `--out` that is not a run directory is refused, and clean-up removes
only its own temporaries, named with its marker and the writer's PID.

Modules, bottom up (none imports one above it):

- `fileio`: atomic writes, .npz / pytree / JSON reading and writing, `CorruptFileError`.
- `commits`: the commit record (`state/manifest.json`), `verify`, the run-directory errors.
- `reader`: `Run`, read access for figures and reports; `write_tables`.
- `guard`: the lock, clean-up of a killed writer's leftovers, `prepare`, `commit_state`,
  `repair`, and the checks made at a commit (finite metrics, memory).
"""

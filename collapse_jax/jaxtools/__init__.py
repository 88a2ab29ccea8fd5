"""XLA-specific tricks, fenced in one place.

- `prng`: threefry key derivation as fused array ops (bit-identical to `jax.random`), and
  `materialize`, which stops XLA:CPU from recomputing a hash in every consumer fusion (CPU
  only, chosen inside the traced program).
- `lanes`: `whole_batch`, the one custom-vmap helper: under `jax.vmap` a function sees every
  lane of the batch at once (the samplers' lane compaction, the batch-wide `cond` of the
  Gaussian factor).
- `convs`: convolutions whose gradients stay on XLA:CPU's fast paths (the VAE's).
- `sharding`: the mesh, the logical-axis rules and the helpers that place arrays on them.
- `jaxprs`: reading a traced program (its nested equations, the dtypes its matmuls run in).

Each trick says why it exists and which platforms it applies to. tests/test_xla_tricks.py reads
the compiled CPU HLO (and programs exported for CUDA and TPU) and fails when the property a
trick relies on is gone, so an XLA upgrade that breaks a trick, or makes it unnecessary, is
noticed; benchmarks/bench_xla_tricks.py times each trick against the plain program
(benchmarks/results/xla_tricks-cpu.json).
"""

"""XLA-specific tricks, fenced in one place.

- `prng`: threefry key derivation as fused array ops (bit-identical to `jax.random`), and
  `materialize`, which stops XLA:CPU from recomputing a hash in every consumer fusion.
- `convs`: convolutions whose gradients stay on XLA:CPU's fast paths (the VAE's).
- `sharding`: the mesh, the logical-axis rules and the helpers that place arrays on them.

Each trick says why it exists, which platforms it applies to, and which test pins the XLA
behaviour it relies on (tests read the compiled HLO), so an XLA upgrade that makes a trick
unnecessary, or breaks it, is noticed.
"""

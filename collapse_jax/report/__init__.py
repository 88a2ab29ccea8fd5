"""Reading a finished run (or sweep) back for people: `collapse-jax compare` overlays runs on one
figure per metric, `collapse-jax report` writes one self-contained HTML page.

Both read only the run directory (summary rows, figures, config, manifest, `env.json`,
`metrics.jsonl`): no model is loaded and no JAX computation runs.

Modules, bottom up:

- `headline`: the metrics each model kind exists for (`HEADLINE_METRICS`); tables and pages
  lead with them.
- `steps`: the per-step training records of `metrics.jsonl`, as curves.
- `runs`: the runs a command names (a sweep's points), their labels from the config difference.
- `compare`: the overlay figures (matplotlib).
- `page`: the HTML page.
"""

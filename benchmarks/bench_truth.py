"""Wall time per generation of the ground-truth LM experiment, split into its three phases.

Runs a config (default: the LM quick start, `collapse_jax/configs/lm/truth_markov_beam.yaml`)
through the
real loop (`loop.run_generations`) in a fresh run directory and records, per generation:
- fine-tune: the learner's `fit_seconds` (training from the base weights, best-epoch selection);
- evaluate: the learner's `eval_seconds` (test perplexity and the exact metrics against the truth);
- regenerate: the wall time of `sample` (beam search / sampling continuing every prompt block),
  measured here by wrapping the learner's method;
- total: the generation's wall time from one commit to the next (data metrics, saving included).
Generation 0 includes the one-time compilations. The machine's load average is recorded next to
the numbers: on a shared CPU, say "under contention" when it exceeds the core count. The process's
CPU seconds (all threads) are recorded too: on an otherwise idle machine with C cores a
generation's wall time is at least cpu_s / C, the estimate to quote for an idle machine when the
measurement ran under contention.

Writes `benchmarks/results/truth_lm-<device>.json` (one object: config, per-generation rows,
sums, totals).

Usage: python benchmarks/bench_truth.py [--config PATH] [--generations G] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time

import jax

from collapse_jax import config as config_lib
from collapse_jax import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--config", default=str(ROOT / "collapse_jax" / "configs" / "lm" / "truth_markov_beam.yaml")
    )
    ap.add_argument("--generations", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = config_lib.load_config(
        args.config, [*args.overrides, f"generation.num_generations={args.generations}"]
    )
    learner = loop.make_learner(cfg)
    regen: list[float] = []
    sample = learner.sample

    def timed_sample(*a, **kw):
        start = time.perf_counter()
        out = sample(*a, **kw)
        regen.append(time.perf_counter() - start)
        return out

    learner.sample = timed_sample  # the same method, timed
    commits = [time.perf_counter()]
    cpu = [time.process_time()]
    loads = []

    def on_generation(g, row):
        commits.append(time.perf_counter())
        cpu.append(time.process_time())
        loads.append(os.getloadavg()[0])
        print(f"gen {g}: {commits[-1] - commits[-2]:.1f} s  kl_to_truth={row.get('kl_to_truth')}")

    with tempfile.TemporaryDirectory(prefix="bench-truth-") as tmp:
        result = loop.run_generations(
            cfg, pathlib.Path(tmp) / "run", learner=learner, on_generation=on_generation
        )
    rows = []
    for i, r in enumerate(result.rows):
        rows.append({
            "generation": r["generation"],
            "fine_tune_s": r.get("fit_seconds"),
            "evaluate_s": r.get("eval_seconds"),
            "regenerate_s": regen[i] if i < len(regen) else None,
            "total_s": commits[i + 1] - commits[i],
            "cpu_s": cpu[i + 1] - cpu[i],
            "load_avg_1min": loads[i],
        })  # fmt: skip

    def total(k):
        return sum(x[k] for x in rows if x[k] is not None)

    later = rows[1:] or rows
    device = jax.devices()[0].platform
    out = {
        "name": "truth_lm_generation",
        "device": device,
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "config": str(pathlib.Path(args.config).relative_to(ROOT)),
        "overrides": args.overrides,
        "generations": len(rows),
        "rows": rows,
        "sum_s": {
            k: total(k) for k in ("fine_tune_s", "evaluate_s", "regenerate_s", "total_s", "cpu_s")
        },
        "median_later_generation_s": {
            k: sorted(x[k] for x in later)[len(later) // 2]
            for k in ("fine_tune_s", "evaluate_s", "regenerate_s", "total_s", "cpu_s")
        },
        "max_load_avg_1min": max(loads) if loads else None,
    }
    path = pathlib.Path(args.out or ROOT / "benchmarks" / "results" / f"truth_lm-{device}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["sum_s"]), "->", path)


if __name__ == "__main__":
    main()

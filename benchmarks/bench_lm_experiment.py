"""Wall time per generation of the real-text CPU LM experiment, split into fine-tune / evaluate /
regenerate (issue 11).

The learner records `fit_seconds` (fine-tuning, validation after every epoch and checkpoints
included) and `eval_seconds` (test perplexity and the example continuation) in every
generation's row; a generation's wall time is the time between the commits of its row and the
previous one (generation 0: since the run directory was created, so data loading, tokenisation
and the first compilations count there), and the regeneration (beam search over the whole
training set, plus the commit) is the rest. Numbers measured on a shared machine depend on the
load: the JSON says how many CPUs the machine has and its load average when written.

Usage:
  python benchmarks/bench_lm_experiment.py --from-run runs/opt_wikitext_cpu
      summarise an existing run directory (e.g. the full 10-generation run);
  python benchmarks/bench_lm_experiment.py [--config collapse_jax/configs/lm/opt_wikitext_cpu.yaml]
      [--generations 2]
      run that many generations of the config in a temporary directory, then summarise them.
Writes `benchmarks/results/lm_experiment-<device>.json` (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]


def summarise(run_dir: pathlib.Path) -> dict:
    """Per-generation fine-tune / evaluate / regenerate seconds of a run directory."""
    gens = sorted((run_dir / "generations").glob("gen_*.json"))
    if not gens:
        raise SystemExit(f"{run_dir}: no finished generation")
    prev = (run_dir / "config.yaml").stat().st_mtime
    rows = []
    for path in gens:
        row = json.loads(path.read_text())
        done = path.stat().st_mtime
        wall = done - prev
        fit, ev = row.get("fit_seconds", float("nan")), row.get("eval_seconds", float("nan"))
        rows.append(
            {
                "generation": row["generation"],
                "wall_s": round(wall, 1),
                "finetune_s": round(fit, 1),
                "evaluate_s": round(ev, 1),
                "regenerate_s": round(wall - fit - ev, 1),
                "test_ppl": round(row["ppl"], 1),
                "unigram_ppl": round(row.get("unigram_ppl", float("nan")), 1),
            }
        )
        prev = done
    later = rows[1:] or rows  # generation 0 also pays for loading and the first compiles
    med = {
        k: statistics.median(r[k] for r in later)
        for k in ("wall_s", "finetune_s", "evaluate_s", "regenerate_s")
    }
    return {"per_generation": rows, "median_after_generation_0": med}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from-run", type=pathlib.Path)
    p.add_argument("--config", default=str(REPO / "collapse_jax/configs/lm/opt_wikitext_cpu.yaml"))
    p.add_argument("--generations", type=int, default=2)
    p.add_argument("--out", type=pathlib.Path)
    p.add_argument("--note", default="", help="e.g. the machine's load while the run ran")
    args = p.parse_args()

    import jax

    from collapse_jax import config as config_lib
    from collapse_jax import loop

    if args.from_run is not None:
        run_dir = args.from_run
        cfg_name = config_lib.load_config(run_dir / "config.yaml").name
    else:
        cfg = config_lib.load_config(
            args.config, [f"generation.num_generations={args.generations}"]
        )
        cfg_name = cfg.name
        run_dir = pathlib.Path(tempfile.mkdtemp(prefix="bench-lm-")) / cfg.name
        loop.run_generations(cfg, run_dir)
    device = jax.devices()[0].platform
    result = {
        "name": "lm_experiment_generation",
        "device": device,
        "config": cfg_name,
        "run_dir": str(run_dir),
        "cpus": os.cpu_count(),
        "load_average_1_5_15": [round(x, 1) for x in os.getloadavg()],
        **({"note": args.note} if args.note else {}),
        **summarise(run_dir),
    }
    out = args.out or REPO / "benchmarks" / "results" / f"lm_experiment-{device}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["median_after_generation_0"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""The `collapse-jax` command line.

```
collapse-jax run CONFIG.yaml [a.b=value ...] [--out DIR] [--dry-run]   run or resume an experiment
collapse-jax quickstart [--out DIR]                                    the theory experiments, fast
collapse-jax show-config CONFIG.yaml [a.b=value ...]                   print the resolved config
collapse-jax plot RUN_DIR                                              redraw a run's figures
collapse-jax bench [--suite quick|full] [--out FILE] [--only a,b]      benchmark this backend
```

Scientific settings come only from the config file and its overrides; flags are operational.
Running the same command again on the same `--out` resumes at the first unfinished generation.
Exit codes: 0 success, 1 runtime failure, 2 config or usage error.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import pathlib
import sys
from collections.abc import Sequence

from collapse_jax import config as config_lib

log = logging.getLogger("collapse_jax")

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def _resolve_config_path(name: str) -> pathlib.Path:
    """A path, or a config name looked up in the repository's `configs/` folder."""
    p = pathlib.Path(name)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"config file not found: {name}")


def _default_out(cfg) -> pathlib.Path:
    digest = hashlib.sha256(config_lib.dump(cfg).encode()).hexdigest()[:8]
    return pathlib.Path("runs") / f"{cfg.name}-{digest}"


def _run_experiment(exp: config_lib.ExperimentConfig, run_dir: pathlib.Path, progress: bool):
    from collapse_jax import generation, plots, records

    learner = generation.make_learner(exp)
    log.info("%s: running in %s", exp.name, run_dir)
    result = generation.run_generations(exp, run_dir, learner=learner, progress=progress)
    run = records.Run(run_dir)
    files = plots.make_figures(run, learner)
    table = plots.summary_table(result.rows)
    records.atomic_write_text(run_dir / "summary.txt", table + "\n")
    print(f"\n== {exp.name} ({run_dir})\n{table}")
    print(f"metrics: {run_dir / 'metrics.json'}  figures: {len(files)} in {run_dir / 'figures'}")


def _cmd_run(args) -> int:
    cfg = config_lib.load_config(_resolve_config_path(args.config), args.overrides)
    out = pathlib.Path(args.out) if args.out else _default_out(cfg)
    if args.dry_run:
        print(config_lib.dump(cfg))
        print(f"# would run in {out}")
        return 0
    experiments = cfg.experiments if isinstance(cfg, config_lib.SuiteConfig) else (cfg,)
    for exp in experiments:
        run_dir = out / exp.name if isinstance(cfg, config_lib.SuiteConfig) else out
        _run_experiment(exp, run_dir, progress=not args.no_progress)
    return 0


def _cmd_show(args) -> int:
    cfg = config_lib.load_config(_resolve_config_path(args.config), args.overrides)
    print(config_lib.dump(cfg), end="")
    return 0


def _cmd_plot(args) -> int:
    from collapse_jax import generation, plots, records

    run = records.Run(args.run_dir)
    files = plots.make_figures(run, generation.make_learner(run.config))
    print("\n".join(str(f) for f in files))
    return 0


def _cmd_bench(args) -> int:
    from collapse_jax import bench

    only = [n for n in args.only.split(",") if n] if args.only else None
    known = {*bench.BENCHES, *bench.THEORY_ROWS}
    for n in only or ():
        if n not in known:
            raise config_lib.ConfigError(
                f"--only: unknown benchmark {n!r}; choose from {sorted(known)}"
            )
    out = pathlib.Path(args.out) if args.out else bench.default_out(bench.device_info(), args.suite)
    report = bench.run(
        args.suite,
        only=only,
        out=out,
        peak_tflops=args.peak_tflops,
        progress=lambda line: print(line, flush=True),
    )
    print(bench.format_table(report))
    print(f"wrote {out} ({report['seconds']:.0f} s)")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="collapse-jax", description=__doc__.split("\n\n")[0])
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run or resume an experiment described by a config")
    r.add_argument("config", help="YAML config file (or a name in configs/)")
    r.add_argument("overrides", nargs="*", help="a.b=value overrides")
    r.add_argument("--out", help="run directory (default runs/<name>-<config hash>)")
    r.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(fn=_cmd_run)

    q = sub.add_parser("quickstart", help="run the theory experiments in well under a minute")
    q.add_argument("overrides", nargs="*", help="a.b=value overrides")
    q.add_argument("--out", help="output directory (default runs/quickstart-<hash>)")
    q.add_argument("--dry-run", action="store_true")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(fn=_cmd_run, config="quickstart")

    s = sub.add_parser("show-config", help="print the resolved config")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=_cmd_show)

    pl = sub.add_parser("plot", help="redraw the figures of a run directory")
    pl.add_argument("run_dir")
    pl.set_defaults(fn=_cmd_plot)

    b = sub.add_parser("bench", help="benchmark the backend JAX sees (table + JSON)")
    b.add_argument("--suite", default="quick", choices=("quick", "full"))
    b.add_argument(
        "--out", help="JSON file (default benchmarks/results/bench-<suite>-<device>.json)"
    )
    b.add_argument("--only", default="", help="comma-separated benchmarks (default: all)")
    b.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    b.set_defaults(fn=_cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `collapse-jax`; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    level = getattr(logging, str(args.log_level).upper(), None)
    if not isinstance(level, int):
        print(f"collapse-jax: error: unknown --log-level {args.log_level}", file=sys.stderr)
        return 2
    log.setLevel(level)  # our own messages; absl/orbax stay at WARNING
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
    try:
        return args.fn(args)
    except (config_lib.ConfigError, FileNotFoundError) as e:
        print(f"collapse-jax: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"collapse-jax: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

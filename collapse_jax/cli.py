"""The `collapse-jax` command line.

```
collapse-jax run CONFIG.yaml [a.b=value ...] [--out DIR] [--dry-run]   run or resume an experiment
                 [--distributed]                                       (one of several processes)
collapse-jax quickstart [--out DIR]                                    the theory experiments, fast
collapse-jax sweep CONFIG.yaml a.b=v1,v2 [c.d=w1,w2 ...] [--out DIR]   a grid in one directory
collapse-jax study lm [--quick] [--source S] [--out DIR]               the LM decomposition study
collapse-jax show-config CONFIG.yaml [a.b=value ...]                   print the resolved config
collapse-jax plot RUN_DIR                                              redraw a run's figures
collapse-jax compare RUN_DIR RUN_DIR ... [--metric NAME ...] [--out FILE.png]  runs on one figure
collapse-jax report RUN_DIR|SWEEP_DIR [--out report.html]             one self-contained page
collapse-jax bench [--suite quick|full] [--out FILE] [--only a,b]      benchmark this backend
```

Every command takes `--compile-cache DIR` (or $COLLAPSE_JAX_COMPILE_CACHE): JAX's persistent
compilation cache, so that a resumed run or a new process skips recompiling its programs.

Scientific settings come only from the config file and its overrides; flags are operational.
Running the same command again on the same `--out` resumes at the first unfinished generation
(also after Ctrl-C). Exit codes: 0 success, 1 runtime failure (data, run directory, disk,
permission, interrupt), 2 config or usage error. Expected failures print one line naming the file
or config key; `--debug` shows the traceback as well.

Several processes (multi-host): `run` joins a JAX cluster when `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` are set, or with `--distributed` (then JAX detects
SLURM, Open MPI, Cloud TPU or Kubernetes). Every process runs the same command; process 0 alone
writes and locks `--out` and draws the figures (`loop.driver`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import pathlib
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence

import jax

from collapse_jax import config as config_lib
from collapse_jax import loop, memplan
from collapse_jax.jaxtools import processes, sharding
from collapse_jax.lm import distributed
from collapse_jax.rundir import commits, fileio, guard, reader

log = logging.getLogger("collapse_jax")

# A folder for JAX's persistent compilation cache when --compile-cache is not given.
COMPILE_CACHE_ENV = "COLLAPSE_JAX_COMPILE_CACHE"


def use_compile_cache(folder: str | os.PathLike | None) -> pathlib.Path | None:
    """Keeps compiled XLA programs in `folder` (else $COLLAPSE_JAX_COMPILE_CACHE) across
    processes: JAX's persistent compilation cache, so that a resumed run, the next run or a
    rerun of the benchmarks loads the programs (train and eval steps, the beam search, the
    theory blocks) instead of compiling them again. Programs that compile in under a second are
    not stored (JAX's default). Returns the folder in use (None: no cache)."""
    folder = folder or os.environ.get(COMPILE_CACHE_ENV) or None
    if folder is None:
        return None
    path = pathlib.Path(folder).expanduser().absolute()
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path


def _resolve_config_path(name: str) -> pathlib.Path:
    """A path, or the name of a config shipped in the package (`config.find_config`)."""
    return config_lib.find_config(name)


def _default_out(cfg) -> pathlib.Path:
    digest = hashlib.sha256(config_lib.dump(cfg, expand=False).encode()).hexdigest()[:8]
    return pathlib.Path("runs") / f"{cfg.name}-{digest}"


@contextlib.contextmanager
def _runtime(run_dir: pathlib.Path) -> Iterator[None]:
    """Marks a missing file of the run directory met from here on as a runtime failure (exit code
    1: it disappeared while the tool worked), not a file the user named (exit code 2)."""
    try:
        yield
    except FileNotFoundError as e:
        try:
            inside = pathlib.Path(os.path.abspath(e.filename)).is_relative_to(
                os.path.abspath(run_dir)
            )
        except (TypeError, ValueError):
            inside = False
        e.runtime = inside
        raise


def _run_experiment(
    exp: config_lib.ExperimentConfig, run_dir: pathlib.Path, progress: bool, repair: bool = False
):
    # Imported here: a run loads matplotlib only once it draws (see config.MODEL_REGISTRY).
    from collapse_jax import plots  # noqa: PLC0415

    learner = loop.make_learner(exp)  # validates the inputs before the run dir is touched
    if processes.is_multiprocess():
        _check_mesh(exp, learner)
    if not processes.is_primary():  # several processes: only process 0 touches the run dir
        loop.follow_generations(exp, learner)
        return
    multi, sent = processes.is_multiprocess(), False
    try:
        # The lock covers the whole run, figures and summary included (the loop re-enters it).
        with _runtime(run_dir), guard.RunLock(run_dir):
            if repair:
                restart = guard.repair(run_dir)
                if restart is not None:
                    print(f"{run_dir}: repaired; resuming at generation {restart}", file=sys.stderr)
            if multi:  # the other processes start where this one does, from its files
                loop.send_resume_point(run_dir, loop.prepare_run_dir(exp, run_dir))
                sent = True
            log.info("%s: running in %s", exp.name, run_dir)
            result = loop.run_generations(exp, run_dir, learner=learner, progress=progress)
            run = reader.Run(run_dir)
            # Drawn by process 0 alone: on its own devices, not waiting for the others.
            with processes.local_devices_only():
                files = plots.make_figures(run, learner)
            table = plots.summary_table(result.rows, kind=exp.kind)
            fileio.atomic_write_text(run_dir / "summary.txt", table + "\n")
            if exp.report.enabled:
                write_report_or_warn(run_dir)
    except BaseException as e:
        if multi and not sent:  # the others wait for the resume point: stop them too
            failure = describe_failure(e)
            loop.send_failure(failure[1] if failure else _one_line(e))
        raise
    print(f"\n== {exp.name} ({run_dir})\n{table}")
    print(f"metrics: {run_dir / 'metrics.json'}  figures: {len(files)} in {run_dir / 'figures'}")


def write_report_or_warn(path: pathlib.Path) -> pathlib.Path | None:
    """`<path>/report.html` (`collapse-jax report`) of a finished run or sweep; a failure to
    write it is one line on stderr, never a failed run. Returns the file (None: not written)."""
    from collapse_jax.report import page  # noqa: PLC0415 (matplotlib only once a run draws)

    try:
        return page.write_report(path)
    except Exception as e:  # noqa: BLE001 (any failure: the run itself is finished and kept)
        print(
            f"collapse-jax: warning: {path / page.REPORT_NAME} not written ({_one_line(e)}); "
            f"`collapse-jax report {path}` retries",
            file=sys.stderr,
        )
        return None


def _check_mesh(exp: config_lib.ExperimentConfig, learner) -> None:
    """Several processes: the config's mesh must span every process (refused by every process
    alike, before any of them waits for another)."""
    if exp.mesh is None:
        return
    if learner.jittable:
        raise config_lib.ConfigError(
            "mesh: a jittable learner's chains are not sharded across processes; drop the mesh "
            "block (every process then runs the chains on its own devices) or run one process"
        )
    try:
        sharding.make_mesh(exp.mesh.shape())
    except ValueError as e:
        raise config_lib.ConfigError(f"mesh: {e}") from None


def _join_cluster(args) -> None:
    """`jax.distributed.initialize` when the environment or `--distributed` asks for several
    processes (before any other JAX work); bad or partial settings raise one line."""
    setup = distributed.from_env(requested=getattr(args, "distributed", False))
    if setup is not None:
        distributed.initialize(setup)
        log.info(
            "process %d of %d, %d of %d devices",
            jax.process_index(),
            jax.process_count(),
            jax.local_device_count(),
            jax.device_count(),
        )


def _cmd_run(args) -> int:
    cfg = config_lib.load_config(_resolve_config_path(args.config), args.overrides)
    out = pathlib.Path(args.out) if args.out else _default_out(cfg)
    if args.dry_run:
        print(config_lib.dump(cfg))
        print(f"# would run in {out}")
        _print_plans(cfg)
        print(memplan.format_table(memplan.plan(cfg)))
        return 0
    _join_cluster(args)
    experiments = cfg.experiments if isinstance(cfg, config_lib.SuiteConfig) else (cfg,)
    for exp in experiments:
        run_dir = out / exp.name if isinstance(cfg, config_lib.SuiteConfig) else out
        _run_experiment(exp, run_dir, progress=not args.no_progress, repair=args.repair)
    distributed.shutdown()  # waits for every process (process 0 may still be drawing)
    return 0


def _cmd_sweep(args) -> int:
    from collapse_jax import sweep  # noqa: PLC0415 (imports plots: matplotlib only for a sweep)

    if any(os.environ.get(k, "").strip() for k in distributed.ENV_VARS):
        raise distributed.DistributedSetupError(
            f"sweep runs in one process; unset {', '.join(distributed.ENV_VARS)} (or run its "
            "points with `collapse-jax run`)"
        )
    path = _resolve_config_path(args.config)
    digest = hashlib.sha256(" ".join([path.read_text(), *args.axes]).encode()).hexdigest()[:8]
    out = (
        pathlib.Path(args.out) if args.out else pathlib.Path("runs") / f"sweep-{path.stem}-{digest}"
    )
    s = sweep.run_sweep(path, args.axes, out, progress=not args.no_progress)
    if s.configs and s.configs[0].report.enabled:
        write_report_or_warn(out)
    print(f"sweep of {len(s.points)} points in {out}: {out / 'sweep.csv'}, {out / 'figures'}")
    return 0


def _cmd_study(args) -> int:
    from collapse_jax.lm import study  # noqa: PLC0415 (a sweep: matplotlib only for a study)

    if any(os.environ.get(k, "").strip() for k in distributed.ENV_VARS):
        raise distributed.DistributedSetupError(
            f"study runs in one process; unset {', '.join(distributed.ENV_VARS)}"
        )
    version = "quick" if args.quick else "full"
    name = f"study-lm-{version}" + ("" if args.source == "zipf" else f"-{args.source}")
    out = pathlib.Path(args.out) if args.out else pathlib.Path("runs") / name
    learners = None
    if args.learners:
        learners = tuple(x.strip() for x in args.learners.split(",") if x.strip())
    s = study.run_study(
        out, version, source=args.source, learners=learners, progress=not args.no_progress
    )
    print(f"study of {len(s.points)} points in {out}: {out / 'metrics.csv'}, {out / 'figures'}")
    return 0


def _print_plans(cfg) -> None:
    """`--dry-run`: each learner's own estimate of what the run will do (`learner.plan(cfg)`)."""
    experiments = cfg.experiments if isinstance(cfg, config_lib.SuiteConfig) else (cfg,)
    for exp in experiments:
        learner = loop.make_learner(exp)
        plan = learner.plan(exp) if isinstance(learner, loop.Plannable) else None
        if plan:
            disk = plan.get("disk_bytes_estimate")
            extra = f", ~{disk / 1e9:.2f} GB on disk" if disk is not None else ""
            rest = {k: v for k, v in plan.items() if k != "disk_bytes_estimate"}
            print(f"# plan {exp.name}: {rest}{extra}")


def _cmd_show(args) -> int:
    cfg = config_lib.load_config(_resolve_config_path(args.config), args.overrides)
    print(config_lib.dump(cfg), end="")
    return 0


def _cmd_plot(args) -> int:
    from collapse_jax import plots  # noqa: PLC0415 (matplotlib only for the commands that draw)

    path = pathlib.Path(args.run_dir)
    if path.is_dir() and not commits.is_run_dir(path):
        raise commits.NotARunDir(
            f"{path} is not a collapse-jax run directory (no {commits.MARKER})"
        )
    run = reader.Run(path)
    # Plotting never needs the lock (committed files are never rewritten), so a running
    # experiment can be plotted; but it must not plot damaged files.
    problems = commits.verify_snapshot(run.path)  # retried if the run commits meanwhile
    if problems:
        raise commits.RunDirDamaged(
            commits.damage_message(
                run.path, problems, "Resume the run with --repair to recompute it."
            )
        )
    learner = loop.make_learner(run.config)
    with _runtime(run.path):
        files = plots.make_figures(run, learner)
    print("\n".join(str(f) for f in files))
    return 0


def _cmd_compare(args) -> int:
    # matplotlib only for the commands that draw
    from collapse_jax.report import compare  # noqa: PLC0415

    result = compare.compare(args.run_dirs, args.metric or None, args.out)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print("\n".join(str(f) for f in result.files))
    return 0


def _cmd_report(args) -> int:
    from collapse_jax.report import page  # noqa: PLC0415 (matplotlib only for drawing commands)

    folder = pathlib.Path(args.run_dir)
    if page.is_suite_dir(folder):  # a suite's folder: one page per experiment
        if args.out:
            raise config_lib.ConfigError(
                f"--out: {folder} is a suite; each experiment's page goes to its own folder"
            )
        for sub in page.suite_runs(folder):
            print(page.write_report(sub))
        return 0
    print(page.write_report(folder, args.out))
    return 0


def _cmd_bench(args) -> int:
    # The benchmarks stay out of the package's import path: loaded for this command only.
    from collapse_jax.bench import harness, suites  # noqa: PLC0415
    from collapse_jax.lm import families  # noqa: PLC0415

    # Before JAX starts its GPU client (device_info below): room for the PyTorch baselines.
    harness.share_gpu_with_torch(suites.SUITES[args.suite].baselines)
    only = [n for n in args.only.split(",") if n] if args.only else None
    known = {*suites.BENCHES, *suites.THEORY_ROWS}
    for n in only or ():
        if n not in known:
            raise config_lib.ConfigError(
                f"--only: unknown benchmark {n!r}; choose from {sorted(known)}"
            )
    if args.out:
        out = pathlib.Path(args.out)
    else:
        out = harness.default_out(harness.device_info(), args.suite)
    suite = suites.SUITES[args.suite]
    if args.model != "opt":
        known_families = [f.name for f in families.FAMILIES]
        if args.model not in known_families:
            raise config_lib.ConfigError(
                f"--model: unknown model family {args.model!r}; choose from {known_families}"
            )
        suite = dataclasses.replace(suite, model=args.model)
    report = suites.run(
        suite,
        only=only,
        out=out,
        peak_tflops=args.peak_tflops,
        progress=lambda line: print(line, flush=True),
    )
    print(harness.format_table(report))
    print(f"wrote {out} ({report['seconds']:.0f} s)")
    return 0


def _parser() -> argparse.ArgumentParser:
    # Options every command takes, before or after its name (SUPPRESS keeps the top level's).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    cache_help = f"keep compiled programs in DIR across runs (default ${COMPILE_CACHE_ENV})"
    common.add_argument(
        "--compile-cache", metavar="DIR", default=argparse.SUPPRESS, help=cache_help
    )
    p = argparse.ArgumentParser(prog="collapse-jax", description=__doc__.split("\n\n")[0])
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    p.add_argument("--debug", action="store_true", help="show the traceback of any failure")
    p.add_argument("--compile-cache", metavar="DIR", default=None, help=cache_help)
    sub = p.add_subparsers(dest="command", required=True)
    # A new subcommand: sub.add_parser(name, parents=[common], ...) and set_defaults(fn=...);
    # main() gives every command the same error handling.

    r = sub.add_parser(
        "run", parents=[common], help="run or resume an experiment described by a config"
    )
    r.add_argument("config", help="YAML config file (or a shipped config's name: quickstart)")
    r.add_argument("overrides", nargs="*", help="a.b=value overrides")
    r.add_argument("--out", help="run directory (default runs/<name>-<config hash>)")
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config, the plan and each compiled program's memory; stop",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument(
        "--repair",
        action="store_true",
        help="if the run directory is damaged, move its generations aside and recompute them",
    )
    r.add_argument(
        "--distributed",
        action="store_true",
        help="one of several processes: join the JAX cluster (JAX_COORDINATOR_ADDRESS, "
        "JAX_NUM_PROCESSES, JAX_PROCESS_ID, or the cluster JAX detects); joined without the "
        "flag when those variables are set",
    )
    r.set_defaults(fn=_cmd_run)

    q = sub.add_parser(
        "quickstart", parents=[common], help="run the theory experiments in well under a minute"
    )
    q.add_argument("overrides", nargs="*", help="a.b=value overrides")
    q.add_argument("--out", help="output directory (default runs/quickstart-<hash>)")
    q.add_argument("--dry-run", action="store_true")
    q.add_argument("--no-progress", action="store_true")
    q.add_argument("--repair", action="store_true")
    q.set_defaults(fn=_cmd_run, config="quickstart")

    sw = sub.add_parser(
        "sweep", parents=[common], help="run a grid of configs in one directory (resumable)"
    )
    sw.add_argument("config", help="YAML config file (or a shipped config's name: quickstart)")
    sw.add_argument("axes", nargs="+", help="a.b=v1,v2,... grid axes (one value: an override)")
    sw.add_argument("--out", help="sweep directory (default runs/sweep-<config>-<hash>)")
    sw.add_argument("--no-progress", action="store_true", help="no progress bar")
    sw.set_defaults(fn=_cmd_sweep)

    st = sub.add_parser(
        "study", parents=[common], help="the LM decomposition study: one resumable sweep"
    )
    st.add_argument("family", choices=["lm"], help="which study (lm: collapse_jax.lm.study)")
    st.add_argument("--quick", action="store_true", help="the quick version (shrunk sizes)")
    st.add_argument(
        "--source",
        choices=["zipf", "heterogeneous"],
        default="zipf",
        help="the language: zipf (every context Zipf(1); default) or heterogeneous (4-16 "
        "continuations per context, Dirichlet weights; no base learner)",
    )
    st.add_argument(
        "--learners", help="comma-separated subset of oracle,counts,base,scratch (default: all)"
    )
    st.add_argument("--out", help="study directory (default runs/study-lm-<full|quick>[-<source>])")
    st.add_argument("--no-progress", action="store_true", help="no progress bar")
    st.set_defaults(fn=_cmd_study)

    s = sub.add_parser("show-config", parents=[common], help="print the resolved config")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=_cmd_show)

    pl = sub.add_parser("plot", parents=[common], help="redraw the figures of a run directory")
    pl.add_argument("run_dir")
    pl.set_defaults(fn=_cmd_plot)

    c = sub.add_parser(
        "compare", parents=[common], help="draw several runs (or a sweep's points) on one figure"
    )
    c.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run, sweep or suite folders")
    c.add_argument(
        "--metric",
        action="append",
        metavar="NAME",
        help="a metric to draw (repeatable; default: the runs' headline metrics)",
    )
    c.add_argument(
        "--out",
        default="compare.png",
        help="figure file; several metrics: <stem>-<metric>.png (default compare.png)",
    )
    c.set_defaults(fn=_cmd_compare)

    rp = sub.add_parser(
        "report", parents=[common], help="write one self-contained HTML page of a run or sweep"
    )
    rp.add_argument("run_dir", metavar="RUN_DIR", help="run directory or sweep directory")
    rp.add_argument("--out", help="HTML file (default RUN_DIR/report.html)")
    rp.set_defaults(fn=_cmd_report)

    b = sub.add_parser(
        "bench", parents=[common], help="benchmark the backend JAX sees (table + JSON)"
    )
    b.add_argument("--suite", default="quick", choices=("quick", "full"))
    b.add_argument(
        "--out", help="JSON file (default benchmarks/results/bench-<suite>-<device>.json)"
    )
    b.add_argument("--only", default="", help="comma-separated benchmarks (default: all)")
    b.add_argument(
        "--model",
        default="opt",
        help="model family of the LM rows (lm.families: opt, gpt2, ...; default opt)",
    )
    b.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    b.set_defaults(fn=_cmd_bench)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an interrupt so that every `finally` (checkpointers, temporaries,
    the lock) runs as for Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `collapse-jax`; returns the process exit code.

    Called as the program (no `argv`), an interrupted run ends with `os._exit` once its clean-up
    has run and the message is printed: background threads (orbax's asynchronous checkpointing,
    XLA's runtime) are then not torn down by interpreter finalization, which could crash.
    """
    as_program = argv is None
    sigterm = None
    if threading.current_thread() is threading.main_thread():
        sigterm = signal.signal(signal.SIGTERM, _terminate)
    try:
        code, interrupted = _main(argv)
    finally:
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
    if interrupted and as_program:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: Sequence[str] | None) -> tuple[int, bool]:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    level = getattr(logging, str(args.log_level).upper(), None)
    if not isinstance(level, int):
        print(f"collapse-jax: error: unknown --log-level {args.log_level}", file=sys.stderr)
        return 2, False
    log.setLevel(level)  # our own messages; absl/orbax stay at WARNING
    use_compile_cache(args.compile_cache)
    # Hub ids download when online unless HF_HUB_OFFLINE=1 (lm/hub.py); transformers' advisory
    # "PyTorch was not found" line is noise in a JAX run.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        return args.fn(args), False
    except BaseException as e:  # noqa: BLE001 (sorted below; the unexpected re-raised)
        failure = describe_failure(e)
        if failure is None:
            raise
        code, message = failure
        if args.debug:
            traceback.print_exc()
        print(f"collapse-jax: error: {message}", file=sys.stderr)
        return code, isinstance(e, KeyboardInterrupt)


def describe_failure(e: BaseException) -> tuple[int, str] | None:
    """(exit code, one line) for an expected failure; None for a bug (which shows its traceback).

    Every expected failure names the file or the config key it is about: our own errors do so in
    their message, OSErrors carry the file name.
    """
    if isinstance(e, KeyboardInterrupt):
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        return 1, f"{what}; finished generations are kept: run the same command to resume"
    if isinstance(e, config_lib.ConfigError):
        return 2, _one_line(e)
    if isinstance(e, distributed.DistributedSetupError | config_lib.MissingExtra):
        return 2, _one_line(e)
    if isinstance(e, commits.RunDirError):
        return e.exit_code, _one_line(e)
    if isinstance(e, commits.NonFiniteMetric):
        return 1, _one_line(e)
    if isinstance(e, MemoryError):
        return 1, "out of memory; lower generation.num_trials or generation.chunk_size"
    if isinstance(e, OSError):
        # A file named in the config or on the command line that does not exist is a usage
        # error; a file that disappears while the tool works (`_runtime`) is a runtime failure.
        code = 2 if isinstance(e, FileNotFoundError) and not getattr(e, "runtime", False) else 1
        if e.errno is None:  # raised by our own code with the file in the message
            return code, _one_line(e)
        what = {
            errno.ENOSPC: "no space left on the device",
            errno.EDQUOT: "disk quota exceeded",
            errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted",
            errno.EROFS: "read-only file system",
            errno.ENOENT: "not found",
            errno.ENOTDIR: "not a folder",
            errno.EISDIR: "is a folder",
        }.get(e.errno, e.strerror or type(e).__name__)
        if e.filename is None:
            return code, f"{what}: {_one_line(e)}"
        where = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
        return code, f"{where}: {what}"
    if isinstance(e, ValueError):  # corrupt files and bad data, named in the message
        return 1, _one_line(e)
    return None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())

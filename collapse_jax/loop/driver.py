"""Running an experiment in a run directory: `run_generations` (one run, resumable) and
`run_batch` (a sweep's points of equal `batch_key` together), dispatching to the jittable or the
sequential driver.

Several processes (`jax.distributed`): process 0 runs `run_generations` in the run directory
and is the only one that writes it; after preparing it (lock, checks, resume point) it sends the
resume point and the files the run resumes from (`send_resume_point`, or `send_failure`). Every
other process runs `follow_generations`: the same generations on the same inputs (the
collectives of fitting and decoding need every process), committed to a private scratch folder
of its own that is removed at the end; it never touches the run directory, so the run directory
need not be on a shared file system.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata as md
import os
import pathlib
import platform
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
from tqdm.auto import tqdm

from collapse_jax import config as config_lib
from collapse_jax.jaxtools import processes
from collapse_jax.loop.jittable import batch_key, run_jittable, run_jittable_points
from collapse_jax.loop.learner import AbstractLearner
from collapse_jax.loop.sequential import run_sequential
from collapse_jax.rundir import commits, events, fileio, guard, reader

Callback = Callable[[int, dict[str, Any]], None]


@dataclasses.dataclass
class Result:
    """What `run_generations` returns: the summary rows and the run directory."""

    rows: list[dict[str, Any]]
    run_dir: pathlib.Path


def _env_info() -> dict[str, Any]:
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tokenizers", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        sha = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=pathlib.Path(__file__).parent,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {
        "python": platform.python_version(),
        "versions": versions,
        "devices": [str(d) for d in jax.devices()],
        "git_sha": sha,
    }


def prepare_run_dir(cfg: config_lib.ExperimentConfig, run_dir: pathlib.Path) -> int:
    """Creates or checks `run_dir` (with its lock held); returns the first generation still to
    run. A run directory may be resumed with the same config, or with more generations; see
    `collapse_jax.rundir.guard.prepare`."""
    return guard.prepare(cfg, run_dir, _env_info)


def make_learner(cfg: config_lib.ExperimentConfig) -> AbstractLearner:
    return config_lib.learner_class(cfg.kind)(cfg.model, cfg.mesh)


def run_generations(
    cfg: config_lib.ExperimentConfig,
    run_dir: str | pathlib.Path,
    *,
    learner: AbstractLearner | None = None,
    on_generation: Callback | None = None,
    progress: bool = False,
    stop_after: int | None = None,
) -> Result:
    """Runs (or resumes) an experiment in `run_dir`.

    Args:
      cfg: the resolved experiment config.
      run_dir: the experiment's run directory; resumed when it already holds generations.
      learner: the learner to use (default: the one `cfg.model.kind` names).
      on_generation: called as `on_generation(g, row)` after every committed generation.
      progress: show progress bars (over generations, and a non-jittable learner's training
        steps and sampling batches) where `cfg.logging.progress` allows (`events.show_progress`:
        "auto" shows them when stderr is a terminal).
      stop_after: stop once this many generations are committed (simulates a killed run).

    Returns:
      The summary rows of all finished generations and the run directory.
    """
    run_dir = pathlib.Path(run_dir)
    learner = make_learner(cfg) if learner is None else learner
    with guard.RunLock(run_dir):  # one process per run directory, for the whole run
        return _run_locked(cfg, run_dir, learner, on_generation, progress, stop_after)


def run_batch(
    cfgs: Sequence[config_lib.ExperimentConfig],
    run_dirs: Sequence[str | pathlib.Path],
    *,
    learner: AbstractLearner | None = None,
) -> list[Result]:
    """Runs (or resumes) several experiments of equal `batch_key` on ONE compiled program per
    block of generations (a sweep's grid points that differ only in seed, knobs such as lambda,
    or traced sample sizes and mix shares), each committed to its own run directory with the
    numbers a run of its own gives (`jittable.run_jittable_points`). Falls back to one run after
    the other when they cannot be batched or stand at different generations (a resumed sweep).
    """
    run_dirs = [pathlib.Path(d) for d in run_dirs]
    learner = make_learner(cfgs[0]) if learner is None else learner
    key0 = batch_key(cfgs[0], learner)
    if len(cfgs) > 1 and key0 is not None and all(batch_key(c, learner) == key0 for c in cfgs):
        with contextlib.ExitStack() as locks:
            for d in run_dirs:
                locks.enter_context(guard.RunLock(d))
            starts = [prepare_run_dir(c, d) for c, d in zip(cfgs, run_dirs)]
            if len(set(starts)) == 1:
                for d in run_dirs:
                    learner.prepare(d)
                if starts[0] < cfgs[0].generation.num_generations:
                    logs = [
                        locks.enter_context(_event_log(c, d, starts[0]))
                        for c, d in zip(cfgs, run_dirs)
                    ]
                    emit = [_committed(log, None, None) for log in logs]
                    run_jittable_points(cfgs, learner, run_dirs, starts[0], emit, None)
                out = []
                for d in run_dirs:
                    rows = reader.Run(d).rows()
                    reader.write_tables(d, rows)
                    out.append(Result(rows=rows, run_dir=d))
                return out
    return [run_generations(c, d, learner=learner) for c, d in zip(cfgs, run_dirs)]


@contextlib.contextmanager
def _event_log(cfg: config_lib.ExperimentConfig, run_dir: pathlib.Path, start: int):
    """The run directory's event log (`rundir.events`), made to agree with a run resuming at
    `start`; None on processes other than 0."""
    marker = commits.read_marker(run_dir) or {}
    log = events.open_log(
        run_dir, cfg, start, reader.Run(run_dir).rows(), str(marker.get("run_id", cfg.name))
    )
    try:
        yield log
    finally:
        if log is not None:
            log.close()


def _committed(log: events.EventLog | None, bar: Any, on_generation: Callback | None) -> Callback:
    """The callback of a committed generation: its event record, the bar, `on_generation`."""

    def committed(g: int, row: dict[str, Any]) -> None:
        if log is not None:
            log.generation(g, row)
        if bar is not None:
            bar.update(1)
            shown = {k: v for k, v in row.items() if "_" not in k and isinstance(v, float)}
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(shown.items())[:3]}, refresh=False)
        if on_generation is not None:
            on_generation(g, row)

    return committed


def _run_locked(cfg, run_dir, learner, on_generation, progress, stop_after) -> Result:
    gcfg = cfg.generation
    start = prepare_run_dir(cfg, run_dir)
    show = events.show_progress(cfg.logging.progress, progress)
    bar = None
    with _event_log(cfg, run_dir, start) as log:
        # A learner's preparatory fit (the LM's pretrained base) reports as generation -1.
        base_log = None if log is None else log.scope(events.BASE_GENERATION, 0, progress=show)
        learner.prepare(run_dir, log=base_log)
        if show:
            bar = tqdm(total=gcfg.num_generations, initial=start, desc=cfg.name, unit="gen")
        committed = _committed(log, bar, on_generation)
        try:
            if start < gcfg.num_generations:
                if learner.jittable:
                    run_jittable(cfg, learner, run_dir, start, committed, stop_after)
                else:
                    run_sequential(
                        cfg, learner, run_dir, start, committed, stop_after, log=log, progress=show
                    )
        finally:
            if bar is not None:
                bar.close()
    run = reader.Run(run_dir)
    rows = run.rows()
    reader.write_tables(run_dir, rows)
    return Result(rows=rows, run_dir=run_dir)


# ----------------------------------------------------------------------------------------------
# Several processes: process 0 leads, the others follow.


class LeaderFailed(commits.RunDirError):
    """Process 0 stopped before the run started (the message is its own)."""


def resume_files(run_dir: pathlib.Path, start: int) -> list[str]:
    """What the other processes need of `run_dir` to run generations [start, G) as process 0
    does: the committed state (without its manifest), each chain's generation-0 data (a fixed
    real set), the run-wide inputs a learner's `prepare` reads back (`base/`, a pretrained base),
    and the finished steps of the unfinished generation in work/ (the fit's and the sampler's
    own state excepted: a multi-process run keeps none, see `loop.sequential`)."""
    names = []
    for top, keep in (
        ("state", lambda rel: rel != commits.MANIFEST_REL),
        ("base", lambda rel: True),
        ("data", lambda rel: rel.endswith("gen_00000.npz")),
        (f"work/gen_{start:05d}", lambda rel: not {"fit", "sample"} & set(rel.split("/"))),
    ):
        root = run_dir / top
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if fileio.temporary_owner(d) is None)
            for name in sorted(filenames):
                if fileio.temporary_owner(name) is not None:
                    continue
                rel = (pathlib.Path(dirpath) / name).relative_to(run_dir).as_posix()
                if keep(rel):
                    names.append(rel)
    return names


def send_resume_point(run_dir: pathlib.Path, start: int) -> None:
    """Process 0 (with the run directory prepared and locked): sends the first generation to run
    and `resume_files` to the other processes (`follow_generations`)."""
    names = resume_files(run_dir, start)
    processes.broadcast_json({"start": start, "files": names})
    processes.broadcast_files(run_dir, names)


def send_failure(message: str) -> None:
    """Process 0, failed before `send_resume_point`: the other processes stop with `message`."""
    processes.broadcast_json({"error": message})


def follow_generations(
    cfg: config_lib.ExperimentConfig, learner: AbstractLearner | None = None
) -> int:
    """A process other than 0: receives the resume point and files from process 0 and runs the
    same generations in a private scratch folder (removed at the end). Returns the number of
    generations it ran.

    Raises:
      LeaderFailed: process 0 stopped before the run started (its message).
    """
    learner = make_learner(cfg) if learner is None else learner
    msg = processes.broadcast_json(None)
    if "error" in msg:
        raise LeaderFailed(f"process 0 stopped: {msg['error']}")
    start, names = int(msg["start"]), list(msg["files"])
    files = processes.broadcast_files(None, names)
    with tempfile.TemporaryDirectory(prefix=f"collapse-jax-p{os.getpid()}-") as tmp:
        scratch = pathlib.Path(tmp)
        for rel, data in files.items():
            (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
            (scratch / rel).write_bytes(data)
        # What the commits in the scratch folder read (config.yaml), as process 0 wrote it.
        (scratch / commits.CONFIG_NAME).write_text(config_lib.dump(cfg, expand=False))
        learner.prepare(scratch)
        driver = run_jittable if learner.jittable else run_sequential
        if start < cfg.generation.num_generations:
            driver(cfg, learner, scratch, start, lambda g, row: None, None)
    return cfg.generation.num_generations - start

"""Running an experiment in a run directory: `run_generations` (one run, resumable) and
`run_batch` (a sweep's points of equal `batch_key` together), dispatching to the jittable or the
sequential driver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata as md
import pathlib
import platform
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

import jax
from tqdm.auto import tqdm

from collapse_jax import config as config_lib
from collapse_jax.loop.jittable import batch_key, run_jittable, run_jittable_points
from collapse_jax.loop.learner import AbstractLearner
from collapse_jax.loop.sequential import run_sequential
from collapse_jax.rundir import guard, reader

Callback = Callable[[int, dict[str, Any]], None]


@dataclasses.dataclass
class Result:
    """What `run_generations` returns: the summary rows and the run directory."""

    rows: list[dict[str, Any]]
    run_dir: pathlib.Path


def _env_info() -> dict[str, Any]:
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy"):
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
      progress: show a progress bar over generations.
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
                    noop = [lambda g, row: None] * len(cfgs)
                    run_jittable_points(cfgs, learner, run_dirs, starts[0], noop, None)
                out = []
                for d in run_dirs:
                    rows = reader.Run(d).rows()
                    reader.write_tables(d, rows)
                    out.append(Result(rows=rows, run_dir=d))
                return out
    return [run_generations(c, d, learner=learner) for c, d in zip(cfgs, run_dirs)]


def _run_locked(cfg, run_dir, learner, on_generation, progress, stop_after) -> Result:
    gcfg = cfg.generation
    start = prepare_run_dir(cfg, run_dir)
    learner.prepare(run_dir)
    driver = run_jittable if learner.jittable else run_sequential
    bar = None
    if progress:
        bar = tqdm(total=gcfg.num_generations, initial=start, desc=cfg.name, unit="gen")

    def committed(g: int, row: dict[str, Any]) -> None:
        if bar is not None:
            bar.update(1)
            shown = {k: v for k, v in row.items() if "_" not in k and isinstance(v, float)}
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(shown.items())[:3]}, refresh=False)
        if on_generation is not None:
            on_generation(g, row)

    try:
        if start < gcfg.num_generations:
            driver(cfg, learner, run_dir, start, committed, stop_after)
    finally:
        if bar is not None:
            bar.close()
    run = reader.Run(run_dir)
    rows = run.rows()
    reader.write_tables(run_dir, rows)
    return Result(rows=rows, run_dir=run_dir)

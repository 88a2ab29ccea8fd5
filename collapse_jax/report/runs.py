"""The runs a `compare` or `report` command names, and labels that tell them apart.

A run is named by its directory; a sweep directory (`sweep.json`) or a suite's folder (one run
directory per experiment) stands for its runs. A run's label is the smallest set of config keys
whose values differ among the compared runs, read as `key=value` with the key's last part
(`policy=replace` against `policy=mix, alpha=0.9, gamma=0.1`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from collapse_jax import config as config_lib
from collapse_jax.rundir import commits, reader

# Config keys that never tell runs apart in a label (operational settings).
_NOT_LABELS = ("report.", "logging.")
# Keys shown only with the policy that uses them (the mix shares), when not at their default.
_SHARES = ("generation.alpha", "generation.beta", "generation.gamma")


class NoRuns(commits.RunDirError):
    """A path names no run directory (exit code 2: a usage error)."""

    exit_code = 2


@dataclasses.dataclass
class RunInfo:
    """One run to compare or report.

    Attributes:
      path: its run directory.
      run: read access to it.
      config: its resolved config (`config.yaml`).
      flat: the config as {"a.b": value} (strings from `${VAR}` as written).
      label: what tells it apart from the other runs (set by `label_runs`).
    """

    path: pathlib.Path
    run: reader.Run
    config: config_lib.ExperimentConfig
    flat: dict[str, Any]
    label: str = ""


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} of a nested mapping (lists stay values)."""
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def is_sweep_dir(path: pathlib.Path) -> bool:
    return (path / "sweep.json").is_file() and (path / "points").is_dir()


def sweep_points(path: pathlib.Path) -> list[pathlib.Path]:
    """A sweep's point directories in grid order (those that have started)."""
    spec = json.loads((path / "sweep.json").read_text())
    dirs = [path / p["dir"] for p in spec.get("points", [])]
    return [d for d in dirs if (d / "config.yaml").is_file()]


def expand(paths: Sequence[str | os.PathLike]) -> list[pathlib.Path]:
    """The run directories `paths` name: a run directory itself, a sweep's points, a suite's
    experiments (its sub-folders that are run directories)."""
    out: list[pathlib.Path] = []
    for p in map(pathlib.Path, paths):
        if not p.is_dir():
            raise NoRuns(f"{p}: no such directory")
        if (p / "config.yaml").is_file():
            out.append(p)
        elif is_sweep_dir(p):
            points = sweep_points(p)
            if not points:
                raise NoRuns(f"{p}: a sweep none of whose points has started")
            out += points
        else:
            subs = sorted(d for d in p.iterdir() if (d / "config.yaml").is_file())
            if not subs:
                raise NoRuns(f"{p} is not a run directory, a sweep or a suite (no config.yaml)")
            out += subs
    return out


def load(path: pathlib.Path) -> RunInfo:
    run = reader.Run(path)
    cfg = run.config
    if isinstance(cfg, config_lib.SuiteConfig):
        raise NoRuns(f"{path}/config.yaml is a suite, not one experiment")
    flat = flatten(config_lib.to_dict(cfg, expand=False))
    return RunInfo(path=path, run=run, config=cfg, flat=flat)


def _priority(key: str) -> tuple[int, str]:
    if key == "generation.policy":
        return (0, "")
    if key.startswith("model."):
        return (1, "")
    if key.startswith("generation."):
        return (2, "")
    if key == "name":
        return (4, "")
    return (3, "")


def _text(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_text(x) for x in v) + "]"
    return str(v)


def differing_keys(flats: Sequence[Mapping[str, Any]]) -> list[str]:
    """Config keys whose values are not the same in every run (operational keys left out), in
    label priority: the policy, the model, the generation block, the rest, the name last."""
    keys = list(dict.fromkeys(k for f in flats for k in f))
    diff = [
        k
        for k in keys
        if not k.startswith(_NOT_LABELS)
        and len({json.dumps(f.get(k, "(absent)"), sort_keys=True) for f in flats}) > 1
    ]
    return sorted(diff, key=_priority)  # stable: config order within a priority


def _distinct(flats: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> bool:
    seen = {json.dumps([f.get(k) for k in keys], sort_keys=True) for f in flats}
    return len(seen) == len(flats)


def label_keys(flats: Sequence[Mapping[str, Any]]) -> list[str]:
    """The fewest differing keys that tell the runs apart: one key where one does (the first in
    priority), else keys added in priority order until the runs differ (all of them when
    even they do not: the runs' configs are equal)."""
    diff = differing_keys(flats)
    for k in diff:
        if _distinct(flats, [k]):
            return [k]
    chosen: list[str] = []
    for k in diff:
        chosen.append(k)
        if _distinct(flats, chosen):
            break
    return chosen


def label_runs(runs: Sequence[RunInfo]) -> list[str]:
    """Sets and returns every run's label (its differing config keys as `key=value`; with the
    policy, the mix shares that are not at their default too). Runs whose configs are equal are
    told apart by their folder names."""
    flats = [r.flat for r in runs]
    keys = label_keys(flats)
    if len(runs) > 1 and not keys:
        for r in runs:
            r.label = r.path.name
        return [r.label for r in runs]
    if "generation.policy" in keys:
        diff = differing_keys(flats)
        defaults = {
            f"generation.{f.name}": f.default
            for f in dataclasses.fields(config_lib.GenerationConfig)
        }
        keys += [k for k in _SHARES if k in diff and k not in keys]
    else:
        defaults = {}
    last = [k.split(".")[-1] for k in keys]
    names = {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}
    for r in runs:
        parts = [
            f"{names[k]}={_text(r.flat.get(k))}"
            for k in keys
            if not (k in _SHARES and k in defaults and r.flat.get(k) == defaults[k])
        ]
        r.label = ", ".join(parts) if parts else r.config.name
    if len(runs) == 1:
        runs[0].label = runs[0].config.name
    if len({r.label for r in runs}) < len(runs):  # equal configs in several folders
        for r in runs:
            r.label = f"{r.label} ({r.path.name})"
    return [r.label for r in runs]

"""The commit record of a run directory: `state/manifest.json` (size and SHA-256 of every committed
file, the stored config, the next generation), written inside the new `state/` before the rename
that commits a generation, and `verify`, which checks a directory against it.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

from collapse_jax import config as config_lib
from collapse_jax.rundir import fileio

MANIFEST = "manifest.json"  # inside state/
MANIFEST_VERSION = 1
CONFIG_NAME = "config.yaml"
# Committed files outside the per-generation folders (config.yaml is checked by content).
TOP_FILES = ("env.json",)
# Folders that are not committed results: the commit record itself, scratch, derived outputs.
NOT_COMMITTED = frozenset({"state", "work", "figures"})
DAMAGED_PREFIX = "damaged-"  # where `guard.repair` moves damaged generations
_GEN = re.compile(r"gen_(\d+)")


class RunDirError(ValueError):
    """An expected problem with a run directory; `exit_code` is what the CLI returns (a
    ValueError, as the loop raised before these classes existed)."""

    exit_code = 1


class RunDirBusy(RunDirError):
    """Another process holds the run directory's lock."""


class RunDirDamaged(RunDirError):
    """Committed files are missing or altered (the message names them)."""


class RunDirConflict(RunDirError):
    """The run directory holds a run the request disagrees with (a usage error)."""

    exit_code = 2


class NonFiniteMetric(RuntimeError):
    """A metric came out NaN or infinite; the message names the generation and the metric."""


def file_digest(path: pathlib.Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def generation_of(rel: str) -> int | None:
    """The generation a committed file belongs to (`.../gen_00007...`), None for run-wide files."""
    m = _GEN.search(rel)
    return int(m.group(1)) if m else None


def committed_files(run_dir: pathlib.Path, generations: range | None) -> Iterator[str]:
    """Relative paths of committed per-generation files (of `generations`, or all)."""
    for top in sorted(run_dir.iterdir()):
        if not top.is_dir() or top.name in NOT_COMMITTED or top.name.startswith("."):
            continue
        if top.name.endswith(".old") or top.name.startswith(DAMAGED_PREFIX):
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if not fileio.TEMPORARY.match(d))
            for name in sorted(filenames):
                if fileio.TEMPORARY.match(name):
                    continue
                rel = str((pathlib.Path(dirpath) / name).relative_to(run_dir))
                g = generation_of(rel)
                if g is not None and (generations is None or g in generations):
                    yield rel


def pruned_by_policy(rel: str, config: Mapping) -> bool:
    """Whether a committed file may be deleted on purpose later: `keep_params: first_last`
    removes the parameters of older generations once a newer one is committed."""
    gen = config.get("generation") if isinstance(config, Mapping) else None
    return (
        isinstance(gen, Mapping)
        and gen.get("keep_params") == "first_last"
        and (rel.startswith("params/"))
    )


def read_manifest(run_dir: pathlib.Path) -> dict[str, Any] | None:
    path = run_dir / "state" / MANIFEST
    if not path.exists():
        return None
    m = fileio.load_json(path)
    if not isinstance(m, dict) or m.get("version") != MANIFEST_VERSION or "files" not in m:
        raise RunDirDamaged(f"{path} is not a manifest this version can read")
    return m


def write_manifest(
    run_dir: pathlib.Path, state_tmp: pathlib.Path, next_generation: int, config: Mapping
) -> None:
    """Writes `state_tmp/manifest.json` for the commit that renames `state_tmp` to `state/`.

    Files of generations committed before are carried over without being read again (they are
    never rewritten); those of the generations this commit adds, the run-wide files and the new
    state are hashed.
    """
    old = read_manifest(run_dir)
    before = old["next_generation"] if old is not None else 0
    files: dict[str, Any] = {}
    if old is not None:
        files = {
            k: v
            for k, v in old["files"].items()
            if not k.startswith("state/")
            and (generation_of(k) or 0) < before
            and not (pruned_by_policy(k, config) and not (run_dir / k).exists())
        }
    new_gens = range(before, next_generation)
    for rel in committed_files(run_dir, new_gens):
        files[rel] = file_digest(run_dir / rel)
    for name in TOP_FILES:
        if (run_dir / name).is_file():
            files[name] = file_digest(run_dir / name)
    for dirpath, _, filenames in os.walk(state_tmp):
        for name in sorted(filenames):
            p = pathlib.Path(dirpath) / name
            files[str(pathlib.Path("state") / p.relative_to(state_tmp))] = file_digest(p)
    manifest = {
        "version": MANIFEST_VERSION,
        "next_generation": next_generation,
        "config": config,
        "files": dict(sorted(files.items())),
    }
    fileio.atomic_write_json(state_tmp / MANIFEST, manifest)


def verify(run_dir: pathlib.Path, manifest: Mapping[str, Any] | None = None) -> list[str]:
    """Problems of a run directory against its manifest: one "<file> <what is wrong>" each.

    Checks every file the manifest lists (existence, size, SHA-256), that config.yaml holds the
    manifest's config (only generation.num_generations may differ, and not below the committed
    generations), and that a directory with committed generations has a manifest at all.
    """
    problems: list[str] = []
    if manifest is None:
        manifest = read_manifest(run_dir)
    if manifest is None:
        # No commit record: generations without one cannot be trusted (deleted state/?).
        if (run_dir / "state" / "meta.json").exists():
            meta = fileio.load_json(run_dir / "state" / "meta.json")
            if meta.get("manifest", False):
                problems.append(f"state/{MANIFEST} is missing")
            return problems  # a run directory written before manifests existed
        if any(True for _ in committed_files(run_dir, None)):
            problems.append("state/ (the record of committed generations) is missing")
        return problems
    for rel, want in manifest["files"].items():
        p = run_dir / rel
        if not p.is_file():
            if not pruned_by_policy(rel, manifest["config"]):
                problems.append(f"{rel} is missing")
        elif p.stat().st_size != want["size"]:
            problems.append(
                f"{rel} has changed (size {p.stat().st_size}, committed {want['size']})"
            )
        elif file_digest(p)["sha256"] != want["sha256"]:
            problems.append(f"{rel} has changed (checksum differs from the committed one)")
    cfg_path = run_dir / CONFIG_NAME
    if not cfg_path.is_file():
        problems.append(f"{CONFIG_NAME} is missing")
    else:
        try:
            stored = config_lib.parse_yaml(cfg_path.read_text(), str(cfg_path))
        except (config_lib.ConfigError, OSError, UnicodeDecodeError):
            stored = None
        if not isinstance(stored, dict):
            problems.append(f"{CONFIG_NAME} is not a readable config")
        else:
            diff = config_diff(manifest["config"], stored)
            if diff:
                problems.append(f"{CONFIG_NAME} was edited after the last commit ({diff})")
            gen = stored.get("generation")
            n = gen.get("num_generations") if isinstance(gen, dict) else None
            if isinstance(n, int) and n < manifest["next_generation"]:
                problems.append(
                    f"{CONFIG_NAME} asks for num_generations={n} but "
                    f"{manifest['next_generation']} generations are committed"
                )
    return problems


def damage_message(run_dir: pathlib.Path, problems: list[str], hint: str) -> str:
    shown = "; ".join(problems[:4]) + (
        f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
    )
    return f"run directory {run_dir} is damaged: {shown}. {hint}"


def committed_generations(run_dir: pathlib.Path) -> int | None:
    """The number of committed generations by the commit record, None without one."""
    manifest = read_manifest(run_dir)
    if manifest is not None:
        return int(manifest["next_generation"])
    meta = run_dir / "state" / "meta.json"
    return int(fileio.load_json(meta)["next_generation"]) if meta.exists() else None



def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_diff(stored: Mapping, wanted: Mapping, *, ignore=("generation.num_generations",)) -> str:
    """ "key: stored -> wanted" for every key that differs (empty when none)."""
    a, b = _flatten(stored), _flatten(wanted)
    keys = [k for k in dict.fromkeys([*a, *b]) if k not in ignore and a.get(k) != b.get(k)]
    parts = [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in keys[:6]]
    if len(keys) > 6:
        parts.append(f"and {len(keys) - 6} more")
    return ", ".join(parts)



"""The commit record of a run directory and the checks made against it.

- **Identity.** A run directory carries `.collapse-jax` (this tool's name and the run's own id),
  written first when the directory is created. Only a directory with it (or, from before it
  existed, with a `state/` commit record) is treated as a run directory: a non-empty `--out`
  without it is refused, and clean-up or repair never act on it.
- **Manifest.** Every commit of the loop (`state/` replaced by a new version) carries
  `state/manifest.json`: size and SHA-256 of every committed file, the stored config, the run's
  id and the next generation. It is written inside the new `state/` before the rename, so it can
  never disagree with the state it describes. The first commit (no generation yet) is made when
  the directory is created, so a directory is resumable from the moment it exists: files of
  generations at or beyond the committed count are uncommitted leftovers, redone on resume.
- **Verify.** `verify` checks a directory against its manifest: the manifest's own structure,
  that it belongs to this directory and agrees with `state/meta.json` and with the generations
  it lists, every listed file (existence, size, SHA-256), and the stored config. Each problem is
  one "<file> <what is wrong>" line. `verify_snapshot` retries when a concurrent commit changed
  the record while it was being read (a reader of a running experiment).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

from collapse_jax import config as config_lib
from collapse_jax.rundir import fileio

MARKER = ".collapse-jax"  # the identity file of a run directory
TOOL = "collapse-jax"
MANIFEST = "manifest.json"  # inside state/
MANIFEST_REL = f"state/{MANIFEST}"
MANIFEST_VERSION = 1
CONFIG_NAME = "config.yaml"
# Committed files outside the per-generation folders (config.yaml is checked by content).
TOP_FILES = ("env.json",)
# Folders of committed files: per generation (gen_XXXXX in the path) or run-wide (source/).
RESULT_FOLDERS = ("generations", "arrays", "params", "data", "source")
# Folders this tool writes that are not committed: the commit record itself, a non-jittable
# learner's resumable scratch, derived outputs (figures, cached analyses recomputed when lost).
SCRATCH_FOLDERS = ("state", "work", "figures", "analysis")
TOOL_FOLDERS = RESULT_FOLDERS + SCRATCH_FOLDERS
DAMAGED_PREFIX = "damaged-"  # where `guard.repair` moves damaged generations
_GEN = re.compile(r"(?:^|/)gen_(\d+)(?=$|[./])")


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


class NotARunDir(RunDirConflict):
    """`--out` holds files but is not a run directory of this tool (a usage error)."""


class NonFiniteMetric(RuntimeError):
    """A metric came out NaN or infinite; the message names the generation and the metric."""


# ----------------------------------------------------------------------------------------------
# Identity.


def read_marker(run_dir: pathlib.Path) -> dict[str, Any] | None:
    """The identity record of a run directory, None where there is none (or it is not ours)."""
    path = run_dir / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        marker = fileio.load_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("tool") != TOOL:
        return None
    return marker


def is_run_dir(run_dir: pathlib.Path) -> bool:
    """Whether `run_dir` was made by this tool (its identity file, or a commit record written
    before identity files existed)."""
    if read_marker(run_dir) is not None:
        return True
    state = run_dir / "state"
    return not state.is_symlink() and (
        (state / MANIFEST).is_file() or (state / "meta.json").is_file()
    )


# ----------------------------------------------------------------------------------------------
# Committed files.


def state_folder(run_dir: pathlib.Path) -> pathlib.Path:
    """`state/`, or, while a commit replaces it (or when its writer was killed between the two
    renames of `fileio.replace_dir`), the previous commit's folder set aside, which is what the
    writer's clean-up puts back."""
    state = run_dir / "state"
    if state.exists() or not run_dir.is_dir():
        return state
    aside = sorted(p for p in run_dir.iterdir() if fileio.aside_target(p.name) == "state")
    return aside[0] if aside else state


def _path(run_dir: pathlib.Path, rel: str) -> pathlib.Path:
    """Where committed file `rel` is now (`state/...` may be set aside mid-commit)."""
    if rel.startswith("state/"):
        return state_folder(run_dir) / rel[len("state/") :]
    return run_dir / rel


def file_digest(path: pathlib.Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def generation_of(rel: str) -> int | None:
    """The generation a committed file belongs to (a `gen_00007` path component, e.g.
    `params/gen_00007/params.npz`), None for run-wide files."""
    m = _GEN.search(rel)
    return int(m.group(1)) if m else None


def _result_files(run_dir: pathlib.Path) -> Iterator[str]:
    """Relative paths of the files in the result folders (temporaries left out)."""
    for top in RESULT_FOLDERS:
        root = run_dir / top
        if root.is_symlink() or not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if fileio.temporary_owner(d) is None)
            for name in sorted(filenames):
                if fileio.temporary_owner(name) is None:
                    yield str((pathlib.Path(dirpath) / name).relative_to(run_dir))


def committed_files(run_dir: pathlib.Path, generations: range | None) -> Iterator[str]:
    """Relative paths of per-generation files (of `generations`, or all)."""
    for rel in _result_files(run_dir):
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


# ----------------------------------------------------------------------------------------------
# The manifest.


def _structure_problem(m: Any) -> str | None:
    """Why `m` is not a manifest this version wrote (None when it is one)."""
    if not isinstance(m, dict):
        return "is not a manifest (not a JSON object)"
    if m.get("version") != MANIFEST_VERSION:
        return f"is not a manifest this version can read (version {m.get('version')!r:.20})"
    n = m.get("next_generation")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        return "is not a manifest (next_generation is not a count)"
    if not isinstance(m.get("config"), dict):
        return "is not a manifest (no config)"
    files = m.get("files")
    if not isinstance(files, dict):
        return "is not a manifest (files is not a mapping of file -> size and checksum)"
    for rel, want in files.items():
        parts = pathlib.PurePosixPath(rel).parts
        if not parts or rel.startswith("/") or ".." in parts:
            return f"is not a manifest (it lists {rel[:60]!r}, outside the run directory)"
        if not (
            isinstance(want, dict)
            and isinstance(want.get("size"), int)
            and isinstance(want.get("sha256"), str)
        ):
            return f"is not a manifest (no size and checksum for {rel[:60]})"
    return None


def read_manifest(run_dir: pathlib.Path) -> dict[str, Any] | None:
    """The manifest of the last commit (None when there is none); an unreadable one raises
    `RunDirDamaged` naming it."""
    path = state_folder(run_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        m = fileio.load_json(path)
    except (OSError, ValueError) as e:
        why = " ".join(str(e).split())[:300]
        raise RunDirDamaged(f"{MANIFEST_REL} is unreadable ({why})") from None
    why = _structure_problem(m)
    if why is not None:
        raise RunDirDamaged(f"{MANIFEST_REL} {why}")
    return m


def write_manifest(
    run_dir: pathlib.Path, state_tmp: pathlib.Path, next_generation: int, config: Mapping
) -> None:
    """Writes `state_tmp/manifest.json` for the commit that renames `state_tmp` to `state/`.

    Files committed before are carried over without being read again (they are never
    rewritten); those of the generations this commit adds, run-wide files seen for the first
    time and the new state are hashed.
    """
    old = read_manifest(run_dir)
    before = old["next_generation"] if old is not None else 0
    files: dict[str, Any] = {}
    if old is not None:
        files = {
            k: v
            for k, v in old["files"].items()
            if not k.startswith("state/")
            and (generation_of(k) if generation_of(k) is not None else -1) < before
            and not (pruned_by_policy(k, config) and not (run_dir / k).exists())
        }
    new = range(before, next_generation)
    for rel in _result_files(run_dir):  # one walk: this commit's generations, new run-wide files
        g = generation_of(rel)
        if (g in new) if g is not None else rel not in files:
            files[rel] = file_digest(run_dir / rel)
    for name in TOP_FILES:
        if (run_dir / name).is_file():
            files[name] = file_digest(run_dir / name)
    for dirpath, _, filenames in os.walk(state_tmp):
        for name in sorted(filenames):
            p = pathlib.Path(dirpath) / name
            files[str(pathlib.Path("state") / p.relative_to(state_tmp))] = file_digest(p)
    marker = read_marker(run_dir)
    manifest = {
        "version": MANIFEST_VERSION,
        "next_generation": next_generation,
        "run_id": marker["run_id"] if marker else None,
        "config": config,
        "files": dict(sorted(files.items())),
    }
    fileio.atomic_write_json(state_tmp / MANIFEST, manifest)


def _consistency(
    run_dir: pathlib.Path, manifest: Mapping[str, Any], *, state: bool = True
) -> list[str]:
    """The manifest against the directory's identity, `state/meta.json` (unless not `state`)
    and itself."""
    problems = []
    n = manifest["next_generation"]
    marker = read_marker(run_dir)
    if marker is not None and manifest.get("run_id") not in (None, marker.get("run_id")):
        problems.append(
            f"{MANIFEST_REL} belongs to another run directory (run id "
            f"{str(manifest['run_id'])[:16]}, this one's is {str(marker.get('run_id'))[:16]})"
        )
    meta_path = state_folder(run_dir) / "meta.json"
    try:
        meta = fileio.load_json(meta_path)
        meta_n = meta.get("next_generation") if isinstance(meta, dict) else None
    except (OSError, ValueError):
        meta_n = "unreadable"
    if state and "state/meta.json" in manifest["files"] and meta_n != n:
        problems.append(
            f"{MANIFEST_REL} says {n} generations are committed but state/meta.json says "
            f"{str(meta_n)[:20]}"
        )
    listed = manifest["files"]
    beyond = sorted({g for g in map(generation_of, listed) if g is not None and g >= n})
    if beyond:
        problems.append(
            f"{MANIFEST_REL} lists files of generation {beyond[0]} but only {n} generations "
            "are committed"
        )
    if n > 0:
        for g in range(n):
            rel = f"generations/gen_{g:05d}.json"
            if rel not in listed:
                problems.append(f"{MANIFEST_REL} does not list {rel} (a committed generation)")
                break
    return problems


def verify(
    run_dir: pathlib.Path,
    manifest: Mapping[str, Any] | None = None,
    *,
    committed_only: bool = False,
) -> list[str]:
    """Problems of a run directory against its manifest: one "<file> <what is wrong>" each.

    Checks the manifest itself (structure, identity, agreement with state/meta.json and with the
    generations it lists), every file it lists (existence, size, SHA-256), that config.yaml holds
    the manifest's config (only generation.num_generations, not below the committed generations,
    and the logging block may differ), and that a directory with committed generations has a
    manifest. `committed_only`: leave out `state/` (the resumable state, replaced by every
    commit) and check the committed results alone, which are never rewritten.
    """
    problems: list[str] = []
    if manifest is None:
        try:
            manifest = read_manifest(run_dir)
        except RunDirDamaged as e:
            return [str(e)]
    if manifest is None:
        # No commit record: generations without one cannot be trusted (deleted state/?).
        if (state_folder(run_dir) / "meta.json").exists():
            try:
                meta = fileio.load_json(state_folder(run_dir) / "meta.json")
            except (OSError, ValueError):
                return ["state/meta.json is unreadable"]
            if not isinstance(meta, dict) or meta.get("manifest", False):
                problems.append(f"{MANIFEST_REL} is missing")
            return problems  # a run directory written before manifests existed
        if any(True for _ in committed_files(run_dir, None)):
            problems.append("state/ (the record of committed generations) is missing")
        return problems
    problems += _consistency(run_dir, manifest, state=not committed_only)
    for rel, want in manifest["files"].items():
        if committed_only and rel.startswith("state/"):
            continue
        p = _path(run_dir, rel)
        try:
            found = file_digest(p) if p.is_file() else None
        except FileNotFoundError:  # removed while it was read (a commit replacing state/)
            found = None
        if found is None:
            if not pruned_by_policy(rel, manifest["config"]):
                problems.append(f"{rel} is missing")
        elif found["size"] != want["size"]:
            problems.append(f"{rel} has changed (size {found['size']}, committed {want['size']})")
        elif found["sha256"] != want["sha256"]:
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


def _commit_token(run_dir: pathlib.Path) -> tuple | None:
    """What changes with every commit: the state folder's inode and the manifest's bytes."""
    try:
        state = state_folder(run_dir)
        return os.stat(state).st_ino, (state / MANIFEST).read_bytes()
    except OSError:
        return None  # no commit record, or state/ is being replaced right now


def verify_snapshot(run_dir: pathlib.Path, tries: int = 8) -> list[str]:
    """`verify` for a reader that does not hold the lock (plot, report): a running experiment
    may commit while the files are being hashed (`state/` is replaced, briefly absent), so
    problems count only when the commit record was the same before and after. A run that
    commits during every try (generations of milliseconds) is checked without its `state/`:
    the committed results, which a reader reads and no commit rewrites."""
    problems: list[str] = []
    for i in range(tries):
        before = _commit_token(run_dir)
        problems = verify(run_dir)
        if not problems or (before is not None and before == _commit_token(run_dir)):
            return problems
        time.sleep(0.02 * (i + 1))
    manifest = None
    for i in range(tries):
        try:
            manifest = read_manifest(run_dir)  # None while state/ is being replaced
        except RunDirDamaged:
            manifest = None  # unreadable, or removed as it was read: again (`verify` reports)
        if manifest is not None:
            break
        time.sleep(0.005 * (i + 1))
    return verify(run_dir, manifest, committed_only=True)


def committed_generations(run_dir: pathlib.Path) -> int | None:
    """The number of committed generations by the commit record, None without one."""
    manifest = read_manifest(run_dir)
    if manifest is not None:
        return int(manifest["next_generation"])
    meta = state_folder(run_dir) / "meta.json"
    return int(fileio.load_json(meta)["next_generation"]) if meta.exists() else None


def damage_message(run_dir: pathlib.Path, problems: list[str], hint: str) -> str:
    shown = "; ".join(problems[:4]) + (
        f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
    )
    return f"run directory {run_dir} is damaged: {shown}. {hint}"


# ----------------------------------------------------------------------------------------------
# The stored config.


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


# Config keys a resumed run may change: the generations to reach, what it reports while it runs
# and what it writes for people when it ends (the `logging:` and `report:` blocks never change
# results).
FREE_KEYS = ("generation.num_generations", "logging.", "report.")


def config_diff(stored: Mapping, wanted: Mapping, *, ignore=FREE_KEYS) -> str:
    """ "key: stored -> wanted" for every key that differs (empty when none); `ignore` holds keys
    and key prefixes (ending in ".") left out."""
    a, b = _flatten(stored), _flatten(wanted)

    def free(k: str) -> bool:
        return any(k == i or (i.endswith(".") and k.startswith(i)) for i in ignore)

    keys = [k for k in dict.fromkeys([*a, *b]) if not free(k) and a.get(k) != b.get(k)]
    parts = [
        f"{k}: {config_lib.short(a.get(k, '(absent)'))} -> {config_lib.short(b.get(k, '(absent)'))}"
        for k in keys[:6]
    ]
    if len(keys) > 6:
        parts.append(f"and {len(keys) - 6} more")
    return ", ".join(parts)

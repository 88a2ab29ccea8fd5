"""Guards of a run directory: one writer at a time, nothing touched that the tool did not write,
every commit resumable, and a way back from damage.

- **Lock.** `RunLock(run_dir)` holds `flock` on the run directory itself for the whole run, so
  no file can be deleted or swapped to let a second writer in; a second process is refused at
  once, named from `.lock`, where the holder records its PID, host and start time (written by
  rename: a symlink there is replaced, never followed). The kernel drops the lock when its holder
  dies, however it dies, so a lock left by a killed process is taken over (with a log line naming
  it), unless the record names another host: `flock` may not reach across hosts on a network file
  system, so such a holder may still be running and the run is refused.
- **Identity and clean-up.** A directory is a run directory only with its identity file
  (`commits.MARKER`); a non-empty `--out` without one is refused before anything is written.
  Clean-up after a killed writer (`clean_leftovers`) looks only in the folders the tool writes and
  removes only its own temporaries (`fileio.TEMPORARY`) of processes no longer running.
- **Commits.** `prepare` makes the first commit (no generation yet) when it creates a directory,
  so a kill at any point leaves a resumable directory; `commit_state` makes every later one.
- **Repair.** `repair` moves damaged files aside into `damaged-<time>/` (nothing is deleted or
  overwritten) so the next run recomputes them; results are a function of seed, chain and
  generation only, so the recomputed files are the same.
- **Config.** The config is stored as written (`${VAR}` templates kept, see `config.Expanded`) and
  compared only after the caller has validated its inputs (`prepare`); a directory whose start
  failed before any work was done is not bound to the config of that failed start. A refusal names
  the keys that differ.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import pathlib
import secrets
import shutil
import socket
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from collapse_jax import config as config_lib
from collapse_jax.rundir import commits, fileio
from collapse_jax.rundir.commits import (
    CONFIG_NAME,
    DAMAGED_PREFIX,
    NonFiniteMetric,
    NotARunDir,
    RunDirBusy,
    RunDirConflict,
    RunDirDamaged,
    RunDirError,
)

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"  # the holder's record (the lock itself is on the folder)

# ----------------------------------------------------------------------------------------------
# The lock.

_held: dict[tuple[int, int], list] = {}  # (device, inode) -> [fd, depth]: re-entrant in a process


def _not_a_folder(run_dir: pathlib.Path) -> str | None:
    """Why `run_dir` cannot be a run directory's folder (None when it can)."""
    if run_dir.is_symlink():
        try:
            os.stat(run_dir)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return "is a symbolic link loop"
            return f"is a dangling symbolic link (to {os.readlink(run_dir)})"
    if run_dir.exists() and not run_dir.is_dir():
        return "is a file, not a run directory"
    return None


def _open_folder(run_dir: pathlib.Path) -> int:
    """Creates `run_dir` if needed and opens the folder itself (a symlinked --out is followed)."""
    why = _not_a_folder(run_dir)
    if why is None:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            return os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileExistsError, NotADirectoryError) as e:
            why = f"cannot be a folder ({e.strerror})"
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            why = "is a symbolic link loop"
    raise RunDirConflict(f"--out {run_dir} {why}; choose another --out")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, run by another user
        return True
    return True


class RunLock:
    """Exclusive lock on a run directory for as long as the `with` block runs (re-entrant).

    Taking it creates the folder if needed and `claim`s it: a non-empty folder that is not a run
    directory is refused before anything is written into it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = pathlib.Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._key: tuple[int, int] | None = None

    def __enter__(self) -> RunLock:
        fd = _open_folder(self.run_dir)
        for _ in range(5):
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            if key in _held:
                os.close(fd)
                _held[key][1] += 1
                self._key = key
                return self
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                    holder = _describe(_read_holder(self.path))
                    raise RunDirBusy(
                        f"{self.run_dir} is in use by {holder}; wait for it to finish or use "
                        "another --out"
                    ) from None
                raise RunDirError(
                    f"cannot lock {self.run_dir} ({e.strerror}): its file system does not "
                    "support locks on folders; use a folder on a local disk as --out"
                ) from None
            # The path may have been renamed or replaced between open and flock: the lock must
            # be on the folder the path names now.
            try:
                now = os.stat(self.run_dir)
                same = (now.st_dev, now.st_ino) == key
            except OSError:
                same = False
            if same:
                break
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            fd = _open_folder(self.run_dir)
        else:
            os.close(fd)
            raise RunDirBusy(f"{self.run_dir} keeps being replaced while it is locked")
        try:
            self._take()
        except BaseException:  # refused, or interrupted: the folder is not left locked
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        _held[key] = [fd, 1]
        self._key = key
        return self

    def _take(self) -> None:
        """With the folder locked: claims it, checks and replaces the holder's record."""
        claim(self.run_dir)  # before anything is written: refuses a folder not ours
        previous = _read_holder(self.path)
        host = socket.gethostname()
        if previous.get("host") not in (None, host):
            raise RunDirBusy(
                f"{self.run_dir} is locked by {_describe(previous)}, another host, where it may "
                "still be running (a lock may not reach across hosts on a network file system); "
                f"if it has stopped, delete {self.path} and run again"
            )
        if previous:  # a holder that released normally empties the record
            log.warning(
                "%s: taking over the lock of %s, which is no longer running",
                self.run_dir,
                _describe(previous),
            )
        info = {
            "pid": os.getpid(),
            "host": host,
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        _write_holder(self.path, json.dumps(info) + "\n")

    def __exit__(self, *exc: Any) -> None:
        entry = _held[self._key]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[self._key]
            try:
                _write_holder(self.path, "")  # "released normally": nothing for the next to report
            finally:
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                os.close(entry[0])


def _write_holder(path: pathlib.Path, text: str) -> None:
    """The holder's record, by rename (a symlink at `path` is replaced, its target untouched)."""
    try:
        fileio.atomic_write_text(path, text)
    except OSError as e:  # the record is information only; the lock is on the folder
        log.warning("%s: cannot record the lock's holder (%s)", path, e.strerror)


def _read_holder(path: pathlib.Path) -> dict[str, Any]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    except OSError:
        return {"pid": "?"}  # a symlink or a folder: not a record this tool wrote
    try:
        text = os.read(fd, 4096).decode(errors="replace").strip()
        holder = json.loads(text) if text else {}
        return holder if isinstance(holder, dict) else {"pid": "?"}
    except (OSError, ValueError):
        return {"pid": "?"}
    finally:
        os.close(fd)


def _describe(holder: Mapping[str, Any]) -> str:
    if not holder:
        return "another process"
    return (
        f"PID {str(holder.get('pid', '?'))[:12]} on {str(holder.get('host', '?'))[:64]} "
        f"(started {str(holder.get('started', '?'))[:32]})"
    )


# ----------------------------------------------------------------------------------------------
# Identity and leftovers of killed writers.


def _transient(name: str) -> bool:
    """Entries that do not make a folder a non-empty one: the lock record, our temporaries."""
    return name == LOCK_NAME or fileio.temporary_owner(name) is not None


def claim(run_dir: pathlib.Path) -> None:
    """Makes sure `run_dir` (locked, existing) is a run directory of this tool: writes the
    identity file into an empty folder (or one with a commit record from before identity files
    existed) and refuses any other non-empty folder, before anything is written there."""
    if commits.read_marker(run_dir) is not None:
        return
    if not commits.is_run_dir(run_dir):
        other = sorted(n for n in os.listdir(run_dir) if not _transient(n))
        if other:
            shown = ", ".join(n[:40] for n in other[:3]) + (", ..." if len(other) > 3 else "")
            raise NotARunDir(
                f"--out {run_dir} is not empty ({shown}) and is not a collapse-jax run "
                f"directory (no {commits.MARKER}); choose a new or empty folder as --out"
            )
    marker = {
        "tool": commits.TOOL,
        "run_id": secrets.token_hex(8),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    fileio.atomic_write_json(run_dir / commits.MARKER, marker)


def _stale(name: str) -> bool:
    pid = fileio.temporary_owner(name)
    # Our own PID counts as dead: the caller holds the lock and has nothing in flight.
    return pid is not None and (pid == os.getpid() or not _alive(pid))


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _clean_folder(folder: pathlib.Path) -> None:
    names = sorted(os.listdir(folder))
    for name in names:  # first put back what `replace_dir` set aside
        target = fileio.aside_target(name)
        if target is None or not _stale(name):
            continue
        live = folder / target
        if live.exists() or live.is_symlink():
            _remove(folder / name)
        else:
            os.replace(folder / name, live)
            log.info("%s: restored from an interrupted replacement", live)
    for name in names:
        if fileio.aside_target(name) is None and _stale(name):
            _remove(folder / name)


def clean_leftovers(run_dir: pathlib.Path) -> None:
    """Finishes or undoes what a killed writer left half-done (call with the lock held).

    Looks only at the run directory's top level and inside the folders this tool writes
    (`commits.TOOL_FOLDERS`, symlinks not followed), and touches only this tool's temporaries
    (`fileio.TEMPORARY`) whose writer is no longer running: a folder `fileio.replace_dir` set
    aside is put back (or removed when its replacement is in place), other temporaries removed.
    """
    if not run_dir.is_dir():
        return
    _clean_folder(run_dir)
    for top in commits.TOOL_FOLDERS:
        root = run_dir / top
        if root.is_symlink() or not root.is_dir():
            continue
        for dirpath, dirnames, _ in os.walk(root):
            _clean_folder(pathlib.Path(dirpath))
            dirnames[:] = [d for d in dirnames if fileio.temporary_owner(d) is None]


# ----------------------------------------------------------------------------------------------
# Starting, resuming and committing.


def _has_work(run_dir: pathlib.Path) -> bool:
    """Whether a run directory holds results or resumable work (then its config is binding).

    Files of generations at or beyond the committed count are uncommitted leftovers (redone on
    resume), not work; a non-jittable learner's scratch counts once a file is in it (a start
    that failed while reading its inputs may have created empty folders)."""
    try:
        n = commits.committed_generations(run_dir)
    except (OSError, ValueError):
        return True  # an unreadable commit record: `verify` names it
    work = any(files for _, _, files in os.walk(run_dir / "work"))
    if n is None:  # no commit record: results without one are damage (deleted state/?)
        return work or any(True for _ in commits.committed_files(run_dir, None))
    return n > 0 or work


def prepare(cfg: config_lib.ExperimentConfig, run_dir: pathlib.Path, env_info) -> int:
    """Checks (or starts) `run_dir` for `cfg` and returns the first generation still to run.

    Call it with the lock held and after the experiment's inputs are validated. A directory with
    committed generations must pass `verify`, hold the same config (only
    `generation.num_generations` may change, and not below what is committed); a directory with
    neither results nor resumable work takes the new config, and gets its first commit (no
    generation yet), so it is resumable whenever the run stops.

    Args:
      env_info: a callable returning the `env.json` contents (written once).
    """
    claim(run_dir)
    clean_leftovers(run_dir)
    wanted = config_lib.to_dict(cfg, expand=False)
    start = 0
    cfg_path = run_dir / CONFIG_NAME
    if _has_work(run_dir):
        problems = commits.verify(run_dir)
        if problems:
            raise RunDirDamaged(
                commits.damage_message(
                    run_dir,
                    problems,
                    "Run again with --repair to move the damaged files aside and recompute "
                    "them (from generation 0: the loop keeps only the newest state; results are "
                    "identical), or use another --out.",
                )
            )
        manifest = commits.read_manifest(run_dir)
        if manifest is not None:
            stored, start = manifest["config"], manifest["next_generation"]
        else:  # a run from before manifests
            if not cfg_path.is_file():
                raise RunDirDamaged(
                    f"run directory {run_dir} holds work but no {CONFIG_NAME}; use another --out"
                )
            stored = config_lib.parse_yaml(cfg_path.read_text(), str(cfg_path))
            meta = run_dir / "state" / "meta.json"
            start = fileio.load_json(meta)["next_generation"] if meta.exists() else 0
        diff = commits.config_diff(stored, wanted)
        if diff:
            raise RunDirConflict(
                f"{run_dir} holds a run of a different config ({diff}); use another --out, or "
                "the same config (only generation.num_generations and logging may change when "
                "resuming)"
            )
        if cfg.generation.num_generations < start:
            raise RunDirConflict(
                f"generation.num_generations={cfg.generation.num_generations} is below the "
                f"{start} generations already committed in {run_dir}; ask for at least {start} "
                "or use another --out"
            )
    fileio.atomic_write_text(cfg_path, config_lib.dump(cfg, expand=False))
    if not (run_dir / "env.json").exists():
        fileio.atomic_write_json(run_dir / "env.json", env_info())
    if not _has_work(run_dir):  # the first commit, after the files it covers
        commit_state(run_dir, 0, lambda tmp: None, config=wanted)
    return start


def commit_state(
    run_dir: pathlib.Path,
    next_generation: int,
    write: Callable[[pathlib.Path], None],
    *,
    config: Mapping | None = None,
) -> None:
    """Replaces `state/` by a new version holding what `write(folder)` puts there, the state's
    meta data and the manifest: the commit point of every generation.

    Args:
      config: the config the manifest stores (default: the config.yaml `prepare` wrote; the lock
        keeps anyone else from writing it meanwhile).
    """
    if config is None:
        cfg_path = run_dir / CONFIG_NAME
        config = config_lib.parse_yaml(cfg_path.read_text(), str(cfg_path))
    with fileio.staged_dir(run_dir / "state") as tmp:
        write(tmp)
        meta = {"next_generation": next_generation, "manifest": True}
        fileio.atomic_write_json(tmp / "meta.json", meta)
        commits.write_manifest(run_dir, tmp, next_generation, config)


# ----------------------------------------------------------------------------------------------
# Repair.


def _aside_folder(run_dir: pathlib.Path) -> pathlib.Path:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    aside, i = run_dir / f"{DAMAGED_PREFIX}{stamp}", 1
    while aside.exists():
        i += 1
        aside = run_dir / f"{DAMAGED_PREFIX}{stamp}-{i}"
    aside.mkdir()
    return aside


def repair(run_dir: pathlib.Path) -> int | None:
    """Makes a damaged run directory resumable; returns the generation it restarts at (None when
    nothing was damaged). Call with the lock held.

    Only what this tool wrote is touched, and nothing is deleted or overwritten: damaged files
    are moved to `damaged-<time>/` inside the run directory. A missing or edited config.yaml is
    set aside and written anew from the manifest. Damaged generations can only be recomputed
    from a point whose complete state is on disk: the newest state is the only one the loop
    keeps, so the run restarts at generation 0 (every result is a function of seed, chain and
    generation, so the recomputed files equal the lost ones); an unreadable or foreign manifest
    is rebuilt the same way.
    """
    if not run_dir.is_dir():
        return None
    claim(run_dir)  # refuses a folder that is not a run directory
    clean_leftovers(run_dir)
    problems = commits.verify(run_dir)
    if not problems:
        return None
    try:
        manifest = commits.read_manifest(run_dir)
    except RunDirDamaged:
        manifest = None
    aside = _aside_folder(run_dir)
    cfg_path = run_dir / CONFIG_NAME
    config_bad = any(p.startswith(CONFIG_NAME) for p in problems)
    if config_bad and cfg_path.exists():
        os.replace(cfg_path, aside / CONFIG_NAME)
    if manifest is not None and all(p.startswith(CONFIG_NAME) for p in problems):
        fileio.atomic_write_text(
            cfg_path, config_lib.dump(config_lib.from_dict(manifest["config"]), expand=False)
        )
        log.warning(
            "%s: restored %s from the manifest (the old one is in %s)",
            run_dir,
            CONFIG_NAME,
            aside.name,
        )
        return manifest["next_generation"]
    # Derived outputs (figures, cached analyses) stay: they are redrawn, and not committed.
    for name in (*commits.RESULT_FOLDERS, "state", "work", *commits.TOP_FILES):
        p = run_dir / name
        damaged = p.is_dir() or any(q.startswith(name) for q in problems)
        if (p.exists() or p.is_symlink()) and damaged:
            os.replace(p, aside / name)
    log.warning(
        "%s: %s; moved the committed generations to %s, the run restarts at generation 0",
        run_dir,
        "; ".join(problems[:4]),
        aside.name,
    )
    return 0


# ----------------------------------------------------------------------------------------------
# Checks at the per-generation commit and before allocation.


def nonfinite_metrics(per_chain: Mapping[str, Any], allowed=frozenset()) -> list[str]:
    """The names of the floating metrics that are NaN or infinite in any chain, in order (those
    in `allowed` may be +-inf, never NaN)."""
    bad_names = []
    for name, v in per_chain.items():
        v = np.asarray(v)
        if not np.issubdtype(v.dtype, np.floating):
            continue
        bad = np.isnan(v) if name in allowed else ~np.isfinite(v)
        if bad.any():
            bad_names.append(name)
    return bad_names


def check_finite(generation: int, per_chain: Mapping[str, Any], allowed=frozenset()) -> None:
    """Stops the run when a metric is NaN or infinite in any chain (metrics in `allowed` may be
    +-inf, e.g. the log-determinant of a collapsed covariance, but never NaN). Called before the
    generation is committed, so the run stays resumable at that generation."""
    bad_names = nonfinite_metrics(per_chain, allowed)
    if bad_names:
        name = bad_names[0]
        v = np.asarray(per_chain[name])
        bad = np.isnan(v) if name in allowed else ~np.isfinite(v)
        chains = int(bad.reshape(bad.shape[0], -1).any(axis=1).sum())
        kind = "NaN" if np.isnan(v).any() else "infinite"
        also = f" (also: {', '.join(bad_names[1:])})" if len(bad_names) > 1 else ""
        raise NonFiniteMetric(
            f"generation {generation}: metric {name} is {kind} in {chains} of {v.shape[0]} "
            f"chain(s){also}; a value overflowed or the fit is ill-conditioned in the compute "
            "dtype (the generations before it are committed)"
        )


def tree_bytes(tree: Any) -> int:
    """Bytes of a pytree of arrays or `jax.ShapeDtypeStruct`s."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def available_memory() -> int | None:
    """Bytes of memory this process can still allocate (MemAvailable), None where unknown."""
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # no /proc (macOS): the physical memory is an upper bound
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def check_memory(bytes_per_chain: int, chains: int, key: str, *, copies: int = 4) -> None:
    """Refuses up front a run whose chains' state would not fit in host memory.

    Args:
      bytes_per_chain: host bytes one chain's carried state (data + params) takes.
      copies: how many copies the loop holds at once (state, chunk outputs, concatenation).
    """
    need = bytes_per_chain * chains * copies
    avail = available_memory()
    if avail is not None and need > avail:
        raise config_lib.ConfigError(
            f"{key}={chains}: the chains' state needs about {need / 2**30:.1f} GiB of memory "
            f"({bytes_per_chain} bytes per chain, {copies} copies) but {avail / 2**30:.1f} GiB "
            "are available; lower it, or make one chain's state smaller (the model's size, e.g. "
            "model.dim, or generation.samples_per_generation)"
        )

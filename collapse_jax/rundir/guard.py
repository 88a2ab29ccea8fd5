"""Guards of a run directory: one process at a time, a manifest of what is committed, the stored
config compared as data, and a way back from damage.

- **Lock.** `RunLock(run_dir)` holds `flock` on `run_dir/.lock` for the whole run and writes the
  holder's PID, host and start time into it. A second process is refused at once with that
  information. The kernel drops the lock when its holder dies, however it dies, so a lock left by a
  killed process is simply taken over (with a log line naming the dead holder).
- **Manifest.** Every commit of the loop (`state/` replaced by a new version, the commit point that
  already existed) carries `state/manifest.json` (`commits`). On resume and on `plot` the
  directory is checked against it (`commits.verify`); any missing or altered file is named, and
  `repair` moves the
  damaged generations aside so the next run recomputes them from the last intact generation
  (results are a function of seed, chain and generation only, so the recomputed files are the
  same).
- **Config.** The config is stored as written (`${VAR}` templates kept, see `config.Expanded`) and
  compared only after the caller has validated its inputs (`prepare`); a directory whose start
  failed before any work was done is not bound to the config of that failed start. A refusal names
  the keys that differ.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import pathlib
import shutil
import socket
from collections.abc import Mapping
from typing import Any

import numpy as np

from collapse_jax import config as config_lib
from collapse_jax.rundir import commits, fileio
from collapse_jax.rundir.commits import (
    CONFIG_NAME,
    DAMAGED_PREFIX,
    NonFiniteMetric,
    RunDirBusy,
    RunDirConflict,
    RunDirDamaged,
)

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


# ----------------------------------------------------------------------------------------------
# The lock.

_held: dict[pathlib.Path, list] = {}  # run dir -> [fd, depth]: re-entrant within one process


def _check_is_folder(run_dir: pathlib.Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirConflict(f"{run_dir} is a file, not a run directory; choose another --out")


class RunLock:
    """Exclusive lock on a run directory for as long as the `with` block runs (re-entrant)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = pathlib.Path(run_dir)
        self.path = self.run_dir / LOCK_NAME

    def __enter__(self) -> RunLock:
        key = self.run_dir.resolve()
        if key in _held:
            _held[key][1] += 1
            return self
        _check_is_folder(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise
            raise RunDirBusy(
                f"{self.run_dir} is in use by {holder}; wait for it to finish or use another --out"
            ) from None
        previous = _read_holder(fd)
        if previous:  # a holder that released normally empties the file
            log.warning(
                "%s: taking over the lock of %s, which is no longer running",
                self.run_dir,
                _describe(previous),
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        _held[key] = [fd, 1]
        return self

    def __exit__(self, *exc: Any) -> None:
        key = self.run_dir.resolve()
        entry = _held[key]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[key]
            fd = entry[0]
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # "released normally": the next holder has nothing to report
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {"pid": "?"}


def _describe(holder: Mapping[str, Any]) -> str:
    if not holder:
        return "another process"
    return (
        f"PID {holder.get('pid', '?')} on {holder.get('host', '?')} "
        f"(started {holder.get('started', '?')})"
    )


# ----------------------------------------------------------------------------------------------
# Leftovers of killed writers.


def clean_temporaries(run_dir: pathlib.Path) -> None:
    """Finishes or undoes what a killed process left half-done (call with the lock held).

    `fileio.replace_dir` renames `dst` to `dst.old` and the new folder to `dst`: a kill between
    the two renames leaves only `dst.old`, which is put back; temporary files and folders of
    `fileio.atomic_path`/`fresh_dir` are removed.
    """
    if not run_dir.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(run_dir, topdown=True):
        here = pathlib.Path(dirpath)
        for name in list(dirnames):
            p = here / name
            if name.endswith(".old"):
                dirnames.remove(name)
                live = p.with_name(name[: -len(".old")])
                if live.exists():
                    shutil.rmtree(p)
                else:
                    os.replace(p, live)
                    log.info("%s: restored from an interrupted replacement", live)
            elif fileio.TEMPORARY.match(name):
                dirnames.remove(name)
                shutil.rmtree(p, ignore_errors=True)
        for name in filenames:
            if fileio.TEMPORARY.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(here / name)


# ----------------------------------------------------------------------------------------------
# The stored config.


def _has_work(run_dir: pathlib.Path) -> bool:
    """Whether a run directory holds results or resumable work (then its config is binding)."""
    if (run_dir / "state").exists():
        return True
    if any(True for _ in commits.committed_files(run_dir, None)):
        return True
    # Resumable scratch counts only once a file is in it (a start that failed while reading
    # its inputs may have created empty folders).
    return any(files for _, _, files in os.walk(run_dir / "work"))


def prepare(cfg: config_lib.ExperimentConfig, run_dir: pathlib.Path, env_info) -> int:
    """Checks (or starts) `run_dir` for `cfg` and returns the first generation still to run.

    Call it with the lock held and after the experiment's inputs are validated. A directory with
    committed generations must pass `verify`, hold the same config (only
    `generation.num_generations` may change, and not below what is committed); a directory with
    neither results nor resumable work takes the new config.

    Args:
      env_info: a callable returning the `env.json` contents (written once).
    """
    _check_is_folder(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_temporaries(run_dir)
    wanted = config_lib.to_dict(cfg, expand=False)
    start = 0
    cfg_path = run_dir / CONFIG_NAME
    if _has_work(run_dir):
        manifest = commits.read_manifest(run_dir)
        problems = commits.verify(run_dir, manifest)
        if problems:
            raise RunDirDamaged(
                commits.damage_message(
                    run_dir,
                    problems,
                    "Run again with --repair to move the damaged generations aside and "
                    "recompute them (from generation 0: the loop keeps only the newest state; "
                    "results are identical), or use another --out.",
                )
            )
        if manifest is not None:
            stored, start = manifest["config"], manifest["next_generation"]
        else:  # resumable work but nothing committed yet, or a run from before manifests
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
                "the same config (only generation.num_generations may change when resuming)"
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
    return start


def commit_state(run_dir: pathlib.Path, next_generation: int, write) -> None:
    """Replaces `state/` by a new version holding what `write(folder)` puts there, the state's
    meta data and the manifest: the commit point of every generation. The manifest stores the
    config that `prepare` wrote (the lock keeps anyone else from writing it meanwhile)."""
    cfg_path = run_dir / CONFIG_NAME
    config = config_lib.parse_yaml(cfg_path.read_text(), str(cfg_path))
    tmp = fileio.fresh_dir(run_dir, "state")
    write(tmp)
    meta = {"next_generation": next_generation, "manifest": True}
    fileio.atomic_write_json(tmp / "meta.json", meta)
    commits.write_manifest(run_dir, tmp, next_generation, config)
    fileio.replace_dir(tmp, run_dir / "state")


# ----------------------------------------------------------------------------------------------
# Repair.


def repair(run_dir: pathlib.Path) -> int | None:
    """Makes a damaged run directory resumable; returns the generation it restarts at (None when
    nothing was damaged). Call with the lock held.

    A missing or edited config.yaml is rewritten from the manifest. Damaged generations can only
    be recomputed from a point whose complete state is on disk: the newest state is the only one
    the loop keeps, so the run restarts at generation 0 (every result is a function of seed, chain
    and generation, so the recomputed files equal the lost ones). Nothing is deleted: the
    committed files are moved to `damaged-<time>/` inside the run directory.
    """
    clean_temporaries(run_dir)
    manifest = commits.read_manifest(run_dir) if (run_dir / "state").exists() else None
    problems = commits.verify(run_dir, manifest)
    if not problems:
        return None
    config_only = manifest is not None and all(p.startswith(CONFIG_NAME) for p in problems)
    if config_only:
        fileio.atomic_write_text(
            run_dir / CONFIG_NAME,
            config_lib.dump(config_lib.from_dict(manifest["config"]), expand=False),
        )
        log.warning("%s: restored %s from the manifest", run_dir, CONFIG_NAME)
        return manifest["next_generation"]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    aside = run_dir / f"{DAMAGED_PREFIX}{stamp}"
    aside.mkdir()
    for top in sorted(run_dir.iterdir()):
        skip = top.name.startswith((".", DAMAGED_PREFIX)) or top.name == "figures"
        if top.is_dir() and not skip:
            os.replace(top, aside / top.name)
    log.warning(
        "%s: %s; moved the committed generations to %s, the run restarts at generation 0",
        run_dir,
        "; ".join(problems[:4]),
        aside.name,
    )
    return 0


# ----------------------------------------------------------------------------------------------
# Checks at the per-generation commit and before allocation.


def check_finite(generation: int, per_chain: Mapping[str, Any], allowed=frozenset()) -> None:
    """Stops the run when a metric is NaN or infinite in any chain (metrics in `allowed` may be
    +-inf, e.g. the log-determinant of a collapsed covariance, but never NaN). Called before the
    generation is committed, so the run stays resumable at that generation."""
    bad_names, first = [], None
    for name, v in per_chain.items():
        v = np.asarray(v)
        if not np.issubdtype(v.dtype, np.floating):
            continue
        bad = np.isnan(v) if name in allowed else ~np.isfinite(v)
        if bad.any():
            bad_names.append(name)
            if first is None:
                chains = int(bad.reshape(bad.shape[0], -1).any(axis=1).sum())
                kind = "NaN" if np.isnan(v).any() else "infinite"
                first = (name, kind, chains, v.shape[0])
    if first is not None:
        name, kind, chains, total = first
        also = f" (also: {', '.join(bad_names[1:])})" if len(bad_names) > 1 else ""
        raise NonFiniteMetric(
            f"generation {generation}: metric {name} is {kind} in {chains} of {total} chain(s)"
            f"{also}; a value overflowed or the fit is ill-conditioned in the compute dtype "
            "(the generations before it are committed)"
        )


def tree_bytes(tree: Any) -> int:
    """Bytes of a pytree of arrays or `jax.ShapeDtypeStruct`s."""
    import jax

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
            "are available; lower it or split the run"
        )

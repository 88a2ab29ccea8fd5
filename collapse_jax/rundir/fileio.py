"""Atomic file I/O of a run directory: every file is written to a temporary name in its folder and
renamed, so a killed writer leaves either the old or the new version, never a torn one.

Every temporary carries this tool's marker and the writing process's id:
`.<name>.cjx<pid>-<random>.tmp` for files and folders, `.<name>.cjx<pid>-old` for the folder that
`replace_dir` sets aside (see `TEMPORARY`, `temporary_owner`). Clean-up after a killed writer
removes only such names, and only those of a process that is no longer running, so a user's
files (`notes.old/`, `.backup.20261201.tar`) and a concurrent reader's temporaries (a `plot` of
a running experiment) are never touched. Readers of JSON and .npz files name the file in every
error (`CorruptFileError`).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pathlib
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; set straight back
    os.umask(mask)
    return mask


def _normal_mode(path_or_fd: str | int, *, folder: bool = False) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; results get the mode `open`/`mkdir` would give."""
    mode = (0o777 if folder else 0o666) & ~_umask()
    if isinstance(path_or_fd, int):
        os.fchmod(path_or_fd, mode)
    else:
        os.chmod(path_or_fd, mode)


def atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
    """Writes `data` to `path` via a temporary file in the same folder and a rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[pathlib.Path]:
    """Yields a temporary file name next to `path`; on success the file is synced and renamed
    to `path`, on failure (or Ctrl-C) removed. For writers that want a file name (np.save,
    safetensors, savefig): a killed writer never leaves a torn or empty `path`.

    Args:
      suffix: the temporary name's ending (some writers choose the format by it, e.g. ".npy").
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_prefix(path.name), suffix=suffix)
    try:
        _normal_mode(fd)
        os.close(fd)
        yield pathlib.Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a full disk is reported with the file being written
        raise


def atomic_write_text(path: pathlib.Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: pathlib.Path, obj: Any) -> None:
    atomic_write_text(
        path, json.dumps(obj, indent=1, sort_keys=False, default=_json_default) + "\n"
    )


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def save_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomically writes a dict of arrays as an uncompressed .npz."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())


def load_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "missing array file", str(path))
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise CorruptFileError(f"corrupt array file {path}: {e}") from e


def save_tree(path: pathlib.Path, tree: Any) -> None:
    """Saves the leaves of a pytree of arrays (the structure comes back from a template)."""
    leaves = jax.tree.leaves(tree)
    save_npz(path, {f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(leaves)})


def load_tree(path: pathlib.Path, template: Any, *, leading: int | None = None) -> Any:
    """Inverse of `save_tree`; `template` (arrays or ShapeDtypeStructs) gives the structure.

    Args:
      leading: check every leaf against the template (a file written by another model, or
        altered, is named): `leading` rows, the template leaf's number of axes and its dtype.
        For a template built for one chain, whose other axes may differ from the state's (data
        that grows with the generations). Without it only the number of leaves is checked
        (learners' parameter files, whose templates may differ in dtype).
    """
    arrays = load_npz(path)
    treedef = jax.tree.structure(template)
    if len(arrays) != treedef.num_leaves:
        raise CorruptFileError(
            f"{path} holds {len(arrays)} arrays but the expected structure has "
            f"{treedef.num_leaves} leaves: it was written by a different model"
        )
    leaves = []
    for i, want in enumerate(jax.tree.leaves(template)):
        got = arrays.get(f"leaf_{i:05d}")
        if got is None:
            raise CorruptFileError(f"{path} has no array leaf_{i:05d}: not a saved pytree")
        if leading is not None:
            ndim = len(want.shape)
            rows_ok = ndim == 0 or (got.ndim > 0 and got.shape[0] == leading)
            if got.ndim != ndim or not rows_ok or got.dtype != np.dtype(want.dtype):
                shape = [leading, *["*"] * (ndim - 1)] if ndim else []
                raise CorruptFileError(
                    f"{path}: array leaf_{i:05d} is {got.dtype}{list(got.shape)} where this run "
                    f"expects {np.dtype(want.dtype)}{shape}: it was written by a different "
                    "model or altered"
                )
        leaves.append(got)
    return jax.tree.unflatten(treedef, leaves)


TOOL_MARK = "cjx"  # in every temporary name this package writes
# Temporaries of `atomic_path` and `fresh_dir` (".<name>.cjx<pid>-<random>.<ending>") and the
# folder `replace_dir` sets aside (".<name>.cjx<pid>-old").
TEMPORARY = re.compile(
    rf"^\.(?P<name>.+)\.{TOOL_MARK}(?P<pid>\d+)-(?:(?P<old>old)|[a-z0-9_]{{8}}\.[A-Za-z0-9]+)$"
)


def _prefix(name: str) -> str:
    return f".{name}.{TOOL_MARK}{os.getpid()}-"


def temporary_owner(name: str) -> int | None:
    """The PID of the process that made temporary `name` (None: not a temporary of this tool)."""
    m = TEMPORARY.match(name)
    return int(m.group("pid")) if m else None


def aside_target(name: str) -> str | None:
    """For the folder `replace_dir` set aside (`.<name>.cjx<pid>-old`), the name it replaced."""
    m = TEMPORARY.match(name)
    return m.group("name") if m and m.group("old") else None


def replace_dir(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Replaces folder `dst` by folder `src` (same file system) with renames only.

    A kill between the two renames leaves `dst` set aside as `.<dst>.cjx<pid>-old`, which the
    next start's clean-up (`rundir.guard.clean_leftovers`) puts back. An exception raised in this
    process (an interrupt) is cleaned up here: the folder set aside is put back if `src` did not
    take its place yet, else removed."""
    old = dst.with_name(f"{_prefix(dst.name)}old")
    try:
        if old.exists():
            shutil.rmtree(old)
        if dst.exists():
            os.replace(dst, old)
        os.replace(src, dst)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        if old.exists():
            if dst.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, dst)
        raise


@contextlib.contextmanager
def staged_dir(dst: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yields a fresh temporary folder beside `dst` that replaces `dst` when the block ends.

    On any exception, an interrupt included, the temporary is removed and `dst` is left as it
    was: an interrupted writer leaves none of its temporaries behind."""
    tmp = fresh_dir(dst.parent, dst.name)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, dst)


def fresh_dir(parent: pathlib.Path, name: str) -> pathlib.Path:
    """A new empty temporary folder under `parent` (to be renamed into place).

    Its name matches `TEMPORARY`, so a run killed before the rename leaves nothing that the next
    start's clean-up (`rundir.guard.clean_leftovers`) does not remove."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=_prefix(name), suffix=".tmp")
    _normal_mode(tmp, folder=True)
    return pathlib.Path(tmp)


def load_json(path: str | os.PathLike) -> Any:
    """Reads a JSON file; a missing or corrupt file raises an error naming it."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "missing file", str(path))
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"corrupt JSON file {path}: {e}") from None


class CorruptFileError(ValueError):
    """A file exists but cannot be read as what it should be; the message names it."""

"""Atomic file I/O of a run directory: every file is written to a temporary name in its folder and
renamed, so a killed writer leaves either the old or the new version, never a torn one.

Temporaries are named `.<name>.<random>.tmp` (see `TEMPORARY`); readers of JSON and .npz files
name the file in every error (`CorruptFileError`).
"""

from __future__ import annotations

import contextlib
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
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
        raise FileNotFoundError(f"missing array file {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise CorruptFileError(f"corrupt array file {path}: {e}") from e


def save_tree(path: pathlib.Path, tree: Any) -> None:
    """Saves the leaves of a pytree of arrays (the structure comes back from a template)."""
    leaves = jax.tree.leaves(tree)
    save_npz(path, {f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(leaves)})


def load_tree(path: pathlib.Path, template: Any) -> Any:
    """Inverse of `save_tree`; `template` (arrays or ShapeDtypeStructs) gives the structure."""
    arrays = load_npz(path)
    treedef = jax.tree.structure(template)
    if len(arrays) != treedef.num_leaves:
        raise ValueError(
            f"{path} holds {len(arrays)} arrays but the expected structure has "
            f"{treedef.num_leaves} leaves: it was written by a different model"
        )
    leaves = [arrays[f"leaf_{i:05d}"] for i in range(len(arrays))]
    return jax.tree.unflatten(treedef, leaves)


def replace_dir(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Replaces folder `dst` by folder `src` (same file system) with renames only."""
    old = dst.with_name(dst.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists():
        shutil.rmtree(old)


def fresh_dir(parent: pathlib.Path, name: str) -> pathlib.Path:
    """A new empty temporary folder under `parent` (to be renamed into place).

    Its name matches `TEMPORARY` so that a run killed before the rename leaves nothing that
    `rundir.clean_temporaries` does not remove on the next start."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp")
    _normal_mode(tmp, folder=True)
    return pathlib.Path(tmp)


# Names of the temporary files and folders above (".<name>.<random>.tmp"/".npy" etc.).
TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.[A-Za-z0-9]+$")


def load_json(path: str | os.PathLike) -> Any:
    """Reads a JSON file; a missing or corrupt file raises an error naming it."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"corrupt JSON file {path}: {e}") from None


class CorruptFileError(ValueError):
    """A file exists but cannot be read as what it should be; the message names it."""

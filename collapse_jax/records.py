"""The run directory: resolved config, per-generation metrics and arrays, resumable state.

Layout of one experiment's run directory:

```
config.yaml                 the resolved config, written first
env.json                    versions, devices, git revision
generations/gen_00007.json  one summary row per finished generation (chain mean, SE, quantiles)
arrays/gen_00007.npz        per-chain values of the first `record_trials` chains, and chain means
                            of vector-valued metrics ("mean/<metric>")
state/                      what the next generation needs (data, params, next generation index)
params/gen_00007/           fitted parameters of every generation (keep_params: all)
data/gen_00007.npz          training data of non-jittable learners' generations
work/gen_00007/             a non-jittable learner's resumable scratch (checkpoints, ...)
metrics.json, metrics.csv   all summary rows; summary.txt; figures/*.png
```

Every file is written to a temporary name and renamed, so a killed run leaves either the old or
the new version, never a torn one. `state/` is the commit point of a generation: it is replaced
only after the generation's rows and arrays are on disk.
"""

from __future__ import annotations

import contextlib
import csv
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


def save_figure(fig: Any, path: str | os.PathLike, **kwargs: Any) -> pathlib.Path:
    """`fig.savefig(path)` written atomically (a kill while plotting leaves no empty PNG)."""
    path = pathlib.Path(path)
    with atomic_path(path, suffix=path.suffix or ".png") as tmp:
        fig.savefig(tmp, **kwargs)
    return path


def recover_state_dir(run_dir: pathlib.Path) -> None:
    """Finishes a `replace_dir` that was interrupted between its two renames."""
    state, old = run_dir / "state", run_dir / "state.old"
    if not state.exists() and old.exists():
        os.replace(old, state)
    elif old.exists():
        shutil.rmtree(old)


class Run:
    """Read access to one experiment's run directory (what `plots` and learners' figures use).

    Attributes:
      path: the run directory.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"run directory not found: {self.path}")
        if not (self.path / "config.yaml").is_file():
            raise FileNotFoundError(f"{self.path} is not a run directory (no config.yaml)")

    @property
    def config(self):
        from collapse_jax import config as config_lib

        return config_lib.load_config(self.path / "config.yaml")

    def finished_generations(self) -> list[int]:
        """The committed generations (by the run's commit record; files of a generation that was
        being committed when the run was killed are not among them)."""
        from collapse_jax import rundir

        n = rundir.committed_generations(self.path)
        if n is not None:
            return list(range(n))
        return sorted(  # nothing committed yet, or a bare folder of rows
            int(p.stem.split("_")[1]) for p in (self.path / "generations").glob("gen_*.json")
        )

    def rows(self) -> list[dict[str, Any]]:
        """Summary rows of every finished generation, in order."""
        return [
            load_json(self.path / "generations" / f"gen_{g:05d}.json")
            for g in self.finished_generations()
        ]

    def series(self, name: str) -> np.ndarray:
        """[G] one summary column (e.g. "w2", "w2_se", "w2_q50"); NaN where absent."""
        return np.array([r.get(name, np.nan) for r in self.rows()], dtype=np.float64)

    def arrays(self, generation: int) -> dict[str, np.ndarray]:
        """Per-chain values ("trials/<m>": [record_trials, ...]) and chain means of vector
        metrics ("mean/<m>") of one generation."""
        return load_npz(self.path / "arrays" / f"gen_{generation:05d}.npz")

    def trial_series(self, name: str) -> np.ndarray:
        """[G, record_trials, ...] per-chain values of metric `name` over all generations."""
        return np.stack([self.arrays(g)[f"trials/{name}"] for g in self.finished_generations()])

    def mean_series(self, name: str) -> np.ndarray:
        """[G, ...] chain mean of a vector-valued metric over generations."""
        return np.stack([self.arrays(g)[f"mean/{name}"] for g in self.finished_generations()])

    def params_dir(self, generation: int) -> pathlib.Path:
        return self.path / "params" / f"gen_{generation:05d}"

    def data_path(self, generation: int) -> pathlib.Path:
        """Training data that generation `generation` was fitted on (non-jittable learners)."""
        return self.path / "data" / f"gen_{generation:05d}.npz"


def write_tables(run_dir: pathlib.Path, rows: list[dict[str, Any]]) -> None:
    """metrics.json and metrics.csv with every summary row."""
    atomic_write_json(run_dir / "metrics.json", rows)
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, restval="")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(run_dir / "metrics.csv", buf.getvalue())

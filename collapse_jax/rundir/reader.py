"""Read access to a run directory (`Run`) and the tables written from it."""

from __future__ import annotations

import csv
import io
import os
import pathlib
from typing import Any

import numpy as np

from collapse_jax import config as config_lib
from collapse_jax.rundir import commits, fileio


class Run:
    """Read access to one experiment's run directory (what `plots` and learners' figures use).

    A snapshot: the committed generations are read once, at the first use, and so are the
    summary rows, so a reader of a running experiment sees one consistent set of generations
    however many the run commits meanwhile (committed files are never rewritten).

    Attributes:
      path: the run directory.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"run directory not found: {self.path}")
        if not (self.path / "config.yaml").is_file():
            raise FileNotFoundError(f"{self.path} is not a run directory (no config.yaml)")
        self._generations: list[int] | None = None
        self._rows: list[dict[str, Any]] | None = None

    @property
    def config(self):
        return config_lib.load_config(self.path / "config.yaml")

    def finished_generations(self) -> list[int]:
        """The committed generations (by the run's commit record; files of a generation that was
        being committed when the run was killed are not among them)."""
        if self._generations is None:
            n = commits.committed_generations(self.path)
            if n is not None:
                self._generations = list(range(n))
            else:  # a bare folder of rows
                self._generations = sorted(
                    int(p.stem.split("_")[1])
                    for p in (self.path / "generations").glob("gen_*.json")
                )
        return list(self._generations)

    def rows(self) -> list[dict[str, Any]]:
        """Summary rows of every finished generation, in order."""
        if self._rows is None:
            self._rows = [
                fileio.load_json(self.path / "generations" / f"gen_{g:05d}.json")
                for g in self.finished_generations()
            ]
        return list(self._rows)

    def series(self, name: str) -> np.ndarray:
        """[G] one summary column (e.g. "w2", "w2_se", "w2_q50"); NaN where absent."""
        return np.array([r.get(name, np.nan) for r in self.rows()], dtype=np.float64)

    def arrays(self, generation: int) -> dict[str, np.ndarray]:
        """Per-chain values ("trials/<m>": [record_trials, ...]) and chain means of vector
        metrics ("mean/<m>") of one generation."""
        return fileio.load_npz(self.path / "arrays" / f"gen_{generation:05d}.npz")

    def trial_series(self, name: str) -> np.ndarray:
        """[G, record_trials, ...] per-chain values of metric `name` over all generations."""
        return self._stack(f"trials/{name}")

    def mean_series(self, name: str) -> np.ndarray:
        """[G, ...] chain mean of a vector-valued metric over generations."""
        return self._stack(f"mean/{name}")

    def _stack(self, key: str) -> np.ndarray:
        parts = [self.arrays(g)[key] for g in self.finished_generations()]
        for g, x in zip(self.finished_generations(), parts):
            if x.shape != parts[0].shape:
                raise fileio.CorruptFileError(
                    f"{self.path / 'arrays' / f'gen_{g:05d}.npz'}: {key} has shape "
                    f"{list(x.shape)} where generation {self.finished_generations()[0]} has "
                    f"{list(parts[0].shape)}"
                )
        return np.stack(parts)

    def params_dir(self, generation: int) -> pathlib.Path:
        return self.path / "params" / f"gen_{generation:05d}"

    def data_path(self, generation: int) -> pathlib.Path:
        """Training data that generation `generation` was fitted on (non-jittable learners)."""
        return self.path / "data" / f"gen_{generation:05d}.npz"


def write_tables(run_dir: pathlib.Path, rows: list[dict[str, Any]]) -> None:
    """metrics.json and metrics.csv with every summary row."""
    fileio.atomic_write_json(run_dir / "metrics.json", rows)
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, restval="")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    fileio.atomic_write_text(run_dir / "metrics.csv", buf.getvalue())

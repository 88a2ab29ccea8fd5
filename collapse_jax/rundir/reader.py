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
        return config_lib.load_config(self.path / "config.yaml")

    def finished_generations(self) -> list[int]:
        """The committed generations (by the run's commit record; files of a generation that was
        being committed when the run was killed are not among them)."""
        n = commits.committed_generations(self.path)
        if n is not None:
            return list(range(n))
        return sorted(  # nothing committed yet, or a bare folder of rows
            int(p.stem.split("_")[1]) for p in (self.path / "generations").glob("gen_*.json")
        )

    def rows(self) -> list[dict[str, Any]]:
        """Summary rows of every finished generation, in order."""
        return [
            fileio.load_json(self.path / "generations" / f"gen_{g:05d}.json")
            for g in self.finished_generations()
        ]

    def series(self, name: str) -> np.ndarray:
        """[G] one summary column (e.g. "w2", "w2_se", "w2_q50"); NaN where absent."""
        return np.array([r.get(name, np.nan) for r in self.rows()], dtype=np.float64)

    def arrays(self, generation: int) -> dict[str, np.ndarray]:
        """Per-chain values ("trials/<m>": [record_trials, ...]) and chain means of vector
        metrics ("mean/<m>") of one generation."""
        return fileio.load_npz(self.path / "arrays" / f"gen_{generation:05d}.npz")

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

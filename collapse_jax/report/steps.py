"""The per-step training records of a run (`<run>/metrics.jsonl`), as curves to draw.

Each line of `metrics.jsonl` is one JSON object: `{"kind": "step", "generation", "run", "epoch",
"step", "loss", "learning_rate", "grad_norm", "tokens_per_second" | "images_per_second", "time",
"val_loss"?}` for a training step, `{"kind": "generation", "generation", <metric>: value ...}` for
a finished generation. A run killed while writing leaves at most a torn last line, which is
skipped; a run without a file has no step curves.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

FILE_NAME = "metrics.jsonl"

# Step fields that are coordinates or bookkeeping, not curves.
_NOT_CURVES = frozenset({"kind", "generation", "run", "epoch", "step", "time"})


def read_records(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete record of `metrics.jsonl` in file order (empty when there is no file).

    A line that is not a JSON object (the torn last line of a killed writer) is skipped."""
    path = pathlib.Path(run_dir) / FILE_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def step_curves(records: list[dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """The training steps' numeric fields as curves over a running step index.

    Returns:
      {field: {"x": [N] running index of the step over the whole run (generations one after the
      other), "y": [N] values, "generation": [N]}} for every numeric field of the step records
      (loss, learning_rate, grad_norm, throughput, val_loss where evaluated); empty without steps.
    """
    steps = [r for r in records if r.get("kind") == "step"]
    fields: list[str] = []
    for r in steps:
        fields += [
            k
            for k, v in r.items()
            if k not in _NOT_CURVES
            and isinstance(v, int | float)
            and not isinstance(v, bool)
            and k not in fields
        ]
    out = {}
    for f in fields:
        idx = [i for i, r in enumerate(steps) if isinstance(r.get(f), int | float)]
        out[f] = {
            "x": np.asarray(idx, dtype=np.int64),
            "y": np.asarray([steps[i][f] for i in idx], dtype=np.float64),
            "generation": np.asarray([steps[i].get("generation", 0) for i in idx], np.int64),
        }
    return out

"""The per-step training records of a run (`<run>/metrics.jsonl`), as curves to draw.

Each line of `metrics.jsonl` is one JSON object: `{"kind": "step", "generation", "run", "epoch",
"step", "loss", "learning_rate", "grad_norm", "tokens_per_second" | "images_per_second", "time",
"val_loss"?}` for a training step, `{"kind": "eval", "generation", "run", "epoch", "step",
"val_loss", ...}` for a validation, `{"kind": "generation", "generation", <metric>: value ...}`
for a finished generation (read with `rundir.events.read_metrics`, which drops the torn last line
a killed writer leaves); a run without a file has no step curves.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Step fields that are coordinates or bookkeeping, not curves.
_NOT_CURVES = frozenset({"kind", "generation", "run", "epoch", "step", "time"})


def step_curves(records: list[dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """The training steps' numeric fields as curves over a running step index.

    Validation records (`"kind": "eval"`, or a step record's `val_loss`) are placed at the index
    of the step they follow.

    Returns:
      {field: {"x": [N] running index of the step over the whole run (generations one after the
      other), "y": [N] values, "generation": [N]}} for every numeric field of the step and eval
      records (loss, learning_rate, grad_norm, throughput, val_loss, ...); empty without steps.
    """
    points: dict[str, list[tuple[int, float, int]]] = {}
    index = -1
    for r in records:
        kind = r.get("kind")
        if kind == "step":
            index += 1
        elif kind != "eval":
            continue
        for k, v in r.items():
            if k in _NOT_CURVES or isinstance(v, bool) or not isinstance(v, int | float):
                continue
            points.setdefault(k, []).append((max(index, 0), float(v), int(r.get("generation", 0))))
    if index < 0:
        return {}
    return {
        k: {
            "x": np.asarray([p[0] for p in pts], np.int64),
            "y": np.asarray([p[1] for p in pts], np.float64),
            "generation": np.asarray([p[2] for p in pts], np.int64),
        }
        for k, pts in points.items()
    }

"""Committing a generation to the run directory.

The order matters for resume: a generation's row and arrays (and the sequential driver's data
and params) are written first, `state/` (what the next generation needs, with meta.json's
next_generation) is replaced last and is the commit point. A run killed in between redoes the
generation from the old state and rewrites the same files.
"""

from __future__ import annotations

import pathlib
import re
import shutil
from collections.abc import Callable

from collapse_jax.rundir import fileio, guard


def commit_generation(run_dir: pathlib.Path, g: int, row: dict, arrays: dict) -> None:
    """Writes generation g's per-chain arrays, then its summary row."""
    fileio.save_npz(run_dir / "arrays" / f"gen_{g:05d}.npz", arrays)
    fileio.atomic_write_json(run_dir / "generations" / f"gen_{g:05d}.json", row)


def commit_state(run_dir: pathlib.Path, next_generation: int, write: Callable) -> None:
    """Replaces `state/` by a folder that `write(tmp)` fills, plus meta.json and the manifest of
    committed files (the commit; `rundir.guard.commit_state`)."""
    guard.commit_state(run_dir, next_generation, write)


def prune_params(folder: pathlib.Path, keep_params: str, newest: int) -> None:
    """`keep_params: first_last`: drop kept parameters other than the first kept generation's
    (generation 0; for jittable learners, whose parameters reach the host only at the end of a
    block, the first block's last) and the newest. Runs after the newest is committed, so a kill
    in between leaves one folder too many, never one too few."""
    if keep_params != "first_last":
        return
    kept = []
    for p in folder.glob("gen_*"):
        m = re.fullmatch(r"gen_(\d+)", p.name)
        if m:
            kept.append((int(m.group(1)), p))
    kept.sort()
    for g, p in kept[1:]:
        if g != newest:
            shutil.rmtree(p, ignore_errors=True)

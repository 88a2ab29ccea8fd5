"""The `collapse-jax bench` command's suites: the sizes of the quick and full suites, the
measurements they run (`BENCHES`) and `run`, which runs a suite and writes its JSON report."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from collapse_jax.bench import gmm, lm, theory, vae
from collapse_jax.bench.harness import (
    FLOP_CONVENTION,
    Suite,
    device_info,
    device_peak_flops,
    share_gpu_with_torch,
    targets,
    versions,
)
from collapse_jax.rundir import fileio

SUITES = {
    # Under 3 minutes on a 2-core CPU: a 2-layer model of OPT-125m's width, small batches, one
    # timed call after the compiling one (about half of the time is compilation; sizes only as
    # large as a representative rate needs).
    "quick": Suite(
        name="quick",
        opt_layers=2,
        train_batch=2,
        train_steps=1,
        decode_batch=1,
        decode_new=16,
        eval_batch=4,
        theory_chains=10_000,
        theory_generations=20,
        numpy_chains=10_000,
        gmm_chains=200,
        gmm_points=1000,
        sklearn_chains=5,
        vae_images=512,
        vae_batch=256,
        repeats=1,
    ),
    # The paper's sizes, for an accelerator: sized to finish in about 5 minutes on one H100/H200
    # (mostly compilation), so that with the gpu test lane it fits benchmarks/
    # gpu_first_contact.sh's 8 minutes.
    "full": Suite(
        name="full",
        opt_layers=12,
        train_batch=lm.PAPER_BATCH,
        train_steps=10,
        decode_batch=256,
        decode_new=64,
        eval_batch=256,
        theory_chains=1_000_000,
        theory_generations=100,
        numpy_chains=20_000,
        gmm_chains=10_000,
        gmm_points=1000,
        sklearn_chains=20,
        vae_images=10_240,
        vae_batch=256,
        repeats=3,
    ),
}


# A measurement takes the suite and a context shared by the suite's measurements (the device's
# peak, measured rates later ones extrapolate from) and returns its rows (`harness.row`).
Bench = Callable[[Suite, dict], list[dict]]
BENCHES: dict[str, Bench] = {
    "train": lm.bench_train,
    "decode": lm.bench_decode,
    "paper_generation": lm.bench_paper_generation,
    "theory": theory.bench_theory,
    "gmm": gmm.bench_gmm,
    "vae": vae.bench_vae,
}
THEORY_ROWS = theory.THEORY_ROWS


def run(
    suite: str | Suite = "quick",
    *,
    only: Sequence[str] | None = None,
    out: os.PathLike | str | None = None,
    peak_tflops: float | None = None,
    progress: Callable[[str], None] | None = None,
    benches: Mapping[str, Bench] | None = None,
) -> dict[str, Any]:
    """Runs a suite and returns the report (also written as JSON to `out`, if given).

    Args:
      suite: "quick", "full", or a `Suite`.
      only: names of `BENCHES` (or theory rows, e.g. "gaussian_exact") to run; default all.
      out: JSON file to write (atomically).
      peak_tflops: the device's peak in TFLOP/s for MFU (overrides the table / measurement).
      progress: called with a line before each measurement (the CLI prints it).
      benches: the measurements by name, in the order they run (default `BENCHES`).
    Returns:
      {"suite", "settings", "device", "versions", "started", "seconds", "rows": [...],
       "flop_convention", "targets", "xla_mem_fraction", "compile_cache"}: `targets` compares
      the rows to the aims on one H100 (`harness.TARGETS`).
    """
    if isinstance(suite, str):
        if suite not in SUITES:
            raise ValueError(f"unknown suite {suite!r}; choose from {sorted(SUITES)}")
        suite = SUITES[suite]
    benches = BENCHES if benches is None else benches
    wanted = list(only) if only else list(benches)
    theory_only = {n for n in wanted if n in THEORY_ROWS}
    for n in wanted:
        if n not in benches and n not in THEORY_ROWS:
            raise ValueError(
                f"unknown benchmark {n!r}; choose from {sorted([*benches, *THEORY_ROWS])}"
            )
    if theory_only:
        wanted = [n for n in wanted if n not in THEORY_ROWS] + ["theory"]
    mem_fraction = share_gpu_with_torch(suite.baselines)
    peaks: dict[Any, tuple[float, str]] = {}

    def peak(device):
        if peak_tflops:
            return peak_tflops * 1e12, "given (--peak-tflops)"
        if device not in peaks:
            peaks[device] = device_peak_flops(device, jnp.bfloat16)
        return peaks[device]

    ctx: dict[str, Any] = {"peak": peak, "only_theory": theory_only}
    report: dict[str, Any] = dict(
        suite=suite.name,
        settings=dataclasses.asdict(suite),
        device=device_info(),
        versions=versions(),
        started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        flop_convention=FLOP_CONVENTION,
        xla_mem_fraction=mem_fraction,
        compile_cache=jax.config.jax_compilation_cache_dir,
        rows=[],
        targets=[],
    )
    t0 = time.perf_counter()
    for name in [n for n in benches if n in wanted]:
        if progress:
            progress(f"bench {name} ({suite.name}) ...")
        report["rows"].extend(benches[name](suite, ctx))
        report["targets"] = targets(report["rows"], report["settings"])
        if out is not None:  # finished rows are never lost
            fileio.atomic_write_text(pathlib.Path(out), json.dumps(report, indent=1) + "\n")
    report["seconds"] = time.perf_counter() - t0
    if out is not None:
        fileio.atomic_write_text(pathlib.Path(out), json.dumps(report, indent=1) + "\n")
    return report

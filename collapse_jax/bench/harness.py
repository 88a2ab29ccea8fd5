"""The benchmark harness: timing, the peak-FLOPs table, result rows and the report's JSON and
table (`collapse-jax bench`, and the scripts in benchmarks/).

Timing convention: a first call compiles, then `repeats` calls are timed and their median is
reported; `interleaved` times several functions in alternating rounds so that all of them see
the same machine load. A row is one measurement: {name, value, unit, compile_s, median_ms,
config, baseline, baseline_value, ratio, note}.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# bf16 dense tensor-core / MXU peaks, TFLOP/s per chip (vendor datasheets, no sparsity), matched
# in order as substrings of the lower-cased `device_kind` (more specific names first).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("gh200", 989.0),
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),
    ("h800", 989.0),
    ("b200", 2250.0),
    ("b100", 1750.0),
    ("a100", 312.0),
    ("a800", 312.0),
    ("l40s", 362.0),
    ("l40", 181.0),
    ("l4", 121.0),
    ("a10", 125.0),
    ("v100", 125.0),  # fp16 (V100 has no bf16)
    ("rtx 4090", 165.0),
    ("tpu v6", 918.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v5", 459.0),
    ("tpu v4", 275.0),
    ("tpu v3", 123.0),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Suite:
    """Sizes of one benchmark suite (the names are the JSON's `settings`).

    Attributes:
      name: "quick", "full" or a custom name.
      opt_layers: decoder layers of the OPT-125m-shaped model (12 = the real model).
      train_batch: blocks per train step (paper: 128); train_steps: timed steps.
      decode_batch: prompts per `generate` call; decode_new: new tokens (paper: 64).
      eval_batch: blocks per evaluation forward.
      theory_chains, theory_generations: the theory chains' sizes.
      numpy_chains: chains of the NumPy baselines (their rate per chain is size-independent).
      gmm_chains, gmm_points: EM chains and points per chain; sklearn_chains: baseline fits.
      vae_images, vae_batch: images per timed VAE epoch and the batch size (paper: 256).
      repeats: timed repeats per measurement (the median is reported).
      baselines: run the baselines (PyTorch, NumPy, scikit-learn) where installed.
      opt_width: "125m" (OPT-125m's width and vocabulary) or "tiny" (a 64-wide model with 512
        tokens, for the test suite: numbers then say nothing about OPT-125m).
    """

    name: str
    opt_layers: int
    train_batch: int
    train_steps: int
    decode_batch: int
    decode_new: int
    eval_batch: int
    theory_chains: int
    theory_generations: int
    numpy_chains: int
    gmm_chains: int
    gmm_points: int
    sklearn_chains: int
    vae_images: int
    vae_batch: int
    repeats: int
    baselines: bool = True
    opt_width: str = "125m"


def block(tree: Any) -> Any:
    """Waits for every array of a result (JAX dispatch is asynchronous)."""
    return jax.block_until_ready(tree)


def timeit(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(compile seconds = first call minus a steady call, median seconds of `repeats` calls).

    `fn` must block until its result is ready."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return max(first - med, 0.0), med


def once(fn: Callable[[], Any]) -> float:
    """Seconds of one call: for baselines with nothing to compile (NumPy), where timing a
    warm-up call first would only double their cost."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measured_matmul_flops(dtype: Any = jnp.float32, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an n^3 matmul in `dtype` on the default device."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    block(f(a))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        block(f(a))
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def device_peak_flops(device: Any, dtype: Any = jnp.bfloat16) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for `device`: the datasheet table for a known
    accelerator, else a measured matmul in `dtype` (n = 1024 on a CPU, 8192 elsewhere; on the
    2-core CPU n = 1024 and 2048 measured the same peak, 41.5 vs 40.6 GFLOP/s in bf16, in 0.7 s
    instead of 3.2 s)."""
    kind = str(getattr(device, "device_kind", "")).lower()
    if device.platform != "cpu":
        for name, tflops in PEAK_TFLOPS:
            if name in kind:
                return tflops * 1e12, f"datasheet bf16 dense ({name})"
    n = 1024 if device.platform == "cpu" else 8192
    return (
        measured_matmul_flops(dtype, n),
        f"measured {jnp.dtype(dtype).name} matmul {n}^3 (device not in the peak table)",
    )


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict, dict]:
    """({name: compile seconds}, {name: median seconds}) of each function, timed in interleaved
    rounds after a first call each, so that all of them see the same load."""
    first = {}
    for k, f in fns.items():
        t0 = time.perf_counter()
        f()
        first[k] = time.perf_counter() - t0
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, repeats)):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {k: max(first[k] - med[k], 0.0) for k in fns}, med


def installed(module: str) -> bool:
    """Whether `module` imports here (a baseline's package is usable)."""
    try:
        __import__(module)
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def row(name, value, unit, *, compile_s, median_s, config, baseline=None, base_value=None,
         note="", **extra) -> dict:  # fmt: skip
    """One result row; `ratio` = value / base_value when a baseline ran."""
    return dict(
        name=name,
        value=float(value),
        unit=unit,
        compile_s=round(float(compile_s), 3),
        median_ms=round(1e3 * float(median_s), 3),
        config=config,
        baseline=baseline,
        baseline_value=None if base_value is None else float(base_value),
        ratio=None if base_value is None else float(value) / float(base_value),
        note=note,
        **extra,
    )


def versions() -> dict[str, str | None]:
    """Versions of Python and of the packages the benchmarks use (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in (
        "jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "scikit-learn",
    ):  # fmt: skip
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def device_info() -> dict[str, Any]:
    """The default device: platform, kind, count, host CPUs."""
    d = jax.devices()[0]
    return dict(
        platform=d.platform,
        device_kind=str(getattr(d, "device_kind", d.platform)),
        device_count=jax.device_count(),
        host=platform.node(),
        cpu_count=os.cpu_count(),
    )


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    x = float(x)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def format_table(report: dict[str, Any]) -> str:
    """The report as a fixed-width text table, plus the device line and the notes."""
    d = report["device"]
    lines = [
        f"collapse-jax bench --suite {report['suite']}: {d['device_kind']} ({d['platform']}, "
        f"{d['device_count']} device(s)), jax {report['versions'].get('jax')}",
        f"{'benchmark':<18} {'value':>10}  {'unit':<20} {'baseline':>10} {'ratio':>7}  "
        f"{'compile s':>9}  extra",
    ]
    notes = []
    for r in report["rows"]:
        extra = []
        if "mfu" in r:
            extra.append(f"MFU {100 * r['mfu']:.1f}%")
        if "regenerate_37k_s" in r:
            extra.append(f"37k blocks {_fmt(r['regenerate_37k_s'])} s")
        if r["name"] == "paper_generation":
            extra.append(
                f"train {_fmt(r['train_s'])} s, eval {_fmt(r['eval_s'])} s, "
                f"regen {_fmt(r['regenerate_s'])} s"
            )
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(
            f"{r['name']:<18} {_fmt(r['value']):>10}  {r['unit']:<20} "
            f"{_fmt(r['baseline_value']):>10} {ratio:>7}  {r['compile_s']:>9.1f}  "
            + "; ".join(extra)
        )
        if r["baseline"]:
            notes.append(f"  {r['name']}: baseline = {r['baseline']}")
        if r["note"]:
            notes.append(f"  {r['name']}: {r['note']}")
    if "train_step" in {r["name"] for r in report["rows"]}:
        tr = next(r for r in report["rows"] if r["name"] == "train_step")
        notes.append(
            f"  MFU = tokens/s x ({tr['config']['flop_formula']}) / peak; peak "
            f"{_fmt(tr['config']['peak_flops'])}FLOP/s from {tr['config']['peak_source']}"
        )
    return "\n".join(lines + (["notes:"] + notes if notes else []))


def default_out(report_device: dict[str, Any], suite: str) -> pathlib.Path:
    """benchmarks/results/bench-<suite>-<device>.json next to the package (or in the cwd)."""
    kind = report_device["device_kind"] if report_device["platform"] != "cpu" else "cpu"
    slug = "".join(c if c.isalnum() else "_" for c in kind.lower()).strip("_")
    root = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    if not root.parent.is_dir():
        root = pathlib.Path("benchmarks") / "results"
    return root / f"bench-{suite}-{slug}.json"


def write_rows(path: os.PathLike | str, rows: list[dict], *, keep_others: bool) -> pathlib.Path:
    """Writes result rows as a JSON list to `path` (a script's results file).

    With `keep_others`, the rows of an earlier file at `path` whose names were not re-run are kept
    before the new ones (a partial re-run updates only its own rows).
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if keep_others and path.exists():
        done = {r["name"] for r in rows}
        rows = [r for r in json.loads(path.read_text()) if r["name"] not in done] + rows
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return path

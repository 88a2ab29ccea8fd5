"""The memory plan of `collapse-jax run CONFIG --dry-run`: what each compiled program of a run
needs per device, against the device's memory, before anything runs.

Each program is lowered from abstract shapes and compiled for this backend (nothing is
executed, no weights or data are loaded) and XLA's `compiled.memory_analysis()` gives its
per-device sizes: arguments, outputs, temporaries and generated code, less what is aliased
(donated arguments reused as outputs). Where a backend has no memory analysis, the lowered
program's argument and output sizes are reported instead. The programs: for the language model
its train step at the config's batch and its regeneration's search
(`loop.HasPrograms`); for every jittable learner the loop's block programs
(`loop.block_programs`: generation 0 and a scanned block, one chunk of chains).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax

from collapse_jax import config as config_lib
from collapse_jax import loop


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """Per-device bytes of one compiled program (None: not reported by this backend).

    Attributes:
      name: what the program is (e.g. "train step (128 x 64 tokens, bfloat16 compute)").
      argument, output, temp, code, alias: XLA's argument, output, temporary, generated-code
        and aliased (donated and reused) sizes.
      source: "compiled memory_analysis" or "lowered argument/output sizes".
    """

    name: str
    argument: int
    output: int
    temp: int | None
    code: int | None
    alias: int
    source: str

    @property
    def total(self) -> int:
        """Arguments + outputs + temporaries + code - aliased: what the program holds while it
        runs (XLA's own estimate of a program's peak)."""
        return self.argument + self.output + (self.temp or 0) + (self.code or 0) - self.alias


def _nbytes_per_device(x: Any) -> int:
    shape = tuple(x.shape)
    sharding = getattr(x, "sharding", None)
    if sharding is not None and hasattr(sharding, "shard_shape"):
        shape = sharding.shard_shape(shape)
    return math.prod(shape) * jax.numpy.dtype(x.dtype).itemsize


def measure(name: str, lower: Callable[[], jax.stages.Lowered]) -> ProgramMemory:
    """Lowers and compiles a program (`lower()` returns its `jax.stages.Lowered`) and reads its
    per-device memory."""
    lowered = lower()
    stats = lowered.compile().memory_analysis()
    if stats is None:
        return ProgramMemory(
            name,
            argument=sum(_nbytes_per_device(a) for a in jax.tree.leaves(lowered.args_info)),
            output=sum(_nbytes_per_device(o) for o in jax.tree.leaves(lowered.out_info)),
            temp=None,
            code=None,
            alias=0,
            source="lowered argument/output sizes",
        )
    return ProgramMemory(
        name,
        argument=int(stats.argument_size_in_bytes),
        output=int(stats.output_size_in_bytes),
        temp=int(stats.temp_size_in_bytes),
        code=int(stats.generated_code_size_in_bytes),
        alias=int(stats.alias_size_in_bytes),
        source="compiled memory_analysis",
    )


def device_memory(device: jax.Device) -> int | None:
    """The memory a device offers its programs (`memory_stats()["bytes_limit"]`), or None where
    the backend does not say (the CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats raise various errors
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"])


def programs(exp: config_lib.ExperimentConfig) -> list[tuple[str, Callable[[], Any]]]:
    """The programs of one experiment to plan: the learner's own (`loop.HasPrograms`), else the
    loop's block programs of a jittable learner."""
    learner = loop.make_learner(exp)
    if isinstance(learner, loop.HasPrograms):
        return learner.programs(exp)
    if learner.jittable:
        return loop.block_programs(exp, learner)
    return []


def plan(cfg: Any) -> dict[str, list[ProgramMemory]]:
    """{experiment name: its programs' memory} for a config (an experiment or a suite)."""
    experiments = cfg.experiments if isinstance(cfg, config_lib.SuiteConfig) else (cfg,)
    return {exp.name: [measure(n, f) for n, f in programs(exp)] for exp in experiments}


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for div, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def format_table(planned: dict[str, list[ProgramMemory]], device: jax.Device | None = None) -> str:
    """One table: every program's per-device sizes and its share of the memory of `device`
    (default: JAX's first device)."""
    device = jax.devices()[0] if device is None else device
    limit = device_memory(device)
    kind = getattr(device, "device_kind", device.platform)
    have = "unknown" if limit is None else _size(limit)
    lines = [
        f"# memory plan per device: {kind} ({device.platform}, {jax.device_count()} device(s)),"
        f" device memory {have}",
        f"# {'program':<58} {'arguments':>10} {'outputs':>10} {'temp':>10} {'code':>10} "
        f"{'aliased':>10} {'total':>10} {'of device':>9}",
    ]
    notes = set()
    for exp_name, rows in planned.items():
        if not rows:
            lines.append(
                f"# {exp_name}: not planned (its fit runs chains in batches from Python: "
                "no single block program)"
            )
        for r in rows:
            share = "unknown" if limit is None else f"{100 * r.total / limit:.1f}%"
            name = f"{exp_name}: {r.name}" if len(planned) > 1 else r.name
            lines.append(
                f"# {name:<58} {_size(r.argument):>10} {_size(r.output):>10} "
                f"{_size(r.temp):>10} {_size(r.code):>10} {_size(r.alias):>10} "
                f"{_size(r.total):>10} {share:>9}"
            )
            notes.add(r.source)
    lines.append(f"# sizes from: {', '.join(sorted(notes)) or '-'}")
    return "\n".join(lines)

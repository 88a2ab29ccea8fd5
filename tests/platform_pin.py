"""Which platform the test suite runs JAX on (read by tests/conftest.py before JAX is imported).

The suite assumes 8 simulated CPU devices (`--xla_force_host_platform_device_count=8`), so on a
GPU or TPU machine it pins JAX to the CPU: otherwise `jax.devices()` is the one accelerator and
every 8-device mesh raises, and TF32 matmuls break the float32 parity tolerances. The `gpu` lane
(`pytest -m gpu`, tests/gpu) lifts the pin; COLLAPSE_JAX_TEST_PLATFORM chooses explicitly:

- unset: "cpu", or no pin when the command line selects the gpu lane (`-m gpu`);
- "cpu": JAX_PLATFORMS=cpu;
- "gpu" / "cuda" / "rocm" / "tpu": that platform first, the CPU second (the gpu lane's CPU
  references run on `jax.devices("cpu")`);
- "auto": no pin (JAX's own choice: an accelerator when one is installed).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

ENV = "COLLAPSE_JAX_TEST_PLATFORM"
_ACCELERATORS = {"gpu": "cuda", "cuda": "cuda", "rocm": "rocm", "tpu": "tpu"}


def marker_expression(argv: Sequence[str]) -> str | None:
    """The `-m EXPR` of a pytest command line (the last one given), else None."""
    expr = None
    args = list(argv)
    for i, a in enumerate(args):
        if a == "-m" and i + 1 < len(args):
            expr = args[i + 1]
        elif a.startswith("-m") and len(a) > 2 and not a.startswith("--"):
            expr = a[2:]
    return expr


def selects_gpu_lane(argv: Sequence[str]) -> bool:
    """Whether the command line's marker expression asks for the `gpu` marker (not `not gpu`)."""
    expr = marker_expression(argv)
    if expr is None:
        return False
    return re.search(r"(?<!not )\bgpu\b", " ".join(expr.split())) is not None


def jax_platforms(environ: Mapping[str, str], argv: Sequence[str]) -> str | None:
    """The JAX_PLATFORMS value the suite sets (None: leave it to JAX)."""
    asked = environ.get(ENV)
    if asked is None:
        return None if selects_gpu_lane(argv) else "cpu"
    asked = asked.strip().lower()
    if asked == "auto":
        return None
    if asked == "cpu":
        return "cpu"
    if asked in _ACCELERATORS:
        return f"{_ACCELERATORS[asked]},cpu"
    raise ValueError(f"{ENV}={asked!r}: choose from cpu, gpu, cuda, rocm, tpu or auto")

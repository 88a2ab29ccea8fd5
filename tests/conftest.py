"""Test-wide JAX settings (JAX pinned to the CPU with 8 fake devices, strict rank promotion), the
tiers, a key fixture.

The platform pin (tests/platform_pin.py) keeps the suite unchanged on a GPU or TPU machine: JAX
runs on the CPU unless COLLAPSE_JAX_TEST_PLATFORM asks otherwise or the command selects the gpu
lane (`pytest -m gpu`: tests/gpu, skipped with the reason when no GPU is visible).

Tiers by folder: tests/unit (the default run), tests/integration (whole runs, resume, sweeps,
bench, the golden record; marked `slow` here), tests/parity (torch, scikit-learn and SciPy
references; marked `parity` here) and tests/gpu (marked `gpu`). pyproject's addopts deselect
`slow`, `parity`, `multiprocess` and `gpu`; `-m ''` runs everything (CI; the gpu tests then skip
on a machine without a GPU). A default-tier test slower than
SLOW_UNIT_SECONDS is named at the end of the run: move it to integration or shrink it."""

import os
import sys

from tests import platform_pin

# Must happen before JAX is imported. The decision is passed on to xdist workers (whose command
# line is not pytest's) through the environment.
_platforms = platform_pin.jax_platforms(os.environ, sys.argv)
os.environ.setdefault(platform_pin.ENV, "auto" if _platforms is None else _platforms.split(",")[0])
if _platforms is not None:
    os.environ["JAX_PLATFORMS"] = _platforms

# Must happen before the JAX backend initialises: a (2, 2, 2) data x fsdp x tensor mesh on CPU.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gc  # noqa: E402
import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = pathlib.Path(__file__).resolve().parents[1]

# A persistent compilation cache under .pytest_cache (COLLAPSE_JAX_TEST_COMPILE_CACHE: another
# folder, or "off"). With the per-module jax.clear_caches() below, a program another module or an
# earlier run compiled is read from disk instead of compiled again: a rerun of
# tests/unit/test_generation.py took half the CPU time of a cold one
# (benchmarks/results/test_compile_cache-cpu.json).
_cache = os.environ.get(
    "COLLAPSE_JAX_TEST_COMPILE_CACHE", str(REPO / ".pytest_cache" / "jax-compilation-cache")
)
if _cache != "off":
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

TESTS = REPO / "tests"
TIER_MARKS = {"integration": "slow", "parity": "parity", "gpu": "gpu"}
SLOW_UNIT_SECONDS = 10.0


def pytest_collection_modifyitems(config, items):
    """Marks every test under tests/integration `slow`, tests/parity `parity`, tests/gpu `gpu`."""
    for item in items:
        path = pathlib.Path(str(item.path)).resolve()
        if TESTS in path.parents:
            mark = TIER_MARKS.get(path.relative_to(TESTS).parts[0])
            if mark is not None:
                item.add_marker(mark)


_slow_unit: list[tuple[float, str]] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.duration > SLOW_UNIT_SECONDS:
        if not any(item.iter_markers(m) for m in ("slow", "parity", "multiprocess")):
            report.user_properties.append(("slow_unit", report.duration))


def pytest_runtest_logreport(report):
    # Runs in the controlling process under xdist too (reports travel with user_properties).
    for name, value in report.user_properties:
        if name == "slow_unit":
            _slow_unit.append((value, report.nodeid))


def pytest_terminal_summary(terminalreporter):
    """Names default-tier tests over SLOW_UNIT_SECONDS (a report, not a failure: a loaded
    machine can slow any test, and a timed failure would make CI flaky)."""
    if _slow_unit:
        terminalreporter.section(f"default-tier tests over {SLOW_UNIT_SECONDS:.0f} s")
        for seconds, nodeid in sorted(_slow_unit, reverse=True):
            terminalreporter.write_line(f"{seconds:7.1f} s  {nodeid}")


def _data_dir() -> pathlib.Path | None:
    env = os.environ.get("COLLAPSE_JAX_DATA")
    candidates = [pathlib.Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """The real-data folder (WikiText-2 valid/test, OPT tokenizer, MNIST); skips if absent."""
    d = _data_dir()
    if d is None:
        pytest.skip("real data not found: set COLLAPSE_JAX_DATA")
    return d


@pytest.fixture
def key():
    return jax.random.key(0)


# Compiled programs are kept across test modules (a program another module traced is reused, not
# traced and compiled again) until the process holds this many memory mappings.
MAPPING_BUDGET = 16_000


def _mappings() -> int | None:
    """Memory mappings of this process (Linux), or None where /proc cannot tell."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after a test module once the process holds more than
    MAPPING_BUDGET memory mappings (after every module where the count is unknown).

    The suite compiles thousands of XLA programs in one process; each keeps memory mappings
    alive, and a process that nears the kernel's map limit (vm.max_map_count, 65530 by default)
    crashes inside the XLA compiler. The budget is a quarter of that default. Nothing here relies
    on a cache kept, or dropped, across modules."""
    yield
    held = _mappings()
    if held is None or held > MAPPING_BUDGET:
        jax.clear_caches()
        gc.collect()

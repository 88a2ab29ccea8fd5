"""The gpu lane's plumbing on a machine without a GPU: `pytest -m gpu` collects tests/gpu, lifts
the CPU pin and skips every test with the reason; the default run deselects them."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def _pytest(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLLAPSE_JAX_TEST_PLATFORM")}
    env.pop("COLLAPSE_JAX_GPU_LANE_ON_CPU", None)
    # The child sees no GPU even on a GPU machine (`-m gpu` leaves JAX_PLATFORMS as it is).
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_gpu_lane_skips_with_the_reason_without_a_gpu():
    r = _pytest("-m", "gpu", "tests/gpu")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "passed" not in r.stdout and "failed" not in r.stdout, r.stdout
    assert "skipped" in r.stdout and "no GPU visible to JAX" in r.stdout, r.stdout


def test_the_default_run_deselects_the_gpu_lane():
    r = _pytest("tests/gpu", "--co")
    assert r.returncode == 5, r.stdout + r.stderr  # 5: no test collected (all deselected)
    assert "deselected" in r.stdout, r.stdout

"""The gpu lane (`pytest -m gpu`): every test here needs a GPU and is skipped with the reason
when JAX sees none. COLLAPSE_JAX_GPU_LANE_ON_CPU=1 runs the lane's tests on the CPU instead (the
"accelerator" is then CPU device 0): a check of the tests themselves, not of a GPU, for machines
without one. Parity tests take the `highest_precision` fixture
(`jax_default_matmul_precision=highest`: float32 matmuls in full float32, not TF32)."""

from __future__ import annotations

import os

import jax
import pytest

ON_CPU_ENV = "COLLAPSE_JAX_GPU_LANE_ON_CPU"


def missing_gpu_reason() -> str | None:
    """Why the lane cannot run here (None: a GPU is JAX's default backend, or the CPU check)."""
    if os.environ.get(ON_CPU_ENV) == "1":
        return None
    backend = jax.default_backend()
    if backend == "gpu":
        return None
    return (
        f"no GPU visible to JAX (default backend {backend!r}, "
        f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')!r}); run `pytest -m gpu` on a GPU "
        f"machine with jax[cuda12] (or {ON_CPU_ENV}=1 to check these tests on the CPU)"
    )


@pytest.fixture(autouse=True)
def _needs_gpu():
    reason = missing_gpu_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def accelerator() -> jax.Device:
    """The device under test: the first GPU (CPU device 0 with COLLAPSE_JAX_GPU_LANE_ON_CPU)."""
    return jax.devices()[0]


@pytest.fixture
def cpu() -> jax.Device:
    """The CPU reference device (the lane pins JAX_PLATFORMS=cuda,cpu or leaves both visible)."""
    return jax.devices("cpu")[-1]


@pytest.fixture
def highest_precision():
    """float32 matmuls in full float32 on the accelerator (no TF32/bf16 passes) for parity."""
    with jax.default_matmul_precision("highest"):
        yield

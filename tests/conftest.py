"""Test-wide JAX settings: 8 fake CPU devices, strict rank promotion, a key fixture."""

import os

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


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after every test module.

    The suite compiles thousands of XLA programs in one process; each keeps memory mappings
    alive, and a process that nears the kernel's map limit (vm.max_map_count, 65530 by default)
    crashes inside the XLA compiler. Nothing here relies on a cache kept across modules."""
    yield
    jax.clear_caches()
    gc.collect()

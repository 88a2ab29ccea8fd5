"""The memory plan's pieces (collapse_jax.memplan); whole plans of LM and theory configs are
in tests/integration/test_memplan.py."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from collapse_jax import memplan


def test_without_a_memory_analysis_the_lowered_sizes_are_reported():
    class NoAnalysis:  # a backend whose compiled programs report no memory analysis
        def __init__(self, lowered):
            self.args_info, self.out_info = lowered.args_info, lowered.out_info

        def compile(self):
            return self

        def memory_analysis(self):
            return None

    f = jax.jit(lambda x, y: (x @ y, x.sum()))
    args = (jax.ShapeDtypeStruct((16, 8), np.float32), jax.ShapeDtypeStruct((8, 4), np.float32))
    r = memplan.measure("f", lambda: NoAnalysis(f.lower(*args)))
    assert (r.argument, r.output, r.temp, r.code) == (4 * (128 + 32), 4 * (64 + 1), None, None)
    assert r.total == 4 * (128 + 32 + 64 + 1) and r.source == "lowered argument/output sizes"


def test_the_device_memory_of_a_cpu_is_unknown():
    cpu = jax.devices("cpu")[0]
    if cpu.memory_stats():
        pytest.skip("this CPU backend reports memory stats")
    assert memplan.device_memory(cpu) is None

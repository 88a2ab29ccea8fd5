"""Two local JAX processes (coordinator on 127.0.0.1, CPU, 2 devices each) train on a global
("data" 2 x "fsdp" 2) mesh and reach the same losses as one process."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from collapse_jax.jaxtools import sharding
from collapse_jax.lm import train
from tests.multihost_worker import MULTIHOST_RUN, tiny_blocks, tiny_model

WORKER = pathlib.Path(__file__).resolve().parents[2] / "multihost_worker.py"
REPO = pathlib.Path(__file__).resolve().parents[3]
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # the worker asks for 2 devices itself
    procs, logs = [], []
    for pid in range(2):
        log = open(tmp_path / f"worker{pid}.log", "w")  # noqa: SIM115 -- closed below
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(WORKER),
                    str(pid),
                    "2",
                    str(port),
                    str(tmp_path / f"{pid}.json"),
                ],
                env=env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise
    finally:
        for log in logs:
            log.close()
    for pid, p in enumerate(procs):
        out = (tmp_path / f"worker{pid}.log").read_text()[-3000:]
        assert p.returncode == 0, f"worker {pid} failed:\n{out}"
    results = [json.loads((tmp_path / f"{pid}.json").read_text()) for pid in range(2)]
    assert all(r["devices"] == 4 for r in results)
    # Both processes see the same (global) losses.
    assert results[0]["history"]["train_loss"] == results[1]["history"]["train_loss"]

    # One process, 8 devices, data-parallel: the curve must not depend on the mesh or processes.
    mesh = sharding.make_mesh({"data": 8}, devices=jax.devices()[:8])
    blocks = tiny_blocks()
    _, hist = train.finetune(
        tiny_model(), blocks, valid_blocks=blocks[:8], mesh=mesh, **MULTIHOST_RUN
    )
    multi = results[0]["history"]
    np.testing.assert_allclose(multi["train_loss"], hist["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(multi["valid_loss"], hist["valid_loss"], rtol=1e-5)
    ppl = train.perplexity(tiny_model(), blocks[:8], batch_size=8, mesh=mesh, per_sequence=True)
    np.testing.assert_allclose(results[1]["ppl"], ppl, rtol=1e-5)

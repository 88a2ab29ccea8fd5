"""Two local JAX processes run the LM experiment through the command line (`python -m collapse_jax
run`, coordinator on 127.0.0.1, CPU, 2 devices each, a global data mesh of 4): process 0 alone
writes the run directory, a kill of the pair mid-generation resumes, and the results are a
4-device single-process run's.

What equals what: the training data of every generation (the regenerated tokens included) are
bit-identical to one process with 4 devices; the metrics agree to float32 rounding (rtol 1e-5),
not bitwise, because the gradient and loss sums across the 4 devices are added in another order
when two of them are in another process (gloo) than when all are in one.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from collapse_jax import config as config_lib
from collapse_jax import loop
from collapse_jax.rundir import commits, fileio
from tests.integration.lm.test_source_experiment import DEFAULT, SHRINK

REPO = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_S = 420
# SHRINK keeps the config's pretrained base (base/, made at the run's first start and sent on
# resume) to 4 steps: over the full 384 its float32 sums drift apart (rtol 5e-4, not 1e-5).
OVERRIDES = [*SHRINK, "mesh.data=-1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: pathlib.Path, outs: list[pathlib.Path], tag: str) -> list[subprocess.Popen]:
    """Process i runs `collapse-jax run` with `--out outs[i]`: process 1 gets a folder of its
    own, so that anything it wrote there would show."""
    port = _free_port()
    procs = []
    for pid, out in enumerate(outs):
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(pid),
            "TMPDIR": str(tmp_path / f"{tag}-tmp{pid}"),  # where process 1's scratch goes
            # No persistent compilation cache: a process that reads a program from it while the
            # other compiles reaches the first collective too late (gloo waits 30 s).
            "JAX_COMPILATION_CACHE_DIR": "",
        }
        (tmp_path / f"{tag}-tmp{pid}").mkdir(exist_ok=True)
        log = open(tmp_path / f"{tag}-p{pid}.log", "w")  # noqa: SIM115 -- closed by the child
        cmd = [sys.executable, "-m", "collapse_jax", "run", str(DEFAULT), *OVERRIDES]
        cmd += ["--out", str(out), "--no-progress"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return procs


def _wait(procs: list[subprocess.Popen]) -> list[int]:
    try:
        return [p.wait(timeout=TIMEOUT_S) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise


def _log(tmp_path: pathlib.Path, tag: str, pid: int) -> str:
    return (tmp_path / f"{tag}-p{pid}.log").read_text()[-3000:]


def _rows(out: pathlib.Path) -> list[dict]:
    rows = json.loads((out / "metrics.json").read_text())
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]


@pytest.mark.multiprocess
def test_two_processes_through_the_cli_write_once_resume_and_match_one(tmp_path):
    out, elsewhere = tmp_path / "run", tmp_path / "process1-out"
    # 1. The pair is killed in generation 1, after its training set is in work/ (generation 0
    # committed): the resume has both committed state and a generation's finished steps to send.
    procs = _launch(tmp_path, [out, elsewhere], "killed")
    marker = out / "work" / "gen_00001" / "train.npz"
    deadline = time.monotonic() + TIMEOUT_S
    while not marker.exists() and all(p.poll() is None for p in procs):
        assert time.monotonic() < deadline, "generation 1 never started"
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    codes = _wait(procs)
    assert codes == [-signal.SIGKILL] * 2, (codes, _log(tmp_path, "killed", 0))
    assert commits.committed_generations(out) == 1 and commits.verify(out) == []
    gen0 = (out / "data" / "gen_00000.npz").stat().st_ino

    # 2. The same command resumes (process 1 again with a folder of its own).
    procs = _launch(tmp_path, [out, elsewhere], "resumed")
    codes = _wait(procs)
    for pid, code in enumerate(codes):
        assert code == 0, f"process {pid} failed:\n{_log(tmp_path, 'resumed', pid)}"
    assert commits.verify(out) == [] and commits.committed_generations(out) == 2
    assert (out / "data" / "gen_00000.npz").stat().st_ino == gen0  # resumed, not redone
    assert (out / "summary.txt").is_file() and any((out / "figures").glob("*.png"))
    assert (out / "base").is_dir()
    # Process 1 never wrote its --out nor left its scratch folder behind.
    assert not elsewhere.exists()
    assert list((tmp_path / "resumed-tmp1").iterdir()) == []

    # 3. One process with 4 devices (the same global device count and mesh).
    cfg = config_lib.load_config(DEFAULT, [*SHRINK, "mesh.data=4"])
    ref = tmp_path / "ref"
    loop.run_generations(cfg, ref, learner=loop.make_learner(cfg))
    multi, single = _rows(out), _rows(ref)
    assert [r.keys() for r in multi] == [r.keys() for r in single]
    for a, b in zip(multi, single, strict=True):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
    for g in range(2):
        a = fileio.load_npz(out / "data" / f"gen_{g:05d}.npz")["data"]
        b = fileio.load_npz(ref / "data" / f"gen_{g:05d}.npz")["data"]
        assert a.tobytes() == b.tobytes(), f"generation {g}'s training data differ"

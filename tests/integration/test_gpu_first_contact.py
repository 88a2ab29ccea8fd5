"""benchmarks/gpu_first_contact.sh, shrunk to run on the CPU (GPU_FIRST_CONTACT_SUITE=quick,
one benchmark, JAX_PLATFORMS=cpu): its pieces run and it writes its JSON with the device's name;
the gpu lane it runs skips every test (no GPU visible)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_first_contact.sh"


def test_the_first_contact_script_runs_its_pieces_and_writes_json(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "COLLAPSE_JAX_TEST_PLATFORM"}
    env.update(
        PYTHONPATH=str(REPO),
        JAX_PLATFORMS="cpu",  # the shrunk script on the CPU even on a GPU machine
        GPU_FIRST_CONTACT_SUITE="quick",
        GPU_FIRST_CONTACT_ONLY="gaussian_exact",
        GPU_FIRST_CONTACT_OUT=str(tmp_path / "results"),
        COLLAPSE_JAX_COMPILE_CACHE=str(tmp_path / "cache"),
    )
    r = subprocess.run(
        ["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = tmp_path / "results"
    summary = json.loads((results / "gpu_first_contact-cpu.json").read_text())
    assert summary["device"] == "cpu" and summary["suite"] == "quick"
    assert summary["bench"]["exit_code"] == 0 and summary["bench"]["rows"] == 1
    assert not summary["bench"]["timed_out"] and not summary["gpu_lane"]["timed_out"]
    lane = summary["gpu_lane"]["counts"]
    assert lane["tests"] > 0 and lane["skipped"] == lane["tests"]  # no GPU: all skip
    bench = json.loads((results / "bench-quick-cpu.json").read_text())
    (row,) = bench["rows"]
    assert row["name"] == "gaussian_exact" and row["kernel_s"] > 0 and row["copy_s"] > 0
    aim = {t["name"]: t for t in bench["targets"]}["theory_kernel_1e6x100_s"]
    assert aim["measured"] > 0 and aim["comparable"] is False
    assert bench["flop_convention"]["flops_per_token"].startswith("6 N + 12 L D T")
    assert bench["compile_cache"] == str(tmp_path / "cache")

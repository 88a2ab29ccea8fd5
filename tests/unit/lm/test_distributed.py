"""Joining a JAX cluster from the command line: what the environment asks for, and one clear line
for bad or partial settings (the two-process runs are in tests/integration, marked
`multiprocess`)."""

from __future__ import annotations

import jax
import pytest

from collapse_jax import cli
from collapse_jax.jaxtools import processes
from collapse_jax.lm import distributed
from collapse_jax.lm.distributed import DistributedConfig, DistributedSetupError, from_env

FULL = {
    "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
    "JAX_NUM_PROCESSES": "4",
    "JAX_PROCESS_ID": "3",
}


def test_no_variables_is_one_process_unless_asked():
    assert from_env({}) is None
    assert from_env({"JAX_PROCESS_ID": "  "}) is None  # blank counts as unset
    # --distributed alone: every field left to JAX's cluster detection.
    assert from_env({}, requested=True) == DistributedConfig()


def test_the_three_variables_give_the_setup():
    assert from_env(FULL) == DistributedConfig(
        coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3
    )
    assert from_env(FULL, requested=True) == from_env(FULL)


@pytest.mark.parametrize(
    "env, words",
    [
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, ["JAX_NUM_PROCESSES, JAX_PROCESS_ID not"]),
        ({**FULL, "JAX_NUM_PROCESSES": ""}, ["JAX_NUM_PROCESSES not"]),
        ({**FULL, "JAX_NUM_PROCESSES": "two"}, ["JAX_NUM_PROCESSES='two'", "integer"]),
        ({**FULL, "JAX_PROCESS_ID": "4"}, ["process_id 4 is outside [0, 4)"]),
        ({**FULL, "JAX_COORDINATOR_ADDRESS": "host"}, ["'host:port'", "'host'"]),
        ({**FULL, "JAX_NUM_PROCESSES": "0"}, ["num_processes must be >= 1"]),
    ],
)
def test_bad_or_partial_settings_are_named(env, words):
    with pytest.raises(DistributedSetupError) as e:
        from_env(env)
    for w in words:
        assert w in str(e.value)


def test_the_cli_refuses_a_partial_environment_in_one_line(tmp_path, monkeypatch, capsys):
    for k in distributed.ENV_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    out = tmp_path / "run"
    assert cli.main(["run", "quickstart", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "collapse-jax: error: JAX_PROCESS_ID set but JAX_COORDINATOR_ADDRESS, "
        "JAX_NUM_PROCESSES not: a multi-process run needs all of JAX_COORDINATOR_ADDRESS, "
        "JAX_NUM_PROCESSES, JAX_PROCESS_ID (or none, with --distributed on a cluster JAX "
        "detects)"
    ]
    assert not out.exists()  # refused before anything was written
    # A sweep runs in one process: refused with the variables named.
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    assert cli.main(["sweep", "quickstart", "seed=1,2", "--out", str(out)]) == 2
    assert "sweep runs in one process; unset JAX_COORDINATOR_ADDRESS" in capsys.readouterr().err
    assert not out.exists()


def test_one_process_helpers_are_identities(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b.bin").write_bytes(b"\x00\x01payload")
    (tmp_path / "empty").write_bytes(b"")
    assert processes.is_primary() and not processes.is_multiprocess()
    assert processes.broadcast_json({"start": 3, "files": ["x"]}) == {"start": 3, "files": ["x"]}
    got = processes.broadcast_files(tmp_path, ["a/b.bin", "empty"])
    assert got == {"a/b.bin": b"\x00\x01payload", "empty": b""}
    with processes.local_devices_only():
        assert processes.mesh_devices() == jax.local_devices()

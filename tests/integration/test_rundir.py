"""A run directory that can't be fooled: the lock, the manifest and repair, the stored config,
numeric range, and one error line per expected failure (issue 14). Each test stands for a class
of failure; the subprocess tests use real processes (a lock between threads would prove nothing).
"""

import errno
import json
import os
import pathlib
import signal
import stat
import subprocess
import sys
import time

import pytest
import yaml

from collapse_jax import cli, plots
from collapse_jax import config as config_lib
from collapse_jax.rundir import commits, fileio, guard, reader
from tests.helpers import TOY_KINDS

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def toy_kinds(monkeypatch):
    for kind, entry in TOY_KINDS.items():
        monkeypatch.setitem(config_lib.MODEL_REGISTRY, kind, entry)


def _write(path: pathlib.Path, raw: dict) -> pathlib.Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def _toy(tmp_path, **gen) -> pathlib.Path:
    generation = {
        "num_generations": 5,
        "samples_per_generation": 10,
        "num_trials": 16,
        "block_size": 2,
        **gen,
    }
    raw = {"name": "toy", "seed": 1, "model": {"kind": "toy"}, "generation": generation}
    return _write(tmp_path / "toy.yaml", raw)


def _slow(tmp_path, delay=0.0, generations=6, **model) -> pathlib.Path:
    raw = {
        "name": "slow",
        "seed": 3,
        "model": {"kind": "slowtoy", "delay": delay, **model},
        "generation": {"num_generations": generations, "samples_per_generation": 10},
    }
    return _write(tmp_path / f"slow{delay}.yaml", raw)


def _cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv] + ["--no-progress"] * (argv[0] == "run"))
    return code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("collapse-jax: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _as_from_a_terminal() -> None:
    # The child starts with SIGINT at its default (Python then turns it into KeyboardInterrupt)
    # and unblocked, as a program started from a shell is: a test harness's worker may ignore or
    # block SIGINT, and both are inherited across exec, so Ctrl-C would never reach the run.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _worker(*argv, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.cli_worker", *map(str, argv), "--no-progress"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_as_from_a_terminal,
        **kw,
    )


def _dead_pid() -> int:
    """The PID of a process that has exited (the owner of a killed writer's temporaries)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _wait_for(predicate, timeout=120.0, proc=None):
    t0 = time.monotonic()
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"worker exited early: {proc.communicate()}")
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------------
# The lock.


def test_two_processes_racing_on_one_out(tmp_path):
    gate = tmp_path / "gate"  # the first run waits in generation 1 until the second has tried
    cfg, out = _slow(tmp_path, gate=str(gate), gate_generation=1), tmp_path / "run"
    first = _worker("run", cfg, "--out", out)
    try:
        _wait_for(lambda: (out / "generations" / "gen_00000.json").exists(), proc=first)
        second = _worker("run", cfg, "--out", out)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 1
        assert f"in use by PID {first.pid} " in _one_error_line(err) and "started" in err
    finally:
        gate.touch()
        _, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    # The winner's results are those of a run that had the directory to itself.
    solo = tmp_path / "solo"
    assert cli.main(["run", str(cfg), "--out", str(solo), "--no-progress"]) == 0
    assert (out / "metrics.json").read_bytes() == (solo / "metrics.json").read_bytes()
    assert (out / ".lock").read_text() == ""  # released


def test_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    code = (
        "import os, signal, sys; from collapse_jax.rundir import guard; "
        "guard.RunLock(sys.argv[1]).__enter__(); os.kill(os.getpid(), signal.SIGKILL)"
    )
    dead = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO)
    assert dead.wait(timeout=120) == -signal.SIGKILL
    assert json.loads((out / ".lock").read_text())["pid"] == dead.pid  # left behind
    with guard.RunLock(out), guard.RunLock(out):  # re-entrant in one process
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    assert "which is no longer running" in caplog.text


# ----------------------------------------------------------------------------------------------
# Ctrl-C.


def test_ctrl_c_stops_cleanly_and_the_run_resumes_to_identical_results(tmp_path, capsys):
    gate = tmp_path / "gate"  # the run waits in generation 2's fit: interrupted there
    cfg, out = _slow(tmp_path, gate=str(gate), gate_generation=2), tmp_path / "run"
    proc = _worker("run", cfg, "--out", out)
    _wait_for(lambda: (out / "work" / "gen_00002").exists(), proc=proc)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    gate.touch()
    assert proc.returncode == 1
    assert "interrupted" in _one_error_line(err) and "resume" in err
    assert reader.Run(out).finished_generations() == [0, 1]
    assert cli.main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 0
    ref = tmp_path / "ref"
    assert cli.main(["run", str(cfg), "--out", str(ref), "--no-progress"]) == 0
    assert (out / "metrics.json").read_bytes() == (ref / "metrics.json").read_bytes()
    for g in range(6):
        name = f"data/gen_{g:05d}.npz"
        assert fileio.load_npz(out / name)["data"].tobytes() == (
            fileio.load_npz(ref / name)["data"].tobytes()
        )


# ----------------------------------------------------------------------------------------------
# Damage: each kind is named, refused before computing, and --repair recomputes the same result.


def _damage_delete_row(out):
    (out / "generations" / "gen_00002.json").unlink()
    return "generations/gen_00002.json is missing"


def _damage_edit_counter(out):
    (out / "state" / "meta.json").write_text(json.dumps({"next_generation": 1, "manifest": True}))
    return "state/meta.json has changed"


def _damage_garble_params(out):
    p = out / "params" / "gen_00003" / "params.npz"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    p.write_bytes(bytes(data))
    return "params/gen_00003/params.npz has changed (checksum"


def _damage_delete_state(out):
    import shutil

    shutil.rmtree(out / "state")
    return "state/ (the record of committed generations) is missing"


@pytest.mark.parametrize(
    "damage",
    [_damage_delete_row, _damage_edit_counter, _damage_garble_params, _damage_delete_state],
)
def test_damage_is_named_and_repair_recomputes_it(tmp_path, capsys, damage):
    cfg, out = _toy(tmp_path, keep_params="all"), tmp_path / "run"
    assert _cli(capsys, "run", cfg, "--out", out)[0] == 0
    good = (out / "metrics.json").read_bytes()
    expected = damage(out)
    code, err = _cli(capsys, "run", cfg, "--out", out)
    assert code == 1 and expected in _one_error_line(err) and "--repair" in err
    if (out / "state").exists():
        code, err = _cli(capsys, "plot", out)
        assert code == 1 and expected in _one_error_line(err)
    assert _cli(capsys, "run", cfg, "--out", out, "--repair")[0] == 0
    assert (out / "metrics.json").read_bytes() == good
    assert list(out.glob("damaged-*"))  # nothing thrown away
    assert commits.verify(out) == []


def test_deleted_config_does_not_let_another_config_continue(tmp_path, capsys):
    cfg, out = _toy(tmp_path), tmp_path / "run"
    assert _cli(capsys, "run", cfg, "--out", out)[0] == 0
    (out / "config.yaml").unlink()
    code, err = _cli(capsys, "run", cfg, "seed=2", "--out", out)
    assert code == 1 and "config.yaml is missing" in _one_error_line(err)
    # Repair restores config.yaml from the manifest; the other config is still refused.
    assert _cli(capsys, "run", cfg, "--out", out, "--repair")[0] == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 1
    code, err = _cli(capsys, "run", cfg, "seed=2", "--out", out)
    assert code == 2 and "seed: 1 -> 2" in _one_error_line(err)


def test_fewer_generations_than_committed_is_refused(tmp_path, capsys):
    cfg, out = _toy(tmp_path), tmp_path / "run"
    assert _cli(capsys, "run", cfg, "--out", out)[0] == 0
    code, err = _cli(capsys, "run", cfg, "generation.num_generations=3", "--out", out)
    assert code == 2 and "num_generations=3 is below the 5 generations" in _one_error_line(err)
    text = (out / "config.yaml").read_text().replace("num_generations: 5", "num_generations: 3")
    (out / "config.yaml").write_text(text)
    code, err = _cli(capsys, "plot", out)
    assert code == 1 and "num_generations=3 but 5 generations are committed" in err


def test_uncommitted_leftovers_and_temporaries_are_cleaned(tmp_path, capsys):
    cfg, out = _toy(tmp_path, num_generations=6), tmp_path / "run"
    assert _cli(capsys, "run", cfg, "generation.num_generations=4", "--out", out)[0] == 0
    # What a kill leaves: temp files/folders, a half-replaced folder, a row not yet committed.
    dead = _dead_pid()
    (out / f".state.cjx{dead}-abcd1234.tmp").mkdir()
    (out / "generations" / f".gen_00004.json.cjx{dead}-zz99zz99.tmp").write_text("{")
    (out / "figures" / f".w.png.cjx{dead}-abcdefgh.png").write_bytes(b"")
    (out / "generations" / "gen_00004.json").write_text("{broken")
    assert reader.Run(out).finished_generations() == [0, 1, 2, 3]
    assert _cli(capsys, "run", cfg, "--out", out)[0] == 0
    leftovers = [p for p in out.rglob(".*") if p.name not in (".lock", commits.MARKER)]
    assert leftovers == []
    assert reader.Run(out).finished_generations() == list(range(6))


# ----------------------------------------------------------------------------------------------
# The stored config.


def test_a_failed_start_does_not_poison_out(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _slow(tmp_path, mean_file=str(tmp_path / "typo.txt"))
    code, err = _cli(capsys, "run", cfg, "--out", out)
    assert code == 2 and "typo.txt: not found" in _one_error_line(err)
    (tmp_path / "mean.txt").write_text("2.5")
    fixed = _slow(tmp_path, mean_file=str(tmp_path / "mean.txt"))
    assert _cli(capsys, "run", fixed, "--out", out)[0] == 0


def test_paths_from_env_vars_are_stored_unexpanded(tmp_path, capsys, monkeypatch):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "mean.txt").write_text("2.5")
    cfg = _slow(tmp_path, generations=3, mean_file="${CJ_TEST_DATA}/mean.txt")
    out = tmp_path / "run"
    monkeypatch.setenv("CJ_TEST_DATA", str(tmp_path / "a"))
    assert _cli(capsys, "run", cfg, "generation.num_generations=2", "--out", out)[0] == 0
    assert "${CJ_TEST_DATA}/mean.txt" in (out / "config.yaml").read_text()
    monkeypatch.setenv("CJ_TEST_DATA", str(tmp_path / "b"))  # the data folder moved
    assert _cli(capsys, "run", cfg, "--out", out)[0] == 0
    assert len(reader.Run(out).rows()) == 3


# ----------------------------------------------------------------------------------------------
# Numeric range.


def test_values_broken_in_float32_are_refused_up_front(capsys):
    for value, word in (("1e39", "out of range for float32"), ("1e-42", "smallest normal")):
        code, err = _cli(capsys, "run", "theory/gaussian_mle", f"model.cov={value}", "--dry-run")
        assert code == 2 and "model.cov" in _one_error_line(err) and word in err


def test_a_non_finite_metric_stops_the_run_naming_generation_and_metric(tmp_path, capsys):
    cfg, out = _toy(tmp_path), tmp_path / "run"
    code, err = _cli(capsys, "run", cfg, "model.std=1e30", "--out", out)  # var = 1e60: inf
    line = _one_error_line(err)
    assert code == 1 and "generation 0: metric " in line and "infinite in 16 of 16 chain" in line
    assert "var" in line
    assert reader.Run(out).finished_generations() == []


def test_chain_counts_beyond_memory_are_refused_before_allocating(tmp_path, capsys):
    cfg = _toy(tmp_path)
    t0 = time.monotonic()
    code, err = _cli(
        capsys, "run", cfg, "generation.num_trials=1000000000000", "--out", tmp_path / "r"
    )
    assert code == 2 and "generation.num_trials=1000000000000" in _one_error_line(err)
    assert "GiB" in err and time.monotonic() - t0 < 60


# ----------------------------------------------------------------------------------------------
# One line per expected failure.


@pytest.mark.parametrize(
    "text, code, message",
    [
        ("", 2, "the config file is empty"),
        ("name: t\nmodel: {kind: toy}\ngeneration: 3\n", 2, "generation: expected a section"),
        ("name: t\nmodel: {kind: toy}\ngeneration: {num_trials: .inf}\n", 2, "num_trials"),
        ("name: t\nseed: 1\nseed: 2\nmodel: {kind: toy}\n", 2, "'seed' is given twice"),
        ("name: t\nmodel: {kind: toy}\ngeneration: {alpha: 0.5}\n", 2, "ignores alpha=0.5"),
        (
            "name: t\nmodel: {kind: gmm, n_components: 5}\n"
            "generation: {samples_per_generation: 4}\n",
            2,
            "fitted to 4 points, but this model needs at least 5",
        ),
    ],
)
def test_bad_configs_give_one_line(tmp_path, capsys, text, code, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    got, err = _cli(capsys, "run", path, "--out", tmp_path / "run")
    assert got == code and message in _one_error_line(err) and str(path) in err
    assert not (tmp_path / "run").exists()


def test_out_pointing_at_a_file(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    code, err = _cli(capsys, "run", _toy(tmp_path), "--out", target)
    assert code == 2 and f"{target} is a file" in _one_error_line(err)


def test_corrupt_files_are_named(tmp_path, capsys):
    cfg, out = _toy(tmp_path), tmp_path / "run"
    assert _cli(capsys, "run", cfg, "--out", out)[0] == 0
    (out / "state" / "manifest.json").write_text("{not json")
    code, err = _cli(capsys, "run", cfg, "--out", out)
    assert code == 1 and f"corrupt JSON file {out / 'state' / 'manifest.json'}" in _one_error_line(
        err
    )
    code, err = _cli(capsys, "plot", tmp_path / "nowhere")
    assert code == 2 and "run directory not found" in _one_error_line(err)


def test_disk_full_and_permission_errors_name_the_file(tmp_path, capsys, monkeypatch):
    cfg, out = _toy(tmp_path), tmp_path / "run"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", full)  # every result file is synced before its rename
    code, err = _cli(capsys, "run", cfg, "--out", out)
    line = _one_error_line(err)
    assert code == 1 and "no space left on the device" in line and str(out) in line
    monkeypatch.setattr(os, "fsync", real_fsync)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.geteuid() == 0:  # root writes anyway: give it the error a read-only folder gives
        real_open = os.open

        def denied(path, *a, **kw):
            if str(path).startswith(str(ro)):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *a, **kw)

        monkeypatch.setattr(os, "open", denied)
    try:
        code, err = _cli(capsys, "run", cfg, "--out", ro)
        assert code == 1 and "permission denied" in _one_error_line(err) and str(ro) in err, err
    finally:
        ro.chmod(stat.S_IRWXU)


def test_debug_shows_the_traceback(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("")
    assert cli.main(["--debug", "run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "the config file is empty" in err


# ----------------------------------------------------------------------------------------------
# Smaller things.


def test_result_files_have_normal_modes_and_figures_are_atomic(tmp_path, capsys, monkeypatch):
    old = os.umask(0o022)
    try:
        cfg, out = _toy(tmp_path), tmp_path / "run"
        assert _cli(capsys, "run", cfg, "--out", out)[0] == 0
    finally:
        os.umask(old)
    for p in (
        out / "metrics.json",
        out / "generations" / "gen_00000.json",
        out / "figures" / "var.png",
    ):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    assert stat.S_IMODE((out / "state").stat().st_mode) == 0o755

    class Killed(Exception):
        pass

    class DiesWhilePlotting:  # the toy kind's reporting module, killed in its own figures
        def expected_curves(self, config, mode, sample_sizes, **kw):
            return {}

        def figures(self, learner, run, out_dir):
            raise Killed

    before = (out / "figures" / "var.png").read_bytes()
    monkeypatch.setattr(config_lib, "reporting_module", lambda kind: DiesWhilePlotting())
    with pytest.raises(Killed):
        plots.make_figures(reader.Run(out), learner=object())
    assert (out / "figures" / "var.png").read_bytes() == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".figures")] == []

    class DiskFull:  # the writer's own error names no file (matplotlib's savefig on ENOSPC)
        def expected_curves(self, config, mode, sample_sizes, **kw):
            return {}

        def figures(self, learner, run, out_dir):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(config_lib, "reporting_module", lambda kind: DiskFull())
    with pytest.raises(OSError) as err:
        plots.make_figures(reader.Run(out), learner=object())
    assert err.value.filename == str(out / "figures")
    assert (out / "figures" / "var.png").read_bytes() == before

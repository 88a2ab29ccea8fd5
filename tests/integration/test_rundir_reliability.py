"""Issue 26: the run directory touches only what it wrote, resumes from a kill at any rename (the
first commit included), has a lock no deletion or symlink can bypass, a manifest that is checked
and repairable, readers that see a consistent snapshot, and inputs that cannot blow up.

Each test reproduces a case of the reliability review (reviews/reliability.md, defects D1-D12)
that failed on main 717aaa0; the kill matrices use the Gaussian theory config.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from collapse_jax import cli, loop
from collapse_jax import config as config_lib
from collapse_jax.rundir import commits, fileio, guard, reader
from tests.helpers import TOY_KINDS

REPO = pathlib.Path(__file__).resolve().parents[2]
GAUSS = str(REPO / "collapse_jax" / "configs" / "theory_gaussian.yaml")
BASE = ["generation.num_trials=20", "generation.block_size=1", "generation.record_trials=8"]
G = ["generation.num_generations=3", *BASE]
# What a run commits and derives, compared byte for byte after a resume (the manifest holds the
# run directory's own id, so only what it lists is compared).
RESULTS = ("generations", "arrays", "data", "params", "state")
TABLES = ("metrics.json", "metrics.csv")


@pytest.fixture(autouse=True)
def toy_kinds(monkeypatch):
    for kind, entry in TOY_KINDS.items():
        monkeypatch.setitem(config_lib.MODEL_REGISTRY, kind, entry)


def _cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv] + ["--no-progress"] * (argv[0] == "run"))
    return code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("collapse-jax: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _snapshot(folder: pathlib.Path) -> dict[str, bytes | None]:
    """Every path under `folder` (folders as None) with its bytes."""
    return {
        str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
    }


def _results(out: pathlib.Path) -> dict[str, bytes]:
    files = {}
    for top in RESULTS:
        for p in sorted((out / top).rglob("*")) if (out / top).is_dir() else ():
            if p.is_file() and p.name != commits.MANIFEST:
                files[str(p.relative_to(out))] = p.read_bytes()
    for name in TABLES:
        files[name] = (out / name).read_bytes()
    return files


def _as_from_a_terminal() -> None:
    # The child starts with SIGINT at its default (Python then turns it into KeyboardInterrupt)
    # and unblocked, as a program started from a shell is: a test harness's worker may ignore or
    # block SIGINT, and both are inherited across exec, so Ctrl-C would never reach the run.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _worker(module: str, *argv) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-m", module, *map(str, argv)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_as_from_a_terminal,
    )


def _wait_for(predicate, timeout=120.0, proc=None):
    t0 = time.monotonic()
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"worker exited early: {proc.communicate()}")
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.05)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _gauss(generations: int = 3):
    return config_lib.load_config(GAUSS, [f"generation.num_generations={generations}", *BASE])


@pytest.fixture(scope="module")
def gauss_ref(tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("gauss") / "ref"
    loop.run_generations(_gauss(), out)
    return _results(out)


# ----------------------------------------------------------------------------------------------
# D1: user files in and around --out survive run, resume, plot and --repair.


def _user_files(out: pathlib.Path) -> None:
    shutil.copytree(out / "generations", out / "generations.old")
    for d in ("notes", "notes.old", "mydata.old", "analysis", "state.old"):
        (out / d).mkdir(exist_ok=True)
    (out / "notes.old" / "n.txt").write_text("v1")
    (out / "mydata.old" / "d.txt").write_text("keep")
    (out / ".backup.20261201.tar").write_text("keep")
    (out / "analysis" / ".draft.abcdefgh.txt").write_text("keep")
    (out / "analysis" / ".plot.12345678.py").write_text("keep")
    (out / "generations" / ".mine.abcdefgh.tmp").write_text("keep")
    (out / "state.old" / "x").write_text("keep")


def test_user_files_survive_resume_plot_and_repair(tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(capsys, "run", GAUSS, *G, "--out", out)[0] == 0
    _user_files(out)
    mine = {k: v for k, v in _snapshot(out).items() if k in _user_paths(out)}
    assert _cli(capsys, "run", GAUSS, *G, "--out", out)[0] == 0  # a no-op resume
    assert _cli(capsys, "run", GAUSS, "generation.num_generations=4", *BASE, "--out", out)[0] == 0
    assert _cli(capsys, "plot", out)[0] == 0
    (out / "generations" / "gen_00001.json").unlink()  # damage, so that --repair acts
    assert _cli(capsys, "run", GAUSS, *G, "--out", out, "--repair")[0] == 0
    after = _snapshot(out)
    for path, data in mine.items():
        if path.startswith("generations/"):  # inside a folder of the tool's that repair set aside
            path = next(k for k in after if k.startswith("damaged-") and k.endswith("/" + path))
        assert after[path] == data, path


def _user_paths(out: pathlib.Path) -> set[str]:
    keep = {"generations.old", "notes", "notes.old", "mydata.old", "state.old", "analysis"}
    paths = set()
    for p in out.rglob("*"):
        rel = str(p.relative_to(out))
        if rel.split("/")[0] in keep or p.name.startswith((".backup", ".draft", ".plot", ".mine")):
            paths.add(rel)
    return paths


def test_a_project_folder_as_out_is_refused_before_anything_is_written(tmp_path, capsys):
    proj = tmp_path / "proj"
    for d in ("src", "src.old", "data"):
        (proj / d).mkdir(parents=True)
    (proj / "config.yaml").write_text("mine")
    (proj / "src.old" / "a.py").write_text("old")
    (proj / ".cache.abcdefgh.db").write_text("db")
    (proj / "data" / "gen_00001.csv").write_text("1,2")
    before = _snapshot(proj)
    for extra in ((), ("--repair",)):
        code, err = _cli(capsys, "run", GAUSS, *G, "--out", proj, *extra)
        line = _one_error_line(err)
        assert code == 2 and "not a collapse-jax run directory" in line and str(proj) in line
        assert _snapshot(proj) == before
    code, err = _cli(capsys, "plot", proj)
    assert code == 2 and _snapshot(proj) == before


def test_a_plain_name_is_required_of_suite_experiments(tmp_path, capsys):
    """D8: a suite experiment named `..` would write outside --out."""
    suite = tmp_path / "suite.yaml"
    exp = {"model": {"kind": "gaussian", "dim": 1, "cov": 1.0}}
    exp["generation"] = {"num_generations": 2, "num_trials": 8}
    for name in ("..", ".", "a/b", ".hidden"):
        raw = {"name": "suite", "experiments": [{"name": name, **exp}]}
        suite.write_text(yaml.safe_dump(raw))
        code, err = _cli(capsys, "run", suite, "--out", tmp_path / "victim" / "out")
        assert code == 2 and "name: must be a plain file name" in _one_error_line(err), name
    assert not (tmp_path / "victim").exists()


# ----------------------------------------------------------------------------------------------
# D2: a kill at any rename, the first commit's included, resumes to identical results.


def _interrupt_at(monkeypatch, n: int, when: str) -> list[str]:
    """Ctrl-C (a KeyboardInterrupt) at the n-th os.replace, before or after the rename."""
    real, seen = os.replace, []

    def replace(src, dst, *args, **kwargs):
        seen.append(str(dst))
        if len(seen) == n and when == "before":
            raise KeyboardInterrupt
        real(src, dst, *args, **kwargs)
        if len(seen) == n and when == "after":
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace)
    return seen


# Renames of a 3-generation run: identity, lock, the first commit (meta, manifest, state),
# config.yaml, env.json; per generation arrays, row, carry, meta, manifest, state set aside,
# state; then the tables and the lock record. The matrix covers the first commit, generation 0's
# commit and generation 1's (a later one).
RENAMES_TO_COVER = range(1, 22)


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_interrupt_at_every_rename_resumes_identically(tmp_path, monkeypatch, when, gauss_ref):
    for n in RENAMES_TO_COVER:
        out = tmp_path / f"{when}{n}"
        with monkeypatch.context() as m:
            seen = _interrupt_at(m, n, when)
            with pytest.raises(KeyboardInterrupt):
                loop.run_generations(_gauss(), out)
        assert commits.verify(out) == [], (n, seen[-1])
        loop.run_generations(_gauss(), out)  # the same command resumes
        assert _results(out) == gauss_ref, (n, seen[-1])
        assert commits.verify(out) == []
        leftovers = [p.name for p in out.rglob(".*") if p.name not in (".lock", commits.MARKER)]
        assert leftovers == [], (n, leftovers)


def test_a_full_disk_at_any_write_of_the_first_commits_resumes(tmp_path, monkeypatch, gauss_ref):
    """ENOSPC at the k-th file sync (every result file is synced before its rename), for every
    write up to generation 1's commit; space is then freed and the same command resumes."""
    for k in range(1, 16):
        out = tmp_path / f"full{k}"
        real, count = os.fsync, [0]

        def full(fd, real=real, count=count, k=k):
            count[0] += 1
            if count[0] == k:
                raise OSError(28, "No space left on device")
            real(fd)

        with monkeypatch.context() as m:
            m.setattr(os, "fsync", full)
            try:
                loop.run_generations(_gauss(), out)
            except OSError:
                pass  # (a full disk while recording the lock's holder is only logged)
        loop.run_generations(_gauss(), out)
        assert _results(out) == gauss_ref, k


@pytest.mark.parametrize(("n", "when"), [(3, "after"), (5, "after"), (8, "after"), (13, "before")])
def test_a_kill_9_in_the_first_commits_resumes_identically(tmp_path, n, when):
    """Real SIGKILLs (no clean-up runs): inside the creation commit, right after it, after
    generation 0's row, and between generation 0's `state` renames."""
    cfg = tmp_path / "toy.yaml"
    raw = {"name": "toy", "seed": 1, "model": {"kind": "toy"}}
    raw["generation"] = {"num_generations": 3, "num_trials": 8, "block_size": 1}
    cfg.write_text(yaml.safe_dump(raw))
    out, ref = tmp_path / "run", tmp_path / "ref"
    proc = _worker("tests.kill_worker", n, when, "run", cfg, "--out", out, "--no-progress")
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert cli.main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert cli.main(["run", str(cfg), "--out", str(ref), "--no-progress"]) == 0
    assert _results(out) == _results(ref)


def test_a_finished_fit_of_the_generation_in_progress_is_reused(tmp_path, monkeypatch):
    """The sequential driver (the LM's): killed right after generation 0's data file, before the
    first commit; the resume reuses the finished fit instead of fitting again."""
    from tests.helpers import ToyNumpyLearner

    raw = {"name": "np", "seed": 2, "model": {"kind": "toy"}}
    raw["generation"] = {"num_generations": 2, "samples_per_generation": 10, "num_trials": 2}
    cfg = config_lib.from_dict(raw)
    learner = ToyNumpyLearner(cfg.model, cfg.mesh)
    ref = tmp_path / "ref"
    loop.run_generations(cfg, ref, learner=learner)
    out = tmp_path / "run"
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        if str(dst).endswith("data/gen_00000.npz"):
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        with pytest.raises(KeyboardInterrupt):
            loop.run_generations(cfg, out, learner=learner)
    assert reader.Run(out).finished_generations() == []
    ToyNumpyLearner.calls.clear()
    loop.run_generations(cfg, out, learner=learner)
    fits = [str(w) for kind, w in ToyNumpyLearner.calls if kind == "fit"]
    assert not any("gen_00000" in w for w in fits) and len(fits) == 2  # generation 1 only
    assert _results(out) == _results(ref)


# ----------------------------------------------------------------------------------------------
# D3, D4, D12: a lock that holds.


def _slow_cfg(tmp_path, gate) -> pathlib.Path:
    raw = {"name": "slow", "seed": 3}
    raw["model"] = {"kind": "slowtoy", "gate": str(gate), "gate_generation": 1}
    raw["generation"] = {"num_generations": 4, "samples_per_generation": 10}
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_deleting_the_lock_record_of_a_live_run_lets_no_second_writer_in(tmp_path, capsys):
    gate = tmp_path / "gate"
    cfg, out = _slow_cfg(tmp_path, gate), tmp_path / "run"
    first = _worker("tests.cli_worker", "run", cfg, "--out", out, "--no-progress")
    try:
        _wait_for(lambda: (out / "work" / "gen_00001").exists(), proc=first)
        (out / ".lock").unlink()
        code, err = _cli(capsys, "run", cfg, "--out", out)
        assert code == 1 and "is in use by" in _one_error_line(err)
        code, err = _cli(capsys, "run", cfg, "--out", out, "--repair")
        assert code == 1 and "is in use by" in _one_error_line(err)
    finally:
        gate.touch()
        _, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    solo = tmp_path / "solo"
    assert _cli(capsys, "run", cfg, "--out", solo)[0] == 0
    assert (out / "metrics.json").read_bytes() == (solo / "metrics.json").read_bytes()


def test_a_symlinked_lock_is_never_followed(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = [GAUSS, *G, "--out", out]
    assert _cli(capsys, "run", *cfg)[0] == 0
    precious = tmp_path / "precious.txt"
    precious.write_text("PRECIOUS")
    (out / ".lock").unlink()
    (out / ".lock").symlink_to("../precious.txt")
    assert _cli(capsys, "run", *cfg)[0] == 0
    assert precious.read_text() == "PRECIOUS"
    assert not (out / ".lock").is_symlink()


def test_a_lock_record_of_another_host_is_not_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(capsys, "run", GAUSS, *G, "--out", out)[0] == 0
    holder = {"pid": 4242, "host": "elsewhere.example", "started": "2026-12-07T10:00:00+00:00"}
    (out / ".lock").write_text(json.dumps(holder))
    code, err = _cli(capsys, "run", GAUSS, *G, "--out", out)
    line = _one_error_line(err)
    assert code == 1 and "elsewhere.example" in line and "another host" in line and ".lock" in line
    (out / ".lock").unlink()  # the advice works
    assert _cli(capsys, "run", GAUSS, *G, "--out", out)[0] == 0


@pytest.mark.parametrize("kind", ["loop", "dangling", "file"])
def test_an_out_that_cannot_be_a_folder_gets_one_line(tmp_path, capsys, kind):
    out = tmp_path / "out"
    if kind == "loop":
        out.symlink_to("out")
    elif kind == "dangling":
        out.symlink_to("nowhere/deeper")
    else:
        out.write_text("x")
    code, err = _cli(capsys, "run", GAUSS, *G, "--out", out)
    word = {"loop": "symbolic link loop", "dangling": "dangling symbolic link", "file": "a file"}
    assert code == 2 and word[kind] in _one_error_line(err)


# ----------------------------------------------------------------------------------------------
# D5: readers of a running experiment.


def test_plot_of_a_running_experiment_succeeds_and_keeps_its_temporaries(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", GAUSS, "generation.num_generations=300", "generation.num_trials=20"]
    argv += ["generation.block_size=1", "--out", out, "--no-progress"]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    running = _worker("tests.cli_worker", *argv)
    try:
        _wait_for(lambda: (out / "generations" / "gen_00002.json").exists(), proc=running)
        # A live reader's temporary (another process's figures folder being drawn).
        theirs = out / f".figures.cjx{sleeper.pid}-abcdefgh.tmp"
        theirs.mkdir()
        checks = 0
        while running.poll() is None and checks < 20:
            assert commits.verify_snapshot(out) == []
            checks += 1
        for _ in range(3):
            if running.poll() is None:
                code, err = _cli(capsys, "plot", out)
                assert code == 0, err
    finally:
        running.wait(timeout=600)
        sleeper.kill()
        sleeper.wait()
    assert running.returncode == 0
    assert theirs.is_dir()


def test_a_file_replaced_while_it_is_hashed_is_retried_not_an_error(tmp_path, monkeypatch):
    """The race of the test above, made certain: a commit swaps state/ between `verify`'s
    existence check of a file and its hashing. `verify` reports the file missing (no
    exception), and `verify_snapshot`, seeing the commit record change, checks again; a file
    that vanishes with no commit meanwhile is reported."""
    out = tmp_path / "run"
    loop.run_generations(_gauss(), out)
    real, calls, swap = commits.file_digest, [], [True]

    def racing(path):
        calls.append(path)
        if len(calls) == 1:  # the first file hashed vanishes meanwhile
            if swap[0]:  # ... because a commit replaced state/ (a new inode)
                os.replace(out / "state", out / "state.old")
                shutil.copytree(out / "state.old", out / "state")
                shutil.rmtree(out / "state.old")
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real(path)

    monkeypatch.setattr(commits, "file_digest", racing)
    assert commits.verify_snapshot(out) == []
    assert len(calls) > len(commits.read_manifest(out)["files"])  # checked a second time
    calls.clear()
    swap[0] = False
    problems = commits.verify_snapshot(out)
    assert len(problems) == 1 and problems[0].endswith("is missing"), problems


def test_a_run_reader_is_a_snapshot(tmp_path):
    out = tmp_path / "run"
    loop.run_generations(_gauss(), out)
    run = reader.Run(out)
    assert len(run.rows()) == 3
    loop.run_generations(_gauss(5), out)
    assert len(run.rows()) == 3 and len(run.series("w2")) == 3  # the snapshot it started with
    assert len(reader.Run(out).rows()) == 5


# ----------------------------------------------------------------------------------------------
# D6, D10: a manifest and a state that are checked and repairable.


@pytest.fixture
def finished(tmp_path) -> pathlib.Path:
    out = tmp_path / "run"
    loop.run_generations(_gauss(), out)
    return out


def _edit_manifest(out: pathlib.Path, edit) -> None:
    path = out / "state" / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def _forge(out: pathlib.Path, rel: str, arrays: dict) -> None:
    """Rewrites `rel` and the manifest entry that would have caught it."""
    buf = out / rel
    np.savez(buf.with_suffix(""), **arrays)
    _edit_manifest(out, lambda m: m["files"].__setitem__(rel, commits.file_digest(out / rel)))


def _run5(capsys, out, *extra):
    return _cli(capsys, "run", GAUSS, "generation.num_generations=5", *BASE, "--out", out, *extra)


def test_an_edited_committed_count_is_refused_not_recomputed(finished, capsys):
    out = finished
    _edit_manifest(out, lambda m: m.__setitem__("next_generation", 1))
    code, err = _run5(capsys, out)
    line = _one_error_line(err)
    assert code == 1 and "state/manifest.json says 1 generations" in line and "meta.json" in line


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda p: p.write_text("{not json"), "state/manifest.json is unreadable"),
        (lambda p: p.write_text('{"version": 2}'), "state/manifest.json is not a manifest"),
        (
            lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "files": []})),
            "files is not a mapping",
        ),
    ],
)
def test_a_corrupt_manifest_is_named_and_rebuilt_by_repair(
    finished, capsys, edit, named, gauss_ref
):
    out = finished
    edit(out / "state" / "manifest.json")
    for argv in (("run", GAUSS, *G, "--out", out), ("plot", out)):
        code, err = _cli(capsys, *argv)
        assert code == 1 and named in _one_error_line(err)
    assert _cli(capsys, "run", GAUSS, *G, "--out", out, "--repair")[0] == 0
    assert _results(out) == gauss_ref and commits.verify(out) == []


def test_a_manifest_of_another_run_directory_is_refused(tmp_path, finished, capsys):
    other = tmp_path / "other"
    loop.run_generations(_gauss(), other)
    shutil.copy(other / "state" / "manifest.json", finished / "state" / "manifest.json")
    code, err = _cli(capsys, "run", GAUSS, *G, "--out", finished)
    assert code == 1 and "belongs to another run directory" in _one_error_line(err)


def test_run_wide_files_are_committed(finished):
    """Files of no generation (the LM's source/) are in the manifest and checked."""
    out = finished
    fileio.save_npz(out / "source" / "source.npz", {"p": np.ones(3)})
    commits_before = commits.read_manifest(out)["files"]
    guard.commit_state(out, 3, lambda tmp: shutil.copy(out / "state" / "carry.npz", tmp))
    assert "source/source.npz" not in commits_before
    assert "source/source.npz" in commits.read_manifest(out)["files"]
    data = bytearray((out / "source" / "source.npz").read_bytes())
    data[-30] ^= 0xFF
    (out / "source" / "source.npz").write_bytes(bytes(data))
    assert commits.verify(out) == [
        "source/source.npz has changed (checksum differs from the committed one)"
    ]


@pytest.mark.parametrize(
    ("forge", "word"),
    [
        (lambda a: a[:10], "[10"),  # 10 of 20 chains
        (lambda a: a.astype(np.int32), "int32"),
        (lambda a: a[0, 0], "[]"),  # a scalar
        (lambda a: a[..., None], "float32"),  # an extra trailing axis
    ],
)
def test_a_forged_state_is_refused_naming_the_file(finished, capsys, forge, word):
    out = finished
    arrays = fileio.load_npz(out / "state" / "carry.npz")
    first = next(iter(arrays))
    arrays[first] = forge(arrays[first])
    _forge(out, "state/carry.npz", arrays)
    assert commits.verify(out) == []  # the forgery passes the checksums
    code, err = _run5(capsys, out)
    line = _one_error_line(err)
    assert code == 1 and "state/carry.npz" in line and word in line


def test_a_forged_array_file_is_named_by_plot(finished, capsys):
    out = finished
    arrays = fileio.load_npz(out / "arrays" / "gen_00001.npz")
    arrays = {k: v[:3] for k, v in arrays.items()}
    _forge(out, "arrays/gen_00001.npz", arrays)
    code, err = _cli(capsys, "plot", out)
    assert code == 1 and "arrays/gen_00001.npz" in _one_error_line(err)


# ----------------------------------------------------------------------------------------------
# D7, D11, D12: inputs and messages.


def _alias_bomb(depth: int) -> str:
    lines = ["name: bomb", "model: {kind: gaussian, dim: 1, cov: 1.0}", "seed:"]
    lines.append('  - &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]')
    for i in range(1, depth + 1):
        lines.append(f"  - &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb(9))  # 9^10 values once expanded
    code, err = _cli(capsys, "show-config", bomb)
    line = _one_error_line(err)
    assert code == 2 and "aliases expand to more than" in line and len(line) < 400
    code, err = _cli(capsys, "show-config", GAUSS, f"seed={_alias_bomb(9)}")
    assert code == 2
    code, err = _cli(capsys, "sweep", GAUSS, "seed=[&a [1,1,1,1,1,1,1,1,1,1]]")
    assert code == 2 and len(_one_error_line(err)) < 400


def test_a_huge_value_is_cut_in_the_message(capsys):
    code, err = _cli(capsys, "show-config", GAUSS, f"seed=[{','.join(['1'] * 100000)}]")
    line = _one_error_line(err)
    assert code == 2 and "seed" in line and len(line) < 300


@pytest.mark.parametrize("override", ["model.mean=[1e8]", "model.mean=[1e38]"])
def test_a_mean_float32_cannot_resolve_is_refused(capsys, override):
    code, err = _cli(capsys, "run", GAUSS, override, "--dry-run")
    assert code == 2 and "model.mean" in _one_error_line(err)


def test_a_run_directory_file_vanishing_mid_run_is_a_runtime_failure(finished, capsys, monkeypatch):
    def vanished(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", str(finished / "state/meta.json"))

    monkeypatch.setattr(loop, "run_generations", vanished)
    code, err = _run5(capsys, finished)
    assert code == 1 and "meta.json: not found" in _one_error_line(err)


def test_damage_to_config_only_advises_the_repair_that_works(finished, capsys):
    text = (finished / "config.yaml").read_text()
    (finished / "config.yaml").write_text(text.replace("seed: 0", "seed: 5"))
    code, err = _cli(capsys, "run", GAUSS, *G, "--out", finished)
    line = _one_error_line(err)
    assert code == 1 and "config.yaml was edited" in line and "--repair" in line
    assert _cli(capsys, "run", GAUSS, *G, "--out", finished, "--repair")[0] == 0
    aside = list(finished.glob("damaged-*/config.yaml"))
    assert aside and "seed: 5" in aside[0].read_text()  # the edited file is kept, not overwritten


def test_sigterm_exits_1_with_one_line(tmp_path):
    out = tmp_path / "run"
    argv = ["run", GAUSS, "generation.num_generations=2000", "generation.num_trials=20"]
    proc = _worker("tests.cli_worker", *argv, "generation.block_size=1", "--out", out)
    _wait_for(lambda: (out / "generations" / "gen_00001.json").exists(), proc=proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "terminated (SIGTERM)" in _one_error_line(err)
    assert commits.verify(out) == []


def test_ctrl_c_of_the_program_exits_1_with_one_line(tmp_path):
    """`python -m collapse_jax` (no argv given to main): the interrupt is reported, the clean-up
    has run, and the process ends without interpreter finalization (D9)."""
    out = tmp_path / "run"
    argv = ["run", GAUSS, "generation.num_generations=2000", "generation.num_trials=20"]
    proc = _worker("collapse_jax", *argv, "generation.block_size=1", "--out", out, "--no-progress")
    _wait_for(lambda: (out / "generations" / "gen_00001.json").exists(), proc=proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "interrupted" in _one_error_line(err)
    assert commits.verify(out) == []
    assert [p.name for p in out.glob(".*.cjx*")] == []  # its temporaries removed


def test_a_run_that_commits_during_every_check_is_checked_by_its_committed_results(
    finished, monkeypatch
):
    """Generations of milliseconds: every `verify` of a reader overlaps a commit, so the state
    it hashes is never the one its manifest lists. The reader then checks the committed
    results alone (never rewritten): intact ones pass, a damaged one is still named."""
    real = commits.verify

    def always_mid_commit(run_dir, manifest=None, *, committed_only=False):
        problems = real(run_dir, manifest, committed_only=committed_only)
        if not committed_only:  # what a reader sees while state/ is replaced under it
            record = finished / "state" / "manifest.json"
            record.write_text(record.read_text() + " ")  # a new commit record meanwhile
            problems.append("state/carry.npz has changed (checksum differs from the committed one)")
        return problems

    monkeypatch.setattr(commits, "verify", always_mid_commit)
    assert commits.verify_snapshot(finished, tries=3) == []
    gen = finished / "generations" / "gen_00001.json"
    gen.write_text(gen.read_text() + " ")
    assert any("gen_00001.json" in p for p in commits.verify_snapshot(finished, tries=3))

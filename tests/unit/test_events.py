"""metrics.jsonl, the progress-bar rule and the sinks (`collapse_jax.rundir.events`), on a toy
learner that trains by pretend steps (tests.helpers.StepToyLearner): a run's records, each once;
a torn last line is dropped; TensorBoard's event files hold the jsonl's values. Kills at every
rename, the VAE, the LM and wandb: tests/integration/test_events_runs.py."""

from __future__ import annotations

import io
import json
import pathlib
import struct
import sys

import pytest
import yaml

from collapse_jax import cli, loop
from collapse_jax import config as config_lib
from collapse_jax.rundir import events, fileio
from tests.helpers import TOY_KINDS

# Fields that identify a record or hold its values (time and throughput vary run to run).
VOLATILE = {"time", "images_per_second", "tokens_per_second"}


@pytest.fixture(autouse=True)
def toy_kinds(monkeypatch):
    for kind, entry in TOY_KINDS.items():
        monkeypatch.setitem(config_lib.MODEL_REGISTRY, kind, entry)


def _cfg(generations=3, trials=2, **logging):
    raw = {"name": "steps", "seed": 3, "model": {"kind": "steptoy", "steps": 5}}
    raw["generation"] = {
        "num_generations": generations,
        "samples_per_generation": 16,
        "num_trials": trials,
    }
    raw["logging"] = {"every_steps": 2, **logging}
    return config_lib.from_dict(raw)


def _stable(records):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


def _by_key(records):
    """The records as a set keyed by what identifies them; asserts there are no duplicates."""
    keys = [(r["kind"], r["generation"], r.get("run"), r.get("step")) for r in records]
    assert len(keys) == len(set(keys)), "duplicate records"
    return dict(zip(keys, _stable(records)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    with pytest.MonkeyPatch.context() as m:
        for kind, entry in TOY_KINDS.items():
            m.setitem(config_lib.MODEL_REGISTRY, kind, entry)
        loop.run_generations(_cfg(), out)
    return out


def test_records_of_a_run(reference):
    recs = events.read_metrics(reference)
    steps = [r for r in recs if r["kind"] == "step"]
    # 3 generations x 2 chains x steps {2, 4, 5} (every 2, and the fit's last)
    assert [(r["generation"], r["run"], r["step"]) for r in steps] == [
        (g, r, s) for g in range(3) for r in range(2) for s in (2, 4, 5)
    ]
    for r in steps:
        assert set(r) == {
            "kind",
            "generation",
            "run",
            "epoch",
            "step",
            "loss",
            "learning_rate",
            "grad_norm",
            "images_per_second",
            "time",
        }
        assert r["epoch"] == (r["step"] - 1) // 2
        assert r["learning_rate"] == pytest.approx(0.5 / r["step"])
    evals = events.read_metrics(reference, "eval")
    assert [(r["generation"], r["run"], r["step"]) for r in evals] == [
        (g, r, s) for g in range(3) for r in range(2) for s in (2, 4)
    ]
    gens = events.read_metrics(reference, "generation")
    rows = json.loads((reference / "metrics.json").read_text())
    assert [r["generation"] for r in gens] == [0, 1, 2]
    for rec, row in zip(gens, rows):
        assert {k: v for k, v in rec.items() if k not in ("kind", "time")} == row


def test_a_torn_last_line_is_dropped_and_the_resume_continues(tmp_path, reference):
    out = tmp_path / "run"
    loop.run_generations(_cfg(generations=2), out)
    with open(out / events.METRICS_NAME, "a") as f:
        f.write('{"kind": "step", "generation": 2, "ru')  # killed mid-line
    assert len(events.read_metrics(out)) == len(events.read_metrics(reference)) - 11
    loop.run_generations(_cfg(generations=3), out)
    assert _by_key(events.read_metrics(out)) == _by_key(events.read_metrics(reference))
    assert (out / events.METRICS_NAME).read_bytes().endswith(b"\n")


def test_a_corrupt_line_before_the_last_is_named(tmp_path):
    (tmp_path / events.METRICS_NAME).write_text('{"kind": "step"}\nnot json\n{"kind": "x"}\n')
    with pytest.raises(fileio.CorruptFileError, match="line 2"):
        events.read_metrics(tmp_path)
    assert events.read_metrics(tmp_path / "nothing-here") == []


def test_a_resume_rebuilds_a_missing_generation_record(tmp_path, reference):
    """Killed between a generation's commit and its record: the resume writes the record from
    the committed row (without a time)."""
    out = tmp_path / "run"
    loop.run_generations(_cfg(generations=2), out)
    lines = (out / events.METRICS_NAME).read_text().splitlines(keepends=True)
    (out / events.METRICS_NAME).write_text("".join(lines[:-1]))  # generation 1's record
    loop.run_generations(_cfg(generations=3), out)
    got = _by_key(events.read_metrics(out))
    assert got == _by_key(events.read_metrics(reference))
    assert "time" not in events.read_metrics(out, "generation")[1]


def test_logging_settings_may_change_on_resume(tmp_path):
    out = tmp_path / "run"
    loop.run_generations(_cfg(generations=1), out)
    loop.run_generations(_cfg(generations=2, every_steps=1), out)
    steps = events.read_metrics(out, "step")
    assert [s["step"] for s in steps if s["generation"] == 1 and s["run"] == 0] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("logging.every_steps=0", "logging.every_steps: must be >= 1 (got 0)"),
        ("logging.progress=sometimes", "logging.progress: must be auto, true or false"),
        ("logging.tensorboard=3", "logging.tensorboard: expected true/false"),
        ("logging.wandb.mode=cloud", "logging.wandb.mode: 'cloud' is not 'offline', 'online'"),
        ("logging.csv=true", "unknown config key logging.csv"),
    ],
)
def test_bad_logging_settings_get_one_line(override, message):
    raw = {"name": "x", "model": {"kind": "steptoy"}}
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.from_dict(raw, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_rule(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Tty())
    assert events.show_progress("auto") and events.show_progress(True)
    assert not events.show_progress("auto", requested=False)  # --no-progress
    assert not events.show_progress(False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    assert not events.show_progress("auto") and events.show_progress(True)
    assert not events.show_progress(True, requested=False)


def _run_cli(capsys, tmp_path, name, *extra):
    """`collapse-jax run` of a 2-generation toy config with `extra` arguments; its stderr."""
    cfg = tmp_path / "steps.yaml"
    raw = {"name": "steps", "seed": 3, "model": {"kind": "steptoy", "steps": 5}}
    raw["generation"] = {"num_generations": 2, "samples_per_generation": 16, "num_trials": 1}
    cfg.write_text(yaml.safe_dump(raw))
    code = cli.main(["run", str(cfg), *extra, "--out", str(tmp_path / name)])
    assert code == 0
    return capsys.readouterr().err


def test_no_bars_with_no_progress_or_without_a_terminal(capsys, tmp_path):
    # pytest's captured stderr is not a terminal: "auto" shows nothing.
    assert "step/s" not in _run_cli(capsys, tmp_path, "auto") + _run_cli(
        capsys, tmp_path, "off", "logging.progress=true", "--no-progress"
    )
    err = _run_cli(capsys, tmp_path, "on", "logging.progress=true")
    assert "train gen 1" in err and "gen/s" in err  # the step bar and the generation bar


def _tfrecords(path: pathlib.Path):
    """The records of a TFRecord file (TensorBoard's event file format)."""
    data, pos = path.read_bytes(), 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos : pos + 8])
        yield data[pos + 12 : pos + 12 + n]
        pos += 12 + n + 4


def _tensorboard_scalars(folder: pathlib.Path) -> dict[tuple[str, int], float]:
    from tensorboardX.proto import event_pb2

    out = {}
    for f in sorted(folder.glob("events.out.tfevents.*")):
        for rec in _tfrecords(f):
            ev = event_pb2.Event.FromString(rec)
            for v in ev.summary.value:
                out[(v.tag, ev.step)] = v.simple_value
    return out


def test_tensorboard_holds_the_jsonl_values(tmp_path):
    pytest.importorskip("tensorboardX", reason="the tensorboard extra is not installed")
    out = tmp_path / "run"
    loop.run_generations(_cfg(generations=2, tensorboard=True), out)
    recs = events.read_metrics(out)
    root = out / events.TENSORBOARD_DIR
    for g in range(2):
        for r in range(2):
            got = _tensorboard_scalars(root / events.TensorBoardSink.fit_name(g, r))
            want = {}
            for rec in recs:
                if rec["kind"] in ("step", "eval") and (rec["generation"], rec["run"]) == (g, r):
                    prefix = "train" if rec["kind"] == "step" else "eval"
                    for k, v in rec.items():
                        if k not in ("kind", "generation", "run", "epoch", "step", "time"):
                            want[(f"{prefix}/{k}", rec["step"])] = v
            assert got.keys() == want.keys()
            for k in want:
                assert got[k] == pytest.approx(want[k], rel=1e-6), k  # float32 in the events
    gens = _tensorboard_scalars(root / "generations")
    for rec in events.read_metrics(out, "generation"):
        assert gens[("var", rec["generation"])] == pytest.approx(rec["var"], rel=1e-6)


def test_a_missing_sink_package_names_its_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
    with pytest.raises(config_lib.MissingExtra, match=r"collapse-jax\[tensorboard\]"):
        loop.run_generations(_cfg(generations=1, tensorboard=True), tmp_path / "run")


def test_only_process_0_writes(tmp_path, monkeypatch):
    from collapse_jax.jaxtools import processes

    monkeypatch.setattr(processes, "is_primary", lambda: False)
    cfg = _cfg(generations=1, tensorboard=True)
    assert events.open_log(tmp_path, cfg, 0, [], "id") is None
    assert list(tmp_path.iterdir()) == []


def test_batched_points_each_get_their_generation_records(tmp_path):
    """`run_batch` (a sweep's points on one program): one record per generation per point, with
    the point's own row."""
    raw = {"name": "toy", "model": {"kind": "toy"}}
    raw["generation"] = {"num_generations": 2, "num_trials": 4, "samples_per_generation": 8}
    cfgs = [config_lib.from_dict({**raw, "seed": s}) for s in (1, 2)]
    dirs = [tmp_path / "a", tmp_path / "b"]
    results = loop.run_batch(cfgs, dirs)
    for d, res in zip(dirs, results):
        recs = events.read_metrics(d)
        assert [r["kind"] for r in recs] == ["generation", "generation"]
        assert [{k: v for k, v in r.items() if k not in ("kind", "time")} for r in recs] == (
            res.rows
        )

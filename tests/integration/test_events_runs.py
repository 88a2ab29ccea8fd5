"""metrics.jsonl through kills and resumes, and from the real trainers (`rundir.events`): an
interrupt at every file rename of a toy run that trains by steps, a kill -9 inside a fit, the
VAE killed between epochs, the records of an LM run, and a wandb offline run."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import pytest
import yaml

from collapse_jax import cli, loop
from collapse_jax import config as config_lib
from collapse_jax.rundir import events
from tests.helpers import TOY_KINDS
from tests.integration import golden_runs
from tests.unit.test_events import _by_key, _cfg

REPO = golden_runs.CONFIGS.parents[1]


@pytest.fixture(autouse=True)
def toy_kinds(monkeypatch):
    for kind, entry in TOY_KINDS.items():
        monkeypatch.setitem(config_lib.MODEL_REGISTRY, kind, entry)


def test_every_kill_point_resumes_to_the_same_records(tmp_path):
    """An interrupt at each file rename of a run (commits, checkpoints, the log's own rewrites),
    then a resume: every record of the uninterrupted run, each once, none else."""
    loop.run_generations(_cfg(generations=2), tmp_path / "ref")
    want = _by_key(events.read_metrics(tmp_path / "ref"))
    real = os.replace
    n, done = 0, False
    while not done:
        n += 1
        out = tmp_path / f"run{n}"
        count = [0]

        def replace(src, dst, *args, count=count, n=n, **kwargs):
            count[0] += 1
            real(src, dst, *args, **kwargs)
            if count[0] == n:
                raise KeyboardInterrupt

        with pytest.MonkeyPatch.context() as m:
            m.setattr(os, "replace", replace)
            try:
                loop.run_generations(_cfg(generations=2), out)
                done = True  # n is past the last rename: the run was not interrupted
            except KeyboardInterrupt:
                pass
        loop.run_generations(_cfg(generations=2), out)
        assert _by_key(events.read_metrics(out)) == want, f"interrupted at rename {n}"
    assert n > 15  # the loop reached renames inside fits and commits


def test_a_kill_9_inside_a_fit_resumes_to_the_same_records(tmp_path):
    """A real SIGKILL (tests/kill_worker.py) at the 9th rename: generation 0's second chain has
    written a checkpoint and step records beyond it."""
    cfg = tmp_path / "steps.yaml"
    raw = {"name": "steps", "seed": 3, "model": {"kind": "steptoy", "steps": 5}}
    raw["generation"] = {"num_generations": 2, "samples_per_generation": 16, "num_trials": 2}
    raw["logging"] = {"every_steps": 1}
    cfg.write_text(yaml.safe_dump(raw))
    out, ref = tmp_path / "run", tmp_path / "ref"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    argv = [sys.executable, "-m", "tests.kill_worker", "9", "after", "run", str(cfg)]
    proc = subprocess.run(
        [*argv, "--out", str(out), "--no-progress"], cwd=REPO, env=env, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    killed = events.read_metrics(out, "step")
    assert killed and not (out / "generations").is_dir()  # killed inside generation 0
    assert cli.main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert cli.main(["run", str(cfg), "--out", str(ref), "--no-progress"]) == 0
    assert _by_key(events.read_metrics(out)) == _by_key(events.read_metrics(ref))


def _shrunk(case: str, data_dir, *extra):
    """The golden record's shrunk config of `case`, with `extra` overrides replacing its own."""
    config, overrides = golden_runs.cases(data_dir)[case]
    keys = {e.split("=")[0] for e in extra}
    over = [o for o in overrides if o.split("=")[0] not in keys]
    return config_lib.load_config(golden_runs.CONFIGS / config, [*over, *extra])


def _vae(data_dir, *extra):
    return _shrunk("vae_cpu", data_dir, "model.epochs=3", "model.batch_size=16", *extra)


def test_the_vae_killed_between_epochs_resumes_to_the_same_records(tmp_path, data_dir):
    cfg = _vae(data_dir, "logging.every_steps=3")
    ref = tmp_path / "ref"
    loop.run_generations(cfg, ref)
    want = events.read_metrics(ref, "step")
    # 64 images in batches of 16: 4 steps per epoch, 3 epochs; reported at 3, 6, 9, 12
    assert [(r["generation"], r["step"], r["epoch"]) for r in want] == [
        (g, s, (s - 1) // 4) for g in range(2) for s in (3, 6, 9, 12)
    ]
    for r in want:
        assert r["learning_rate"] == cfg.model.learning_rate and r["grad_norm"] > 0
        assert r["images_per_second"] > 0 and "tokens_per_second" not in r
    out = tmp_path / "run"
    real = os.replace
    seen = [0]

    def replace(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        if str(dst).endswith("train_state.json"):
            seen[0] += 1
            if seen[0] == 2:  # generation 0 after its second epoch
                raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as m:
        m.setattr(os, "replace", replace)
        with pytest.raises(KeyboardInterrupt):
            loop.run_generations(cfg, out)
    assert [r["step"] for r in events.read_metrics(out, "step")] == [3, 6]
    # The kill came after the fit had reported step 9 of its third epoch: it is redone once.
    with open(out / events.METRICS_NAME, "a") as f:
        f.write('{"kind":"step","generation":0,"run":0,"epoch":2,"step":9,"loss":1.0}\n')
    loop.run_generations(cfg, out)
    got = events.read_metrics(out)
    assert _by_key(got) == _by_key(events.read_metrics(ref))  # the same losses, bit for bit


def test_the_lm_trainer_reports_steps_and_validations(tmp_path, data_dir):
    cfg = _shrunk(
        "lm/opt_wikitext_cpu", data_dir, "generation.num_generations=1", "logging.every_steps=1"
    )
    out = tmp_path / "run"
    loop.run_generations(cfg, out)
    steps = events.read_metrics(out, "step")
    spe = len(steps) // cfg.model.train.epochs
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1)) and spe >= 1
    for r in steps:
        assert r["generation"] == 0 and r["run"] == 0 and r["epoch"] == (r["step"] - 1) // spe
        assert r["tokens_per_second"] > 0 and "images_per_second" not in r
        assert r["learning_rate"] > 0 and r["grad_norm"] > 0 and r["loss"] > 0
    evals = events.read_metrics(out, "eval")
    assert [r["step"] for r in evals] == [spe * (e + 1) for e in range(cfg.model.train.epochs)]
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-12)
    gens = events.read_metrics(out, "generation")
    assert [g["generation"] for g in gens] == [0] and "ppl" in gens[0]


def test_a_wandb_offline_run_is_written(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    loop.run_generations(_cfg(generations=1, wandb={"enabled": True, "project": "t"}), out)
    runs = list((out / events.WANDB_DIR / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / events.WANDB_DIR).rglob("*"))
    assert list(runs[0].glob("*.wandb")), "no wandb event file"

"""Issue 26 on the language model (the sequential driver with orbax checkpoints): a kill right
after generation 0's data file, before the first commit of a generation, resumes without refitting
generation 0 and gives the uninterrupted run's results; the run-wide source is committed."""

import json
import os
import pathlib

import pytest

from collapse_jax import config as config_lib
from collapse_jax import loop
from collapse_jax.rundir import commits, fileio
from tests.integration.lm.test_source_experiment import DEFAULT, SHRINK


def _rows(out: pathlib.Path) -> list[dict]:
    rows = json.loads((out / "metrics.json").read_text())
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]


def test_a_kill_before_the_first_commit_keeps_the_finished_fit(tmp_path, monkeypatch):
    cfg = config_lib.load_config(DEFAULT, SHRINK)
    learner = loop.make_learner(cfg)
    fits = []
    fit = learner.fit

    def counted(key, data, params, *, workdir=None, **kw):
        fits.append(str(workdir))
        return fit(key, data, params, workdir=workdir, **kw)

    monkeypatch.setattr(learner, "fit", counted)
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        if str(dst).endswith("data/gen_00000.npz"):
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        with pytest.raises(KeyboardInterrupt):
            loop.run_generations(cfg, out, learner=learner)
    assert commits.verify(out) == [] and commits.committed_generations(out) == 0
    assert len(fits) == 1
    loop.run_generations(cfg, out, learner=learner)  # the same command resumes
    assert len(fits) == 2 and "gen_00001" in fits[1]  # generation 0's fit was reused
    files = commits.read_manifest(out)["files"]
    assert "source/source.npz" in files and "source/source.json" in files
    ref = tmp_path / "ref"
    loop.run_generations(cfg, ref, learner=loop.make_learner(cfg))
    assert _rows(out) == _rows(ref)
    for g in range(2):
        a = fileio.load_npz(out / "arrays" / f"gen_{g:05d}.npz")
        b = fileio.load_npz(ref / "arrays" / f"gen_{g:05d}.npz")
        assert a.keys() == b.keys()
        differ = [k for k in a if "seconds" not in k and a[k].tobytes() != b[k].tobytes()]
        assert differ == [], (g, differ)

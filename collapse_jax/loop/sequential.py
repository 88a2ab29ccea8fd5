"""The sequential driver of non-jittable learners (SGD fine-tuning, beam search): chains one
after the other in Python, a generation of every chain before the next generation; every
generation committed, each chain's fit and sample resumable.

Each chain's generation is the core's step (`loop.core`: `draw_pool`, `build_data`, fit,
`finish`, the default measure with the learner's `data_metrics`) with persistence around each
part. One difference of timing only: generation g + 1's pool (the expensive synthetic draw) is
drawn at the end of generation g, from the fitted params still in memory, and committed with it
as `state/data.npz` (it is the next generation's input, and the last generation's samples are
there for figures); `draw_pool` draws it with generation g's keys either way, so the numbers are
those the jittable core draws at the start of generation g + 1.

Chain r's files live in `chain_dir(folder, r)`: the folder itself for chain 0 (the layout of a
single-chain run) and `folder/chain_XXXXX` for the others. Per generation g and chain r:

    work/gen_g[/chain_r]/train.npz  the training set (real data, or a subset of the pool)
    work/gen_g[/chain_r]/fit/       the learner's own resumable fit state (checkpoints)
    work/gen_g[/chain_r]/fitted/    the fitted params (DONE marks them complete)
    work/gen_g[/chain_r]/metrics.npz
    work/gen_g[/chain_r]/sample/    the learner's resumable sampling state
    work/gen_g[/chain_r]/next.npz   the next data set (state/data.npz once committed): this
                                    chain's generation is done

Once every chain is done the generation is committed (data, params, row, arrays, then state/)
and work/gen_g is removed.

With several processes (`jax.distributed`) the fit and the sampling get no workdir, so no
resumable state of their own (a training checkpoint is written by every process, and a
regeneration's rows are only all known after its last batch): a killed multi-process run resumes
at its last committed generation or after the last finished step above (train.npz, fitted/,
metrics.npz, next.npz), which process 0 sends to the others (`loop.driver.send_resume_point`).
"""

from __future__ import annotations

import pathlib
import shutil
from typing import Any

import jax
import numpy as np

from collapse_jax.jaxtools import processes
from collapse_jax.loop.commit import commit_generation, commit_state, prune_params
from collapse_jax.loop.core import build_data, draw_pool, finish, nothing
from collapse_jax.loop.keys import base_key, chain_keys, generation_keys, reference_key
from collapse_jax.loop.learner import Provenance
from collapse_jax.loop.policy import Carry
from collapse_jax.loop.schedule import Schedule, requested_real_size
from collapse_jax.loop.summary import row_and_arrays
from collapse_jax.rundir import events, fileio, guard


def chain_dir(folder: pathlib.Path, r: int) -> pathlib.Path:
    return folder if r == 0 else folder / f"chain_{r:05d}"


def run_sequential(
    cfg, learner, run_dir, start, committed, stop_after, *, log=None, progress=False
) -> None:
    """Runs (or resumes) generations [start, G) of a non-jittable learner in `run_dir` (locked
    and prepared by the caller): the core's steps (`draw_pool`, `build_data`, fit, `finish`)
    for every chain, each step's result persisted in work/ so that a killed run resumes within
    a generation, then the generation's commit.

    `log` (a `rundir.events.EventLog`, or None) receives what the fits report: the learner's
    `fit` and `sample` get `log=` a `StepLog` of the chain's generation (with `progress`: whether
    they show progress bars)."""
    gcfg = cfg.generation
    real_size = learner.real_size(requested_real_size(gcfg))
    # Generation g's pool is drawn at the end of generation g - 1 (state/data.npz), so the
    # schedule reaches one generation beyond the run where the config defines its size.
    more = gcfg.sample_schedule is None or len(gcfg.sample_schedule) > gcfg.num_generations
    schedule = Schedule.of(gcfg, real_size, gcfg.num_generations + int(more))
    policy = schedule.policy
    if policy.keeps_anchor:  # refused before any fit, not at the end of generation 0
        raise ValueError(
            f"generation.likelihood_filter.scorer: 'generation0' needs a jittable learner "
            f"({type(learner).__name__} is not)"
        )
    key, R = base_key(cfg.seed), gcfg.num_trials
    reference = learner.reference(reference_key(key))
    ks = [chain_keys(key, r) for r in range(R)]
    template: list[Any] = [None] * R

    def params_template(r: int) -> Any:
        if template[r] is None:
            template[r] = learner.init(ks[r][1])
        return template[r]

    def previous_carry(r: int, g: int) -> Carry | None:
        """What `build_data` and `finish` read of generation g - 1's carry (None at g = 0): its
        params where the fit starts from them, the chain's fixed real set."""
        if g == 0:
            return None
        params = real = None
        if policy.init_from == "previous":
            params = learner.load_params(
                chain_dir(run_dir / "state", r) / "params", params_template(r)
            )
        if policy.keeps_real:  # the chain's fixed real set: its generation-0 data
            real = _load_data(chain_dir(run_dir / "data", r) / "gen_00000.npz")
        return Carry(params, None, real)

    resumable = not processes.is_multiprocess()  # within a generation (see the module docstring)
    done = 0
    for g in range(start, gcfg.num_generations):
        work = run_dir / "work" / f"gen_{g:05d}"
        counts = schedule.counts(g)
        per_chain = []
        for r in range(R):
            state = chain_dir(run_dir / "state", r)
            wdir = chain_dir(work, r)
            wdir.mkdir(parents=True, exist_ok=True)
            keys = generation_keys(ks[r][2], g)
            steps = (
                log.scope(g, r, progress=progress)
                if log is not None
                else events.StepLog(None, g, r, 1, progress)
            )
            carry = previous_carry(r, g)
            # The training set passes through work/ (generation 0's real data too), so a resumed
            # run trains on exactly the bytes the committed data/gen_XXXXX holds.
            train_path = wdir / "train.npz"
            if g == 0:
                if not train_path.exists():
                    real = draw_pool(learner, policy, ks[r], g, None, counts)
                    fileio.save_npz(train_path, _data_arrays(real))
                pool = _load_data(train_path)
            else:
                pool = _load_data(state / "data.npz")  # drawn at the end of generation g - 1
            data, init = build_data(learner, policy, ks[r], g, keys, carry, pool, counts)
            if not train_path.exists():
                fileio.save_npz(train_path, _data_arrays(data))
            data = _load_data(train_path)
            fitted_dir = wdir / "fitted"
            if (fitted_dir / "DONE").exists():
                params = learner.load_params(fitted_dir, params_template(r))
            else:
                fit_dir = wdir / "fit" if resumable else None
                params = learner.fit(keys["fit"], data, init, workdir=fit_dir, log=steps)
                with fileio.staged_dir(fitted_dir) as tmp:
                    learner.save_params(tmp, params)
                    (tmp / "DONE").write_text("ok\n")
            del init
            metrics_path = wdir / "metrics.npz"
            if metrics_path.exists():
                m = fileio.load_npz(metrics_path)
                new, _ = finish(learner, policy, keys, carry, data, pool, params, measure=nothing)
            else:
                new, m = finish(learner, policy, keys, carry, data, pool, params, reference)
                m = {k: np.asarray(v) for k, v in m.items()}
                # A non-finite metric stops the run below (`guard.check_finite`) and is never
                # cached: a resume after the cause is fixed measures again.
                if not guard.nonfinite_metrics(m, learner.infinite_metrics):
                    fileio.save_npz(metrics_path, m)
            per_chain.append(m)
            if g + 1 < schedule.num_generations and not (wdir / "next.npz").exists():
                nxt = draw_pool(
                    learner,
                    policy,
                    ks[r],
                    g + 1,
                    new,
                    schedule.counts(g + 1),
                    workdir=wdir / "sample" if resumable else None,
                    log=steps,
                )
                if isinstance(learner, Provenance):  # its new points were written by generation g
                    nxt = learner.stamp(nxt, g)
                fileio.save_npz(wdir / "next.npz", _data_arrays(nxt))
            del data, pool, params, new, carry
        # Every chain has finished generation g: commit it.
        for r in range(R):
            wdir = chain_dir(work, r)
            dst = chain_dir(run_dir / "data", r) / f"gen_{g:05d}.npz"
            fileio.save_npz(dst, fileio.load_npz(wdir / "train.npz"))
            if gcfg.keep_params != "last":
                pdir = chain_dir(run_dir / "params", r) / f"gen_{g:05d}"
                with fileio.staged_dir(pdir) as tmp:
                    shutil.copytree(wdir / "fitted", tmp, dirs_exist_ok=True)
                prune_params(pdir.parent, gcfg.keep_params, g)
        stacked = {k: np.stack([m[k] for m in per_chain]) for k in per_chain[0]}
        guard.check_finite(g, stacked, learner.infinite_metrics)  # before the commit
        row, arrays = row_and_arrays(schedule, g, stacked, gcfg.record_trials)
        commit_generation(run_dir, g, row, arrays)

        def write(tmp, work=work):
            for r in range(R):
                wdir, sdir = chain_dir(work, r), chain_dir(tmp, r)
                sdir.mkdir(parents=True, exist_ok=True)
                if (wdir / "next.npz").exists():
                    shutil.copyfile(wdir / "next.npz", sdir / "data.npz")
                shutil.copytree(wdir / "fitted", sdir / "params")

        commit_state(run_dir, g + 1, write)
        shutil.rmtree(work, ignore_errors=True)
        committed(g, row)
        done += 1
        if stop_after is not None and done >= stop_after:
            return


def _data_arrays(data: Any) -> dict[str, np.ndarray]:
    """A non-jittable learner's data as the arrays of one .npz: a single array is saved as
    "data"; a dict of arrays (e.g. blocks with their provenance) under its own keys."""
    if isinstance(data, dict):
        return {k: np.asarray(v) for k, v in data.items()}
    leaves = jax.tree.leaves(data)
    if len(leaves) != 1:
        raise TypeError("non-jittable learners' data must be a single array or a dict of arrays")
    return {"data": np.asarray(leaves[0])}


def _load_data(path: pathlib.Path) -> Any:
    """What `_data_arrays` saved: the array "data" alone, or the dict of every array."""
    arrays = fileio.load_npz(path)
    return arrays["data"] if set(arrays) == {"data"} else arrays

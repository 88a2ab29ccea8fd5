"""The model-agnostic generational loop: fit -> evaluate -> sample -> mix, persisted and resumable.

```
data_0 = real data
for n in 0..G-1:
    model_n   = fit(learner, data_n)
    metrics_n = evaluate(model_n, real reference)
    data_n+1  = mix(synthetic=alpha, previous=beta, real=gamma)   # or replace / accumulate
```

Keys: chain `r` of a run with seed `s` uses `k_r = fold_in(key(s), r)`; generation `n` of that chain
uses `fold_in(k_gens, n)` where `k_real, k_base, k_gens = split(k_r, 3)`. Results therefore depend
neither on how many chains or generations were asked for, nor on chunking or resumption.

Jittable learners run `R = num_trials` chains under `vmap`, `block_size` generations per
`lax.scan`, `chunk_size` chains at a time; each finished block is committed to the run directory.
Other learners (SGD, beam search) run one chain in Python, committing after every generation and
keeping their fit and sample resumable inside `work/gen_XXXXX/`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import pathlib
import re
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax import config as config_lib
from collapse_jax import records
from collapse_jax.learner import AbstractLearner

log = logging.getLogger(__name__)

Callback = Callable[[int, dict[str, Any]], None]


# ----------------------------------------------------------------------------------------------
# Keys and one generation of one chain (pure; shared by both paths).


def chain_keys(seed: int, chain: jax.Array | int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(k_real, k_base, k_gens) of chain `chain` of a run seeded with `seed`."""
    k_chain = jax.random.fold_in(jax.random.key(seed), chain)
    k_real, k_base, k_gens = jax.random.split(k_chain, 3)
    return k_real, k_base, k_gens


def generation_keys(k_gens: jax.Array, generation: jax.Array | int) -> dict[str, jax.Array]:
    ks = jax.random.split(jax.random.fold_in(k_gens, generation), 6)
    return dict(fit=ks[0], eval=ks[1], sample=ks[2], previous=ks[3], real=ks[4], init=ks[5])


def start_params(learner: AbstractLearner, gcfg, keys, k_base, previous):
    """Where generation n's fit starts (`init_from`)."""
    if gcfg.init_from == "previous" and previous is not None:
        return previous
    if gcfg.init_from == "scratch":
        return learner.init(keys["init"])
    return learner.init(k_base)


def next_data(learner: AbstractLearner, gcfg, keys, data, params, counts, **kw) -> Any:
    """The next generation's training set under the mixing policy.

    Args:
      counts: (synthetic, previous, real) numbers of points; ints, or traced int32 scalars for
        learners with `static_sample_size = False`.
    """
    n_syn, n_prev, n_real = counts
    if gcfg.policy == "replace":
        return learner.sample(keys["sample"], params, n_syn, **kw)
    if gcfg.policy == "accumulate":
        return learner.concat([data, learner.sample(keys["sample"], params, n_syn, **kw)])
    parts = [learner.sample(keys["sample"], params, n_syn, **kw)]
    if gcfg.beta > 0:
        parts.append(learner.subset(keys["previous"], data, n_prev))
    if gcfg.gamma > 0:
        parts.append(learner.draw_real(keys["real"], n_real))
    return learner.concat(parts)


def _one_generation(learner, gcfg, reference, k_base, k_gens, g, data, params_prev, counts):
    keys = generation_keys(k_gens, g)
    params = learner.fit(keys["fit"], data, start_params(learner, gcfg, keys, k_base, params_prev))
    metrics = learner.evaluate(keys["eval"], params, reference)
    return next_data(learner, gcfg, keys, data, params, counts), params, metrics


# ----------------------------------------------------------------------------------------------
# Summaries of per-chain metrics.


def summarize(metrics: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Chain statistics of one generation's metrics.

    Args:
      metrics: {name: [R] or [R, ...]} per-chain values.
    Returns:
      (row, means): scalar metrics give `name` (chain mean) and, when R > 1, `name_se`,
      `name_std`, `name_q05`, `name_q50`, `name_q95`; vector metrics give their chain mean in
      `means`.
    """
    row: dict[str, float] = {}
    means: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", over="ignore"):  # -inf log-dets of collapsed chains
        for name, v in metrics.items():
            _summarize_one(name, np.asarray(v, dtype=np.float64), row, means)
    return row, means


def _summarize_one(name: str, v: np.ndarray, row: dict, means: dict) -> None:
    if v.ndim > 1:
        means[name] = v.mean(axis=0)
        return
    r = v.shape[0]
    row[name] = float(v.mean())
    if r > 1:
        std = float(v.std(ddof=1))
        row[f"{name}_se"] = std / math.sqrt(r)
        row[f"{name}_std"] = std
        q = np.quantile(v, [0.05, 0.5, 0.95])
        row[f"{name}_q05"], row[f"{name}_q50"], row[f"{name}_q95"] = map(float, q)


# ----------------------------------------------------------------------------------------------
# The driver.


@dataclasses.dataclass
class Result:
    """What `run_generations` returns: the summary rows and the run directory."""

    rows: list[dict[str, Any]]
    run_dir: pathlib.Path


def _env_info() -> dict[str, Any]:
    import importlib.metadata as md
    import platform
    import subprocess

    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        sha = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=pathlib.Path(__file__).parent,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {
        "python": platform.python_version(),
        "versions": versions,
        "devices": [str(d) for d in jax.devices()],
        "git_sha": sha,
    }


def prepare_run_dir(cfg: config_lib.ExperimentConfig, run_dir: pathlib.Path) -> int:
    """Creates or checks `run_dir`; returns the first generation still to run.

    A run directory may be resumed with the same resolved config, or with more generations.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.yaml"
    text = config_lib.dump(cfg)
    if cfg_path.exists():
        import yaml

        stored = yaml.safe_load(cfg_path.read_text())
        wanted = config_lib.to_dict(cfg)
        # Only the number of generations may change: a finished run can be extended.
        for d in (stored, wanted):
            d.get("generation", {}).pop("num_generations", None)
        if stored != wanted:
            raise ValueError(
                f"{run_dir} holds a run of a different config; use another --out, or the same "
                f"config (only generation.num_generations may change when resuming). Stored:\n"
                f"{cfg_path.read_text()}"
            )
    records.atomic_write_text(cfg_path, text)
    if not (run_dir / "env.json").exists():
        records.atomic_write_json(run_dir / "env.json", _env_info())
    records.recover_state_dir(run_dir)
    meta = run_dir / "state" / "meta.json"
    return json.loads(meta.read_text())["next_generation"] if meta.exists() else 0


def make_learner(cfg: config_lib.ExperimentConfig) -> AbstractLearner:
    return config_lib.learner_class(cfg.kind)(cfg.model, cfg.generation, cfg.mesh)


def run_generations(
    cfg: config_lib.ExperimentConfig,
    run_dir: str | pathlib.Path,
    *,
    learner: AbstractLearner | None = None,
    on_generation: Callback | None = None,
    progress: bool = False,
    stop_after: int | None = None,
) -> Result:
    """Runs (or resumes) an experiment in `run_dir`.

    Args:
      cfg: the resolved experiment config.
      run_dir: the experiment's run directory; resumed when it already holds generations.
      learner: the learner to use (default: the one `cfg.model.kind` names).
      on_generation: called as `on_generation(g, row)` after every committed generation.
      progress: show a progress bar over generations.
      stop_after: stop once this many generations are committed (simulates a killed run).

    Returns:
      The summary rows of all finished generations and the run directory.
    """
    run_dir = pathlib.Path(run_dir)
    learner = make_learner(cfg) if learner is None else learner
    gcfg = cfg.generation
    start = prepare_run_dir(cfg, run_dir)
    if learner.jittable:
        driver = _run_jittable
    else:
        if gcfg.num_trials != 1:
            raise ValueError(
                f"generation.num_trials={gcfg.num_trials}: {type(learner).__name__} is not "
                "jittable and runs a single chain; set num_trials=1"
            )
        driver = _run_python
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=gcfg.num_generations, initial=start, desc=cfg.name, unit="gen")

    def committed(g: int, row: dict[str, Any]) -> None:
        if bar is not None:
            bar.update(1)
            shown = {k: v for k, v in row.items() if "_" not in k and isinstance(v, float)}
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(shown.items())[:3]}, refresh=False)
        if on_generation is not None:
            on_generation(g, row)

    try:
        if start < gcfg.num_generations:
            driver(cfg, learner, run_dir, start, committed, stop_after)
    finally:
        if bar is not None:
            bar.close()
    run = records.Run(run_dir)
    rows = run.rows()
    records.write_tables(run_dir, rows)
    return Result(rows=rows, run_dir=run_dir)


def _commit_generation(run_dir, g, row, arrays) -> None:
    records.save_npz(run_dir / "arrays" / f"gen_{g:05d}.npz", arrays)
    records.atomic_write_json(run_dir / "generations" / f"gen_{g:05d}.json", row)


def _commit_state(run_dir: pathlib.Path, next_generation: int, write: Callable) -> None:
    tmp = records.fresh_dir(run_dir, "state")
    write(tmp)
    records.atomic_write_json(tmp / "meta.json", {"next_generation": next_generation})
    records.replace_dir(tmp, run_dir / "state")


# ----------------------------------------------------------------------------------------------
# Jittable learners: vmap over chains, scan over a block of generations, chunk over chains.


def _segments(gcfg, start: int, counts_of: Callable[[int], tuple], static: bool):
    """Blocks of generations [a, b): aligned to block_size, split where static counts change."""
    g = start
    while g < gcfg.num_generations:
        end = min((g // gcfg.block_size + 1) * gcfg.block_size, gcfg.num_generations)
        if static:
            b = g + 1
            while b < end and counts_of(b) == counts_of(g):
                b += 1
            end = b
        yield g, end
        g = end


@functools.partial(jax.jit, static_argnames=("learner", "seed", "counts", "scan"))
def _block(learner, seed, chains, gens, data, params, reference, counts_arr, *, counts, scan):
    """Runs generations `gens` for a chunk of chains; returns (data, params, metrics[b, R])."""
    gcfg = learner.generation

    def per_chain(chain, data, params):
        _, k_base, k_gens = chain_keys(seed, chain)

        def step(carry, xs):
            data, params = carry
            g, c = xs
            cnt = counts if counts is not None else (c[0], c[1], c[2])
            data, params, metrics = _one_generation(
                learner, gcfg, reference, k_base, k_gens, g, data, params, cnt
            )
            return (data, params), metrics

        if scan:
            (data, params), metrics = jax.lax.scan(step, (data, params), (gens, counts_arr))
        else:  # one generation whose data changes shape (e.g. accumulate with raw points)
            (data, params), m = step((data, params), (gens[0], counts_arr[0]))
            metrics = jax.tree.map(lambda x: x[None], m)
        return data, params, metrics

    data, params, metrics = jax.vmap(per_chain, in_axes=(0, 0, 0), out_axes=(0, 0, 1))(
        chains, data, params
    )
    return data, params, metrics


@functools.partial(jax.jit, static_argnames=("learner", "seed"))
def _initial(learner, seed, chains):
    def one(chain):
        k_real, k_base, _ = chain_keys(seed, chain)
        return learner.real_data(k_real), learner.init(k_base)

    return jax.vmap(one)(chains)


def _run_jittable(cfg, learner, run_dir, start, committed, stop_after) -> None:
    gcfg = cfg.generation
    R, seed = gcfg.num_trials, cfg.seed
    chunk = min(gcfg.chunk_size, R)
    n_chunks = -(-R // chunk)
    sharding = None
    if cfg.mesh is not None:
        from collapse_jax import sharding as sharding_lib

        mesh = sharding_lib.make_mesh(cfg.mesh.shape())
        if chunk % sharding_lib.data_parallel_size(mesh) == 0:
            sharding = sharding_lib.batch_sharding(mesh)

    def chunk_chains(c: int) -> np.ndarray:
        # The last chunk is padded with extra chain indices (computed, then dropped): one compile.
        return np.arange(c * chunk, (c + 1) * chunk, dtype=np.uint32)

    def put(x):
        return jax.device_put(x, sharding) if sharding is not None else jnp.asarray(x)

    k_ref = jax.random.fold_in(jax.random.key(seed), 2**31 - 1)
    reference = learner.reference(k_ref)
    # The real data size, for M_n when samples_per_generation is None.
    real_shape = jax.eval_shape(lambda: learner.real_data(jax.random.key(0)))
    real_size = learner.num_samples(real_shape)

    if start == 0:
        data_parts, params_parts = [], []
        for c in range(n_chunks):
            d, p = _initial(learner, seed, put(chunk_chains(c)))
            data_parts.append(jax.device_get(d))
            params_parts.append(jax.device_get(p))
        data = _cat_chunks(data_parts, R)
        params = _cat_chunks(params_parts, R)
    else:
        tmpl_d, tmpl_p = jax.eval_shape(
            lambda: _initial(learner, seed, jnp.zeros((1,), jnp.uint32))
        )
        data = records.load_tree(run_dir / "state" / "data.npz", tmpl_d)
        params = records.load_tree(run_dir / "state" / "params.npz", tmpl_p)

    def counts_of(g: int) -> tuple[int, int, int]:
        return gcfg.shares(gcfg.sample_size(g + 1, real_size))

    static = learner.static_sample_size
    # Learners whose data grows (accumulate with raw points) cannot be scanned: one generation
    # per jitted call then, recompiled as the shapes change.
    g0 = np.arange(start, start + 1, dtype=np.int32)
    c0 = np.array([counts_of(start)], dtype=np.int32)
    first = jax.tree.map(lambda x: _pad_rows(x[:chunk], chunk), (data, params))
    scan = _shape_invariant(
        learner, seed, *first, reference, counts_of(start) if static else None, c0, g0
    )
    seg_cfg = gcfg if scan else dataclasses.replace(gcfg, block_size=1)
    done = 0
    for a, b in _segments(seg_cfg, start, counts_of, static):
        gens = np.arange(a, b, dtype=np.int32)
        counts_arr = np.array([counts_of(g) for g in range(a, b)], dtype=np.int32)
        counts = counts_of(a) if static else None
        out_d, out_p, out_m = [], [], []
        for c in range(n_chunks):
            sl = slice(c * chunk, min((c + 1) * chunk, R))
            d_c = jax.tree.map(lambda x, sl=sl: put(_pad_rows(x[sl], chunk)), data)
            p_c = jax.tree.map(lambda x, sl=sl: put(_pad_rows(x[sl], chunk)), params)
            d, p, m = _block(
                learner,
                seed,
                put(chunk_chains(c)),
                jnp.asarray(gens),
                d_c,
                p_c,
                reference,
                jnp.asarray(counts_arr),
                counts=counts,
                scan=scan,
            )
            n = sl.stop - sl.start
            out_d.append(jax.tree.map(lambda x, n=n: np.asarray(x)[:n], d))
            out_p.append(jax.tree.map(lambda x, n=n: np.asarray(x)[:n], p))
            out_m.append(jax.tree.map(lambda x, n=n: np.asarray(x)[:, :n], m))
        data = _cat_chunks(out_d, R)
        params = _cat_chunks(out_p, R)
        metrics = {k: np.concatenate([m[k] for m in out_m], axis=1) for k in out_m[0]}
        for i, g in enumerate(range(a, b)):
            per_chain = {k: v[i] for k, v in metrics.items()}
            row, means = summarize(per_chain)
            row = {"generation": g, "sample_size": _size_of(gcfg, g, real_size), **row}
            arrays = {f"trials/{k}": v[: gcfg.record_trials] for k, v in per_chain.items()}
            arrays.update({f"mean/{k}": v for k, v in means.items()})
            _commit_generation(run_dir, g, row, arrays)
            if gcfg.keep_params != "last":
                pdir = run_dir / "params" / f"gen_{g:05d}"
                if i == b - a - 1:  # only the block's last params exist on the host
                    tmp = records.fresh_dir(pdir.parent, pdir.name)
                    records.save_tree(tmp / "params.npz", params)
                    records.replace_dir(tmp, pdir)
                    _prune_params(run_dir, gcfg, g)

        def write(tmp, data=data, params=params):
            records.save_tree(tmp / "data.npz", data)
            records.save_tree(tmp / "params.npz", params)

        _commit_state(run_dir, b, write)
        for g in range(a, b):
            committed(g, json.loads((run_dir / "generations" / f"gen_{g:05d}.json").read_text()))
        done += b - a
        if stop_after is not None and done >= stop_after:
            return


def _size_of(gcfg, g: int, real_size: int) -> int:
    """Number of points generation g is fitted to (accumulate: all generations' data)."""
    if gcfg.policy == "accumulate":
        return real_size + sum(gcfg.sample_size(k, real_size) for k in range(1, g + 1))
    return real_size if g == 0 else gcfg.sample_size(g, real_size)


def _shape_invariant(learner, seed, data, params, reference, counts, counts_arr, gens) -> bool:
    """Whether one generation maps the (data, params) carry to arrays of the same shapes."""
    out = jax.eval_shape(
        functools.partial(_block, learner, seed, counts=counts, scan=False),
        jnp.zeros(jax.tree.leaves(data)[0].shape[:1], jnp.uint32),
        jnp.asarray(gens[:1]),
        data,
        params,
        reference,
        jnp.asarray(counts_arr[:1]),
    )
    same = jax.tree.map(
        lambda a, b: a.shape == b.shape and a.dtype == b.dtype, (out[0], out[1]), (data, params)
    )
    return all(jax.tree.leaves(same))


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
    x = np.asarray(x)
    if x.shape[0] == n:
        return x
    pad = np.repeat(x[-1:], n - x.shape[0], axis=0)
    return np.concatenate([x, pad], axis=0)


def _cat_chunks(parts: list[Any], R: int) -> Any:
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs])[:R], *parts)


# ----------------------------------------------------------------------------------------------
# Non-jittable learners: one chain in Python, every generation committed, fit/sample resumable.


def _run_python(cfg, learner, run_dir, start, committed, stop_after) -> None:
    gcfg, seed = cfg.generation, cfg.seed
    k_real, k_base, k_gens = chain_keys(seed, 0)
    reference = learner.reference(jax.random.fold_in(jax.random.key(seed), 2**31 - 1))
    params_template = None
    if start == 0:
        data = learner.real_data(k_real)
        params_prev = None
    else:
        data = _load_data(run_dir / "state" / "data.npz")
        params_prev = None
        if gcfg.init_from == "previous":
            params_template = learner.init(k_base)
            params_prev = learner.load_params(run_dir / "state" / "params", params_template)
    real_size = (
        learner.num_samples(data)
        if start == 0
        else json.loads((run_dir / "generations" / "gen_00000.json").read_text())["sample_size"]
    )
    done = 0
    for g in range(start, gcfg.num_generations):
        keys = generation_keys(k_gens, g)
        work = run_dir / "work" / f"gen_{g:05d}"
        work.mkdir(parents=True, exist_ok=True)
        fitted_dir = work / "fitted"
        if (fitted_dir / "DONE").exists():
            template = params_template if params_template is not None else learner.init(k_base)
            params = learner.load_params(fitted_dir, template)
        else:
            init = start_params(learner, gcfg, keys, k_base, params_prev)
            params = learner.fit(keys["fit"], data, init, workdir=work / "fit")
            tmp = records.fresh_dir(work, "fitted")
            learner.save_params(tmp, params)
            (tmp / "DONE").write_text("ok\n")
            records.replace_dir(tmp, fitted_dir)
        metrics_path = work / "metrics.npz"
        if metrics_path.exists():
            per_chain = records.load_npz(metrics_path)
        else:
            m = learner.evaluate(keys["eval"], params, reference)
            per_chain = {k: np.asarray(v)[None] for k, v in m.items()}
            records.save_npz(metrics_path, per_chain)
        row, means = summarize(per_chain)
        row = {"generation": g, "sample_size": learner.num_samples(data), **row}
        counts = gcfg.shares(gcfg.sample_size(g + 1, real_size))
        new_data = next_data(learner, gcfg, keys, data, params, counts, workdir=work / "sample")
        # Commit: the data this generation trained on, its params, its metrics, then the state.
        records.save_npz(run_dir / "data" / f"gen_{g:05d}.npz", _data_arrays(data))
        if gcfg.keep_params != "last":
            pdir = run_dir / "params" / f"gen_{g:05d}"
            tmp = records.fresh_dir(pdir.parent, pdir.name)
            shutil.copytree(fitted_dir, tmp, dirs_exist_ok=True)
            records.replace_dir(tmp, pdir)
            _prune_params(run_dir, gcfg, g)
        arrays = {f"trials/{k}": v for k, v in per_chain.items()}
        arrays.update({f"mean/{k}": v for k, v in means.items()})
        _commit_generation(run_dir, g, row, arrays)

        def write(tmp, new_data=new_data, fitted_dir=fitted_dir):
            records.save_npz(tmp / "data.npz", _data_arrays(new_data))
            shutil.copytree(fitted_dir, tmp / "params")

        _commit_state(run_dir, g + 1, write)
        shutil.rmtree(work, ignore_errors=True)
        data, params_prev = new_data, params
        committed(g, row)
        done += 1
        if stop_after is not None and done >= stop_after:
            return


def _prune_params(run_dir: pathlib.Path, gcfg, newest: int) -> None:
    """`keep_params: first_last`: drop kept parameters other than the first kept generation's
    (generation 0; for jittable learners, whose parameters reach the host only at the end of a
    block, the first block's last) and the newest. Runs after the newest is committed, so a kill
    in between leaves one folder too many, never one too few."""
    if gcfg.keep_params != "first_last":
        return
    kept = []
    for p in (run_dir / "params").glob("gen_*"):
        m = re.fullmatch(r"gen_(\d+)", p.name)
        if m:
            kept.append((int(m.group(1)), p))
    kept.sort()
    for g, p in kept[1:]:
        if g != newest:
            shutil.rmtree(p, ignore_errors=True)


def _data_arrays(data: Any) -> dict[str, np.ndarray]:
    leaves = jax.tree.leaves(data)
    if len(leaves) != 1:
        raise TypeError("non-jittable learners' data must be a single array")
    return {"data": np.asarray(leaves[0])}


def _load_data(path: pathlib.Path) -> np.ndarray:
    return records.load_npz(path)["data"]

"""The generational loop: mixing policies, chain independence, persistence and resume."""

import json
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_jax import loop
from collapse_jax.config import ExperimentConfig, GenerationConfig
from collapse_jax.loop.learner import AbstractLearner
from collapse_jax.rundir import fileio, reader
from tests.helpers import ToyConfig, ToyGaussianLearner, ToyNumpyLearner


def _cfg(**gen):
    g = GenerationConfig(**{"num_generations": 6, "samples_per_generation": 12, **gen})
    return ExperimentConfig(name="toy", seed=7, model=ToyConfig(), generation=g)


def _run(cfg, path, learner_cls=ToyGaussianLearner, **kw):
    return loop.run_generations(cfg, path, learner=learner_cls(cfg.model), **kw)


@pytest.mark.slow  # runs killed and resumed: the integration tier (CI's -m '')
def test_resume_after_kill_is_identical(tmp_path):
    cfg = _cfg(
        num_trials=40, chunk_size=16, block_size=2, policy="mix", alpha=0.6, beta=0.2, gamma=0.2
    )
    full = _run(cfg, tmp_path / "full")
    part = _run(cfg, tmp_path / "part", stop_after=3)  # killed after the block ending at gen 3
    assert len(part.rows) == 4
    resumed = _run(cfg, tmp_path / "part")
    assert (tmp_path / "full" / "metrics.json").read_bytes() == (
        tmp_path / "part" / "metrics.json"
    ).read_bytes()
    assert resumed.rows == full.rows
    for g in range(6):
        a, b = reader.Run(full.run_dir).arrays(g), reader.Run(resumed.run_dir).arrays(g)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_chains_do_not_depend_on_chunking_or_count(tmp_path):
    a = _run(_cfg(num_trials=30, chunk_size=7), tmp_path / "a")
    b = _run(_cfg(num_trials=50, chunk_size=50, block_size=3), tmp_path / "b")
    ra, rb = reader.Run(a.run_dir), reader.Run(b.run_dir)
    va, vb = ra.trial_series("var"), rb.trial_series("var")
    np.testing.assert_allclose(va, vb[:, :30], rtol=1e-6)


def test_vmapped_scan_equals_python_loop_over_chains(tmp_path):
    """The blocked, vmapped, scanned run equals the per-chain core called generation by
    generation (the same keys and the same policy)."""
    cfg = _cfg(num_trials=5, block_size=4, policy="mix", alpha=0.5, beta=0.25, gamma=0.25)
    learner = ToyGaussianLearner(cfg.model)
    res = loop.run_generations(cfg, tmp_path, learner=learner)
    got = reader.Run(res.run_dir).trial_series("var")  # [G, R]
    policy = loop.Policy.of(cfg.generation)
    counts = cfg.generation.shares(12)
    step = jax.jit(
        lambda ks, g, carry, cnt: loop.chain_generation(learner, policy, ks, g, carry, cnt)[1:],
        static_argnums=(3,),
    )
    for r in range(5):
        ks = loop.chain_keys(cfg.seed, r)
        carry = None
        for g in range(6):
            carry, m = step(ks, g, carry, 12 if g == 0 else counts)
            np.testing.assert_allclose(got[g, r], m["var"], rtol=1e-5)


@pytest.mark.slow  # whole runs: the integration tier (CI's -m '')
def test_accumulate_grows_the_training_set(tmp_path):
    res = _run(_cfg(num_trials=3, policy="accumulate", num_generations=4), tmp_path)
    assert [r["sample_size"] for r in res.rows] == [12, 24, 36, 48]


class TagLearner(AbstractLearner):
    """Data are 0 (real) and 1 (synthetic) tags; the 'model' is the fraction of 1s."""

    jittable = True

    def draw_real(self, key, num):
        return jnp.zeros((num,))

    def init(self, key):
        return jnp.zeros(())

    def fit(self, key, data, params, **kw):
        return data.mean()

    def evaluate(self, key, params, reference):
        return {"synthetic_fraction": params}

    def sample(self, key, params, num, **kw):
        return jnp.ones((num,))


@pytest.mark.slow  # whole runs: the integration tier (CI's -m '')
def test_mix_policy_shares(tmp_path):
    cfg = _cfg(
        num_trials=20,
        samples_per_generation=10,
        num_generations=4,
        policy="mix",
        alpha=0.5,
        beta=0.3,
        gamma=0.2,
    )
    res = _run(cfg, tmp_path, learner_cls=TagLearner)
    frac = reader.Run(res.run_dir).trial_series("synthetic_fraction")
    assert np.all(frac[0] == 0) and np.all(frac[1] == 0.5)
    # Later: 5 new synthetic + 3 of the previous set (which held 5 synthetic of 10) + 2 real.
    assert np.all((frac[2:] >= 0.5) & (frac[2:] <= 0.8))
    assert frac[2:].std() > 0  # the subset of previous data is random


@pytest.mark.slow  # runs killed and resumed: the integration tier (CI's -m '')
def test_python_learner_resume_and_workdirs(tmp_path):
    cfg = _cfg(policy="mix", alpha=0.5, beta=0.3, gamma=0.2)
    full = _run(cfg, tmp_path / "full", learner_cls=ToyNumpyLearner)
    ToyNumpyLearner.calls.clear()
    _run(cfg, tmp_path / "part", learner_cls=ToyNumpyLearner, stop_after=2)
    assert [c[0] for c in ToyNumpyLearner.calls] == ["fit", "sample"] * 2
    assert all(c[1] is not None and "work/gen_" in str(c[1]) for c in ToyNumpyLearner.calls)
    resumed = _run(cfg, tmp_path / "part", learner_cls=ToyNumpyLearner)
    assert resumed.rows == full.rows
    run = reader.Run(resumed.run_dir)
    assert len(run.finished_generations()) == 6
    assert fileio.load_npz(run.data_path(0))["data"].shape == (12,)


class FlakySampler(ToyNumpyLearner):
    fail: ClassVar[bool] = True

    def sample(self, key, params, num, *, workdir=None, **kw):
        if FlakySampler.fail:
            FlakySampler.fail = False
            raise RuntimeError("killed while sampling")
        return super().sample(key, params, num, workdir=workdir)


def test_finished_fit_is_not_redone_after_a_crash_in_sample(tmp_path):
    cfg = _cfg(num_generations=2)
    with pytest.raises(RuntimeError, match="killed while sampling"):
        _run(cfg, tmp_path, learner_cls=FlakySampler)
    ToyNumpyLearner.calls.clear()
    res = _run(cfg, tmp_path, learner_cls=FlakySampler)
    assert [c[0] for c in ToyNumpyLearner.calls] == ["sample", "fit", "sample"]
    ref = _run(cfg, tmp_path / "ref", learner_cls=ToyNumpyLearner)
    assert res.rows == ref.rows


@pytest.mark.slow  # runs and a resume: the integration tier (CI's -m '')
def test_resume_with_another_config_is_refused(tmp_path):
    _run(_cfg(num_trials=2), tmp_path)
    with pytest.raises(ValueError, match="different config"):
        _run(_cfg(num_trials=3), tmp_path)
    # Extending the number of generations is allowed and continues where it stopped.
    res = _run(_cfg(num_trials=2, num_generations=8), tmp_path)
    assert [r["generation"] for r in res.rows] == list(range(8))


def test_corrupt_state_gives_a_clear_error(tmp_path):
    cfg = _cfg(num_trials=2, num_generations=8, block_size=1)
    _run(cfg, tmp_path, stop_after=1)
    (tmp_path / "state" / "carry.npz").write_bytes(b"not a zip file")
    # The manifest catches it before anything is computed, and names the file.
    with pytest.raises(ValueError, match="damaged: state/carry.npz has changed"):
        _run(cfg, tmp_path)
    assert reader.Run(tmp_path).finished_generations() == [0]  # finished work is kept


def test_summarize_statistics():
    v = np.array([1.0, 2.0, 3.0, 4.0])
    row, means = loop.summarize({"m": v, "vec": np.eye(4)})
    assert row["m"] == 2.5 and row["m_se"] == pytest.approx(v.std(ddof=1) / 2)
    np.testing.assert_allclose(means["vec"], np.full(4, 0.25))


def test_keys_are_independent_of_everything_but_seed_chain_generation():
    _, _, kg = loop.chain_keys(1, 3)
    a = loop.generation_keys(kg, 5)
    b = loop.generation_keys(loop.chain_keys(1, 3)[2], 5)
    assert all(jnp.array_equal(jax.random.key_data(a[k]), jax.random.key_data(b[k])) for k in a)
    c = loop.generation_keys(loop.chain_keys(1, 4)[2], 5)
    assert not jnp.array_equal(jax.random.key_data(a["fit"]), jax.random.key_data(c["fit"]))
    assert json.dumps(sorted(a)) == json.dumps(
        ["eval", "fit", "init", "previous", "real", "sample"]
    )


class KilledOnce(ToyNumpyLearner):
    """Dies in the fit of chain 1's generation 1 the first time (a killed process)."""

    armed: ClassVar[bool] = True

    def fit(self, key, data, params, *, workdir=None, **kw):
        if KilledOnce.armed and "gen_00001/chain_00001" in str(workdir):
            KilledOnce.armed = False
            raise KeyboardInterrupt("killed")
        return super().fit(key, data, params, workdir=workdir)


@pytest.mark.slow  # runs killed and resumed: the integration tier (CI's -m '')
def test_python_learner_runs_several_chains_and_resumes_mid_generation(tmp_path):
    """num_trials = 2 with a non-jittable learner: two independent chains (their own keys),
    resumable per chain and generation; a kill inside chain 1 of generation 1 resumes to the
    same metrics, and chain 0's finished work of that generation is not redone."""
    cfg = _cfg(num_trials=2, num_generations=2, policy="mix", alpha=0.5, beta=0.25, gamma=0.25)
    full = _run(cfg, tmp_path / "full", learner_cls=ToyNumpyLearner)
    assert len(full.rows) == 2 and "var_se" in full.rows[0]
    ToyNumpyLearner.calls.clear()
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, tmp_path / "part", learner_cls=KilledOnce)
    assert reader.Run(tmp_path / "part").finished_generations() == [0]
    ToyNumpyLearner.calls.clear()
    resumed = _run(cfg, tmp_path / "part", learner_cls=KilledOnce)
    # Only chain 1's generation 1 is left: its fit and sample.
    assert [c[0] for c in ToyNumpyLearner.calls] == ["fit", "sample"]
    assert resumed.rows == full.rows
    a, b = reader.Run(full.run_dir), reader.Run(resumed.run_dir)
    for g in range(2):
        assert a.arrays(g)["trials/var"].shape == (2,)
        np.testing.assert_array_equal(a.arrays(g)["trials/var"], b.arrays(g)["trials/var"])
    # Each chain keeps its own data; the chains differ (their own keys).
    d0 = fileio.load_npz(tmp_path / "full" / "data" / "gen_00001.npz")["data"]
    d1 = fileio.load_npz(tmp_path / "full" / "data" / "chain_00001" / "gen_00001.npz")["data"]
    assert d0.shape == d1.shape == (12,) and not np.array_equal(d0, d1)
    # Chain r of the Python path draws its real data with chain r's key, as the vmapped path.
    k_real = loop.chain_keys(cfg.seed, 1)[0]
    d = fileio.load_npz(tmp_path / "full" / "data" / "chain_00001" / "gen_00000.npz")["data"]
    np.testing.assert_array_equal(d, ToyNumpyLearner(cfg.model).real_data(k_real, 12))


@pytest.mark.slow  # whole runs: the integration tier (CI's -m '')
@pytest.mark.parametrize("real_data", ["fixed", "fresh"])
def test_real_share_fixed_or_fresh(tmp_path, real_data):
    """generation.real_data: "fixed" takes the gamma share from the chain's generation-0 real
    set (Alemohammad et al.'s fixed real set), "fresh" draws new real points. Checked on the
    data themselves (continuous values: fresh draws never coincide with old ones), through the
    loop core's replay (jittable path) and the stored data (Python path)."""
    cfg = _cfg(policy="mix", alpha=0.5, gamma=0.5, real_data=real_data, num_generations=3)
    want = 6 if real_data == "fixed" else 0  # of the 12 points of generation 2
    learner = ToyGaussianLearner(cfg.model)
    data = loop.replay_data(learner, cfg.generation, cfg.seed, [0, 2])
    assert np.isin(data[2], data[0]).sum() == want
    _run(cfg, tmp_path, learner_cls=ToyNumpyLearner)
    d0 = fileio.load_npz(tmp_path / "data" / "gen_00000.npz")["data"]
    d2 = fileio.load_npz(tmp_path / "data" / "gen_00002.npz")["data"]
    assert np.isin(d2, d0).sum() == want

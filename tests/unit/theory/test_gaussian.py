"""Recursive Gaussian fitting: closed-form moments (Supplementary Sec. 3.2) and exact == sample.

Moment checks use |estimate - expected| < Z * SE with Z = 4.5 (false-failure probability
6.8e-6 per check, two-sided, normal approximation; about 1e-4 for the file). Distribution
checks use two-sample KS tests rejecting at p < 1e-4. Keys are fixed: runs are deterministic.
"""

import jax
import numpy as np
import pytest
import scipy.stats

from collapse_jax import config as config_lib
from collapse_jax import loop, plots
from collapse_jax.config import ConfigError
from collapse_jax.rundir import reader
from collapse_jax.theory import analytic, gaussian
from collapse_jax.theory import figures as theory_figures

Z = 4.5
P_MIN = 1e-4
R = 20000  # chains
G = 10  # generations
M = 10  # sample size (k = M - 1 = 9)


def _check_mean(x: np.ndarray, expected: float, what: str) -> None:
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert abs(x.mean() - expected) < Z * se, (
        f"{what}: {x.mean():.5g} vs {expected:.5g} (se {se:.2g})"
    )


def _check_var(x: np.ndarray, expected: float, what: str) -> None:
    """Sample variance against `expected`; SE from the fourth central moment."""
    xc = x - x.mean()
    s2 = np.mean(xc**2)
    se = np.sqrt(max(np.mean(xc**4) - s2**2, 0.0) / x.size)
    assert abs(s2 - expected) < Z * se, f"{what}: {s2:.5g} vs {expected:.5g} (se {se:.2g})"


def _ks(a: np.ndarray, b: np.ndarray, what: str) -> None:
    p = scipy.stats.ks_2samp(a, b).pvalue
    assert p > P_MIN, f"{what}: KS p-value {p:.2g}"


@pytest.fixture(scope="module")
def runs_1d():
    key = jax.random.key(1)
    return {
        m: gaussian.simulate(key, chains=R, generations=G, sample_size=M, method=m)
        for m in ("exact", "sample")
    }


@pytest.mark.parametrize("method", ["exact", "sample"])
def test_unbiased_1d_moments(runs_1d, method):
    """E[s_n^2] = s_0^2; E/Var[log s_n^2] via digamma/trigamma; Var[mu_n] = n s_0^2 / M."""
    r = runs_1d[method]
    assert r.mean.shape == (G + 1, R, 1) and r.cov.shape == (G + 1, R, 1, 1)
    np.testing.assert_array_equal(r.mean[0], 0.0)
    np.testing.assert_array_equal(r.cov[0], 1.0)
    k = M - 1
    for n in (1, 4, G):
        var = r.cov[n, :, 0, 0].astype(np.float64)
        mu = r.mean[n, :, 0].astype(np.float64)
        _check_mean(var, 1.0, f"E[var_{n}]")
        e_log = n * (analytic.digamma(k / 2) + np.log(2 / k))
        _check_mean(np.log(var), float(e_log), f"E[log var_{n}]")
        _check_var(np.log(var), float(n * analytic.trigamma(k / 2)), f"Var[log var_{n}]")
        _check_var(mu, n / M, f"Var[mu_{n}]")
        _check_mean(mu, 0.0, f"E[mu_{n}]")


def test_exact_and_sample_agree_1d(runs_1d):
    a, b = runs_1d["exact"], runs_1d["sample"]
    for n in (1, G):
        _ks(np.log(a.cov[n, :, 0, 0]), np.log(b.cov[n, :, 0, 0]), f"log var_{n}")
        _ks(a.mean[n, :, 0], b.mean[n, :, 0], f"mu_{n}")


@pytest.mark.slow  # a large Monte Carlo run: in CI's full run (-m ''), not the fast tier
@pytest.mark.parametrize("method", ["exact", "sample"])
def test_mle_1d_and_growing_schedule(method):
    """MLE: E[s_n^2] = prod_i (M_i - 1) / M_i, for a constant M and for a growing schedule."""
    key = jax.random.key(2)
    sched = [4, 5, 7, 9, 12, 16, 21, 28, 37, 49]
    for sizes in ([M] * G, sched):
        r = gaussian.simulate(
            key,
            chains=R,
            generations=G,
            sample_size=sizes,
            method=method,
            estimator="mle",
            mean=1.5,
            cov=2.0,
        )
        np.testing.assert_array_equal(r.sample_sizes, sizes)
        shrink = np.cumprod((np.array(sizes) - 1.0) / np.array(sizes))
        for n in (1, 5, G):
            _check_mean(r.cov[n, :, 0, 0].astype(np.float64), 2.0 * shrink[n - 1], f"E[var_{n}]")
            _check_mean(r.mean[n, :, 0].astype(np.float64), 1.5, f"E[mu_{n}]")
        if method == "sample":
            break  # each distinct size compiles a new sample shape: one schedule is enough


COV2 = [[1.0, 0.6], [0.6, 2.0]]


@pytest.fixture(scope="module")
def runs_2d():
    key = jax.random.key(3)
    return {
        m: gaussian.simulate(
            key, chains=10000, generations=5, sample_size=8, mean=[0.0, 1.0], cov=COV2, method=m
        )
        for m in ("exact", "sample")
    }


@pytest.mark.slow  # a large Monte Carlo run: in CI's full run (-m ''), not the fast tier
@pytest.mark.parametrize("method", ["exact", "sample"])
def test_2d_moments(runs_2d, method):
    """E[Sigma_n] = Sigma_0 (unbiased) and E[log det Sigma_n] in closed form (d = 2)."""
    r = runs_2d[method]
    assert r.mean.shape == (6, 10000, 2) and r.cov.shape == (6, 10000, 2, 2)
    cov0 = np.array(COV2)
    e_logdet, _ = analytic.gaussian_log_cov_moments([8] * 5, 2)
    for n in (1, 5):
        c = r.cov[n].astype(np.float64)
        for i, j in ((0, 0), (0, 1), (1, 1)):
            _check_mean(c[:, i, j], cov0[i, j], f"E[Sigma_{n}[{i},{j}]]")
        want = np.linalg.slogdet(cov0)[1] + e_logdet[n - 1]
        _check_mean(np.linalg.slogdet(c)[1], want, f"E[logdet_{n}]")


@pytest.mark.slow  # a large Monte Carlo run: in CI's full run (-m ''), not the fast tier
def test_exact_and_sample_agree_2d(runs_2d):
    a, b = runs_2d["exact"], runs_2d["sample"]
    n = 5
    _ks(np.linalg.slogdet(a.cov[n])[1], np.linalg.slogdet(b.cov[n])[1], "logdet")
    _ks(a.cov[n, :, 0, 1], b.cov[n, :, 0, 1], "cov[0, 1]")
    _ks(a.mean[n, :, 1], b.mean[n, :, 1], "mean[1]")


@pytest.mark.slow  # a large Monte Carlo run: in CI's full run (-m ''), not the fast tier
@pytest.mark.parametrize(
    "dim,policy",
    [
        (1, dict(policy="mix", alpha=0.7, gamma=0.3)),
        (2, dict(policy="accumulate")),
        (2, dict(policy="mix", alpha=0.5, beta=0.3, gamma=0.2)),
        (1, dict(policy="accumulate_subsample")),
    ],
    ids=["1d-mix", "2d-accumulate", "2d-mix-previous", "1d-accumulate-subsample"],
)
def test_exact_and_sample_agree_with_mixing(dim, policy):
    """The exact method (sufficient statistics; subsets of previous data drawn exactly from
    their conditional law, `gaussian.subset_stats`) agrees in distribution with drawing the
    points: two-sample KS tests at p > 1e-4 on 10^4 chains."""
    kw = dict(chains=10000, generations=4, sample_size=10, cov=1.0 if dim == 1 else COV2, **policy)
    if dim == 2:
        kw["mean"] = [0.0, 0.0]
    a = gaussian.simulate(jax.random.key(4), method="exact", **kw)
    b = gaussian.simulate(jax.random.key(5), method="sample", **kw)
    for n in (2, 4):
        _ks(np.linalg.slogdet(a.cov[n])[1], np.linalg.slogdet(b.cov[n])[1], f"logdet_{n}")
        _ks(a.mean[n, :, 0], b.mean[n, :, 0], f"mean_{n}")


def test_chunking_does_not_change_results():
    kw = dict(chains=48, generations=3, sample_size=6, method="exact")
    full = gaussian.simulate(jax.random.key(9), **kw)
    chunked = gaussian.simulate(jax.random.key(9), chunk_size=20, **kw)
    np.testing.assert_array_equal(full.cov, chunked.cov)
    np.testing.assert_array_equal(full.mean, chunked.mean)


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        gaussian.simulate(
            jax.random.key(0),
            chains=4,
            generations=2,
            sample_size=5,
            mean=[0.0, 0.0, 0.0],
            cov=COV2,
        )
    with pytest.raises(ValueError, match="entries"):
        gaussian.simulate(jax.random.key(0), chains=4, generations=3, sample_size=[5, 6])
    with pytest.raises(ValueError, match=">= 2"):
        gaussian.simulate(jax.random.key(0), chains=4, generations=2, sample_size=1)
    with pytest.raises(ValueError, match="positive definite"):
        gaussian.simulate(
            jax.random.key(0), chains=4, generations=2, sample_size=5, cov=[[1.0, 2.0], [2.0, 1.0]]
        )


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(dim=0), "model.dim"),
        (dict(dim=2, mean=(0.0,)), "model.mean"),
        (dict(dim=2, cov=((1.0, 0.5), (0.4, 1.0))), "symmetric"),
        (dict(dim=2, cov=((1.0,), (0.0,))), "model.cov"),
        (dict(cov=-1.0), "model.cov"),
        (dict(estimator="median"), "model.estimator"),
        (dict(method="fast"), "model.method"),
    ],
)
def test_config_validation(fields, match):
    with pytest.raises(ConfigError, match=match):
        gaussian.GaussianConfig(**fields)


def test_learner_in_generational_loop(tmp_path):
    """The learner under the model-agnostic loop: metrics, closed-form curves, W2 consistency."""
    raw = {
        "name": "g2",
        "seed": 0,
        "model": {"kind": "gaussian", "dim": 2, "cov": [[1.0, 0.6], [0.6, 2.0]], "method": "exact"},
        "generation": {
            "num_generations": 4,
            "samples_per_generation": 10,
            "num_trials": 4096,
            "block_size": 2,
        },
    }
    cfg = config_lib.from_dict(raw)
    res = loop.run_generations(cfg, tmp_path / "run")
    rows = res.rows
    assert [r["generation"] for r in rows] == [0, 1, 2, 3]
    learner = loop.make_learner(cfg)
    curves = plots.expected_curves(cfg, np.array([r["sample_size"] for r in rows]))
    for name in ("trace_cov", "logdet_cov", "mean_dist2"):
        for r, want in zip(rows, curves[name]):
            assert abs(r[name] - want) < Z * r[f"{name}_se"], (name, r["generation"])
    assert all(0 <= r["w2"] ** 2 <= r["w2_squared"] + 1e-6 for r in rows)  # Jensen
    files = plots.make_figures(reader.Run(res.run_dir), learner)
    names = {f.name for f in files}
    assert {"gaussian_drift.png", "gaussian_trajectories.png", "trace_cov.png"} <= names
    assert all(f.stat().st_size > 1000 for f in files)


def test_yaml_configs_build_learners():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[3] / "collapse_jax" / "configs"
    paths = [root / "theory_gaussian.yaml", *sorted((root / "theory").glob("gaussian*.yaml"))]
    assert len(paths) >= 2
    for p in paths:
        cfg = config_lib.load_config(p)
        learner = loop.make_learner(cfg)
        assert isinstance(learner, gaussian.GaussianLearner)


def test_sampling_bias_scales_the_variance_geometrically():
    """Synthetic data from N(mu, lambda Sigma), unbiased refits, replace: E[sigma_n^2] =
    lambda^n sigma_0^2 (generation 0 fits real data). 10^4 chains; each of the 6 generations
    within Z = 4.5 SE (false-failure probability < 6 * 7e-6), and the analytic curve the
    learner overlays on its plots agrees."""
    lam, G = 0.8, 6
    r = gaussian.simulate(
        jax.random.key(21),
        chains=10000,
        generations=G,
        sample_size=10,
        cov=2.0,
        method="sample",
        sampling_bias=lam,
    )
    var = r.cov[1:, :, 0, 0]  # [G, R]: generation g's fit
    for g in range(G):
        _check_mean(var[g], 2.0 * lam**g, f"E sigma^2 at generation {g}")
    model = gaussian.GaussianConfig(cov=2.0, sampling_bias=lam)
    np.testing.assert_allclose(
        theory_figures.expected_curves(model, "replace", np.full(G, 10))["trace_cov"],
        2.0 * lam ** np.arange(G),
    )
    with pytest.raises(ValueError, match="sampling_bias"):
        gaussian.GaussianConfig(sampling_bias=0.0)


def test_accumulate_subsample_lies_between_replace_and_accumulate():
    """Drift of the fitted mean, E|mu_n - mu_0|^2: replace adds sigma^2 / M every generation
    (n sigma^2 / M), accumulate adds sigma^2 / (all data so far), and fitting a random subset of
    M points of all data so far (accumulate_subsample) lies strictly between. 10^4 chains, 5
    generations of M = 10; each gap above 4.5 SE of the difference (false-failure probability
    < 1e-5)."""
    kw = dict(chains=10000, generations=5, sample_size=10, method="sample")
    drift = {}
    for policy in ("replace", "accumulate_subsample", "accumulate"):
        r = gaussian.simulate(jax.random.key(31), policy=policy, **kw)
        drift[policy] = r.mean[-1, :, 0] ** 2
    np.testing.assert_allclose(drift["replace"].mean(), 0.5, rtol=0.05)  # 5 sigma^2 / M
    for hi, lo in (("replace", "accumulate_subsample"), ("accumulate_subsample", "accumulate")):
        diff = drift[hi] - drift[lo]
        assert diff.mean() > 4.5 * diff.std(ddof=1) / np.sqrt(diff.size), (hi, lo)

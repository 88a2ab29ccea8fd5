"""Recursive discrete re-estimation (Wright-Fisher): martingale, absorption, exact == sample.

Mean checks use |estimate - expected| < Z * SE with Z = 4.5 (false-failure probability 6.8e-6
per check; about 3e-4 for the file). Distribution checks (chi-square homogeneity of the count
distributions of the two methods) reject at p < 1e-4. Keys are fixed: runs are deterministic.
"""

import jax
import numpy as np
import pytest
import scipy.stats

from collapse_jax import config as config_lib
from collapse_jax import loop, plots
from collapse_jax.config import ConfigError
from collapse_jax.rundir import reader
from collapse_jax.theory import analytic, discrete

Z = 4.5
P_MIN = 1e-4
P0 = np.array([0.45, 0.25, 0.15, 0.0, 0.1, 0.04, 0.01])
R = 20000
G = 12
M = 16


def _check_mean(x: np.ndarray, expected: float, what: str) -> None:
    se = x.std(ddof=1) / np.sqrt(x.size)
    se = max(se, 1.0 / x.size)  # a constant sample has se 0: allow one chain of slack
    assert abs(x.mean() - expected) < Z * se, (
        f"{what}: {x.mean():.5g} vs {expected:.5g} (se {se:.2g})"
    )


def _same_distribution(a: np.ndarray, b: np.ndarray, what: str) -> None:
    """Chi-square homogeneity test of two samples of small non-negative integers."""
    top = int(max(a.max(), b.max())) + 1
    table = np.stack([np.bincount(a, minlength=top), np.bincount(b, minlength=top)])
    table = table[:, table.sum(0) > 0]
    # pool sparse columns so expected counts are >= 5
    cols, acc = [], np.zeros(2)
    for c in table.T:
        acc = acc + c
        if acc.min() >= 5:
            cols.append(acc)
            acc = np.zeros(2)
    if cols and acc.sum() > 0:
        cols[-1] = cols[-1] + acc
    if len(cols) < 2:
        return  # a degenerate (constant) statistic: nothing to compare
    p = scipy.stats.chi2_contingency(np.stack(cols, axis=1)).pvalue
    assert p > P_MIN, f"{what}: chi-square p-value {p:.2g}"


@pytest.fixture(scope="module")
def runs():
    key = jax.random.key(21)
    return {
        m: discrete.simulate(key, probs=P0, chains=R, generations=G, sample_size=M, method=m)
        for m in ("exact", "sample")
    }


@pytest.mark.parametrize("method", ["exact", "sample"])
def test_martingale_and_wright_fisher_laws(runs, method):
    """E[p_n] = p_0 per state; support size, lost tail mass, absorption and Gini-Simpson
    diversity against the exactly propagated Wright-Fisher laws."""
    r = runs[method]
    assert r.probs.shape == (G + 1, R, P0.size)
    np.testing.assert_allclose(r.probs[0], np.broadcast_to(P0, (R, P0.size)).astype(np.float32))
    np.testing.assert_allclose(r.probs.sum(-1), 1.0, rtol=1e-5)
    assert np.all(r.probs[:, :, 3] == 0)  # a zero-probability state never appears
    want = analytic.discrete_expectations(P0, [M] * G)
    for n in (1, 5, G):
        p = r.probs[n].astype(np.float64)
        for i in range(P0.size):
            _check_mean(p[:, i], P0[i], f"E[p_{n}({i})]")
        _check_mean((p > 0).sum(1).astype(float), want["support_size"][n - 1], f"support_{n}")
        lost = np.where(p > 0, 0.0, P0).sum(1)
        _check_mean(lost, want["lost_tail_mass"][n - 1], f"lost mass_{n}")
        absorbed = ((p > 0).sum(1) == 1).astype(float)
        _check_mean(absorbed, want["absorbed"][n - 1], f"absorbed_{n}")
        _check_mean(1 - (p**2).sum(1), want["gini_simpson"][n - 1], f"gini-simpson_{n}")


def test_exact_and_sample_agree(runs):
    a, b = runs["exact"], runs["sample"]
    for n in (3, G):
        for i in (0, 4, 6):
            ca = np.rint(a.probs[n, :, i] * M).astype(int)
            cb = np.rint(b.probs[n, :, i] * M).astype(int)
            _same_distribution(ca, cb, f"count_{n}({i})")
        _same_distribution((a.probs[n] > 0).sum(1), (b.probs[n] > 0).sum(1), f"support_{n}")


@pytest.mark.slow  # a large Monte Carlo run: in CI's full run (-m ''), not the fast tier
def test_long_run_absorption_at_p0():
    """Every chain is eventually absorbed in a delta, at state i with probability p_0(i)."""
    p0 = P0  # same model, chains and M as the `runs` fixture: shares its compiled scans
    r = discrete.simulate(
        jax.random.key(22), probs=p0, chains=R, generations=300, sample_size=M, method="sample"
    )
    last = r.probs[-1]
    absorbed = (last > 0).sum(1) == 1
    fixed = analytic.state_count_laws(p0, [M] * 300)[1][-1]
    assert absorbed.mean() > 0.999 and fixed.sum() > 0.999
    for i in range(p0.size):
        at_i = (absorbed & (last[:, i] == 1)).astype(float)
        _check_mean(at_i, p0[i], f"absorbed at {i}")
        assert abs(fixed[i] - p0[i]) < 1e-3


@pytest.mark.slow  # a large Monte Carlo run: in CI's full run (-m ''), not the fast tier
@pytest.mark.parametrize(
    "policy",
    [dict(policy="mix", alpha=0.75, gamma=0.25)],
    ids=["mix"],  # (accumulate uses the same data algebra; tested for the Gaussian)
)
def test_exact_and_sample_agree_with_mixing(policy):
    kw = dict(probs=P0, chains=10000, generations=5, sample_size=12, **policy)
    a = discrete.simulate(jax.random.key(23), method="exact", **kw)
    b = discrete.simulate(jax.random.key(24), method="sample", **kw)
    sizes = np.cumsum([12] * 5) if policy["policy"] == "accumulate" else np.full(5, 12)
    for n in (2, 5):
        for i in (0, 5):
            ca = np.rint(a.probs[n, :, i] * sizes[n - 1]).astype(int)
            cb = np.rint(b.probs[n, :, i] * sizes[n - 1]).astype(int)
            _same_distribution(ca, cb, f"count_{n}({i})")
        for i in range(P0.size):  # the martingale survives mixing with real data
            _check_mean(a.probs[n, :, i].astype(np.float64), P0[i], f"E[p_{n}({i})]")


@pytest.mark.slow  # a large Monte Carlo run: in CI's full run (-m ''), not the fast tier
def test_mix_with_previous_data_matches_derivation():
    """mix with beta > 0 (a subset of the previous training set: exact hypergeometric counts for
    method "exact", a subset of the points for "sample"). With counts (S, B, Q) of M and
    H0 = 1 - sum p0^2, D_n = E||p_n - p_0||^2 follows (the martingale keeps E p_n = p_0, so
    E[1 - sum p_{n-1}^2] = H0 - D_{n-1}):
      D_n = ((S + B) / M)^2 D_{n-1} + (S / M^2 + B (M - B) / (M^2 (M - 1))) (H0 - D_{n-1})
            + Q H0 / M^2,   D_0 = H0 / M.
    Both methods, 10^4 chains, 4.5 SE per check (false-failure probability < 1e-4 in all)."""
    m, gens = 10, 4
    kw = dict(probs=P0, chains=10000, generations=gens, sample_size=m, policy="mix")
    kw.update(alpha=0.5, beta=0.3, gamma=0.2)
    n_s, n_b, n_q = config_lib.split_shares(m, "mix", (0.5, 0.3, 0.2))
    h0 = 1.0 - (P0**2).sum()
    want = [h0 / m]
    for _ in range(1, gens):
        d = want[-1]
        noise = n_s / m**2 + n_b * (m - n_b) / (m**2 * (m - 1))
        want.append(((n_s + n_b) / m) ** 2 * d + noise * (h0 - d) + n_q * h0 / m**2)
    for method, seed in (("exact", 0), ("sample", 1)):
        r = discrete.simulate(jax.random.key(seed), method=method, **kw)
        assert r.probs.shape == (gens + 1, 10000, P0.size)
        np.testing.assert_allclose(r.probs.sum(-1), 1.0, rtol=1e-5)
        drift = ((r.probs[1:].astype(np.float64) - P0) ** 2).sum(-1)
        for n in range(gens):
            _check_mean(drift[n], want[n], f"{method}: E||p_{n} - p_0||^2")
        for i in (0, 5):
            _check_mean(r.probs[-1, :, i].astype(np.float64), P0[i], f"{method}: E[p({i})]")


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(family="explicit"), "model.probs"),
        (dict(family="explicit", probs=(0.5, 0.6)), "sum to 1"),
        (dict(family="explicit", probs=(1.2, -0.2)), ">= 0"),
        (dict(family="zipf", probs=(0.5, 0.5)), "model.probs"),
        (dict(num_states=1), "model.num_states"),
        (dict(exponent=0.0), "model.exponent"),
        (dict(method="fast"), "model.method"),
    ],
)
def test_config_validation(fields, match):
    with pytest.raises(ConfigError, match=match):
        discrete.DiscreteConfig(**fields)


def test_named_families():
    z = discrete.DiscreteConfig(family="zipf", num_states=4, exponent=1.0).probs_array()
    np.testing.assert_allclose(z, np.array([1, 1 / 2, 1 / 3, 1 / 4]) / (25 / 12))
    u = discrete.DiscreteConfig(family="uniform", num_states=5).probs_array()
    np.testing.assert_allclose(u, 0.2)


def test_learner_in_generational_loop(tmp_path):
    """The learner under the model-agnostic loop: metrics and the exact Wright-Fisher curves."""
    raw = {
        "name": "d",
        "seed": 0,
        "model": {"kind": "discrete", "family": "explicit", "probs": P0.tolist()},
        "generation": {
            "num_generations": 4,
            "samples_per_generation": M,
            "num_trials": 4096,
            "block_size": 2,
        },
    }
    cfg = config_lib.from_dict(raw)
    res = loop.run_generations(cfg, tmp_path / "run")
    rows = res.rows
    learner = loop.make_learner(cfg)
    curves = plots.expected_curves(cfg, np.array([r["sample_size"] for r in rows]))
    for name in ("support_size", "lost_tail_mass", "gini_simpson", "absorbed"):
        for r, want in zip(rows, curves[name]):
            se = max(r[f"{name}_se"], 1 / 4096)
            assert abs(r[name] - want) < Z * se, (name, r["generation"], r[name], want)
    run = res.run_dir
    from collapse_jax.rundir import reader

    means = reader.Run(run).mean_series("probs")
    assert means.shape == (4, P0.size)
    assert np.all(np.abs(means - P0) < 0.05)
    files = plots.make_figures(reader.Run(res.run_dir), learner)
    names = {f.name for f in files}
    assert {
        "support_size.png",
        "discrete_drift.png",
        "discrete_support.png",
        "discrete_absorbed_at.png",
    } <= names
    assert all(f.stat().st_size > 1000 for f in files)


def test_yaml_configs_build_learners():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[3] / "collapse_jax" / "configs"
    paths = [root / "theory_discrete.yaml", *sorted((root / "theory").glob("discrete*.yaml"))]
    for p in paths:
        cfg = config_lib.load_config(p)
        assert isinstance(loop.make_learner(cfg), discrete.DiscreteLearner)


def test_truncation_loses_exactly_the_truncated_states_mass(tmp_path):
    """Top-k truncation of the sampler: with M large enough that every kept state is drawn
    (P(some kept state missing) < 1e-30 here), generation 1 has lost exactly the original mass
    of the states outside generation 0's top k (`truncated_mass`), chain by chain; and no
    truncated state ever comes back."""
    cfg = config_lib.from_dict(
        {
            "name": "trunc",
            "seed": 5,
            "model": {"kind": "discrete", "family": "zipf", "num_states": 10, "truncation": 5},
            "generation": {"num_generations": 3, "samples_per_generation": 4000, "num_trials": 64},
        }
    )
    run = reader.Run(loop.run_generations(cfg, tmp_path).run_dir)
    lost, cut = run.trial_series("lost_tail_mass"), run.trial_series("truncated_mass")
    probs = run.trial_series("probs")  # [G, R, K]
    assert np.all(lost[0] == 0) and np.all(cut[0] > 0)
    np.testing.assert_allclose(lost[1], cut[0], rtol=1e-6)
    assert np.all((probs[1:] > 0).sum(axis=-1) <= 5)
    assert np.all(lost[2] >= lost[1] - 1e-7)
    with pytest.raises(ConfigError, match="truncation"):
        discrete.DiscreteConfig(num_states=4, truncation=5)


def test_timing_the_kernel_and_the_copy_apart_changes_no_number():
    kw = dict(probs=[0.5, 0.3, 0.2], chains=40, generations=3, sample_size=20, chunk_size=16)
    plain = discrete.simulate(jax.random.key(7), **kw)
    timings: dict[str, float] = {}
    timed = discrete.simulate(jax.random.key(7), timings=timings, **kw)
    np.testing.assert_array_equal(timed.probs, plain.probs)
    assert set(timings) == {"kernel_s", "copy_s"} and min(timings.values()) > 0

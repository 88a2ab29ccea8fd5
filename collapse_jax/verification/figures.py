"""Reporting of verification runs (`kind: verification`): the closed-form chain means of
`label_error`, `kept_fraction` and (d = 1, `labeller: noisy`) `test_error` overlaid on the
generic figures, and the phase diagram over the verifier's accuracies (`phase_figure`:
`python -m collapse_jax.verification.figures OUT.png`)."""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.verification.learner import (
    VerificationConfig,
    VerificationLearner,
    expected_error_noisy,
    keep_probability,
    selected_error,
)


def expected_curves(
    config: VerificationConfig,
    mode: str,
    sample_sizes: np.ndarray,
    *,
    filtered: bool = False,
    generation: Any = None,
) -> dict[str, np.ndarray]:
    """Closed-form chain means under `replace` with `labeller: noisy` (every generation after
    the first labels fresh inputs, independently of the previous fit): `label_error` p' (times
    the probability that anything is kept), `kept_fraction` P_K, and for d = 1 `test_error`
    (`learner.expected_error_noisy`). Generation 0 fits real labels (p' = 0, all kept).

    Args:
      config: the run's model config; mode: its policy; sample_sizes: [G] candidate counts.
      filtered: whether the run also filters by likelihood (then no curve is known).
      generation: the run's `generation:` block (unused here).
    """
    c = config
    if mode != "replace" or filtered or c.labeller != "noisy":
        return {}
    sizes = np.asarray(sample_sizes, np.int64)
    p_sel = selected_error(c.flip, c.q_correct, c.q_wrong)
    p_keep = keep_probability(c.flip, c.q_correct, c.q_wrong)
    label = np.array([0.0] + [p_sel * (1 - (1 - p_keep) ** m) for m in sizes[1:]])
    kept = np.array([1.0] + [p_keep] * (len(sizes) - 1))
    out = {"label_error": label, "kept_fraction": kept}
    if c.dim == 1:
        first = expected_error_noisy(int(sizes[0]), c.separation, 0.0, 1.0)
        later = [expected_error_noisy(int(m), c.separation, p_sel, p_keep) for m in sizes[1:]]
        out["test_error"] = np.array([first, *later])
    return out


def figures(learner: Any, run: Any, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """None beyond the generic per-metric figures (which carry the closed forms)."""
    return []


def one_generation_errors(
    key: jax.Array, configs: Sequence[VerificationConfig], num: int, chains: int
) -> np.ndarray:
    """[len(configs), chains] test errors of one fit on `num` verified synthetic candidates
    (`labeller: noisy`; the configs differ only in the knobs flip, q_correct, q_wrong), chains
    and settings vmapped in one compiled program."""
    learner = VerificationLearner(configs[0]).canonical()
    knobs = {
        name: jnp.asarray([VerificationLearner(c).knobs()[name] for c in configs], jnp.float32)
        for name in learner.knob_fields
    }

    def chain(k, kn):
        bound = learner.bind(kn)
        params = bound.init(k)
        fitted = bound.fit(k, bound.sample(k, params, num), params)
        return bound.evaluate(k, fitted, None)["test_error"]

    keys = jax.random.split(key, (len(configs), chains))
    run = jax.jit(jax.vmap(jax.vmap(chain, in_axes=(0, None)), in_axes=(0, 0)))
    return np.asarray(run(keys, knobs))


def phase_figure(
    path: pathlib.Path,
    *,
    separation: float = 1.0,
    flip: float = 0.6,
    sizes: Sequence[int] = (20, 200, 2000),
    grid: int = 11,
    chains: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Feng et al.'s phase transition, d = 1, `labeller: noisy`, one generation.

    Left: test error against the selected label error p' for `sizes` candidates (verifier
    q_wrong swept at q_correct = 1, and q_correct swept at q_wrong = 0, with the generator's
    flip rate `flip`): Monte Carlo means +- 2 s.e. over `chains` vmapped chains, the closed form
    as lines. Right: the mean test error over a grid of (q_correct, q_wrong) at the largest size,
    with the boundary p' = 1/2, i.e. q_correct = p (1 - q_wrong) / (1 - p).
    Returns the numbers drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = jax.random.key(seed)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
    qs = np.linspace(0.0, 1.0, grid)
    # Settings along p': q_wrong from 0 to 0.95 at q_correct = 1 (p' falls below 1/2), and
    # q_correct from 1 down at q_wrong = 0 (p' rises).
    line = [VerificationConfig(separation=separation, flip=flip, q_correct=1.0, q_wrong=q)
            for q in np.linspace(0.0, 0.95, grid)]  # fmt: skip
    line += [VerificationConfig(separation=separation, flip=flip, q_correct=q, q_wrong=0.0)
             for q in np.linspace(1.0, 0.1, grid)[1:]]  # fmt: skip
    p_line = np.array([selected_error(c.flip, c.q_correct, c.q_wrong) for c in line])
    order = np.argsort(p_line)
    numbers: dict[str, Any] = {"p_selected": p_line[order].tolist()}
    for j, num in enumerate(sizes):
        errs = one_generation_errors(jax.random.fold_in(key, j), line, num, chains)
        mean, se = errs.mean(1), errs.std(1, ddof=1) / np.sqrt(chains)
        exact = np.array(
            [
                expected_error_noisy(
                    num, separation, selected_error(c.flip, c.q_correct, c.q_wrong),
                    keep_probability(c.flip, c.q_correct, c.q_wrong),
                )
                for c in line
            ]
        )  # fmt: skip
        (h,) = ax.plot(p_line[order], exact[order], "-", lw=1.2, label=f"closed form, {num} cand.")
        ax.errorbar(
            p_line[order], mean[order], 2 * se[order], fmt="o", ms=3, color=h.get_color(),
            label=f"Monte Carlo, {num} cand. (+-2 s.e.)",
        )  # fmt: skip
        numbers[f"mc_mean_{num}"] = mean[order].tolist()
        numbers[f"closed_{num}"] = exact[order].tolist()
    from scipy import stats

    ax.axvline(0.5, color="k", ls=":", lw=1)
    ax.axhline(stats.norm.cdf(-separation), color="grey", ls="--", lw=0.8)
    ax.text(0.01, stats.norm.cdf(-separation) + 0.01, "Bayes error", color="grey", fontsize=8)
    ax.set_xlabel("selected label error p' (wrong labels among the points the verifier keeps)")
    ax.set_ylabel("test error of the retrained classifier (chain mean)")
    ax.set_title(f"Test error after one generation on verified labels\n(generator flip rate p = "
                 f"{flip}, |mu| = {separation}, d = 1, {chains} chains per point)",
                 fontsize=10)  # fmt: skip
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    num = int(sizes[-1])
    cells = [VerificationConfig(separation=separation, flip=flip, q_correct=max(qc, 0.02),
                                q_wrong=qw) for qc in qs for qw in qs]  # fmt: skip
    errs = one_generation_errors(jax.random.fold_in(key, 99), cells, num, chains // 4)
    heat = errs.mean(1).reshape(grid, grid)
    numbers["heat_q_correct"], numbers["heat_q_wrong"] = qs.tolist(), qs.tolist()
    numbers["heat_mean"] = heat.tolist()
    im = bx.imshow(heat, origin="lower", extent=(-0.05, 1.05, -0.05, 1.05), vmin=0, vmax=1,
                   cmap="coolwarm", aspect="auto")  # fmt: skip
    qw = np.linspace(0, 1, 200)
    qc = flip * (1 - qw) / (1 - flip)
    ok = qc <= 1
    bx.plot(qw[ok], qc[ok], "k-", lw=2, label="p' = 1/2 (closed form)")
    bx.set_xlabel("verifier's accuracy on wrong labels q_wrong (share discarded)")
    bx.set_ylabel("verifier's accuracy on correct labels q_correct (share kept)")
    bx.set_title(f"Test error (chain mean) after one generation, p = {flip}\n({num} candidates, "
                 f"{chains // 4} chains per cell)", fontsize=10)  # fmt: skip
    bx.legend(loc="lower right", fontsize=8)
    fig.colorbar(im, ax=bx, label="test error (chain mean)")
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return numbers


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the verification phase diagram (Feng et al. 2024)")
    p.add_argument("out", help="PNG path")
    p.add_argument("--flip", type=float, default=0.6, help="the generator's flip rate p")
    p.add_argument("--chains", type=int, default=2000)
    args = p.parse_args(argv)
    numbers = phase_figure(pathlib.Path(args.out), flip=args.flip, chains=args.chains)
    for k, v in numbers.items():
        print(k, np.round(np.asarray(v), 4).tolist())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

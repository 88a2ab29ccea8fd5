"""Reporting of the memorising learner on Zipf data (`kind: tails`): closed-form chain means of a
run (`expected_curves`) and the paper-style scaling-law figures of a sweep (Dohmatob et al. 2024,
Fig. 1-like), drawn from a `collapse-jax sweep` directory of `theory/tails_topk.yaml`:

    python -m collapse_jax.theory.tails_figures SWEEP_DIR [SWEEP_DIR ...] --out DIR

writes DIR/tails_scaling.png (test error vs T, one panel per beta, one line per k, closed forms
dashed, the clean law and its asymptote T^-(1-1/beta) as references) and DIR/tails_grokking.png
(one k, one line per real fraction pi) from the points it finds; with `--iterated RUN_DIR ...`
(runs of `theory/tails_iterated.yaml`) also DIR/tails_iterated.png, the error vs generation.
"""

from __future__ import annotations

import argparse
import pathlib
from typing import Any

# A plotting module, imported only to draw figures: matplotlib at its top (TID253 lists it).
import matplotlib  # noqa: TID253

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402, TID253
import numpy as np  # noqa: E402

from collapse_jax.config import split_shares  # noqa: E402
from collapse_jax.rundir import reader  # noqa: E402
from collapse_jax.theory import tails_laws  # noqa: E402
from collapse_jax.theory.tails import TailsConfig, zipf_probs  # noqa: E402


def expected_curves(
    config: TailsConfig,
    mode: str,
    sample_sizes: np.ndarray,
    *,
    filtered: bool = False,
    generation: Any = None,
) -> dict[str, np.ndarray]:
    """`test_error` chain means per generation where a closed form holds (`tails_laws`):
    generation 0 is the clean law; later generations under `generator: truth` ("replace", or
    "mix" with beta = 0 and fresh real data) by (1); under `generator: fit` without a cut,
    "replace", sizes <= 5000, by the Wright-Fisher absorption. Empty otherwise (a fit cut to its
    top k, mixing with a fitted generator, likelihood filtering: no closed form here)."""
    sizes = [int(x) for x in np.asarray(sample_sizes)]
    if filtered or not sizes:
        return {}
    p = config.probs_array()
    if config.generator == "fit":
        if config.top_k is not None or mode != "replace" or max(sizes) > 5000:
            return {}
        return {"test_error": tails_laws.iterated_fit_errors(p, sizes)}
    if mode == "mix":
        if generation is None or generation.beta != 0 or generation.real_data != "fresh":
            return {}
        shares = (generation.alpha, generation.beta, generation.gamma)
    elif mode == "replace":
        shares = (1.0, 0.0, 0.0)
    else:
        return {}
    q = zipf_probs(config.exponent, config.num_tokens, config.top_k)
    out = [tails_laws.expected_error(p, None, sizes[0], 0)]
    for m in sizes[1:]:
        n_s, _, n_r = split_shares(m, mode, shares)
        out.append(tails_laws.expected_error(p, q, n_r, n_s))
    return {"test_error": np.asarray(out)}


def figures(learner: Any, run: Any, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """No figures of its own for one run: the generic `test_error.png` (chain mean, band over
    chains, closed form dashed) is the error vs generation; the scaling laws need a sweep
    (`scaling_figures`)."""
    return []


def _points(sweep_dirs: list[pathlib.Path]) -> list[dict[str, Any]]:
    """One record per finished point of sweeps of a `tails` config with generator truth:
    beta, k, pi, T, the clean (generation 0) and the cut (generation 1) errors and s.e."""
    out = []
    for d in sorted(d for s in sweep_dirs for d in (s / "points").iterdir()):
        if not (d / "metrics.json").exists():
            continue
        run = reader.Run(d)
        cfg, rows = run.config, run.rows()
        if cfg.kind != "tails" or cfg.model.generator != "truth" or len(rows) < 2:
            continue
        g = cfg.generation
        out.append(
            {
                "model": cfg.model,
                "generation": g,
                "T": int(rows[1]["sample_size"]),
                "beta": cfg.model.exponent,
                "k": cfg.model.top_k,
                "pi": g.gamma if g.policy == "mix" else 0.0,
                "clean": rows[0]["test_error"],
                "clean_se": rows[0]["test_error_se"],
                "err": rows[1]["test_error"],
                "err_se": rows[1]["test_error_se"],
            }
        )
    return out


def _closed(point: dict[str, Any], sizes: np.ndarray) -> np.ndarray:
    """The closed form of generation 1 at every size in `sizes` for a point's settings."""
    cfg, g = point["model"], point["generation"]
    return np.array(
        [
            expected_curves(cfg, g.policy, np.array([m, m]), generation=g)["test_error"][1]
            for m in sizes
        ]
    )


def scaling_figures(
    sweep_dirs: list[str | pathlib.Path], out: str | pathlib.Path
) -> list[pathlib.Path]:
    """Writes tails_scaling.png and tails_grokking.png from sweeps over T (and k, beta, pi:
    one sweep per real fraction, whose alpha and gamma are set together)."""
    dirs, out = [pathlib.Path(d) for d in sweep_dirs], pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pts = _points(dirs)
    if not pts:
        raise ValueError(f"{dirs}: no finished point of a tails sweep with generator truth")
    files = []
    betas = sorted({x["beta"] for x in pts})
    ks = sorted({x["k"] for x in pts if x["k"] is not None})
    colors = {k: plt.cm.viridis(i / max(len(ks) - 1, 1) * 0.85) for i, k in enumerate(ks)}
    fig, axes = plt.subplots(
        1, len(betas), figsize=(max(5.6 * len(betas), 7.5), 4.6), squeeze=False
    )
    for ax, beta in zip(axes[0], betas):
        sel = [x for x in pts if x["beta"] == beta and x["pi"] == 0]
        if not sel:
            continue
        n_tok = sel[0]["model"].num_tokens
        ts = np.array(sorted({x["T"] for x in sel}))
        grid = np.unique(np.geomspace(ts.min(), ts.max(), 40).round().astype(int))
        p = zipf_probs(beta, n_tok)
        clean = {x["T"]: (x["clean"], x["clean_se"]) for x in sel}
        ax.errorbar(
            ts,
            [clean[t][0] for t in ts],
            [clean[t][1] for t in ts],
            fmt="o",
            color="k",
            ms=4,
            label="clean (no cut), Monte Carlo",
        )
        ax.plot(grid, [tails_laws.expected_error(p, None, m, 0) for m in grid], "k--", lw=1)
        c, e = tails_laws.clean_constant(beta), 1 - 1 / beta
        ax.plot(
            grid,
            c * grid**-e,
            ":",
            color="grey",
            lw=1.2,
            label=f"{c:.2f} T^-{e:.2f} (clean asymptote)",
        )
        for k in ks:
            kk = sorted((x for x in sel if x["k"] == k), key=lambda x: x["T"])
            if not kk:
                continue
            ax.errorbar(
                [x["T"] for x in kk],
                [x["err"] for x in kk],
                [x["err_se"] for x in kk],
                fmt="s",
                color=colors[k],
                ms=4,
                label=f"top-k cut, k = {k}",
            )
            ax.plot(grid, _closed(kk[0], grid), "--", color=colors[k], lw=1)
            ax.axhline(float(p[k:].sum()), color=colors[k], lw=0.6, alpha=0.6)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="training tokens T",
            ylabel="test error (mean over chains)",
            title=f"Zipf beta = {beta:g}, N = {n_tok:,} tokens",
        )
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(
        "Memorising learner on T tokens of Zipf data cut to its top k: the error stops at the "
        "cut mass (thin lines)\nmarkers: Monte Carlo mean +- s.e.; dashed: exact closed forms",
        fontsize=9,
    )
    files.append(_save(fig, out / "tails_scaling.png"))

    mixed = [x for x in pts if x["pi"] > 0]
    if mixed:
        beta, k = mixed[0]["beta"], mixed[0]["k"]
        sel = [x for x in pts if x["beta"] == beta and x["k"] == k]
        pis = sorted({x["pi"] for x in sel})
        fig, ax = plt.subplots(figsize=(6, 4.4))
        p = zipf_probs(beta, sel[0]["model"].num_tokens)
        ts = np.array(sorted({x["T"] for x in sel}))
        grid = np.unique(np.geomspace(ts.min(), ts.max(), 40).round().astype(int))
        ax.plot(
            grid,
            [tails_laws.expected_error(p, None, m, 0) for m in grid],
            "k--",
            lw=1,
            label="clean law E_clean(T)",
        )
        for i, pi in enumerate(pis):
            kk = sorted((x for x in sel if x["pi"] == pi), key=lambda x: x["T"])
            col = plt.cm.plasma(i / max(len(pis), 1) * 0.85)
            ax.errorbar(
                [x["T"] for x in kk],
                [x["err"] for x in kk],
                [x["err_se"] for x in kk],
                fmt="o",
                color=col,
                ms=4,
                label=f"real fraction pi = {pi:g}",
            )
            ax.plot(grid, _closed(kk[0], grid), "--", color=col, lw=1)
            if pi > 0:
                ax.plot(
                    grid,
                    [tails_laws.expected_error(p, None, round(pi * m), 0) for m in grid],
                    ":",
                    color=col,
                    lw=1,
                )
        ax.axhline(float(p[k:].sum()), color="grey", lw=0.6)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="training tokens T",
            ylabel="test error (mean over chains)",
            title=f"beta = {beta:g}, top-k cut k = {k}, a fraction pi of real tokens",
        )
        ax.legend(
            fontsize=7,
            loc="lower left",
            title="dashed: closed form; dotted: E_clean(pi T)",
            title_fontsize=7,
        )
        files.append(_save(fig, out / "tails_grokking.png"))
    return files


def iterated_figure(run_dirs: list[str | pathlib.Path], out: str | pathlib.Path) -> pathlib.Path:
    """Writes tails_iterated.png: test error vs generation of runs of `generator: fit` (one line
    per run: chain mean +- 2 s.e., the exact Wright-Fisher closed form dashed where it holds)."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4.4))
    for i, d in enumerate(run_dirs):
        run = reader.Run(pathlib.Path(d))
        cfg, rows = run.config, run.rows()
        gens = np.array([r["generation"] for r in rows])
        mean = np.array([r["test_error"] for r in rows])
        se = np.array([r["test_error_se"] for r in rows])
        col = plt.cm.tab10(i)
        cut = "no cut" if cfg.model.top_k is None else f"each fit cut to its top {cfg.model.top_k}"
        label = f"T = {rows[0]['sample_size']}, {cut} ({cfg.generation.num_trials} chains)"
        ax.fill_between(gens, mean - 2 * se, mean + 2 * se, color=col, alpha=0.25, lw=0)
        ax.plot(gens, mean, "o-", color=col, ms=3, lw=1, label=label)
        g = cfg.generation
        sizes = np.array([r["sample_size"] for r in rows])
        closed = expected_curves(cfg.model, g.policy, sizes, generation=g).get("test_error")
        if closed is not None:
            ax.plot(gens, closed, "k--", lw=1)
    ax.set(
        xlabel="generation (0: trained on real tokens)",
        ylabel="test error (mean over chains)",
        title="Iterated fits: each learner is the next one's generator",
    )
    ax.legend(
        fontsize=7,
        title="bands: mean +- 2 s.e.; dashed: exact closed form (Wright-Fisher)",
        title_fontsize=7,
    )
    return _save(fig, out / "tails_iterated.png")


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dirs", nargs="+", help="sweep directories of a tails config")
    parser.add_argument("--out", required=True, help="folder of the figures")
    parser.add_argument("--iterated", nargs="*", default=[], help="run dirs of generator: fit")
    args = parser.parse_args(argv)
    for f in scaling_figures(args.sweep_dirs, args.out):
        print(f)
    if args.iterated:
        print(iterated_figure(args.iterated, args.out))


if __name__ == "__main__":
    main()

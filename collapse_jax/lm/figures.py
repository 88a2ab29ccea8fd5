"""The paper's language-model figures from a run directory (Shumailov et al. 2024, Fig. 1): the
reporting module of `kind: opt` (`figures`, `expected_curves`).

- `lm_test_perplexity.png`: test perplexity per generation, every run as a thin line and the
  mean +- std over runs as a band, with the unigram baseline on the same tokens;
- `train_perplexity_under_gen0.png` / `..._3d.png`: histograms of the per-sequence perplexity of
  each generation's *training data* under the generation-0 model, on a log axis, for generations
  0, 1, 2, 3, 5 and 9 (2-D overlaid and 3-D stacked). Later generations produce sequences the
  first model finds ever more likely, plus a tail of improbable ones;
- `perplexity_histograms.png`: the real test blocks under every generation's model;
- `example_continuations.txt` (in the run directory): one prompt's continuation by every
  generation's model, decoded to text (the paper's Example 1);
- on a ground-truth source (`data: {kind: source}`), `truth_figures`: the exact metrics of
  `lm.truth` against generation, the training data scored by the truth, and true vs model
  conditionals.

Per-sequence perplexities under the generation-0 model are cached in `analysis/`.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from collapse_jax.lm import evaluate, truth
from collapse_jax.lm.source import GroundTruthSource, to_source_ids
from collapse_jax.lm.vocab import Vocab
from collapse_jax.rundir import fileio, reader

# The generations the paper's Fig. 1 histograms show.
HISTOGRAM_GENERATIONS = (0, 1, 2, 3, 5, 9)


def figures(learner: Any, run: reader.Run, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Every figure of an LM run (`kind: opt`): `make_figures`, and for a known language
    (`data: {kind: source}`) the ground-truth figures (`truth_figures`)."""
    files = make_figures(learner, run, out_dir)
    src = learner.ground_truth()
    if src is not None:

        def load_model(g):
            p = run.params_dir(g)
            return learner.load_params(p, None).model if (p / "config.json").is_file() else None

        files += truth_figures(
            run,
            out_dir,
            src,
            load_model,
            learner.corpus().eval,
            learner.config.data.ranked_contexts,
        )
    return files


def expected_curves(
    config: Any,
    mode: str,
    sample_sizes: np.ndarray,
    *,
    filtered: bool = False,
    generation: Any = None,
) -> dict[str, np.ndarray]:
    """None is known for language models."""
    return {}


def make_figures(learner: Any, run: reader.Run, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Writes every LM figure that the run's contents allow; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    files: list[pathlib.Path] = []
    gens = run.finished_generations()
    if not gens:
        return files
    bins = learner.config.histogram_bins
    path = out_dir / "lm_test_perplexity.png"
    if _perplexity_figure(run, gens, path):
        files.append(path)
    test = [(g, run.arrays(g).get("trials/per_sequence_ppl")) for g in gens]
    test = [(g, v.reshape(-1)) for g, v in test if v is not None]
    if test:
        path = out_dir / "perplexity_histograms.png"
        _histograms(test, "perplexity of a real test block", path, bins)
        files.append(path)
    under0 = train_perplexity_under_gen0(learner, run)
    shown = [(g, v) for g, v in under0 if g in HISTOGRAM_GENERATIONS] or under0
    if shown:
        label = "perplexity of a training block under the generation-0 model"
        path = out_dir / "train_perplexity_under_gen0.png"
        _histograms(shown, label, path, bins)
        files.append(path)
        path = out_dir / "train_perplexity_under_gen0_3d.png"
        _histograms_3d(shown, label, path, bins)
        files.append(path)
    text = write_examples(learner, run)
    if text is not None:
        files.append(text)
    return files


def _trials(run: reader.Run, gens: list[int], name: str) -> np.ndarray | None:
    """[G, R] per-run values of a scalar metric (None when absent)."""
    vals = []
    for g in gens:
        v = run.arrays(g).get(f"trials/{name}")
        if v is None:
            return None
        vals.append(np.asarray(v, np.float64).reshape(-1))
    r = min(len(v) for v in vals)
    return np.stack([v[:r] for v in vals])


def _perplexity_figure(run: reader.Run, gens: list[int], path: pathlib.Path) -> bool:
    import matplotlib.pyplot as plt

    ppl = _trials(run, gens, "ppl")
    if ppl is None:
        return False
    x = np.asarray(gens)
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=110)
    for r in range(ppl.shape[1]):
        ax.plot(
            x, ppl[:, r], color="tab:blue", lw=0.8, alpha=0.5, label="each run" if r == 0 else None
        )
    mean = ppl.mean(axis=1)
    ax.plot(
        x, mean, color="tab:blue", lw=2, marker="o", ms=3, label=f"mean of {ppl.shape[1]} run(s)"
    )
    if ppl.shape[1] > 1:
        std = ppl.std(axis=1, ddof=1)
        ax.fill_between(x, mean - std, mean + std, color="tab:blue", alpha=0.2, label="mean ± std")
    uni = _trials(run, gens, "unigram_ppl")
    if uni is not None:
        ax.axhline(float(uni[0, 0]), color="gray", ls="--", lw=1, label="unigram baseline")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    values = np.concatenate([ppl.ravel(), [] if uni is None else uni[:1, 0]])
    if np.nanmax(values) > 20 * np.nanmin(values):  # a collapse spans decades: log axis
        ax.set_yscale("log")
    ax.set_xlabel("generation")
    ax.set_ylabel("test perplexity")
    ax.set_title(f"Test perplexity by generation ({run.config.name})", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _log_bins(series: list[tuple[int, np.ndarray]], num_bins: int) -> np.ndarray:
    allv = np.concatenate([v[np.isfinite(v)] for _, v in series])
    lo, hi = np.log10(max(allv.min(), 1.0)), np.log10(max(allv.max(), 1.0))
    return np.logspace(lo, hi + 1e-9, num_bins)


def _histograms(series: list[tuple[int, np.ndarray]], xlabel: str, path, num_bins: int) -> None:
    """One step histogram per generation on shared logarithmic bins, as fractions of the blocks
    per bin (a density per unit of perplexity would shrink the wide bins of a log axis to
    nothing)."""
    import matplotlib.pyplot as plt

    bins = _log_bins(series, num_bins)
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=110)
    cmap = plt.get_cmap("viridis")
    for i, (g, v) in enumerate(series):
        color = cmap(i / max(1, len(series) - 1))
        v = np.clip(v[np.isfinite(v)], bins[0], bins[-1])
        ax.hist(
            v,
            bins=bins,
            weights=np.full(len(v), 1.0 / max(1, len(v))),
            histtype="step",
            color=color,
            label=f"gen {g}",
        )
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of blocks")
    ax.set_title("Per-sequence perplexity by generation")
    ax.legend(fontsize=7, frameon=False, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _histograms_3d(series: list[tuple[int, np.ndarray]], xlabel: str, path, num_bins: int) -> None:
    """The same histograms stacked along a generation axis (the paper's 3-D panel)."""
    import matplotlib.pyplot as plt

    edges = np.log10(_log_bins(series, num_bins))
    width = np.diff(edges)
    fig = plt.figure(figsize=(6.5, 4.5), dpi=110)
    ax = fig.add_subplot(projection="3d")
    cmap = plt.get_cmap("viridis")
    for i, (_, v) in enumerate(series):
        # Fractions per bin (not densities): comparable heights on a log-spaced axis.
        h, _ = np.histogram(np.log10(np.maximum(v, 1.0)), bins=edges)
        h = h / max(1, h.sum())
        color = cmap(i / max(1, len(series) - 1))
        ax.bar(edges[:-1], h, zs=i, zdir="y", width=width, align="edge", color=color, alpha=0.8)
    ax.set_yticks(range(len(series)))
    ax.set_yticklabels([str(g) for g, _ in series])
    ax.set_ylabel("generation")
    ticks = np.arange(np.floor(edges[0]), np.ceil(edges[-1]) + 1)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"$10^{{{int(t)}}}$" for t in ticks])
    ax.set_xlabel(xlabel, fontsize=7)
    ax.set_zlabel("fraction of blocks")
    ax.view_init(elev=25, azim=-60)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _chain(folder: pathlib.Path, r: int) -> pathlib.Path:
    """Run (chain) r's folder: the loop keeps run 0 at the top, run r > 0 in `chain_<r>/`."""
    return folder if r == 0 else folder / f"chain_{r:05d}"


def _num_runs(run: reader.Run) -> int:
    return 1 + len(list((run.path / "data").glob("chain_*")))


def train_perplexity_under_gen0(learner: Any, run: reader.Run) -> list[tuple[int, np.ndarray]]:
    """[(g, per-block perplexity of generation g's training data under the generation-0 model)],
    every run scored by its own generation-0 model and pooled; needs generation 0's parameters
    (`keep_params: all` or `first_last`)."""
    out = []
    for g in run.finished_generations():
        cache = run.path / "analysis" / f"train_ppl_under_gen0_{g:05d}.npz"
        if cache.is_file():
            try:
                out.append((g, fileio.load_npz(cache)["ppl"]))
                continue
            except (fileio.CorruptFileError, KeyError):
                pass  # a derived cache: recomputed below and rewritten
        pieces = []
        for r in range(_num_runs(run)):
            p0 = _chain(run.path / "params", r) / "gen_00000"
            data = _chain(run.path / "data", r) / f"gen_{g:05d}.npz"
            if not ((p0 / "config.json").is_file() and data.is_file()):
                continue
            model0 = learner.load_params(p0, None).model
            blocks = _vocab_map(p0)(fileio.load_npz(data)["data"])
            pieces.append(
                evaluate.perplexity(
                    model0,
                    blocks,
                    batch_size=learner.config.eval_batch_size,
                    per_sequence=True,
                    compute_dtype=learner.config.train.compute_dtype,
                    pad_token_id=model0.config.pad_token_id,
                )
            )
        if not pieces:
            continue
        ppl = np.concatenate(pieces)
        fileio.save_npz(cache, {"ppl": ppl})
        out.append((g, ppl))
    return out


def _vocab_map(params_dir: pathlib.Path):
    """Source ids -> the saved model's ids (identity unless it has a compact vocabulary)."""
    ids_file = params_dir / "token_ids.npy"
    if not ids_file.is_file():
        return lambda b: np.asarray(b, np.int32)
    ids = np.load(ids_file)
    vocab = Vocab(ids, int(ids.max()) + 1)
    return vocab.to_model


def write_examples(learner: Any, run: reader.Run) -> pathlib.Path | None:
    """`example_continuations.txt`: the example prompt and every generation's continuation."""
    gens = run.finished_generations()
    conts = [(g, run.arrays(g).get("trials/example_continuation")) for g in gens]
    conts = [(g, c) for g, c in conts if c is not None]
    if not conts or learner.config.example_prompt is None:
        return None
    corpus = learner.corpus()
    decode = corpus.decode or (lambda ids: " ".join(map(str, ids)))
    i = min(learner.config.example_prompt, len(corpus.train) - 1)
    pad = None
    lines = [
        f"# {run.config.name}: training block {i} continued by every generation's model",
        f"# ({learner.config.decode.num_beams}-beam search, "
        f"{learner.config.decode.max_new_tokens} new tokens, repetition penalty "
        f"{learner.config.decode.repetition_penalty}); the paper's Example 1.",
        "",
        "Input: " + decode(corpus.train[i]).strip(),
        "",
    ]
    for g, c in conts:
        c = np.asarray(c)
        c = c.reshape(-1, c.shape[-1])
        for r, tokens in enumerate(c):
            tokens = [int(t) for t in tokens if pad is None or t != pad]
            who = f"Gen {g}" + (f", run {r + 1}" if len(c) > 1 else "")
            lines.append(f"{who}: " + decode(tokens).strip().replace("\n", " "))
        lines.append("")
    path = run.path / "example_continuations.txt"
    fileio.atomic_write_text(path, "\n".join(lines))
    return path


# ----------------------------------------------------------------------------------------------
# Figures of a run on a ground-truth source (`data: {kind: source}`, metrics of `lm.truth`).


def truth_figures(run: Any, out_dir: Any, source: GroundTruthSource, load_model: Any,
            eval_ids: np.ndarray, num_contexts: int = 4) -> list[Any]:  # fmt: skip
    """The ground-truth figures of a finished (or partial) run.

    - `truth_metrics.png`: kl_to_truth, tail_retention (10-90% of contexts shaded; the unbounded
      tail_mass_ratio's mean dotted), data_true_nll (5-95% of blocks shaded, the floored NLL
      dotted, entropy rate dashed, the least NLL of any block dotted), support coverage / lost
      mass, entropy and repetition of the data, against generation;
    - `truth_nll_histograms.png`: per-block true NLL of generations 0, 1, 2, 3, 5, 9's training
      data on a shared axis, the entropy rate marked;
    - `truth_ranked_conditionals.png`: true vs model conditional probabilities ranked by true
      probability, for a few held-out contexts, at generation 0 and the last generation with
      saved parameters (`load_model(g)` returns the model or None).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = pathlib.Path(out_dir)
    gens = run.finished_generations()
    if not gens:
        return []
    files = []
    h, _ = source.entropy_rate
    series = {name: run.series(name) for name in (
        "kl_to_truth", "tail_retention", "tail_retention_p10", "tail_retention_p50",
        "tail_retention_p90",
        "data_true_nll", "support_coverage", "lost_mass", "data_entropy", "data_repetition",
        "data_invalid_rate", "tail_mass_ratio", "data_true_nll_floored", "min_block_nll",
    )}  # fmt: skip
    # The truth's mode: the least NLL per token a block can have (Markov sources; NaN otherwise).
    floor = series["min_block_nll"][np.isfinite(series["min_block_nll"])]
    floor = float(floor[0]) if len(floor) else None
    g = run.series("generation")
    per_block = {}
    for gen in gens:
        v = run.arrays(gen).get("trials/data_true_nll_per_block")
        if v is not None:
            per_block[gen] = v.reshape(-1)[np.isfinite(v.reshape(-1))]

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), dpi=100)
    ax = axes[0, 0]
    kl = series["kl_to_truth"]
    ax.plot(g, kl, "o-", color="C3")
    # KL >= 0: from 0, at least 0.05 nats tall, so a float32 rounding of 0 (the oracle's -4e-8)
    # is drawn as 0, not magnified into a trend.
    finite = kl[np.isfinite(kl)]
    ax.set_ylim(0, max(0.05, 1.1 * float(finite.max())) if finite.size else 0.05)
    ax.set_ylabel("nats")
    ax.set_title("kl_to_truth (held-out contexts)")
    ax = axes[0, 1]
    # tail_retention is bounded in [0, 1] (1 = the truth's tail intact); the unbounded
    # tail_mass_ratio (a uniform model scores above 1) is dotted for reference.
    ax.fill_between(g, series["tail_retention_p10"], series["tail_retention_p90"], color="C0",
                    alpha=0.2, lw=0, label="10-90% of contexts")  # fmt: skip
    ax.plot(g, series["tail_retention"], "o-", color="C0", label="tail_retention mean")
    ratio = series["tail_mass_ratio"]
    if np.isfinite(ratio).any():
        ax.plot(g, ratio, ":", color="C1", label="tail_mass_ratio mean (unbounded)")
    ax.set_title("tail_retention (least probable 10%; 1 = truth)")
    # The bounded scale in full (the unbounded ratio may reach above it), no offset axis.
    ax.set_ylim(-0.02, max([1.05, *(1.05 * ratio[np.isfinite(ratio)])]))
    ax.axhline(1.0, color="k", ls="--", lw=0.8, label="truth")
    ax.legend(fontsize=7, frameon=False)
    ax = axes[0, 2]
    if per_block:
        lo = [np.quantile(per_block[x], 0.05) if x in per_block else np.nan for x in g]
        hi = [np.quantile(per_block[x], 0.95) if x in per_block else np.nan for x in g]
        ax.fill_between(g, lo, hi, color="C2", alpha=0.2, lw=0, label="5-95% of blocks")
    ax.plot(g, series["data_true_nll"], "o-", color="C2", label="mean (valid tokens)")
    if np.isfinite(series["data_true_nll_floored"]).any():
        ax.plot(g, series["data_true_nll_floored"], "s:", color="C2",
                label="impossible tokens at 13.8 nats, positions 1..T-1")  # fmt: skip
    ax.axhline(h, color="k", ls="--", lw=0.8, label="entropy rate")
    if floor is not None:
        ax.axhline(floor, color="k", ls=":", lw=0.8, label="least NLL of any block (mode)")
    ax.set_title("data_true_nll of each generation's data")
    ax.set_ylabel("nats / token")
    ax.legend(fontsize=7, frameon=False)
    ax = axes[1, 0]
    ax.plot(g, series["support_coverage"], "o-", label="support_coverage")
    ax.plot(g, series["lost_mass"], "s-", label="lost_mass")
    ax.set_title("true transitions in the data")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, frameon=False)
    ax = axes[1, 1]
    ax.plot(g, series["data_entropy"], "o-", color="C4", label="unigram entropy of data")
    ax.axhline(float(-(source.unigram[source.unigram > 0]
                       * np.log(source.unigram[source.unigram > 0])).sum()),
               color="C4", ls="--", lw=0.8, label="truth")  # fmt: skip
    ax.set_title("data_entropy (nats)")
    ax.legend(fontsize=7, frameon=False)
    ax = axes[1, 2]
    ax.plot(g, series["data_repetition"], "o-", color="C5", label="repeated 4-grams")
    ax.plot(g, series["data_invalid_rate"], "s-", color="C7", label="impossible tokens")
    ax.set_title("data_repetition, data_invalid_rate")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, frameon=False)
    for a in axes.flat:
        a.set_xlabel("generation")
    fig.suptitle(f"{run.path.name}: collapse against the ground truth "
                 f"(entropy rate {h:.3f} nats/token)")  # fmt: skip
    fig.tight_layout()
    path = out_dir / "truth_metrics.png"
    fig.savefig(path)
    plt.close(fig)
    files.append(path)

    shown = [x for x in HISTOGRAM_GENERATIONS if x in per_block and len(per_block[x])]
    if shown:
        allv = np.concatenate([per_block[x] for x in shown])
        lo = min(allv.min(), h, h if floor is None else floor)
        bins = np.linspace(lo - 0.05, max(allv.max(), h) + 0.05, 90)
        fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
        cmap = plt.get_cmap("viridis")
        for i, x in enumerate(shown):
            ax.hist(per_block[x], bins=bins, histtype="step", density=True, lw=1.4,
                    color=cmap(i / max(1, len(shown) - 1)), label=f"gen {x}")  # fmt: skip
        ax.axvline(h, color="k", ls="--", lw=0.9, label="entropy rate")
        if floor is not None:
            ax.axvline(floor, color="k", ls=":", lw=0.9, label="least NLL of any block")
        ax.set_xlabel("true NLL per token of a training block (nats)")
        ax.set_ylabel("density")
        ax.set_title("Training data scored by the truth")
        ax.legend(fontsize=7, frameon=False)
        fig.tight_layout()
        path = out_dir / "truth_nll_histograms.png"
        fig.savefig(path)
        plt.close(fig)
        files.append(path)

    models = [(x, load_model(x)) for x in dict.fromkeys([gens[0], gens[-1]])]
    models = [(x, m) for x, m in models if m is not None]
    if models:
        path = out_dir / "truth_ranked_conditionals.png"
        _ranked_figure(source, models, eval_ids, num_contexts, path)
        files.append(path)
    return files


def _ranked_figure(source, models, eval_ids, num_contexts, path) -> None:
    import matplotlib.pyplot as plt

    ids = np.asarray(eval_ids[:num_contexts], np.int32)
    tokens = to_source_ids(ids, source.vocab_size)
    t = ids.shape[1] // 2  # a context of half a block, the same for every panel
    p = np.asarray(source.next_token_probs(tokens))[:, t]  # [C, V]
    qs = [
        (g, np.exp(np.asarray(truth.model_log_probs(m, ids, source.vocab_size)))[:, t])
        for g, m in models
    ]
    fig, axes = plt.subplots(1, num_contexts, figsize=(3.3 * num_contexts, 3.4), dpi=100,
                             squeeze=False)  # fmt: skip
    for c, ax in enumerate(axes[0]):
        order = np.argsort(-p[c])
        live = int((p[c] > 0).sum())
        r = np.arange(1, len(order) + 1)
        ax.plot(r[:live], p[c][order][:live], "k-", lw=1.8, label="truth")  # its support only
        for i, (g, q) in enumerate(qs):
            ax.plot(r, q[c][order], "o-" if i == 0 else "s-", ms=3, lw=1, color=f"C{i}",
                    label=f"model gen {g}")  # fmt: skip
        ax.axvline(live + 0.5, color="gray", lw=0.6, ls=":")
        ax.set_yscale("log")
        ax.set_ylim(1e-6, 1.2)
        ax.set_xlabel("token rank by true probability")
        ax.set_title(f"context {c}: ..{' '.join(map(str, tokens[c, max(0, t - 3) : t]))}",
                     fontsize=9)  # fmt: skip
        if c == 0:
            ax.set_ylabel("p(next token | context)")
            ax.legend(fontsize=7, frameon=False)
    fig.suptitle("True vs model conditionals, ranked by true probability (dotted line: end of "
                 "the true support; beyond it the truth is 0)", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

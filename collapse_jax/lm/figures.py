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
  generation's model, decoded to text (the paper's Example 1).

Per-sequence perplexities under the generation-0 model are cached in `analysis/`.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from collapse_jax.lm import truth
from collapse_jax.rundir import fileio, reader

# The generations the paper's Fig. 1 histograms show.
HISTOGRAM_GENERATIONS = (0, 1, 2, 3, 5, 9)


def figures(learner: Any, run: reader.Run, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Every figure of an LM run (`kind: opt`): `make_figures`, and for a known language
    (`data: {kind: source}`) the ground-truth figures (`truth.figures`)."""
    files = make_figures(learner, run, out_dir)
    src = learner.ground_truth()
    if src is not None:

        def load_model(g):
            p = run.params_dir(g)
            return learner.load_params(p, None).model if (p / "config.json").is_file() else None

        files += truth.figures(
            run,
            out_dir,
            src,
            load_model,
            learner.corpus().eval,
            learner.config.data.ranked_contexts,
        )
    return files


def expected_curves(
    config: Any, mode: str, sample_sizes: np.ndarray, *, selection: bool = False
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
    from collapse_jax.lm import evaluate

    out = []
    for g in run.finished_generations():
        cache = run.path / "analysis" / f"train_ppl_under_gen0_{g:05d}.npz"
        if cache.is_file():
            out.append((g, fileio.load_npz(cache)["ppl"]))
            continue
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
    from collapse_jax.lm.experiment import Vocab

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

"""Reporting of VAE runs (`kind: vae`): a grid of samples per generation and the density of every
generation's training images in generation 0's latent space, from a run directory (set
`generation.keep_params: all`)."""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np

from collapse_jax.rundir import fileio
from collapse_jax.vae.learner import VAELearner
from collapse_jax.vae.model import VAEConfig, encode_means, latent_spread, merge


def expected_curves(
    config: VAEConfig,
    mode: str,
    sample_sizes: np.ndarray,
    *,
    filtered: bool = False,
    generation: Any = None,
) -> dict[str, np.ndarray]:
    """None is known for the VAE."""
    return {}


def _generation_samples(run: Any, g: int, last: int) -> pathlib.Path | None:
    """File holding generation g's samples: the next generation's training data."""
    path = run.data_path(g + 1) if g < last else run.path / "state" / "data.npz"
    return path if path.is_file() else None


def figures(learner: VAELearner, run: Any, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """A grid of samples per generation (the same prior draws z decoded by every generation)
    and the density of every generation's training images in generation 0's latent space,
    with their spread (written to latent_spread.json too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = learner.config
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gens = run.finished_generations()
    files: list[pathlib.Path] = []
    if not gens:
        return files
    template = learner.init(jax.random.key(0))
    have = [g for g in gens if (pathlib.Path(run.params_dir(g)) / "params.npz").is_file()]
    # Sample grids: identical z for every generation, so the drift is visible image by image.
    k = cfg.grid_size
    z = jax.random.normal(jax.random.key(1), (k * k, cfg.latent_dim))
    rows = []
    for g in have:
        params = learner.load_params(run.params_dir(g), template)
        p = jax.nn.sigmoid(merge(cfg, params).decode(z))
        grid = np.asarray(p).reshape(k, k, 28, 28).transpose(0, 2, 1, 3).reshape(k * 28, k * 28)
        rows.append((g, grid))
    if rows:
        fig, axes = plt.subplots(1, len(rows), figsize=(2.4 * len(rows), 2.6), squeeze=False)
        for ax, (g, grid) in zip(axes[0], rows):
            ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"generation {g}", fontsize=9)
            ax.axis("off")
        fig.tight_layout()
        path = out_dir / "vae_samples.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)
    # Latent density under generation 0's encoder.
    if 0 in have:
        enc = learner.load_params(run.params_dir(0), template)
        spreads: dict[str, float] = {}
        fig, ax = plt.subplots(figsize=(5, 3.2))
        sets = [("real (gen 0 data)", run.data_path(0))]
        sets += [(f"samples of gen {g}", _generation_samples(run, g, gens[-1])) for g in gens]
        for label, path in sets:
            if path is None or not pathlib.Path(path).is_file():
                continue
            images = fileio.load_npz(path)["data"][: cfg.probe_size]
            mu = encode_means(enc, images, cfg)
            spreads[label] = latent_spread(mu)
            hist, edges = np.histogram(mu.ravel(), bins=80, range=(-4, 4), density=True)
            ax.plot(
                0.5 * (edges[1:] + edges[:-1]), hist, label=f"{label}: spread {spreads[label]:.3f}"
            )
        ax.set_xlabel("latent mean (all dimensions), generation-0 encoder")
        ax.set_ylabel("density")
        ax.legend(fontsize=6, frameon=False)
        fig.tight_layout()
        path = out_dir / "vae_latent_density.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)
        fileio.atomic_write_json(out_dir / "latent_spread.json", spreads)
        files.append(out_dir / "latent_spread.json")
    return files

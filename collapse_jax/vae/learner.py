"""The paper's VAE in the generational loop (`model: {kind: vae, ...}`): `VAELearner` trains a
fresh VAE per generation (`collapse_jax.vae.model`) on MNIST (`collapse_jax.vae.mnist`) or on the
previous generation's decoded samples."""

from __future__ import annotations

import functools
import pathlib
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.loop.learner import AbstractLearner
from collapse_jax.rundir import fileio
from collapse_jax.vae import mnist
from collapse_jax.vae.model import (
    Params,
    VAEConfig,
    encode_means,
    evaluate_elbo,
    generate,
    init_params,
    latent_spread,
    merge,
    train,
)


class VAELearner(AbstractLearner[Params, np.ndarray]):
    """The paper's VAE in the generational loop (one chain; data = uint8 images [N, 28, 28]).

    `fit` trains (resumable at epoch ends inside its `workdir`), `sample` decodes prior samples,
    `evaluate` reports test-set ELBO terms. The latent spread of every generation's samples in
    generation 0's latent space needs generation 0's parameters, so `figures` computes it from
    the run directory (set `generation.keep_params: all`).
    """

    jittable: ClassVar[bool] = False
    config: VAEConfig

    @functools.cached_property
    def _train_images(self) -> np.ndarray:
        return mnist.load_mnist(self.config.data_dir, "train")[0]

    def real_size(self, requested: int | None) -> int:
        """The real training set's size (`model.train_size`, capped by MNIST's 60000)."""
        n, total = self.config.train_size, len(self._train_images)
        return total if n is None else min(n, total)

    def real_data(self, key: jax.Array, num: int | jax.Array) -> np.ndarray:
        """A fixed random subset of `num` training images (all of them when num is 60000)."""
        images = self._train_images
        if int(num) >= len(images):
            return images
        idx = np.asarray(jax.random.choice(key, len(images), (int(num),), replace=False))
        return images[np.sort(idx)]

    def draw_real(self, key: jax.Array, num: int | jax.Array) -> np.ndarray:
        images = self._train_images
        num = int(num)
        if num > len(images):
            raise ValueError(f"cannot draw {num} real images from {len(images)}")
        return images[np.asarray(jax.random.choice(key, len(images), (num,), replace=False))]

    def reference(self, key: jax.Array) -> np.ndarray:
        images = mnist.load_mnist(self.config.data_dir, "test")[0]
        n = self.config.test_size
        if n is None or n >= len(images):
            return images
        return images[:n]

    def init(self, key: jax.Array) -> Params:
        return init_params(key, self.config.latent_dim, tuple(self.config.channels))

    def fit(self, key: jax.Array, data: np.ndarray, params: Params, **kwargs: Any) -> Params:
        workdir = kwargs.get("workdir")
        if workdir is not None:
            pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
        params, _ = train(key, data, params, self.config, workdir=workdir)
        return params

    def sample(
        self, key: jax.Array, params: Params, num: int | jax.Array, **kwargs: Any
    ) -> np.ndarray:
        return generate(key, params, int(num), self.config)

    def evaluate(self, key: jax.Array, params: Params, reference: Any) -> dict[str, Any]:
        """Test-set metrics: test_loss (negative ELBO per image), test_bce, test_kl,
        test_recon_bce (reconstruction BCE at the posterior mean)."""
        return evaluate_elbo(key, params, reference, self.config)

    def save_params(self, path: pathlib.Path, params: Params) -> None:
        fileio.save_tree(path / "params.npz", params)

    def load_params(self, path: pathlib.Path, template: Params) -> Params:
        return jax.tree.map(jnp.asarray, fileio.load_tree(path / "params.npz", template))

    def figures(self, run: Any, out_dir: pathlib.Path) -> list[pathlib.Path]:
        return vae_figures(self, run, out_dir)


def _generation_samples(run: Any, g: int, last: int) -> pathlib.Path | None:
    """File holding generation g's samples: the next generation's training data."""
    path = run.data_path(g + 1) if g < last else run.path / "state" / "data.npz"
    return path if path.is_file() else None


def vae_figures(learner: VAELearner, run: Any, out_dir: pathlib.Path) -> list[pathlib.Path]:
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

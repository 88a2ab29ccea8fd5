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
    evaluate_elbo,
    generate,
    init_params,
    train,
)


class VAELearner(AbstractLearner[Params, np.ndarray]):
    """The paper's VAE in the generational loop (one chain; data = uint8 images [N, 28, 28]).

    `fit` trains (resumable at epoch ends inside its `workdir`), `sample` decodes prior samples,
    `evaluate` reports test-set ELBO terms. The latent spread of every generation's samples in
    generation 0's latent space needs generation 0's parameters, so `vae.figures` computes it from
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
        params, _ = train(key, data, params, self.config, workdir=workdir, log=kwargs.get("log"))
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

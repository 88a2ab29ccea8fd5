"""Benchmark of the paper's VAE: training images/s as `vae.model.train` runs its epochs, against
the same network in PyTorch (`bench.baselines.torch_vae`) where installed."""

from __future__ import annotations

import os
import pathlib

import jax
import numpy as np

from collapse_jax.bench.baselines import torch_device, torch_vae
from collapse_jax.bench.harness import Suite, block, installed, row, timeit
from collapse_jax.jaxtools import convs
from collapse_jax.vae import mnist
from collapse_jax.vae import model as vae


def _mnist_or_random(n: int) -> tuple[np.ndarray, str]:
    """n MNIST training images if the data folder has them, else random binary images."""
    root = pathlib.Path(os.environ.get("COLLAPSE_JAX_DATA", "data")) / "mnist"
    try:
        images = mnist.load_mnist(root, "train")[0][:n]
        if images.shape[0] == n:
            return images, "MNIST"
    except Exception:  # noqa: BLE001 - no data here: the speed does not depend on the pixels
        pass
    rng = np.random.default_rng(0)
    return (rng.random((n, 28, 28)) < 0.15).astype(np.uint8) * 255, "random binary images"


def bench_vae(suite: Suite, ctx: dict) -> list[dict]:
    """Training epochs of the paper's VAE (Adam 1e-3, weight decay 1e-5) as `vae.train` runs
    them, against the same network in PyTorch."""
    images, source = _mnist_or_random(suite.vae_images)
    cfg = vae.VAEConfig(batch_size=suite.vae_batch, epochs=1)
    params = vae.init_params(jax.random.key(0))
    state = [params, vae.init_optimizer(params, cfg)]
    x = jax.device_put(images)
    count = [0]

    def epoch():
        count[0] += 1
        p, o, loss = vae.train_epoch(*state, x, jax.random.key(count[0]), cfg)
        state[:] = [p, o]
        block(loss)

    compile_s, med = timeit(epoch, suite.repeats)
    value = images.shape[0] / med
    base = None
    if suite.baselines and installed("torch"):
        import torch

        dev = torch_device()
        torch.manual_seed(0)
        model = torch_vae().to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
        xt = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None].to(dev)

        def torch_epoch():
            perm = torch.randperm(len(xt), device=dev)
            for lo in range(0, len(xt), suite.vae_batch):
                opt.zero_grad()
                loss = model(xt[perm[lo : lo + suite.vae_batch]])
                loss.backward()
                opt.step()
            float(loss.detach())

        _, t_med = timeit(torch_epoch, suite.repeats)
        base = images.shape[0] / t_med
    return [
        row(
            "vae_train",
            value,
            "images/s",
            compile_s=compile_s,
            median_s=med,
            config=dict(
                images=images.shape[0],
                data=source,
                batch=suite.vae_batch,
                latent=20,
                channels=[64, 128],
                dtype="float32",
                convolutions=convs.impl(),
            ),
            baseline="the same network in PyTorch" if base else None,
            base_value=base,
        )
    ]

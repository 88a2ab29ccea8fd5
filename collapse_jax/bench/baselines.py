"""Baselines of the benchmarks: NumPy implementations of the theory chains (the same processes,
vectorised over chains) and the paper's VAE in PyTorch. Imported only when a benchmark runs."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def _trajectory(generations: int, first: np.ndarray) -> np.ndarray:
    """The float32 array [G + 1, ...] of every generation's state, row 0 = `first`: what the
    `simulate` functions return, so the NumPy baselines produce the same output (on a VM that
    hands freed memory back to its host, first touching such an array costs as much as a
    fraction of the run, on either side)."""
    out = np.empty((generations + 1, *first.shape), np.float32)
    out[0] = first
    return out


def numpy_gaussian_sample(rng, chains: int, generations: int, m: int):
    """The sample method in NumPy: draw m points per chain and refit (d = 1, unbiased); returns
    the trajectories of the means and variances [G + 1, chains]."""
    mu, var = np.zeros(chains), np.ones(chains)
    mus, vs = _trajectory(generations, mu), _trajectory(generations, var)
    for g in range(generations):
        x = mu[:, None] + np.sqrt(var)[:, None] * rng.standard_normal((chains, m))
        mu, var = x.mean(1), x.var(1, ddof=1)
        mus[g + 1], vs[g + 1] = mu, var
    return mus, vs


def numpy_gaussian_exact(rng, chains: int, generations: int, m: int):
    """The exact method in NumPy: the sufficient statistics (normal mean, chi-square scatter);
    returns the trajectories of the means and variances [G + 1, chains]."""
    mu, var = np.zeros(chains), np.ones(chains)
    mus, vs = _trajectory(generations, mu), _trajectory(generations, var)
    for g in range(generations):
        mu = mu + np.sqrt(var / m) * rng.standard_normal(chains)
        var = var * rng.chisquare(m - 1, chains) / (m - 1)
        mus[g + 1], vs[g + 1] = mu, var
    return mus, vs


def numpy_discrete_sample(rng, probs: np.ndarray, chains: int, generations: int, m: int):
    """The sample method in NumPy: m inverse-CDF draws per chain, then counts; returns the
    trajectory of the distributions [G + 1, chains, K]."""
    k = probs.size
    p = np.broadcast_to(probs, (chains, k)).copy()
    ps = _trajectory(generations, p)
    offs = (np.arange(chains) * k)[:, None]
    for g in range(generations):
        cdf = np.cumsum(p, axis=1)
        u = rng.random((chains, m)) * cdf[:, -1:]
        idx = (u[:, :, None] >= cdf[:, None, :]).sum(-1)
        counts = np.bincount((idx + offs).ravel(), minlength=chains * k).reshape(chains, k)
        p = ps[g + 1] = counts / m
    return ps


def numpy_discrete_exact(rng, probs: np.ndarray, chains: int, generations: int, m: int):
    """The exact method in NumPy: `Generator.multinomial` (C-level conditional binomials);
    returns the trajectory of the distributions [G + 1, chains, K]."""
    p = np.broadcast_to(probs, (chains, probs.size)).copy()
    ps = _trajectory(generations, p)
    for g in range(generations):
        p = ps[g + 1] = rng.multinomial(m, p) / m
    return ps


def zipf_probs(k: int = 10) -> np.ndarray:
    """The discrete benchmarks' distribution: p_i proportional to 1 / i."""
    p = 1.0 / np.arange(1, k + 1)
    return p / p.sum()


def torch_vae(latent: int = 20, c1: int = 64, c2: int = 128) -> Any:
    """The paper's VAE in PyTorch (the notebook's framework), returning the summed loss."""
    import torch
    from torch import nn

    class VAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(
                nn.Conv2d(1, c1, 4, 2, 1),
                nn.ReLU(),
                nn.Conv2d(c1, c2, 4, 2, 1),
                nn.ReLU(),
                nn.Flatten(),
            )
            self.mu = nn.Linear(c2 * 49, latent)
            self.logvar = nn.Linear(c2 * 49, latent)
            self.fc = nn.Linear(latent, c2 * 49)
            self.dec = nn.Sequential(
                nn.ConvTranspose2d(c2, c1, 4, 2, 1),
                nn.ReLU(),
                nn.ConvTranspose2d(c1, 1, 4, 2, 1),
            )

        def forward(self, x):
            h = self.enc(x)
            mu, logvar = self.mu(h), self.logvar(h)
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            logits = self.dec(torch.relu(self.fc(z)).view(-1, c2, 7, 7))
            bce = nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum")
            kl = -0.5 * torch.sum(1 + logvar - mu**2 - logvar.exp())
            return bce + kl

    return VAE()


def torch_device() -> str:
    """PyTorch's device for the baselines: CUDA when JAX runs on a GPU and torch sees one."""
    import torch

    if jax.devices()[0].platform == "gpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu"

"""VAE training throughput (images/s) on CPU: our Flax VAE vs the same network in PyTorch.

The paper's network (conv 64/128, latent 20) and optimiser (Adam 1e-3, weight decay 1e-5), batch
256, on real MNIST images. Variants, timed in this process one epoch each per round,
interleaved (so a change of load hits all of them alike):

- `cpu`: `vae.model.make_train_step` with jaxtools/convs.py's CPU convolutions (the default on CPU);
- `lax`: the same step with XLA's convolutions and JAX's own gradients (`COLLAPSE_JAX_CONV=lax`);
- `old` (with `--old DIR`): another checkout's VAE step and convolutions (before/after);
- `torch`: the same network in PyTorch, the usual eager loop over the same batches.

Writes `benchmarks/results/vae_conv_ab-<device>.json` (images/s per variant, min and median over
rounds, ratios against PyTorch, and the load average as a note).

    COLLAPSE_JAX_DATA=../shared/data python benchmarks/bench_vae.py [--images 1024] [--rounds 9]
        [--old /path/to/old/checkout]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

from collapse_jax.bench import baselines
from collapse_jax.jaxtools import convs
from collapse_jax.vae import mnist
from collapse_jax.vae import model as vae


def _load_old(root: pathlib.Path):
    """The vae module of another checkout, bound to that checkout's convs module."""
    mods = {}
    # Each module where that checkout has it (the package layout moved them).
    places = {
        "convs": ("collapse_jax/jaxtools/convs.py", "collapse_jax/convs.py"),
        "vae": ("collapse_jax/vae/model.py", "collapse_jax/vae.py"),
    }
    for name, paths in places.items():
        path = next((root / p for p in paths if (root / p).is_file()), root / paths[-1])
        spec = importlib.util.spec_from_file_location(f"old_{name}", path)
        mods[name] = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mods[name]
        spec.loader.exec_module(mods[name])
    mods["vae"].convs = mods["convs"]  # its functions look `convs` up when traced
    mods["convs"].IMPL = "auto"
    return mods["vae"]


def _old_step(module, cfg, params):
    """(optimizer state, a newly jitted step) of another checkout's vae module, through the
    names that checkout has (before `make_train_step`, its step and optimizer were private)."""
    if hasattr(module, "make_train_step"):
        return [params, module.init_optimizer(params, cfg)], module.make_train_step(cfg)
    opt_state = module._optimizer(cfg.learning_rate, cfg.weight_decay).init(params)
    kw = dict(arch=module._arch(cfg), lr=cfg.learning_rate, wd=cfg.weight_decay)
    step = jax.jit(functools.partial(module._train_step.__wrapped__, **kw), donate_argnums=(0, 1))
    return [params, opt_state], step


def _jax_epoch(module, method: str | None, images, batch: int):
    """An epoch function for `module` (a vae module); `method` forces convs.IMPL while the
    step is traced (the first call), so each variant keeps its own compiled step."""
    cfg = module.VAEConfig(batch_size=batch, epochs=1)
    params = module.init_params(jax.random.key(0))
    if module is vae:
        state = [params, vae.init_optimizer(params, cfg)]
        step = vae.make_train_step(cfg)  # a program of its own per variant
    else:
        state, step = _old_step(module, cfg, params)
    x = jax.device_put(images)
    mask = jax.numpy.ones(batch, np.float32)
    count = [0]

    def epoch():
        count[0] += 1
        key = jax.random.key(count[0])
        for i, lo in enumerate(range(0, len(images), batch)):
            p, o, loss = step(*state, x[lo : lo + batch], mask, jax.random.fold_in(key, i))
            state[:] = [p, o]
        jax.block_until_ready(loss)

    if method is None:
        epoch()
    else:
        saved, convs.IMPL = convs.IMPL, method
        try:
            epoch()
        finally:
            convs.IMPL = saved
    return epoch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--old", type=pathlib.Path, default=None)
    args = ap.parse_args()

    import torch

    data_dir = pathlib.Path(os.environ.get("COLLAPSE_JAX_DATA", "../shared/data")) / "mnist"
    images = mnist.load_mnist(data_dir, "train")[0][: args.images]
    device = jax.devices()[0]
    dev = "cpu" if device.platform == "cpu" else "gpu"

    epochs = {}
    compile_s = {}
    variants = [("cpu", vae, "cpu"), ("lax", vae, "lax")]
    if args.old is not None:
        variants.append(("old", _load_old(args.old), None))
    for name, module, method in variants:
        t = time.perf_counter()
        epochs[name] = _jax_epoch(module, method, images, args.batch)
        compile_s[name] = time.perf_counter() - t

    torch.manual_seed(0)
    model = baselines.torch_vae()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    xt = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]

    def torch_epoch():
        perm = torch.randperm(len(xt))
        for lo in range(0, len(xt), args.batch):
            opt.zero_grad()
            loss = model(xt[perm[lo : lo + args.batch]])
            loss.backward()
            opt.step()

    torch_epoch()
    epochs["torch"] = torch_epoch

    times = {name: [] for name in epochs}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name, fn in epochs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        load.append(os.getloadavg()[0])
    rate = {n: {"min": args.images / max(t), "median": args.images / statistics.median(t)}
            for n, t in times.items()}  # fmt: skip
    rate = {n: {k: round(v, 1) for k, v in r.items()} for n, r in rate.items()}
    out = {
        "name": "vae_train_conv_ab",
        "note": (
            f"one process, {args.rounds} interleaved rounds of one epoch per variant "
            f"({args.images} MNIST images, batch {args.batch}); images/s from the median and the "
            f"slowest round; 1-minute load average {min(load):.1f}-{max(load):.1f} on "
            f"{os.cpu_count()} cores during the rounds (other jobs shared the machine)"
        ),
        "device": dev,
        "torch_threads": torch.get_num_threads(),
        "compile_and_first_epoch_s": {n: round(v, 2) for n, v in compile_s.items()},
        "images_per_s": rate,
        "ratio_vs_torch_median": {
            n: round(r["median"] / rate["torch"]["median"], 2) for n, r in rate.items()
        },
        "ratio_vs_torch_per_round_median": {
            n: round(statistics.median(a / b for a, b in zip(times["torch"], t)), 2)
            for n, t in times.items()
        },
    }
    path = pathlib.Path(__file__).parent / "results" / f"vae_conv_ab-{dev}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""VAE training throughput (images/s) on CPU: our Flax VAE vs the same network in PyTorch.

The paper's network (conv 64/128, latent 20) and optimiser (Adam 1e-3, weight decay 1e-5), batch
256, on real MNIST images. JAX: one jitted epoch (`lax.scan` over batches, `vae._train_epoch`);
PyTorch (the paper's notebook framework): the usual eager loop over the same batches. Both in
this process, one after the other.

Writes `benchmarks/results/vae-<device>.json` (name, device, config, compile_s, median_ms per
epoch, throughput in images/s, ratio = JAX / PyTorch).

    COLLAPSE_JAX_DATA=../shared/data python benchmarks/bench_vae.py [--images 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

import jax
import numpy as np

from collapse_jax import bench

torch_vae = bench.torch_vae


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from collapse_jax import mnist, vae

    data_dir = pathlib.Path(os.environ.get("COLLAPSE_JAX_DATA", "../shared/data")) / "mnist"
    images = mnist.load_mnist(data_dir, "train")[0][: args.images]
    cfg = vae.VAEConfig(batch_size=args.batch, epochs=1)
    device = jax.devices()[0]
    dev = "cpu" if device.platform == "cpu" else str(device.device_kind)
    config = {
        "images": args.images,
        "batch": args.batch,
        "latent": 20,
        "channels": [64, 128],
        "optimizer": "Adam 1e-3, weight decay 1e-5",
        "dtype": "float32",
        "torch_threads": torch.get_num_threads(),
    }
    results = []

    # JAX: one jitted epoch per call.
    params = vae.init_params(jax.random.key(0))
    opt_state = vae._optimizer(cfg.learning_rate, cfg.weight_decay).init(params)
    x = jax.device_put(images)
    kw = dict(
        arch=vae._arch(cfg), batch_size=cfg.batch_size, lr=cfg.learning_rate, wd=cfg.weight_decay
    )
    t0 = time.perf_counter()
    params, opt_state, loss = vae._train_epoch(params, opt_state, x, jax.random.key(1), **kw)
    jax.block_until_ready(loss)
    first = time.perf_counter() - t0
    times = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        params, opt_state, loss = vae._train_epoch(params, opt_state, x, jax.random.key(r), **kw)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    jax_med = statistics.median(times)
    jax_tp = args.images / jax_med

    # PyTorch: the same network, optimiser and batches, eager.
    torch.manual_seed(0)
    model = torch_vae()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    xt = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]

    def torch_epoch():
        perm = torch.randperm(len(xt))
        for lo in range(0, len(xt), args.batch):
            opt.zero_grad()
            loss = model(xt[perm[lo : lo + args.batch]])
            loss.backward()
            opt.step()

    t0 = time.perf_counter()
    torch_epoch()
    t_first = time.perf_counter() - t0
    t_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        torch_epoch()
        t_times.append(time.perf_counter() - t0)
    torch_med = statistics.median(t_times)
    torch_tp = args.images / torch_med

    results.append(
        {
            "name": "vae_train_jax",
            "device": dev,
            "config": config,
            "compile_s": round(max(first - jax_med, 0.0), 2),
            "median_ms": round(1000 * jax_med, 1),
            "throughput": round(jax_tp, 1),
            "ratio": round(jax_tp / torch_tp, 2),
        }
    )
    results.append(
        {
            "name": "vae_train_torch",
            "device": "cpu",
            "config": config,
            "compile_s": round(max(t_first - torch_med, 0.0), 2),
            "median_ms": round(1000 * torch_med, 1),
            "throughput": round(torch_tp, 1),
            "ratio": 1.0,
        }
    )
    out = pathlib.Path(__file__).parent / "results" / f"vae-{'cpu' if dev == 'cpu' else 'gpu'}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    for r in results:
        print(
            json.dumps({k: r[k] for k in ("name", "compile_s", "median_ms", "throughput", "ratio")})
        )


if __name__ == "__main__":
    main()

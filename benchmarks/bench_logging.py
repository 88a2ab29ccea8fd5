"""What per-step logging costs the VAE's training loop (images/s of `vae.model.train`).

Variants, timed in this process one epoch each per round, interleaved:

- `before` (with `--old DIR`): another checkout's `train` (e.g. main before metrics.jsonl);
- `off`: this checkout's `train` without a step log (what a Python caller gets);
- `every10`, `every1`: with a `rundir.events.StepLog` writing metrics.jsonl every 10 steps (the
  default) and every step (the worst case: one host fetch, one step late, per step).

Writes `benchmarks/results/logging_overhead-<device>.json`.

    COLLAPSE_JAX_DATA=../shared/data python benchmarks/bench_logging.py [--images 512]
        [--batch 64] [--rounds 5] [--old /path/to/old/checkout]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
import types

import jax

from collapse_jax.rundir import events
from collapse_jax.vae import mnist
from collapse_jax.vae import model as vae


def _load_old(root: pathlib.Path):
    """Another checkout's collapse_jax.vae.model, imported from that checkout (its package on
    sys.path in a subprocess would be cleaner; this process holds only one collapse_jax)."""
    spec = importlib.util.spec_from_file_location(
        "old_vae_model", root / "collapse_jax/vae/model.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--old", type=pathlib.Path, default=None)
    args = ap.parse_args()
    data_dir = pathlib.Path(os.environ.get("COLLAPSE_JAX_DATA", "../shared/data")) / "mnist"
    images = mnist.load_mnist(data_dir, "train")[0][: args.images]
    cfg = vae.VAEConfig(batch_size=args.batch, epochs=1)
    init = vae.init_params(jax.random.key(0))

    def fresh():  # train donates its parameters
        return jax.tree.map(jax.numpy.copy, init)

    tmp = pathlib.Path(tempfile.mkdtemp())

    def log(every: int) -> events.StepLog:
        settings = types.SimpleNamespace(every_steps=every)
        return events.EventLog(tmp, settings).scope(0, 0, progress=False)

    variants = {
        "off": lambda: vae.train(jax.random.key(1), images, fresh(), cfg),
        "every10": lambda: vae.train(jax.random.key(1), images, fresh(), cfg, log=log(10)),
        "every1": lambda: vae.train(jax.random.key(1), images, fresh(), cfg, log=log(1)),
    }
    if args.old is not None:
        old = _load_old(args.old)
        ocfg = old.VAEConfig(batch_size=args.batch, epochs=1)
        variants["before"] = lambda: old.train(jax.random.key(1), images, fresh(), ocfg)
    first = {}
    for name, fn in variants.items():
        t = time.perf_counter()
        jax.block_until_ready(fn()[0])
        first[name] = round(time.perf_counter() - t, 2)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t = time.perf_counter()
            jax.block_until_ready(fn()[0])
            times[name].append(time.perf_counter() - t)
    rate = {
        name: {
            "min": round(len(images) / max(ts), 1),
            "median": round(len(images) / statistics.median(ts), 1),
        }
        for name, ts in times.items()
    }
    device = "cpu" if jax.devices()[0].platform == "cpu" else "gpu"
    out = {
        "name": "logging_overhead",
        "note": (
            f"one process, {args.rounds} interleaved rounds of one epoch per variant "
            f"({len(images)} MNIST images, batch {args.batch}, the paper's network: "
            f"{-(-len(images) // args.batch)} steps); images/s from the median and the slowest "
            f"round; 1-minute load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        ),
        "device": device,
        "compile_and_first_epoch_s": first,
        "images_per_s": rate,
        "ratio_vs_off_median": {
            k: round(v["median"] / rate["off"]["median"], 3) for k, v in rate.items()
        },
    }
    path = pathlib.Path(__file__).parent / "results" / f"logging_overhead-{device}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

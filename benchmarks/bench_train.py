"""Training throughput and MFU of collapse-jax's train step vs a transformers PyTorch step.

Both sides train the same OPT (same random weights, converted with `lm.families.state_from_hf`)
on the same batch of token blocks with AdamW (lr 2e-5, weight decay 0.01, the paper's settings),
dropout 0.1 in training mode, fp32, in one process on whatever CPU (or accelerator, for JAX) is
present. The JAX side is exactly what `finetune` runs (`train.prepare_training`: jitted step with
explicit shardings, donated state); the torch side is `loss = model(ids, labels=ids).loss;
loss.backward(); opt.step(); opt.zero_grad()`. Steps alternate between the two so that contention
from other processes on a shared machine hits both alike. The median step time is reported.

MFU convention (PaLM appendix B, also NOTES.md): training FLOPs per token
    6 * N + 12 * L * D * T
with N the parameters that take part in matmuls (all decoder weights plus the token embedding,
which is also the tied LM head; positional embeddings excluded), L layers, D hidden size,
T = block length (attention scores and values, forward + backward). The peak is the measured
fp32 matmul throughput of this machine (a 2048^3 `jnp.dot`, best of 5), since a shared CPU has no
meaningful datasheet peak; on a GPU pass --peak-tflops.

Writes `benchmarks/results/train-<device>.json`: one object per measurement (name, device,
config, compile_s, median_ms, throughput in tokens/s, mfu, ratio = JAX tokens/s / torch tokens/s).

Usage: python benchmarks/bench_train.py [--layers 2] [--batch 8] [--length 64] [--steps 5]
       [--peak-tflops X] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from collapse_jax.bench import harness  # noqa: E402
from collapse_jax.bench import lm as bench_lm  # noqa: E402
from collapse_jax.jaxtools import sharding  # noqa: E402
from collapse_jax.lm import data as data_lib  # noqa: E402
from collapse_jax.lm import (
    train,  # noqa: E402
)
from collapse_jax.lm.families import state_from_hf  # noqa: E402
from collapse_jax.lm.opt import OPTConfig, OPTForCausalLM  # noqa: E402
from collapse_jax.lm.train_config import TrainConfig  # noqa: E402

measured_peak_flops = harness.measured_matmul_flops  # fp32 2048^3, best of 5
flops_per_token = bench_lm.opt_flops_per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="12 = the real OPT-125m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per framework")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()

    base = OPTConfig.opt_125m()
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    cfg = OPTConfig(**{**fields, "num_hidden_layers": args.layers, "dropout": 0.1})
    torch.manual_seed(0)
    hf = transformers.OPTForCausalLM(transformers.OPTConfig(**cfg.to_hf_dict()))
    hf.train()
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: OPTForCausalLM(cfg, rngs=nnx.Rngs(0))))
    model = nnx.merge(graphdef, state_from_hf(cfg, tensors))

    params = nnx.state(model, nnx.Param)
    n_all = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    n_pos = int(np.prod(params["model"]["decoder"]["embed_positions"]["embedding"].shape))
    n_matmul = n_all - n_pos
    tokens = args.batch * args.length
    fpt = flops_per_token(cfg, n_matmul, args.length)
    device = jax.devices()[0]
    kind = device.platform if device.platform != "cpu" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else measured_peak_flops()

    rng = np.random.default_rng(0)
    blocks = rng.integers(3, cfg.vocab_size, size=(args.batch, args.length)).astype(np.int32)
    blocks[:, 0] = 2

    # JAX: exactly finetune's step.
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    config = TrainConfig(epochs=1, batch_size=args.batch, learning_rate=2e-5)
    t0 = time.perf_counter()
    prep = train.prepare_training(model, config, mesh=mesh, steps_per_epoch=1_000_000)
    batch = data_lib.global_batch(blocks, np.arange(args.batch), prep.batch)
    key = jax.random.key(0)
    state = prep.state
    state, metrics = prep.step(state, prep.rest, batch, key, prep.hparams)
    jax.block_until_ready(metrics)
    jax_compile_s = time.perf_counter() - t0

    # torch: AdamW with the same settings (torch's default betas / eps, weight decay 0.01).
    ids_t = torch.as_tensor(blocks, dtype=torch.long)
    opt = torch.optim.AdamW(hf.parameters(), lr=2e-5, weight_decay=0.01)

    def torch_step() -> float:
        loss = hf(input_ids=ids_t, labels=ids_t).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    t0 = time.perf_counter()
    torch_step()
    torch_first_s = time.perf_counter() - t0

    jax_times, torch_times = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, metrics = prep.step(state, prep.rest, batch, key, prep.hparams)
        jax.block_until_ready(metrics)
        jax_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        torch_step()
        torch_times.append(time.perf_counter() - t)

    if not args.peak_tflops:  # contention varies: keep the best peak seen before and after
        peak = max(peak, measured_peak_flops())
    jax_ms = statistics.median(jax_times) * 1e3
    torch_ms = statistics.median(torch_times) * 1e3
    jax_tps = tokens / (jax_ms / 1e3)
    torch_tps = tokens / (torch_ms / 1e3)
    conf = {
        "layers": args.layers,
        "hidden": cfg.hidden_size,
        "vocab": cfg.vocab_size,
        "batch": args.batch,
        "length": args.length,
        "params": n_all,
        "matmul_params": n_matmul,
        "flops_per_token": fpt,
        "peak_flops": peak,
        "peak": "given" if args.peak_tflops else "measured fp32 matmul 2048^3",
        "dtype": "float32",
        "dropout": 0.1,
        "optimizer": "AdamW lr 2e-5 wd 0.01",
        "torch_threads": torch.get_num_threads(),
        "steps": args.steps,
    }
    results = [
        {
            "name": "train_step_jax",
            "device": str(device.device_kind),
            "config": conf,
            "compile_s": round(jax_compile_s, 3),
            "median_ms": round(jax_ms, 2),
            "throughput": round(jax_tps, 1),
            "mfu": round(jax_tps * fpt / peak, 4),
            "ratio": round(jax_tps / torch_tps, 3),
        },
        {
            "name": "train_step_torch",
            "device": "cpu",
            "config": conf,
            "compile_s": round(torch_first_s, 3),
            "median_ms": round(torch_ms, 2),
            "throughput": round(torch_tps, 1),
            "mfu": round(torch_tps * fpt / peak, 4),
            "ratio": 1.0,
        },
    ]
    out = args.out or pathlib.Path(__file__).parent / "results" / f"train-{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    for r in results:
        print(json.dumps({k: r[k] for k in ("name", "median_ms", "throughput", "mfu", "ratio")}))


if __name__ == "__main__":
    main()

"""Forward and beam-search throughput of the Llama-family port vs transformers' LlamaForCausalLM.

Same process, the same random weights on both sides (transformers draws them at SmolLM2-135M's
shape: width 576, GQA 9/3 heads, SwiGLU 1536, tied 49152-token head; `--layers` layers),
float32, on whatever CPU (or accelerator for JAX) is present. JAX and torch repeats are
interleaved so that contention from other processes on a shared machine hits both alike.

- forward: a jitted forward on `--batch` x `--length` tokens (tokens/s);
- beam: `decode.generate` vs transformers' `generate`, the paper's beam search (5 beams,
  repetition penalty 3.0, exactly `--new` new tokens) on `--prompts` prompts of `--length`
  tokens (new tokens/s), with the fraction of prompts whose outputs are identical.

Writes `benchmarks/results/llama-<backend>.json` (a list of rows; `ratio` = torch time / JAX
time, so > 1 means JAX is faster).

Usage: python benchmarks/bench_llama.py [--layers 2] [--batch 8] [--length 64] [--prompts 4]
       [--new 16] [--repeats 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
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

from collapse_jax.lm import decode, families  # noqa: E402
from collapse_jax.lm.llama import LlamaConfig  # noqa: E402

BEAM = dict(num_beams=5, repetition_penalty=3.0)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="30 = the real SmolLM2-135M")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()

    cfg = dataclasses.replace(LlamaConfig.smollm2_135m(), num_hidden_layers=args.layers)
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf_dict())
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    graphdef, _ = nnx.split(families.abstract_model(cfg))
    model = nnx.merge(graphdef, families.state_from_hf(cfg, tensors))

    rng = np.random.default_rng(0)
    ids = rng.integers(1, cfg.vocab_size, size=(args.batch, args.length)).astype(np.int32)
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    state = nnx.state(model)
    compile_forward = _timed(lambda: forward.lower(state, ids).compile())
    with torch.no_grad():
        ref = hf(ids_t).logits.numpy()
    diff = float(np.abs(np.asarray(forward(state, ids)) - ref).max())

    prompts = ids[: args.prompts]
    prompts_t = torch.as_tensor(prompts, dtype=torch.long)
    beam = dict(BEAM, max_new_tokens=args.new, min_new_tokens=args.new)
    compile_beam = _timed(lambda: decode.generate(model, prompts, **beam))  # compile + one run
    out: dict[str, np.ndarray] = {}

    def run_jax_forward():
        forward(state, ids).block_until_ready()

    def run_torch_forward():
        with torch.no_grad():
            hf(ids_t)

    def run_jax_beam():
        out["jax"] = decode.generate(model, prompts, **beam)

    def run_torch_beam():
        with torch.no_grad():
            out["torch"] = hf.generate(
                prompts_t, attention_mask=torch.ones_like(prompts_t), **beam
            ).numpy()

    cases = {
        "forward": (run_jax_forward, run_torch_forward, args.batch * args.length, compile_forward),
        "beam": (run_jax_beam, run_torch_beam, args.prompts * args.new, compile_beam),
    }
    device = jax.devices()[0].device_kind
    results = []
    for case, (run_jax, run_torch, tokens, compile_s) in cases.items():
        run_jax(), run_torch()  # warm-up
        times: dict[str, list[float]] = {"jax": [], "torch": []}
        for _ in range(args.repeats):
            times["jax"].append(_timed(run_jax))
            times["torch"].append(_timed(run_torch))
        wall = {k: statistics.median(v) for k, v in times.items()}
        config = {
            "model": f"SmolLM2-135M shape, {args.layers} layers, random weights",
            "batch": args.batch if case == "forward" else args.prompts,
            "length": args.length,
            "dtype": "float32",
            "repeats": args.repeats,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_avg_1min": os.getloadavg()[0],
            "max_abs_logit_diff": diff,
        }
        if case == "beam":
            config.update(BEAM, new_tokens=args.new)
            config["identical_fraction"] = float(np.mean(np.all(out["jax"] == out["torch"], 1)))
        for lib in ("jax", "torch"):
            results.append(
                {
                    "name": f"llama_{case}_{lib}",
                    "device": device if lib == "jax" else "cpu (torch)",
                    "config": config,
                    "compile_s": compile_s if lib == "jax" else 0.0,
                    "median_ms": 1e3 * wall[lib],
                    "throughput": tokens / wall[lib],
                    "ratio": wall["torch"] / wall[lib],
                }
            )
    path = args.out or (
        pathlib.Path(__file__).parent / "results" / f"llama-{jax.default_backend()}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    for r in results:
        print(
            f"{r['name']:22s} {r['median_ms']:9.1f} ms  {r['throughput']:9.1f} tok/s  "
            f"ratio {r['ratio']:.2f}"
        )
    print(f"max |logit diff| jax vs torch: {diff:.2e}; written to {path}")


if __name__ == "__main__":
    main()

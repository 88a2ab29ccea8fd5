"""Forward and beam-search throughput of every model family (`lm.families`) vs transformers.

For each registered family: its small released model's defaults (`bench.lm.model_config`, e.g.
GPT-2 124M's width) with `--layers` layers, random weights shared by both sides (transformers
draws them, `families.state_from_hf` converts them), float32, one process, on whatever CPU is
present. Two rows per family, JAX and torch repeats interleaved so that contention on a shared
machine hits both alike:

- forward: a jitted forward on `--batch` x `--length` tokens (tokens/s);
- beam: `decode.generate` vs transformers' `generate`, the paper's beam search (5 beams,
  repetition penalty 3.0, exactly `--new` new tokens) on `--prompts` prompts of `--length`
  tokens (new tokens/s), with the fraction of prompts whose tokens are identical.

Writes `benchmarks/results/families-<device>.json` (a list of rows; `ratio` = JAX / torch).

Usage: python benchmarks/bench_families.py [--layers 2] [--batch 8] [--length 64] [--prompts 4]
       [--new 16] [--repeats 3] [--families opt,gpt2] [--out PATH]
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

from collapse_jax.bench import lm as bench_lm  # noqa: E402
from collapse_jax.lm import decode, families  # noqa: E402

BEAM = dict(num_beams=5, repetition_penalty=3.0)


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_family(name: str, args) -> list[dict]:
    cfg = bench_lm.model_config(name, args.layers, dropout=0.0)
    model, hf = bench_lm.opt_pair(cfg, with_torch=True)
    hf.eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, size=(args.batch, args.length)).astype(np.int32)
    ids_t = torch.as_tensor(ids, dtype=torch.long)

    forward = jax.jit(lambda m, x: m(x))
    jax.block_until_ready(forward(model, ids))  # compile

    def jax_forward():
        jax.block_until_ready(forward(model, ids))

    def torch_forward():
        with torch.no_grad():
            hf(input_ids=ids_t)

    jax_s, torch_s = [], []
    for _ in range(args.repeats):  # interleaved
        jax_s.append(_median(jax_forward, 1))
        torch_s.append(_median(torch_forward, 1))
    tokens = args.batch * args.length
    label = bench_lm.model_name(cfg, "125m")
    rows = [
        dict(
            family=name,
            name="forward",
            model=label,
            shape=[args.batch, args.length],
            jax_tokens_per_s=tokens / statistics.median(jax_s),
            torch_tokens_per_s=tokens / statistics.median(torch_s),
        )
    ]

    prompts = ids[: args.prompts]
    prompts_t = torch.as_tensor(prompts, dtype=torch.long)
    kw = dict(BEAM, max_new_tokens=args.new, min_new_tokens=args.new)
    out: dict = {}

    def jax_beam():
        out["jax"] = decode.generate(model, prompts, **kw)

    def torch_beam():
        with torch.no_grad():
            out["torch"] = hf.generate(
                prompts_t, attention_mask=torch.ones_like(prompts_t), **kw
            ).numpy()

    jax_beam()  # compile
    jax_s, torch_s = [], []
    for _ in range(args.repeats):
        jax_s.append(_median(jax_beam, 1))
        torch_s.append(_median(torch_beam, 1))
    new = args.prompts * args.new
    rows.append(
        dict(
            family=name,
            name="beam",
            model=label,
            prompts=args.prompts,
            prompt_length=args.length,
            new_tokens=args.new,
            **BEAM,
            jax_new_tokens_per_s=new / statistics.median(jax_s),
            torch_new_tokens_per_s=new / statistics.median(torch_s),
            identical_to_transformers=float(np.mean(np.all(out["jax"] == out["torch"], axis=1))),
        )
    )
    for r in rows:
        jax_rate = r.get("jax_tokens_per_s") or r["jax_new_tokens_per_s"]
        torch_rate = r.get("torch_tokens_per_s") or r["torch_new_tokens_per_s"]
        r["ratio"] = jax_rate / torch_rate
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--families", default=",".join(f.name for f in families.FAMILIES))
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    device = jax.devices()[0].platform
    rows = []
    for name in args.families.split(","):
        for r in bench_family(name, args):
            r.update(device=device, layers=args.layers, repeats=args.repeats)
            print(json.dumps(r), flush=True)
            rows.append(r)
    out = pathlib.Path(args.out or f"benchmarks/results/families-{device}.json")
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

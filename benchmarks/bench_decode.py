"""New tokens/s of the paper's regeneration beam search: collapse-jax vs transformers' generate.

The paper's setting: full 64-token prompts (no padding), `num_beams=5, max_new_tokens=64,
min_new_tokens=64, repetition_penalty=3.0`, fp32, on random OPT-125m weights (same weights in
both frameworks, converted in memory). Both run in this process on the same CPU, repeats
interleaved so that contention from other processes hits both alike. The JAX compile time is
reported separately (first call minus a steady call). Also checks that the tokens agree.

Writes one JSON object per measurement to `benchmarks/results/decode-<device>.json`:
name, device, config, compile_s, median_ms (one `generate` call on the batch), throughput (new
tokens/s), ratio (JAX throughput / transformers throughput).

Usage: python benchmarks/bench_decode.py [--batch 4] [--repeats 2] [--layers 12] [--new 64]
       [--torch-threads N] [--out PATH]
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

from collapse_jax.lm import decode, opt  # noqa: E402
from collapse_jax.lm.opt import OPTConfig, OPTForCausalLM  # noqa: E402


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="prompts per generate call")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12, help="12 = the real OPT-125m")
    parser.add_argument("--new", type=int, default=64, help="max_new_tokens = min_new_tokens")
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch intra-op threads (0 = torch's default); 1 is faster on an oversubscribed CPU",
    )
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    base = OPTConfig.opt_125m()
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    cfg = OPTConfig(**{**fields, "num_hidden_layers": args.layers, "dropout": 0.0})
    torch.manual_seed(0)
    hf = transformers.OPTForCausalLM(transformers.OPTConfig(**cfg.to_hf_dict())).eval()
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: OPTForCausalLM(cfg, rngs=nnx.Rngs(0))))
    model = nnx.merge(graphdef, opt.state_from_hf(cfg, tensors))

    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, size=(args.batch, 64)).astype(np.int32)
    ids[:, 0] = 2
    kw = dict(
        num_beams=args.beams,
        max_new_tokens=args.new,
        min_new_tokens=args.new,
        repetition_penalty=3.0,
    )
    ids_t = torch.as_tensor(ids, dtype=torch.long)

    def run_hf():
        with torch.no_grad():
            return hf.generate(ids_t, attention_mask=torch.ones_like(ids_t), **kw).numpy()

    def run_jax():
        return decode.generate(model, ids, **kw)

    first, got = _timed(run_jax)
    jax_times, hf_times = [], []
    for _ in range(args.repeats):
        t, ref = _timed(run_hf)
        hf_times.append(t)
        t, got = _timed(run_jax)
        jax_times.append(t)
    new_tokens = args.batch * args.new
    match = float(np.mean(np.all(got == ref, axis=1)))
    device = jax.devices()[0].platform
    config = dict(
        model=f"opt-125m-shaped ({args.layers} layers), random weights, fp32",
        batch=args.batch,
        prompt_length=64,
        threads_torch=torch.get_num_threads(),
        identical_sequences=match,
        **kw,
    )
    hf_med, jax_med = statistics.median(hf_times), statistics.median(jax_times)
    results = [
        dict(
            name="decode_beam_transformers",
            device="cpu",
            config=config,
            compile_s=0.0,
            median_ms=1e3 * hf_med,
            throughput=new_tokens / hf_med,
            ratio=1.0,
        ),
        dict(
            name="decode_beam_collapse_jax",
            device=device,
            config=config,
            compile_s=max(first - jax_med, 0.0),
            median_ms=1e3 * jax_med,
            throughput=new_tokens / jax_med,
            ratio=hf_med / jax_med,
        ),
    ]
    out = args.out or pathlib.Path(__file__).parent / "results" / f"decode-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    for r in results:
        print(
            json.dumps({k: r[k] for k in ("name", "compile_s", "median_ms", "throughput", "ratio")})
        )
    print(f"identical sequences: {match:.2f}; written to {out}")


if __name__ == "__main__":
    main()

"""Forward and forward+backward throughput of the Flax OPT port vs transformers' PyTorch OPT.

Same process, same random OPT-125m weights, batch 16 x 64 tokens, float32, on whatever CPU (or
accelerator for JAX) is present. JAX and torch repeats are interleaved so that contention from
other processes on a shared machine hits both alike. Writes one JSON object per measurement to
`benchmarks/results/opt_forward-<device>.json`; `ratio` is JAX tokens/s over torch tokens/s.

Usage: python benchmarks/bench_opt_forward.py [--repeats 3] [--batch 16] [--length 64]
       [--layers 12] [--out PATH]
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from collapse_jax.lm import (
    families,  # noqa: E402
)
from collapse_jax.lm.opt import OPTConfig, OPTForCausalLM  # noqa: E402


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _timed_both(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds): CPU time is less sensitive to other processes."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--layers", type=int, default=12, help="12 = the real OPT-125m")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()

    cfg = OPTConfig.opt_125m()
    cfg = OPTConfig(
        **{
            **{f: getattr(cfg, f) for f in cfg.__dataclass_fields__},
            "num_hidden_layers": args.layers,
            "dropout": 0.0,
        }
    )
    torch.manual_seed(0)
    hf = transformers.OPTForCausalLM(transformers.OPTConfig(**cfg.to_hf_dict())).eval()
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: OPTForCausalLM(cfg, rngs=nnx.Rngs(0))))
    state = families.state_from_hf(cfg, tensors)

    rng = np.random.default_rng(0)
    ids_np = rng.integers(3, cfg.vocab_size, size=(args.batch, args.length)).astype(np.int32)
    ids_np[:, 0] = 2
    mask_np = np.ones_like(ids_np)
    ids, mask = jnp.asarray(ids_np), jnp.asarray(mask_np)
    ids_t, mask_t = torch.as_tensor(ids_np, dtype=torch.long), torch.as_tensor(mask_np)
    tokens = args.batch * args.length

    def loss_fn(state, ids, mask):
        # Mean next-token cross-entropy, as transformers' labels= loss (logsumexp - target logit:
        # XLA fuses it without materialising log-probabilities).
        logits = nnx.merge(graphdef, state)(ids, mask)[:, :-1]  # [B, T-1, V]
        target = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target)

    jax_fwd = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))
    jax_fwd_bwd = jax.jit(jax.value_and_grad(loss_fn))

    def run_jax_fwd():
        jax_fwd(state, ids, mask).block_until_ready()

    def run_jax_fwd_bwd():
        jax.block_until_ready(jax_fwd_bwd(state, ids, mask))

    def run_torch_fwd():
        with torch.no_grad():
            hf(input_ids=ids_t, attention_mask=mask_t)

    def run_torch_fwd_bwd():
        hf.zero_grad(set_to_none=True)
        hf(input_ids=ids_t, attention_mask=mask_t, labels=ids_t).loss.backward()

    # Compile times first (a later call would hit the cache), then the same numbers on both sides.
    compile_s = {
        "forward": _timed(lambda: jax_fwd.lower(state, ids, mask).compile()),
        "forward_backward": _timed(lambda: jax_fwd_bwd.lower(state, ids, mask).compile()),
    }
    with torch.no_grad():
        ref = hf(input_ids=ids_t, attention_mask=mask_t).logits.numpy()
    diff = float(np.abs(np.asarray(jax_fwd(state, ids, mask)) - ref).max())

    cases = {
        "forward": (run_jax_fwd, run_torch_fwd),
        "forward_backward": (run_jax_fwd_bwd, run_torch_fwd_bwd),
    }
    device = jax.devices()[0].device_kind
    results = []
    for case, (run_jax, run_torch) in cases.items():
        run_jax(), run_torch()  # warm-up (compile, allocator, oneDNN primitive caches)
        times = {"jax": [], "torch": []}
        for _ in range(args.repeats):
            times["jax"].append(_timed_both(run_jax))
            times["torch"].append(_timed_both(run_torch))
        wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
        cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
        config = {
            "model": f"opt-125m ({args.layers} layers)",
            "batch": args.batch,
            "length": args.length,
            "dtype": "float32",
            "repeats": args.repeats,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_avg_1min": os.getloadavg()[0],
            "max_abs_logit_diff": diff,
        }
        for lib in ("jax", "torch"):
            results.append(
                {
                    "name": f"opt_{case}_{lib}",
                    "device": device if lib == "jax" else "cpu (torch)",
                    "config": config,
                    "compile_s": compile_s[case] if lib == "jax" else 0.0,
                    "median_ms": 1e3 * wall[lib],
                    "median_cpu_ms": 1e3 * cpu[lib],
                    "throughput": tokens / wall[lib],
                    "ratio": wall["torch"] / wall[lib],
                    "cpu_time_ratio": cpu["torch"] / cpu[lib],
                }
            )
    out = args.out or (
        pathlib.Path(__file__).parent / "results" / f"opt_forward-{jax.default_backend()}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for r in results:
        print(
            f"{r['name']:28s} {r['median_ms']:9.1f} ms  {r['throughput']:9.0f} tok/s  "
            f"ratio {r['ratio']:.2f}  (CPU time {r['median_cpu_ms']:9.1f} ms, "
            f"ratio {r['cpu_time_ratio']:.2f})"
        )
    print(f"max |logit diff| jax vs torch: {diff:.2e}; written to {out}")


if __name__ == "__main__":
    main()

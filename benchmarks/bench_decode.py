"""New tokens/s of the paper's regeneration beam search: collapse-jax vs transformers' generate.

The paper's setting: full 64-token prompts (no padding), `num_beams=5, max_new_tokens=64,
min_new_tokens=64, repetition_penalty=3.0`, fp32, on random OPT-125m weights (same weights in
both frameworks, converted in memory). Both run in this process on the same CPU, repeats
interleaved so that contention from other processes hits both alike. The JAX compile time is
reported separately (first call minus a steady call). Also checks that the tokens agree.

`--old` also times the decoder as it was before issue 9 (`OldOPTBeamDecoder` below, a frozen
copy that re-implemented the OPT forward step by step; it lives only in this file) through the
same search loop, interleaved with the others: ratio_to_old > 1 means today's decoder (the
model's own forward with `lm.cache.PromptSharingCache`) is faster.

Writes one JSON object per measurement to `benchmarks/results/decode-<device>.json`:
name, device, config, compile_s, median_ms (one `generate` call on the batch), throughput (new
tokens/s), ratio (JAX throughput / transformers throughput).

Usage: python benchmarks/bench_decode.py [--batch 4] [--repeats 2] [--layers 12] [--new 64]
       [--torch-threads N] [--old] [--no-hf] [--cost] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from collapse_jax.lm import (  # noqa: E402
    decode,
    families,  # noqa: E402
    opt,
    search,
)
from collapse_jax.lm.opt import OPTConfig, OPTForCausalLM  # noqa: E402

Array = jax.Array
COST_KEYS = ("flops", "transcendentals", "bytes accessed")
# The OPT activations as the old decoder had them (`OPTConfig.activation_function` names).
_OLD_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}


# The decoder before issue 9, verbatim but for the names of the modules it reaches into. Kept only
# here, to measure that the refactor (one OPT forward, the cache as an object) did not cost speed.
class OldOPTBeamDecoder:
    """Decoding steps of the Flax OPT with a beam-aware KV cache (no cache reordering).

    The generic `SlotCacheDecoder` keeps one cache row per beam holding prompt + generated
    tokens and gathers the whole cache every step when beams are reordered, then attends over
    all of it: three passes over [L, B*K, P+L, D] per step. Here, since the K rows of a prompt
    share its prompt, the prompt's keys/values are stored once per prompt ([L, B, P, N, H], from
    the model's own cached forward), and generated keys/values go to a separate
    [L, B*K, L_new, N, H] buffer where row r's token i is written at (r, i) and never moved.
    A small ancestry table `src [R, L_new]` says which buffer row holds token j of beam r;
    reordering beams gathers only that table, and attention reads each generated key through it.
    Per step the cache traffic drops from 3 (B*K)(P+L) to B*P + B*K*L rows of keys and values.

    The layer arithmetic is the model's own modules (`q_proj`, LayerNorms, `fc1`, ... and the
    pre/post-LayerNorm switch of `OPTDecoderLayer`); only the attention over the split cache is
    spelled out (HF numerics: q scaled before the dot product, fp32 softmax, masked logits at the
    dtype's minimum). Parity with transformers is tested through `generate`.
    """

    def __init__(self, model: Any, *, reorders: bool = True):
        """`reorders=False` (greedy/sampling: rows never change places) attends row-locally;
        with beams the ancestry one-hot costs n^2 per prompt, fine for beam counts."""
        self.model = model
        self.reorders = reorders

    def prefill(self, input_ids: Array, attention_mask: Array, n: int, max_new_tokens: int):
        model = self.model
        b, p = input_ids.shape
        mask = attention_mask.astype(jnp.int32)
        cache = model.init_cache(b, p)
        if p > 1:  # see SlotCacheDecoder.prefill: the unused logits are dead code
            _, cache = model(input_ids[:, : p - 1], attention_mask=mask, cache=cache)
        logits, cache = model(input_ids[:, p - 1 :], attention_mask=mask, cache=cache)
        r = b * n
        layers, _, _, heads, head_dim = cache.key.shape
        gen_shape = (layers, r, max_new_tokens, heads, head_dim)
        state = dict(
            prompt_k=cache.key,  # [L, B, P, N, H]
            prompt_v=cache.value,
            prompt_mask=attention_mask != 0,  # [B, P]
            # HF positions: cumsum(mask) * mask - 1, so new token i sits at n_valid + i.
            n_valid=jnp.sum(mask, axis=1).astype(jnp.int32),  # [B]
            gen_k=jnp.zeros(gen_shape, cache.key.dtype),  # [L, R, L_new, N, H]
            gen_v=jnp.zeros(gen_shape, cache.value.dtype),
            src=jnp.zeros((r, max_new_tokens), jnp.int32),  # [R, L_new]
        )
        rows = jnp.repeat(jnp.arange(b), n)
        return logits[:, -1, :].astype(jnp.float32)[rows], state

    def reorder(self, state, rows: Array):
        return {**state, "src": state["src"][rows]}

    def step(self, state, tokens: Array, i: Array):
        model = self.model
        decoder = model.model.decoder
        b, p = state["prompt_mask"].shape
        r, big_l = state["src"].shape
        n = r // b
        src = jax.lax.dynamic_update_slice_in_dim(
            state["src"], jnp.arange(r, dtype=jnp.int32)[:, None], i, axis=1
        )
        positions = jnp.repeat(state["n_valid"], n)[:, None] + i  # [R, 1]

        x = decoder.embed_tokens(tokens[:, None])  # [R, 1, E]
        if decoder.project_in is not None:
            x = decoder.project_in(x)  # [R, 1, D]
        x = x + decoder.embed_positions(positions + opt.POSITION_OFFSET)
        gen_k, gen_v = state["gen_k"], state["gen_v"]
        for layer_idx, layer in enumerate(decoder.layers):
            residual = x
            if layer.pre_ln:
                x = layer.self_attn_layer_norm(x)
            attn = layer.self_attn
            q = attn.q_proj(x) * jnp.asarray(attn.scaling, x.dtype)  # [R, 1, N, H]
            k, v = attn.k_proj(x), attn.v_proj(x)  # [R, 1, N, H]
            start = (layer_idx, 0, i, 0, 0)
            gen_k = jax.lax.dynamic_update_slice(gen_k, k[None].astype(gen_k.dtype), start)
            gen_v = jax.lax.dynamic_update_slice(gen_v, v[None].astype(gen_v.dtype), start)
            x = attn.out_proj(
                self._attend(
                    q[:, 0],
                    state["prompt_k"][layer_idx],
                    state["prompt_v"][layer_idx],
                    gen_k[layer_idx],
                    gen_v[layer_idx],
                    state["prompt_mask"],
                    src if self.reorders else None,
                    i,
                )[:, None]
            )  # [R, 1, D]
            x = residual + x
            if not layer.pre_ln:
                x = layer.self_attn_layer_norm(x)
            residual = x
            if layer.pre_ln:
                x = layer.final_layer_norm(x)
            x = layer.fc2(_OLD_ACTIVATIONS[layer.activation](layer.fc1(x)))
            x = residual + x
            if not layer.pre_ln:
                x = layer.final_layer_norm(x)
        if decoder.final_layer_norm is not None:
            x = decoder.final_layer_norm(x)
        if decoder.project_out is not None:
            x = decoder.project_out(x)  # [R, 1, E]
        if model.lm_head is None:
            table = decoder.embed_tokens.embedding[...].astype(model.dtype)  # [V, E]
            logits = jnp.einsum("bte,ve->btv", x, table, preferred_element_type=jnp.float32)
        else:
            kernel = model.lm_head.kernel[...].astype(model.dtype)  # [E, V]
            logits = jnp.einsum("bte,ev->btv", x, kernel, preferred_element_type=jnp.float32)
        state = {**state, "gen_k": gen_k, "gen_v": gen_v, "src": src}
        return logits[:, -1, :].astype(jnp.float32), state

    @staticmethod
    def _attend(q, prompt_k, prompt_v, gen_k, gen_v, prompt_mask, src, i):
        """One query per row over its prompt (shared by the prompt's rows) and its own history.

        Args:
          q: [R, N, H] queries, R = B * n rows (n per prompt).
          prompt_k, prompt_v: [B, P, N, H].
          gen_k, gen_v: [R, L_new, N, H] generated keys/values by buffer row.
          prompt_mask: [B, P] bool.
          src: [R, L_new] buffer row holding each row's token j (rows of the same prompt), or
            None when every row's history is its own buffer row (no beam reordering).
          i: the current step (slots j <= i are valid).

        Returns:
          [R, N, H].
        """
        b, p = prompt_k.shape[:2]
        r, heads, head_dim = q.shape
        n, big_l = r // b, gen_k.shape[1]
        qb = q.reshape(b, n, heads, head_dim)  # [B, n, N, H]
        s_prompt = jnp.einsum("bknh,bpnh->bknp", qb, prompt_k, preferred_element_type=jnp.float32)
        # Row k's token j lives in buffer row src[k, j] of its prompt's n rows: score against all
        # n candidates (n times the few FLOPs) and keep the right one with a one-hot, instead of
        # gathering a [R, L_new, N, H] copy of the keys every layer and step.
        gk = gen_k.reshape(b, n, big_l, heads, head_dim)  # [B, m, L_new, N, H]
        gv = gen_v.reshape(b, n, big_l, heads, head_dim)
        if src is None:
            s_gen = jnp.einsum("bknh,bkjnh->bknj", qb, gk, preferred_element_type=jnp.float32)
        else:
            s_all = jnp.einsum("bknh,bmjnh->bknmj", qb, gk, preferred_element_type=jnp.float32)
            local = (src - (jnp.arange(r) // n * n)[:, None]).reshape(b, n, big_l)  # [B, n, L]
            onehot = local[:, :, None, :] == jnp.arange(n)[None, None, :, None]  # [B, n, m, L]
            s_gen = jnp.sum(jnp.where(onehot[:, :, None], s_all, 0.0), axis=3)  # [B, n, N, L]
        low = jnp.finfo(jnp.float32).min
        valid = (jnp.arange(big_l) <= i)[None, None, None, :]
        scores = jnp.concatenate(
            [
                jnp.where(prompt_mask[:, None, None, :], s_prompt, low),
                jnp.where(valid, s_gen, low),
            ],
            axis=-1,
        )  # [B, n, N, P + L_new]
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out_prompt = jnp.einsum("bknp,bpnh->bknh", probs[..., :p], prompt_v)
        if src is None:
            out_gen = jnp.einsum("bknj,bkjnh->bknh", probs[..., p:], gv)
        else:
            weights = jnp.where(onehot[:, :, None], probs[..., None, p:], 0.0)  # [B,n,N,m,L]
            out_gen = jnp.einsum("bknmj,bmjnh->bknh", weights, gv)
        return (out_prompt + out_gen).reshape(r, heads, head_dim)


def old_generate(model, ids, **kw):
    """`decode.generate(model, ids, **kw)` (full prompts) through `OldOPTBeamDecoder`."""
    settings = decode.resolve_settings(model, **kw)
    graphdef, state = nnx.split(model)
    fn = _old_program(graphdef, settings)
    out = fn(state, jnp.asarray(ids, jnp.int32), jnp.ones(ids.shape, jnp.int32))
    return decode.assemble(ids, out, settings)


_OLD_PROGRAMS = {}


def _old_program(graphdef, settings):
    if (graphdef, settings) not in _OLD_PROGRAMS:

        def run(state, input_ids, attention_mask):
            model = nnx.merge(graphdef, state)
            dec = OldOPTBeamDecoder(model, reorders=settings.num_beams > 1)
            return search.search_with(dec, input_ids, attention_mask, settings)

        _OLD_PROGRAMS[(graphdef, settings)] = jax.jit(run)
    return _OLD_PROGRAMS[(graphdef, settings)]


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
    parser.add_argument(
        "--old", action="store_true", help="also time the pre-issue-9 decoder (frozen copy)"
    )
    parser.add_argument("--no-hf", action="store_true", help="skip transformers (JAX only)")
    parser.add_argument(
        "--cost",
        action="store_true",
        help="only print XLA's cost analysis of the new and the old decoder's programs",
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
    model = nnx.merge(graphdef, families.state_from_hf(cfg, tensors))

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

    if args.cost:
        # XLA's static cost estimate of both compiled programs (the while loop's body counted
        # once): a comparison that contention cannot blur.
        settings = decode.resolve_settings(model, **kw)
        graphdef, state = nnx.split(model)
        jids, jmask = jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32)
        programs = {
            "collapse_jax": (
                decode.compiled_search(graphdef, settings),
                (state, jids, jmask, decode.prompt_keys(0, np.arange(len(ids)))),
            ),
            "collapse_jax_old": (_old_program(graphdef, settings), (state, jids, jmask)),
        }
        rows = []
        for name, (fn, fn_args) in programs.items():
            cost = fn.lower(*fn_args).compile().cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            rows.append({"name": f"decode_cost_{name}", "config": {"layers": args.layers, **kw}})
            rows[-1].update({k: cost.get(k) for k in COST_KEYS})
            print(json.dumps(rows[-1]), flush=True)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1) + "\n")
        return

    runners = {"collapse_jax": lambda: decode.generate(model, ids, **kw)}
    if args.old:
        runners["collapse_jax_old"] = lambda: old_generate(model, ids, **kw)
    if not args.no_hf:
        runners["transformers"] = run_hf
    first = {name: _timed(fn)[0] for name, fn in runners.items() if name != "transformers"}
    print(f"first calls (compile + run): {first}", flush=True)
    times = {name: [] for name in runners}
    outs = {}
    for _ in range(args.repeats):  # interleaved: contention hits every contender alike
        for name, fn in runners.items():
            t, outs[name] = _timed(fn)
            times[name].append(t)
            print(f"{name}: {t:.2f} s", flush=True)  # progress, and partial data if killed
    new_tokens = args.batch * args.new
    got = outs["collapse_jax"]
    device = jax.devices()[0].platform
    config = dict(
        model=f"opt-125m-shaped ({args.layers} layers), random weights, fp32",
        batch=args.batch,
        prompt_length=64,
        threads_torch=torch.get_num_threads(),
        load_average_1min=os.getloadavg()[0],
        cpu_count=os.cpu_count(),
        **kw,
    )
    for name, out in outs.items():
        if name != "collapse_jax":
            config[f"identical_sequences_{name}"] = float(np.mean(np.all(got == out, axis=1)))
    med = {name: statistics.median(t) for name, t in times.items()}
    base_name = "transformers" if "transformers" in med else "collapse_jax"
    results = []
    for name in runners:
        r = dict(
            name=f"decode_beam_{name}",
            device="cpu" if name == "transformers" else device,
            config=config,
            compile_s=max(first[name] - med[name], 0.0) if name in first else 0.0,
            median_ms=1e3 * med[name],
            throughput=new_tokens / med[name],
            ratio=med[base_name] / med[name],
        )
        if "collapse_jax_old" in med:
            r["ratio_to_old"] = med["collapse_jax_old"] / med[name]
        results.append(r)
    out = args.out or pathlib.Path(__file__).parent / "results" / f"decode-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    keys = ("name", "compile_s", "median_ms", "throughput", "ratio", "ratio_to_old")
    for r in results:
        print(json.dumps({k: r[k] for k in keys if k in r}))
    print({k: v for k, v in config.items() if k.startswith("identical")}, f"written to {out}")


if __name__ == "__main__":
    main()

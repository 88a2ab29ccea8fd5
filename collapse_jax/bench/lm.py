"""Benchmarks of the language model: the OPT-125m train step (tokens/s, MFU), the paper's beam
search (new tokens/s) and one whole generation of the paper's LM experiment, extrapolated from
measured slices; against transformers/PyTorch where installed."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from flax import nnx

from collapse_jax.bench.baselines import torch_device
from collapse_jax.bench.harness import Suite, block, installed, row, timeit
from collapse_jax.jaxtools import sharding
from collapse_jax.jaxtools.jaxprs import traced_matmul_dtypes
from collapse_jax.lm import data as data_lib
from collapse_jax.lm import decode, families, train
from collapse_jax.lm.opt import OPTConfig
from collapse_jax.lm.settings import resolve_decode_dtype
from collapse_jax.lm.train_config import TrainConfig

# The paper's LM experiment (WikiText-2 with the OPT tokenizer, 64-token blocks).
TRAIN_BLOCKS = 37_000  # training blocks regenerated every generation ("37k")
EVAL_BLOCKS = 4_400  # about the test split's blocks, evaluated once per generation
PAPER_EPOCHS = 5
PAPER_BATCH = 128
BLOCK = 64
BEAM = dict(num_beams=5, max_new_tokens=64, min_new_tokens=64, repetition_penalty=3.0)


def opt_flops_per_token(config: Any, matmul_params: int, length: int) -> float:
    """Training FLOPs per token, `6 N + 12 L D T` (PaLM appendix B)."""
    return 6 * matmul_params + 12 * config.num_hidden_layers * config.hidden_size * length


def opt_config(layers: int, dropout: float = 0.1, width: str = "125m") -> Any:
    """OPT-125m's hyper-parameters with `layers` decoder layers (`width="tiny"`: a 64-wide model
    with 512 tokens, for tests)."""
    base = OPTConfig.opt_125m()
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    fields.update(num_hidden_layers=layers, dropout=dropout)
    if width == "tiny":
        fields.update(
            vocab_size=512,
            hidden_size=64,
            word_embed_proj_dim=64,
            ffn_dim=128,
            num_attention_heads=4,
            max_position_embeddings=256,
        )
    elif width != "125m":
        raise ValueError(f"opt_width must be '125m' or 'tiny', got {width!r}")
    return OPTConfig(**fields)


def model_config(family: str, layers: int, dropout: float = 0.1, width: str = "125m") -> Any:
    """The benchmarked model's config: OPT as `opt_config`; another family's defaults (its small
    released model) with `layers` layers, or the tiny sizes of `opt_config` (`width="tiny"`)."""
    if family == "opt":
        return opt_config(layers, dropout, width)
    fam = families.family_named(family)
    d: dict[str, Any] = {"model_type": fam.model_types[0], "num_hidden_layers": layers}
    for rate in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "dropout"):
        d[rate] = dropout
    if width == "tiny":
        d.update(
            vocab_size=512,
            hidden_size=64,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=256,
        )
    elif width != "125m":
        raise ValueError(f"opt_width must be '125m' or 'tiny', got {width!r}")
    return fam.config_class.from_hf_dict(d)


def model_name(config: Any, width: str) -> str:
    """The rows' label of the benchmarked model."""
    family = families.family_of(config).name
    label = f"OPT-{width}" if family == "opt" else f"{family} ({width} defaults)"
    return f"{label} shape, {config.num_hidden_layers} layers, random weights"


def opt_pair(config: Any, with_torch: bool) -> tuple[Any, Any]:
    """(our model, transformers' model of the same family or None) with the same random
    weights (any family's config, despite the name)."""
    if not with_torch:
        return families.init_random(config, jax.random.key(0)), None
    import torch
    import transformers

    torch.manual_seed(0)
    d = config.to_hf_dict()
    hf_config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config)
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    graphdef, _ = nnx.split(families.abstract_model(config))
    return nnx.merge(graphdef, families.state_from_hf(config, tensors)), hf


def matmul_precision() -> str:
    """`jax_default_matmul_precision` as set ("default": the backend's, e.g. TF32 for float32
    matmuls on recent NVIDIA GPUs, bf16 passes on TPU)."""
    return str(jax.config.jax_default_matmul_precision or "default")


def random_blocks(rows: int, vocab: int, length: int = BLOCK, seed: int = 0) -> np.ndarray:
    """int32 [rows, length] random token blocks starting with OPT's BOS (2)."""
    ids = np.random.default_rng(seed).integers(3, vocab, size=(rows, length)).astype(np.int32)
    ids[:, 0] = 2
    return ids


def bench_train(suite: Suite, ctx: dict) -> list[dict]:
    """The train step as `finetune` runs it (`prepare_training`), bf16 compute."""
    cfg = model_config(suite.model, suite.opt_layers, dropout=0.1, width=suite.opt_width)
    with_torch = suite.baselines and installed("torch") and installed("transformers")
    model, hf = opt_pair(cfg, with_torch)
    params = nnx.state(model, nnx.Param)
    n_all = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    n_pos = sum(  # learned position tables (OPT's embed_positions, GPT-2's wpe): no matmul
        int(np.prod(v.shape))
        for path, v in nnx.to_flat_state(params)
        if "embed_positions" in path or "wpe" in path
    )
    fpt = opt_flops_per_token(cfg, n_all - n_pos, BLOCK)
    device = jax.devices()[0]
    peak, peak_src = ctx["peak"](device)
    b = suite.train_batch
    blocks = random_blocks(b, cfg.vocab_size)
    mesh = sharding.make_mesh({"data": 1}, devices=[device])
    tcfg = TrainConfig(
        epochs=1, batch_size=b, learning_rate=2e-5, compute_dtype="bfloat16", dropout=True
    )
    prep = train.prepare_training(model, tcfg, mesh=mesh, steps_per_epoch=1_000_000)
    batch = data_lib.global_batch(blocks, np.arange(b), prep.batch)
    key = jax.random.key(0)
    box = [prep.state]

    def step():
        box[0], metrics = prep.step(box[0], prep.rest, batch, key, prep.hparams)
        block(metrics)

    matmuls = traced_matmul_dtypes(prep.step, prep.state, prep.rest, batch, key, prep.hparams)
    compile_s, med = timeit(step, suite.train_steps)
    tps = b * BLOCK / med
    base = None
    if hf is not None:
        import torch

        dev = torch_device()
        hf = hf.to(dev).train()
        ids = torch.as_tensor(blocks, dtype=torch.long, device=dev)
        opt = torch.optim.AdamW(hf.parameters(), lr=2e-5, weight_decay=0.01)
        amp = torch.autocast(dev, dtype=torch.bfloat16) if dev == "cuda" else None

        def torch_step():
            if amp is not None:
                with amp:
                    loss = hf(input_ids=ids, labels=ids).loss
            else:
                loss = hf(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            float(loss.detach())

        _, t_med = timeit(torch_step, suite.train_steps)
        base = b * BLOCK / t_med
        ctx["torch_train_dtype"] = "bf16 autocast" if dev == "cuda" else "fp32 (CPU)"
    config = dict(
        model=model_name(cfg, suite.opt_width),
        batch=b,
        length=BLOCK,
        compute_dtype="bfloat16",
        param_dtype="float32",
        matmul_dtypes=matmuls,
        matmul_precision=matmul_precision(),
        optimizer="AdamW lr 2e-5 wd 0.01, dropout 0.1",
        params=n_all,
        matmul_params=n_all - n_pos,
        flops_per_token=fpt,
        flop_formula="6 N + 12 L D T (N: all parameters but the position table)",
        peak_flops=peak,
        peak_source=peak_src,
    )
    ctx["train_seconds_per_token"] = med / (b * BLOCK)
    return [
        row(
            "train_step",
            tps,
            "tokens/s",
            compile_s=compile_s,
            median_s=med,
            config=config,
            baseline=f"transformers {ctx.get('torch_train_dtype', '')}" if base else None,
            base_value=base,
            mfu=tps * fpt / peak,
        )
    ]


def bench_decode(suite: Suite, ctx: dict) -> list[dict]:
    """The paper's beam search on full 64-token prompts (`decode.generate`)."""
    cfg = model_config(suite.model, suite.opt_layers, dropout=0.0, width=suite.opt_width)
    with_torch = suite.baselines and installed("torch") and installed("transformers")
    model, hf = opt_pair(cfg, with_torch)
    ids = random_blocks(suite.decode_batch, cfg.vocab_size, seed=1)
    kw = dict(BEAM, max_new_tokens=suite.decode_new, min_new_tokens=suite.decode_new)
    dtype = resolve_decode_dtype("auto")  # as the experiment's default decode.dtype
    out = {}

    def run():
        out["ids"] = decode.generate(model, ids, **kw, dtype=dtype)

    compile_s, med = timeit(run, suite.repeats)
    new = suite.decode_batch * suite.decode_new
    rate = new / med
    prompts_per_s = suite.decode_batch / med * (suite.decode_new / 64)  # at 64 new tokens
    base = None
    identical = None
    if hf is not None:
        import torch

        dev = torch_device()
        hf = hf.to(dev).eval()
        ids_t = torch.as_tensor(ids, dtype=torch.long, device=dev)

        def run_hf():
            with torch.no_grad():
                out["hf"] = hf.generate(ids_t, attention_mask=torch.ones_like(ids_t), **kw)
            out["hf"] = out["hf"].cpu().numpy()

        _, t_med = timeit(run_hf, 1)
        base = new / t_med
        if dev == "cpu" and dtype == "float32":  # fp32 on both sides: the tokens must agree
            identical = float(np.mean(np.all(out["ids"] == out["hf"], axis=1)))
    ctx["decode_prompts_per_s"] = prompts_per_s
    config = dict(
        model=model_name(cfg, suite.opt_width),
        compute_dtype=dtype,
        kv_cache_dtype=dtype,
        matmul_precision=matmul_precision(),
        batch=suite.decode_batch,
        prompt_length=BLOCK,
        **kw,
        identical_to_transformers=identical,
    )
    return [
        row(
            "decode_beam",
            rate,
            "new tokens/s",
            compile_s=compile_s,
            median_s=med,
            config=config,
            baseline="transformers generate" if base else None,
            base_value=base,
            regenerate_37k_s=TRAIN_BLOCKS / prompts_per_s,
            note=(
                f"37k blocks = {TRAIN_BLOCKS} prompts x 64 new tokens at this batch's rate"
                + ("" if suite.decode_new == 64 else f" (scaled linearly from {suite.decode_new})")
            ),
        )
    ]


def bench_paper_generation(suite: Suite, ctx: dict) -> list[dict]:
    """One generation of the paper's LM loop, from measured slices (train, eval, regenerate)."""
    if "train_seconds_per_token" not in ctx:
        bench_train(dataclasses.replace(suite, baselines=False), ctx)
    if "decode_prompts_per_s" not in ctx:
        bench_decode(dataclasses.replace(suite, baselines=False), ctx)
    cfg = model_config(suite.model, suite.opt_layers, dropout=0.0, width=suite.opt_width)
    model, _ = opt_pair(cfg, with_torch=False)
    blocks = random_blocks(suite.eval_batch * 2, cfg.vocab_size, seed=2)
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])

    def run():
        train.perplexity(
            model, blocks, batch_size=suite.eval_batch, mesh=mesh, compute_dtype="bfloat16"
        )

    compile_s, med = timeit(run, suite.repeats)
    eval_s_per_block = med / blocks.shape[0]
    steps = PAPER_EPOCHS * math.ceil(TRAIN_BLOCKS / PAPER_BATCH)
    t_train = ctx["train_seconds_per_token"] * PAPER_EPOCHS * TRAIN_BLOCKS * BLOCK
    t_eval = eval_s_per_block * EVAL_BLOCKS
    t_regen = TRAIN_BLOCKS / ctx["decode_prompts_per_s"]
    total = t_train + t_eval + t_regen
    method = (
        f"extrapolated: fine-tune {PAPER_EPOCHS} epochs x {TRAIN_BLOCKS} blocks ({steps} steps of "
        f"{PAPER_BATCH}) at the measured train_step tokens/s (batch {suite.train_batch}); "
        f"evaluate {EVAL_BLOCKS} blocks at a measured bf16 forward (batch {suite.eval_batch}); "
        f"regenerate {TRAIN_BLOCKS} blocks at the measured decode_beam rate "
        f"(batch {suite.decode_batch})"
    )
    return [
        row(
            "paper_generation",
            total,
            "s (extrapolated)",
            compile_s=compile_s,
            median_s=med,
            config=dict(
                model=model_name(cfg, suite.opt_width),
                train_blocks=TRAIN_BLOCKS,
                eval_blocks=EVAL_BLOCKS,
                epochs=PAPER_EPOCHS,
            ),
            note=method,
            train_s=t_train,
            eval_s=t_eval,
            regenerate_s=t_regen,
        )
    ]

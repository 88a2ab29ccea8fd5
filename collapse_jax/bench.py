"""`collapse-jax bench`: the standard throughput benchmarks on whatever backend JAX sees (issue 12).

One command measures every part of the project that costs time, prints a table and writes a JSON
report (device, versions, settings, one row per measurement):

- `train_step`: an OPT-125m training step (AdamW, dropout on, bf16 compute, fp32 parameters) at
  the paper's batch of 128 blocks x 64 tokens: tokens/s and MFU. FLOPs per token follow the PaLM
  convention `6 N + 12 L D T` (N = parameters in matmuls: all decoder weights plus the tied token
  embedding / LM head, learned positions excluded; L layers, D width, T = 64 tokens); the peak is
  the device's bf16 dense datasheet figure (`PEAK_TFLOPS`) or, on a CPU, a measured matmul peak in
  the compute dtype.
- `decode_beam`: the paper's regeneration search (5 beams, 64 new tokens, min 64, repetition
  penalty 3.0) on full 64-token prompts: new tokens/s and the extrapolated time to regenerate
  WikiText-2's 37k training blocks.
- `paper_generation`: one whole generation of the paper's LM experiment on 37k random-token blocks
  with a randomly initialised OPT-125m (fine-tune 5 epochs, evaluate, regenerate), extrapolated
  from measured slices: the train step above x the number of steps, a measured evaluation forward
  x the number of evaluation batches, and the decode rate above x 37k blocks.
- `gaussian_exact`, `gaussian_sample`, `discrete_exact`, `discrete_sample`: the theory chains
  (`simulate`, 10^6 chains in the full suite): chain-generations/s or samples/s.
- `gmm_em`: EM over 10^4 chains (full suite) of the paper's GMM setting, chain-iterations/s.
- `vae_train`: training images/s of the paper's VAE (batch 256).

Baselines run in the same process when their package is installed (transformers/PyTorch for the
LM and the VAE, NumPy for the theory chains, scikit-learn for EM): `ratio` = ours / baseline.
`benchmarks/bench_*.py` reuse the helpers here (timing, peaks, baselines). Library code does not
print: the CLI prints the table.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.rundir import fileio

# bf16 dense tensor-core / MXU peaks, TFLOP/s per chip (vendor datasheets, no sparsity), matched
# in order as substrings of the lower-cased `device_kind` (more specific names first).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("gh200", 989.0),
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),
    ("h800", 989.0),
    ("b200", 2250.0),
    ("b100", 1750.0),
    ("a100", 312.0),
    ("a800", 312.0),
    ("l40s", 362.0),
    ("l40", 181.0),
    ("l4", 121.0),
    ("a10", 125.0),
    ("v100", 125.0),  # fp16 (V100 has no bf16)
    ("rtx 4090", 165.0),
    ("tpu v6", 918.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v5", 459.0),
    ("tpu v4", 275.0),
    ("tpu v3", 123.0),
)

# The paper's LM experiment (WikiText-2 with the OPT tokenizer, 64-token blocks).
TRAIN_BLOCKS = 37_000  # training blocks regenerated every generation ("37k")
EVAL_BLOCKS = 4_400  # about the test split's blocks, evaluated once per generation
PAPER_EPOCHS = 5
PAPER_BATCH = 128
BLOCK = 64
BEAM = dict(num_beams=5, max_new_tokens=64, min_new_tokens=64, repetition_penalty=3.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Suite:
    """Sizes of one benchmark suite (the names are the JSON's `settings`).

    Attributes:
      name: "quick", "full" or a custom name.
      opt_layers: decoder layers of the OPT-125m-shaped model (12 = the real model).
      train_batch: blocks per train step (paper: 128); train_steps: timed steps.
      decode_batch: prompts per `generate` call; decode_new: new tokens (paper: 64).
      eval_batch: blocks per evaluation forward.
      theory_chains, theory_generations: the theory chains' sizes.
      numpy_chains: chains of the NumPy baselines (their rate per chain is size-independent).
      gmm_chains, gmm_points: EM chains and points per chain; sklearn_chains: baseline fits.
      vae_images, vae_batch: images per timed VAE epoch and the batch size (paper: 256).
      repeats: timed repeats per measurement (the median is reported).
      baselines: run the baselines (PyTorch, NumPy, scikit-learn) where installed.
      opt_width: "125m" (OPT-125m's width and vocabulary) or "tiny" (a 64-wide model with 512
        tokens, for the test suite: numbers then say nothing about OPT-125m).
    """

    name: str
    opt_layers: int
    train_batch: int
    train_steps: int
    decode_batch: int
    decode_new: int
    eval_batch: int
    theory_chains: int
    theory_generations: int
    numpy_chains: int
    gmm_chains: int
    gmm_points: int
    sklearn_chains: int
    vae_images: int
    vae_batch: int
    repeats: int
    baselines: bool = True
    opt_width: str = "125m"


SUITES = {
    # Under 3 minutes on a 2-core CPU: a 2-layer model of OPT-125m's width, small batches, one
    # timed call after the compiling one (about half of the time is compilation; sizes only as
    # large as a representative rate needs).
    "quick": Suite(
        name="quick",
        opt_layers=2,
        train_batch=2,
        train_steps=1,
        decode_batch=1,
        decode_new=16,
        eval_batch=4,
        theory_chains=10_000,
        theory_generations=20,
        numpy_chains=10_000,
        gmm_chains=200,
        gmm_points=1000,
        sklearn_chains=5,
        vae_images=512,
        vae_batch=256,
        repeats=1,
    ),
    # The paper's sizes, for an accelerator (under 8 minutes on one H100/H200).
    "full": Suite(
        name="full",
        opt_layers=12,
        train_batch=PAPER_BATCH,
        train_steps=10,
        decode_batch=256,
        decode_new=64,
        eval_batch=256,
        theory_chains=1_000_000,
        theory_generations=100,
        numpy_chains=20_000,
        gmm_chains=10_000,
        gmm_points=1000,
        sklearn_chains=20,
        vae_images=10_240,
        vae_batch=256,
        repeats=3,
    ),
}


# ----------------------------------------------------------------------------------------------
# Shared helpers (also used by benchmarks/bench_*.py).


def block(tree: Any) -> Any:
    """Waits for every array of a result (JAX dispatch is asynchronous)."""
    return jax.block_until_ready(tree)


def timeit(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(compile seconds = first call minus a steady call, median seconds of `repeats` calls).

    `fn` must block until its result is ready."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return max(first - med, 0.0), med


def once(fn: Callable[[], Any]) -> float:
    """Seconds of one call: for baselines with nothing to compile (NumPy), where timing a
    warm-up call first would only double their cost."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measured_matmul_flops(dtype: Any = jnp.float32, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an n^3 matmul in `dtype` on the default device."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    block(f(a))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        block(f(a))
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def device_peak_flops(device: Any, dtype: Any = jnp.bfloat16) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for `device`: the datasheet table for a known
    accelerator, else a measured matmul in `dtype` (n = 1024 on a CPU, 8192 elsewhere; on the
    2-core CPU n = 1024 and 2048 measured the same peak, 41.5 vs 40.6 GFLOP/s in bf16, in 0.7 s
    instead of 3.2 s)."""
    kind = str(getattr(device, "device_kind", "")).lower()
    if device.platform != "cpu":
        for name, tflops in PEAK_TFLOPS:
            if name in kind:
                return tflops * 1e12, f"datasheet bf16 dense ({name})"
    n = 1024 if device.platform == "cpu" else 8192
    return (
        measured_matmul_flops(dtype, n),
        f"measured {jnp.dtype(dtype).name} matmul {n}^3 (device not in the peak table)",
    )


def opt_flops_per_token(config: Any, matmul_params: int, length: int) -> float:
    """Training FLOPs per token, `6 N + 12 L D T` (PaLM appendix B)."""
    return 6 * matmul_params + 12 * config.num_hidden_layers * config.hidden_size * length


def opt_config(layers: int, dropout: float = 0.1, width: str = "125m") -> Any:
    """OPT-125m's hyper-parameters with `layers` decoder layers (`width="tiny"`: a 64-wide model
    with 512 tokens, for tests)."""
    from collapse_jax.lm.opt import OPTConfig

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


def opt_pair(config: Any, with_torch: bool) -> tuple[Any, Any]:
    """(our model, transformers' OPTForCausalLM or None) with the same random weights."""
    from flax import nnx

    from collapse_jax.lm.opt import OPTForCausalLM, init_random, state_from_hf

    if not with_torch:
        return init_random(config, jax.random.key(0)), None
    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.OPTForCausalLM(transformers.OPTConfig(**config.to_hf_dict()))
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: OPTForCausalLM(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, state_from_hf(config, tensors)), hf


def random_blocks(rows: int, vocab: int, length: int = BLOCK, seed: int = 0) -> np.ndarray:
    """int32 [rows, length] random token blocks starting with OPT's BOS (2)."""
    ids = np.random.default_rng(seed).integers(3, vocab, size=(rows, length)).astype(np.int32)
    ids[:, 0] = 2
    return ids


def _trajectory(generations: int, first: np.ndarray) -> np.ndarray:
    """The float32 array [G + 1, ...] of every generation's state, row 0 = `first`: what the
    `simulate` functions return, so the NumPy baselines produce the same output (on a VM that
    hands freed memory back to its host, first touching such an array costs as much as a
    fraction of the run, on either side)."""
    out = np.empty((generations + 1, *first.shape), np.float32)
    out[0] = first
    return out


def numpy_gaussian_sample(rng, chains: int, generations: int, m: int):
    """The sample method in NumPy: draw m points per chain and refit (d = 1, unbiased); returns
    the trajectories of the means and variances [G + 1, chains]."""
    mu, var = np.zeros(chains), np.ones(chains)
    mus, vs = _trajectory(generations, mu), _trajectory(generations, var)
    for g in range(generations):
        x = mu[:, None] + np.sqrt(var)[:, None] * rng.standard_normal((chains, m))
        mu, var = x.mean(1), x.var(1, ddof=1)
        mus[g + 1], vs[g + 1] = mu, var
    return mus, vs


def numpy_gaussian_exact(rng, chains: int, generations: int, m: int):
    """The exact method in NumPy: the sufficient statistics (normal mean, chi-square scatter);
    returns the trajectories of the means and variances [G + 1, chains]."""
    mu, var = np.zeros(chains), np.ones(chains)
    mus, vs = _trajectory(generations, mu), _trajectory(generations, var)
    for g in range(generations):
        mu = mu + np.sqrt(var / m) * rng.standard_normal(chains)
        var = var * rng.chisquare(m - 1, chains) / (m - 1)
        mus[g + 1], vs[g + 1] = mu, var
    return mus, vs


def numpy_discrete_sample(rng, probs: np.ndarray, chains: int, generations: int, m: int):
    """The sample method in NumPy: m inverse-CDF draws per chain, then counts; returns the
    trajectory of the distributions [G + 1, chains, K]."""
    k = probs.size
    p = np.broadcast_to(probs, (chains, k)).copy()
    ps = _trajectory(generations, p)
    offs = (np.arange(chains) * k)[:, None]
    for g in range(generations):
        cdf = np.cumsum(p, axis=1)
        u = rng.random((chains, m)) * cdf[:, -1:]
        idx = (u[:, :, None] >= cdf[:, None, :]).sum(-1)
        counts = np.bincount((idx + offs).ravel(), minlength=chains * k).reshape(chains, k)
        p = ps[g + 1] = counts / m
    return ps


def numpy_discrete_exact(rng, probs: np.ndarray, chains: int, generations: int, m: int):
    """The exact method in NumPy: `Generator.multinomial` (C-level conditional binomials);
    returns the trajectory of the distributions [G + 1, chains, K]."""
    p = np.broadcast_to(probs, (chains, probs.size)).copy()
    ps = _trajectory(generations, p)
    for g in range(generations):
        p = ps[g + 1] = rng.multinomial(m, p) / m
    return ps


def zipf_probs(k: int = 10) -> np.ndarray:
    """The discrete benchmarks' distribution: p_i proportional to 1 / i."""
    p = 1.0 / np.arange(1, k + 1)
    return p / p.sum()


def torch_vae(latent: int = 20, c1: int = 64, c2: int = 128) -> Any:
    """The paper's VAE in PyTorch (the notebook's framework), returning the summed loss."""
    import torch
    from torch import nn

    class VAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(
                nn.Conv2d(1, c1, 4, 2, 1),
                nn.ReLU(),
                nn.Conv2d(c1, c2, 4, 2, 1),
                nn.ReLU(),
                nn.Flatten(),
            )
            self.mu = nn.Linear(c2 * 49, latent)
            self.logvar = nn.Linear(c2 * 49, latent)
            self.fc = nn.Linear(latent, c2 * 49)
            self.dec = nn.Sequential(
                nn.ConvTranspose2d(c2, c1, 4, 2, 1),
                nn.ReLU(),
                nn.ConvTranspose2d(c1, 1, 4, 2, 1),
            )

        def forward(self, x):
            h = self.enc(x)
            mu, logvar = self.mu(h), self.logvar(h)
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            logits = self.dec(torch.relu(self.fc(z)).view(-1, c2, 7, 7))
            bce = nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum")
            kl = -0.5 * torch.sum(1 + logvar - mu**2 - logvar.exp())
            return bce + kl

    return VAE()


def _installed(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def _torch_device() -> str:
    """PyTorch's device for the baselines: CUDA when JAX runs on a GPU and torch sees one."""
    import torch

    if jax.devices()[0].platform == "gpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


# ----------------------------------------------------------------------------------------------
# Measurements. Each returns rows: {name, value, unit, compile_s, median_ms, config, baseline,
# baseline_value, ratio, note}.


def _row(name, value, unit, *, compile_s, median_s, config, baseline=None, base_value=None,
         note="", **extra) -> dict:  # fmt: skip
    return dict(
        name=name,
        value=float(value),
        unit=unit,
        compile_s=round(float(compile_s), 3),
        median_ms=round(1e3 * float(median_s), 3),
        config=config,
        baseline=baseline,
        baseline_value=None if base_value is None else float(base_value),
        ratio=None if base_value is None else float(value) / float(base_value),
        note=note,
        **extra,
    )


def bench_train(suite: Suite, ctx: dict) -> list[dict]:
    """The train step as `finetune` runs it (`prepare_training`), bf16 compute."""
    from flax import nnx

    from collapse_jax.jaxtools import sharding
    from collapse_jax.lm import data as data_lib
    from collapse_jax.lm import train
    from collapse_jax.lm.train_config import TrainConfig

    cfg = opt_config(suite.opt_layers, dropout=0.1, width=suite.opt_width)
    with_torch = suite.baselines and _installed("torch") and _installed("transformers")
    model, hf = opt_pair(cfg, with_torch)
    params = nnx.state(model, nnx.Param)
    n_all = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    n_pos = int(np.prod(params["model"]["decoder"]["embed_positions"]["embedding"].shape))
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

    compile_s, med = timeit(step, suite.train_steps)
    tps = b * BLOCK / med
    base = None
    if hf is not None:
        import torch

        dev = _torch_device()
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
        model=f"OPT-{suite.opt_width} shape, {cfg.num_hidden_layers} layers, random weights",
        batch=b,
        length=BLOCK,
        compute_dtype="bfloat16",
        param_dtype="float32",
        optimizer="AdamW lr 2e-5 wd 0.01, dropout 0.1",
        params=n_all,
        matmul_params=n_all - n_pos,
        flops_per_token=fpt,
        flop_formula="6 N + 12 L D T (N: matmul parameters incl. tied embedding)",
        peak_flops=peak,
        peak_source=peak_src,
    )
    ctx["train_seconds_per_token"] = med / (b * BLOCK)
    return [
        _row(
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
    from collapse_jax.lm import decode

    cfg = opt_config(suite.opt_layers, dropout=0.0, width=suite.opt_width)
    with_torch = suite.baselines and _installed("torch") and _installed("transformers")
    model, hf = opt_pair(cfg, with_torch)
    ids = random_blocks(suite.decode_batch, cfg.vocab_size, seed=1)
    kw = dict(BEAM, max_new_tokens=suite.decode_new, min_new_tokens=suite.decode_new)
    out = {}

    def run():
        out["ids"] = decode.generate(model, ids, **kw)

    compile_s, med = timeit(run, suite.repeats)
    new = suite.decode_batch * suite.decode_new
    rate = new / med
    prompts_per_s = suite.decode_batch / med * (suite.decode_new / 64)  # at 64 new tokens
    base = None
    identical = None
    if hf is not None:
        import torch

        dev = _torch_device()
        hf = hf.to(dev).eval()
        ids_t = torch.as_tensor(ids, dtype=torch.long, device=dev)

        def run_hf():
            with torch.no_grad():
                out["hf"] = hf.generate(ids_t, attention_mask=torch.ones_like(ids_t), **kw)
            out["hf"] = out["hf"].cpu().numpy()

        _, t_med = timeit(run_hf, 1)
        base = new / t_med
        if dev == "cpu":  # fp32 on both sides: the tokens must agree
            identical = float(np.mean(np.all(out["ids"] == out["hf"], axis=1)))
    ctx["decode_prompts_per_s"] = prompts_per_s
    config = dict(
        model=f"OPT-{suite.opt_width} shape, {cfg.num_hidden_layers} layers, random, float32",
        batch=suite.decode_batch,
        prompt_length=BLOCK,
        **kw,
        identical_to_transformers=identical,
    )
    return [
        _row(
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
    from collapse_jax.jaxtools import sharding
    from collapse_jax.lm import train

    if "train_seconds_per_token" not in ctx:
        bench_train(dataclasses.replace(suite, baselines=False), ctx)
    if "decode_prompts_per_s" not in ctx:
        bench_decode(dataclasses.replace(suite, baselines=False), ctx)
    cfg = opt_config(suite.opt_layers, dropout=0.0, width=suite.opt_width)
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
        _row(
            "paper_generation",
            total,
            "s (extrapolated)",
            compile_s=compile_s,
            median_s=med,
            config=dict(
                model=f"OPT-{suite.opt_width} shape, {cfg.num_hidden_layers} layers, random",
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


def bench_theory(suite: Suite, ctx: dict) -> list[dict]:
    """The theory chains (`simulate`) against NumPy implementations of the same processes."""
    from collapse_jax.theory import discrete, gaussian

    rows = []
    r, g, reps = suite.theory_chains, suite.theory_generations, suite.repeats
    key = jax.random.key(0)
    rng = np.random.default_rng(0)
    rn = min(suite.numpy_chains, r)
    probs = zipf_probs(10)
    cases = [
        ("gaussian_exact", 1000, "chain-generations/s",
         lambda m: gaussian.simulate(key, chains=r, generations=g, sample_size=m, method="exact"),
         lambda m: numpy_gaussian_exact(rng, rn, g, m), "numpy standard_normal + chisquare"),
        ("gaussian_sample", 100, "samples/s",
         lambda m: gaussian.simulate(key, chains=r, generations=g, sample_size=m,
                                     method="sample"),
         lambda m: numpy_gaussian_sample(rng, rn, g, m), "numpy draw + refit"),
        ("discrete_exact", 1000, "chain-generations/s",
         lambda m: discrete.simulate(key, probs=probs, chains=r, generations=g, sample_size=m,
                                     method="exact"),
         lambda m: numpy_discrete_exact(rng, probs, rn, g, m), "numpy multinomial"),
        ("discrete_sample", 100, "samples/s",
         lambda m: discrete.simulate(key, probs=probs, chains=r, generations=g, sample_size=m,
                                     method="sample"),
         lambda m: numpy_discrete_sample(rng, probs, rn, max(1, g // 10), m),
         "numpy inverse CDF + bincount"),
    ]  # fmt: skip
    for name, m, unit, ours, theirs, base_name in cases:
        if ctx["only_theory"] and name not in ctx["only_theory"]:
            continue
        compile_s, med = timeit(lambda ours=ours, m=m: ours(m), reps)
        per = 1 if unit == "chain-generations/s" else m
        value = r * g * per / med
        base = None
        if suite.baselines:
            t_np = once(lambda theirs=theirs, m=m: theirs(m))
            np_gens = g if name != "discrete_sample" else max(1, g // 10)
            base = rn * np_gens * per / t_np
        rows.append(
            _row(
                name,
                value,
                unit,
                compile_s=compile_s,
                median_s=med,
                config=dict(chains=r, generations=g, M=m, numpy_chains=rn),
                baseline=base_name if base else None,
                base_value=base,
            )
        )
    return rows


def bench_gmm(suite: Suite, ctx: dict) -> list[dict]:
    """EM of the paper's GMM setting (2 components, full covariance, k-means init, tol 1e-5, up to
    2000 iterations) on 2-D Gaussian blobs, all chains at once (`gmm.fit_em`)."""
    from collapse_jax import gmm

    rng = np.random.default_rng(0)
    xs = rng.normal(size=(suite.gmm_chains, suite.gmm_points, 2)).astype(np.float32)
    xj = jax.device_put(xs)
    key = jax.random.key(0)
    out = {}

    def run():
        out["res"] = block(gmm.fit_em(xj, n_components=2, key=key, tol=1e-5, max_iter=2000))

    compile_s, med = timeit(run, suite.repeats)
    iters = float(np.asarray(out["res"].n_iter).sum())
    value = iters / med
    base = None
    if suite.baselines and _installed("sklearn") and _installed("threadpoolctl"):
        import threadpoolctl
        from sklearn.mixture import GaussianMixture

        t = time.perf_counter()
        sk_iters = 0
        # One BLAS thread: faster per fit on a small shared CPU (threads oversubscribe).
        with warnings.catch_warnings(), threadpoolctl.threadpool_limits(1):
            warnings.simplefilter("ignore")
            for i in range(suite.sklearn_chains):
                fit = GaussianMixture(2, tol=1e-5, max_iter=2000, random_state=i).fit(xs[i])
                sk_iters += fit.n_iter_
        base = sk_iters / (time.perf_counter() - t)
    return [
        _row(
            "gmm_em",
            value,
            "chain-iterations/s",
            compile_s=compile_s,
            median_s=med,
            config=dict(
                chains=suite.gmm_chains,
                points=suite.gmm_points,
                dim=2,
                components=2,
                mean_iterations=iters / suite.gmm_chains,
                sklearn_chains=suite.sklearn_chains,
            ),
            baseline="scikit-learn chain by chain (1 BLAS thread)" if base else None,
            base_value=base,
        )
    ]


def _mnist_or_random(n: int) -> tuple[np.ndarray, str]:
    """n MNIST training images if the data folder has them, else random binary images."""
    from collapse_jax.vae import mnist

    root = pathlib.Path(os.environ.get("COLLAPSE_JAX_DATA", "data")) / "mnist"
    try:
        images = mnist.load_mnist(root, "train")[0][:n]
        if images.shape[0] == n:
            return images, "MNIST"
    except Exception:  # noqa: BLE001 - no data here: the speed does not depend on the pixels
        pass
    rng = np.random.default_rng(0)
    return (rng.random((n, 28, 28)) < 0.15).astype(np.uint8) * 255, "random binary images"


def bench_vae(suite: Suite, ctx: dict) -> list[dict]:
    """Training epochs of the paper's VAE (Adam 1e-3, weight decay 1e-5) as `vae.train` runs
    them, against the same network in PyTorch."""
    from collapse_jax.jaxtools import convs
    from collapse_jax.vae import model as vae

    images, source = _mnist_or_random(suite.vae_images)
    cfg = vae.VAEConfig(batch_size=suite.vae_batch, epochs=1)
    params = vae.init_params(jax.random.key(0))
    state = [params, vae._optimizer(cfg.learning_rate, cfg.weight_decay).init(params)]
    x = jax.device_put(images)
    kw = dict(
        arch=vae._arch(cfg), batch_size=cfg.batch_size, lr=cfg.learning_rate, wd=cfg.weight_decay
    )
    count = [0]

    def epoch():
        count[0] += 1
        p, o, loss = vae._train_epoch(*state, x, jax.random.key(count[0]), **kw)
        state[:] = [p, o]
        block(loss)

    compile_s, med = timeit(epoch, suite.repeats)
    value = images.shape[0] / med
    base = None
    if suite.baselines and _installed("torch"):
        import torch

        dev = _torch_device()
        torch.manual_seed(0)
        model = torch_vae().to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
        xt = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None].to(dev)

        def torch_epoch():
            perm = torch.randperm(len(xt), device=dev)
            for lo in range(0, len(xt), suite.vae_batch):
                opt.zero_grad()
                loss = model(xt[perm[lo : lo + suite.vae_batch]])
                loss.backward()
                opt.step()
            float(loss.detach())

        _, t_med = timeit(torch_epoch, suite.repeats)
        base = images.shape[0] / t_med
    return [
        _row(
            "vae_train",
            value,
            "images/s",
            compile_s=compile_s,
            median_s=med,
            config=dict(
                images=images.shape[0],
                data=source,
                batch=suite.vae_batch,
                latent=20,
                channels=[64, 128],
                dtype="float32",
                convolutions=convs.impl(),
            ),
            baseline="the same network in PyTorch" if base else None,
            base_value=base,
        )
    ]


BENCHES: dict[str, Callable[[Suite, dict], list[dict]]] = {
    "train": bench_train,
    "decode": bench_decode,
    "paper_generation": bench_paper_generation,
    "theory": bench_theory,
    "gmm": bench_gmm,
    "vae": bench_vae,
}
THEORY_ROWS = ("gaussian_exact", "gaussian_sample", "discrete_exact", "discrete_sample")


# ----------------------------------------------------------------------------------------------
# Running, reporting.


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in (
        "jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "scikit-learn",
    ):  # fmt: skip
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def device_info() -> dict[str, Any]:
    """The default device: platform, kind, count, host CPUs."""
    d = jax.devices()[0]
    return dict(
        platform=d.platform,
        device_kind=str(getattr(d, "device_kind", d.platform)),
        device_count=jax.device_count(),
        host=platform.node(),
        cpu_count=os.cpu_count(),
    )


def run(
    suite: str | Suite = "quick",
    *,
    only: Sequence[str] | None = None,
    out: os.PathLike | str | None = None,
    peak_tflops: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Runs a suite and returns the report (also written as JSON to `out`, if given).

    Args:
      suite: "quick", "full", or a `Suite`.
      only: names of `BENCHES` (or theory rows, e.g. "gaussian_exact") to run; default all.
      out: JSON file to write (atomically).
      peak_tflops: the device's peak in TFLOP/s for MFU (overrides the table / measurement).
      progress: called with a line before each measurement (the CLI prints it).
    Returns:
      {"suite", "settings", "device", "versions", "started", "seconds", "rows": [...]}.
    """
    if isinstance(suite, str):
        if suite not in SUITES:
            raise ValueError(f"unknown suite {suite!r}; choose from {sorted(SUITES)}")
        suite = SUITES[suite]
    wanted = list(only) if only else list(BENCHES)
    theory_only = {n for n in wanted if n in THEORY_ROWS}
    for n in wanted:
        if n not in BENCHES and n not in THEORY_ROWS:
            raise ValueError(
                f"unknown benchmark {n!r}; choose from {sorted([*BENCHES, *THEORY_ROWS])}"
            )
    if theory_only:
        wanted = [n for n in wanted if n not in THEORY_ROWS] + ["theory"]
    peaks: dict[Any, tuple[float, str]] = {}

    def peak(device):
        if peak_tflops:
            return peak_tflops * 1e12, "given (--peak-tflops)"
        if device not in peaks:
            peaks[device] = device_peak_flops(device, jnp.bfloat16)
        return peaks[device]

    ctx: dict[str, Any] = {"peak": peak, "only_theory": theory_only}
    report: dict[str, Any] = dict(
        suite=suite.name,
        settings=dataclasses.asdict(suite),
        device=device_info(),
        versions=_versions(),
        started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        rows=[],
    )
    t0 = time.perf_counter()
    for name in [n for n in BENCHES if n in wanted]:
        if progress:
            progress(f"bench {name} ({suite.name}) ...")
        report["rows"].extend(BENCHES[name](suite, ctx))
        if out is not None:  # finished rows are never lost
            fileio.atomic_write_text(pathlib.Path(out), json.dumps(report, indent=1) + "\n")
    report["seconds"] = time.perf_counter() - t0
    if out is not None:
        fileio.atomic_write_text(pathlib.Path(out), json.dumps(report, indent=1) + "\n")
    return report


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    x = float(x)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def format_table(report: dict[str, Any]) -> str:
    """The report as a fixed-width text table, plus the device line and the notes."""
    d = report["device"]
    lines = [
        f"collapse-jax bench --suite {report['suite']}: {d['device_kind']} ({d['platform']}, "
        f"{d['device_count']} device(s)), jax {report['versions'].get('jax')}",
        f"{'benchmark':<18} {'value':>10}  {'unit':<20} {'baseline':>10} {'ratio':>7}  "
        f"{'compile s':>9}  extra",
    ]
    notes = []
    for r in report["rows"]:
        extra = []
        if "mfu" in r:
            extra.append(f"MFU {100 * r['mfu']:.1f}%")
        if "regenerate_37k_s" in r:
            extra.append(f"37k blocks {_fmt(r['regenerate_37k_s'])} s")
        if r["name"] == "paper_generation":
            extra.append(
                f"train {_fmt(r['train_s'])} s, eval {_fmt(r['eval_s'])} s, "
                f"regen {_fmt(r['regenerate_s'])} s"
            )
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(
            f"{r['name']:<18} {_fmt(r['value']):>10}  {r['unit']:<20} "
            f"{_fmt(r['baseline_value']):>10} {ratio:>7}  {r['compile_s']:>9.1f}  "
            + "; ".join(extra)
        )
        if r["baseline"]:
            notes.append(f"  {r['name']}: baseline = {r['baseline']}")
        if r["note"]:
            notes.append(f"  {r['name']}: {r['note']}")
    if "train_step" in {r["name"] for r in report["rows"]}:
        tr = next(r for r in report["rows"] if r["name"] == "train_step")
        notes.append(
            f"  MFU = tokens/s x ({tr['config']['flop_formula']}) / peak; peak "
            f"{_fmt(tr['config']['peak_flops'])}FLOP/s from {tr['config']['peak_source']}"
        )
    return "\n".join(lines + (["notes:"] + notes if notes else []))


def default_out(report_device: dict[str, Any], suite: str) -> pathlib.Path:
    """benchmarks/results/bench-<suite>-<device>.json next to the package (or in the cwd)."""
    kind = report_device["device_kind"] if report_device["platform"] != "cpu" else "cpu"
    slug = "".join(c if c.isalnum() else "_" for c in kind.lower()).strip("_")
    root = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    if not root.parent.is_dir():
        root = pathlib.Path("benchmarks") / "results"
    return root / f"bench-{suite}-{slug}.json"

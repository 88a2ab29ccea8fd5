"""Every hot program compiles for CUDA and TPU: exported from this CPU at the paper's sizes.

`jax.export` lowers a jitted program for another platform on this machine, from abstract shapes
(`jax.ShapeDtypeStruct`: nothing is allocated, nothing runs). Each program below is the one the
package runs (the same jitted function, shardings and static settings) at the paper's sizes:
the OPT-125m train step (128 x 64, bf16, data x fsdp over the 8 simulated CPU devices), its
eval step, the paper's beam search (256 prompts x 5 beams, 64 new tokens, bf16 as
`decode.dtype: auto` resolves on an accelerator), the theory blocks at 10^6 chains (Gaussian
exact and sample, discrete exact), GMM EM, the VAE's training epoch and the ground-truth
sources' samplers. The exported module must hold no CPU-only custom call (LAPACK, CPU
callbacks) and no host callback (which `jax.export` refuses anyway): those would fail to compile
on the accelerator, or run on its host. tests/unit/test_xla_tricks.py checks the per-platform
tricks themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

from collapse_jax import config as config_lib
from collapse_jax import gmm
from collapse_jax.bench.baselines import zipf_probs
from collapse_jax.jaxtools import sharding
from collapse_jax.lm import experiment, families, opt, programs
from collapse_jax.lm import source as source_lib
from collapse_jax.lm.evaluate import Evaluator
from collapse_jax.loop import blocks, core
from collapse_jax.loop.keys import base_key, reference_key
from collapse_jax.loop.schedule import Schedule
from collapse_jax.theory import discrete, gaussian
from collapse_jax.vae import model as vae
from tests.integration.golden_runs import CONFIGS

ACCELERATORS = ("cuda", "tpu")
CHAINS = 10**6
KEY = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)

# Custom-call targets that exist only on a CPU, and host callbacks (pure_callback, io_callback,
# jax.debug): `stablehlo.custom_call @name` in the module text.
_CUSTOM_CALL = re.compile(r"custom_call @([\w.$-]+)")
_CPU_ONLY = re.compile(r"lapack|cpu|callback|host|xla_python", re.IGNORECASE)


def exported(fn, platform: str, *args) -> export.Exported:
    return export.export(fn if hasattr(fn, "trace") else jax.jit(fn), platforms=(platform,))(*args)


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


def cpu_only_calls(text: str) -> list[str]:
    """The custom calls of a module's text that a CUDA or TPU program must not hold."""
    return sorted({t for t in _CUSTOM_CALL.findall(text) if _CPU_ONLY.search(t)})


def check_accelerators(fn, *args) -> dict[str, export.Exported]:
    out = {}
    for platform in ACCELERATORS:
        exp = exported(fn, platform, *args)
        text = exp.mlir_module()
        assert exp.platforms == (platform,)
        assert cpu_only_calls(text) == [], f"{platform}: CPU-only calls {cpu_only_calls(text)}"
        assert "callback" not in text, f"{platform}: a host callback"
        out[platform] = exp
    return out


def test_the_check_finds_cpu_only_calls():
    """The controls: a Cholesky exported for CPU calls LAPACK (flagged), for CUDA/TPU not; and
    `jax.export` refuses a program with a host callback outright, so every export below that
    succeeds holds none."""
    a = jax.ShapeDtypeStruct((4, 3, 3), jnp.float32)
    calls = cpu_only_calls(exported(jnp.linalg.cholesky, "cpu", a).mlir_module())
    assert any("lapack" in t for t in calls), calls
    check_accelerators(jnp.linalg.cholesky, a)

    def with_callback(x):
        return jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    with pytest.raises(NotImplementedError, match="host_callbacks"):
        exported(with_callback, "cpu", a)


# ----------------------------------------------------------------------------------------------
# The language model
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def opt125m():
    """OPT-125m with abstract parameters (never allocated)."""
    return nnx.eval_shape(lambda: families.init_random(opt.OPTConfig.opt_125m(), jax.random.key(0)))


def test_opt125m_train_and_eval_steps_export_with_data_and_fsdp_shardings(opt125m):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    # configs/lm/opt125m_wikitext2.yaml: the paper's training in bf16 compute.
    cfg = dataclasses.replace(experiment.paper_train(), batch_size=128, compute_dtype="bfloat16")
    fns, args = programs.train_step_program(opt125m, cfg, mesh=mesh, length=64)
    state, rest, batch = args[:3]
    assert batch["input_ids"].shape == (128, 64)
    for platform, exp in check_accelerators(fns.step, *args).items():
        text = exp.mlir_module()
        assert exp.nr_devices == 8
        # The parameters are sharded over fsdp (here 4 ways), the batch over data x fsdp.
        assert re.search(r'sharding<@mesh, \[[^\]]*\{"fsdp"\}', text), platform
        assert '[{"data", "fsdp"}, {}]' in text, platform
        # bf16 matmuls: the program multiplies bf16 matrices.
        assert re.search(r"dot_general.*tensor<128x64x768xbf16>", text), platform

    graphdef = nnx.graphdef(opt125m)
    ev = Evaluator(graphdef, mesh, fns.state_shardings.params, fns.rest_shardings,
                   batch_size=128, compute_dtype=jnp.bfloat16)  # fmt: skip
    for exp in check_accelerators(ev.step, state.params, rest, batch).values():
        assert exp.nr_devices == 8


def test_paper_beam_search_exports_in_bf16(opt125m):
    mesh = sharding.make_mesh({"data": 8})
    settings = dataclasses.replace(
        experiment.paper_decode(), dtype="bfloat16", eos_token_ids=(2,), pad_token_id=1
    )
    fn, args = programs.search_program(opt125m, settings, mesh=mesh, batch_size=256, length=64)
    assert args[1].shape == (256, 64)
    for exp in check_accelerators(fn, *args).values():
        text = exp.mlir_module()
        # The bf16 KV cache of the generated tokens: [layers, 32 x 5 rows per device, 64, N, H].
        assert "tensor<12x160x64x12x64xbf16>" in text


# ----------------------------------------------------------------------------------------------
# The theory chains, GMM, VAE and the ground-truth sources
# ----------------------------------------------------------------------------------------------


def _mean_cov(learner, key, params, reference, data):
    """What `gaussian.simulate` keeps per generation."""
    return params.mean, params.cov


def _probs(learner, key, params, reference, data):
    """What `discrete.simulate` keeps per generation."""
    return params


def _theory_blocks(learner, sample_size: int, measure):
    """The two programs `simulate` runs on a chunk of 10^6 chains: generation 0 and a scanned
    block of `SCAN_BLOCK` generations (its carry's shapes from the first, abstractly)."""
    schedule = Schedule.build([sample_size] * 100, mode="replace")
    key = base_key(jax.random.key(0))
    reference = learner.reference(reference_key(key))
    chains = jax.ShapeDtypeStruct((CHAINS,), jnp.uint32)
    static = learner.static_sample_size
    policy = schedule.policy
    first = functools.partial(
        core.block, learner, policy, measure, scan=False, first=True,
        counts=int(schedule.counts(0)) if static else None,
    )  # fmt: skip
    first_args = (key, chains, np.zeros(1, np.int32), None, reference,
                  np.atleast_1d(np.asarray(schedule.counts(0), np.int32))[None])  # fmt: skip
    carry, _ = jax.eval_shape(first, *first_args)
    gens = np.arange(1, 1 + blocks.SCAN_BLOCK, dtype=np.int32)
    rows = np.stack([np.atleast_1d(np.asarray(schedule.counts(int(g)), np.int32)) for g in gens])
    scan = functools.partial(
        core.block, learner, policy, measure, scan=True, first=False,
        counts=tuple(int(c) for c in schedule.counts(1)) if static else None,
    )  # fmt: skip
    return [(first, first_args), (scan, (key, chains, gens, carry, reference, rows))]


THEORY = {
    "gaussian_exact": lambda: (
        gaussian.GaussianLearner(gaussian.GaussianConfig(dim=1, method="exact")), 1000, _mean_cov,
    ),
    "gaussian_sample": lambda: (
        gaussian.GaussianLearner(gaussian.GaussianConfig(dim=1, method="sample")), 100, _mean_cov,
    ),
    "discrete_exact": lambda: (
        discrete.DiscreteLearner(discrete.DiscreteConfig(
            family="explicit", probs=tuple(float(p) for p in zipf_probs(10)), method="exact")),
        1000, _probs,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(THEORY))
def test_theory_blocks_of_a_million_chains_export(name):
    learner, m, measure = THEORY[name]()
    for fn, args in _theory_blocks(learner, m, measure):
        check_accelerators(fn, *args)


def test_gmm_em_exports():
    """The paper's GMM setting (2 components, k-means init, tol 1e-5, up to 2000 iterations) on
    10^4 chains of 1000 2-D points, all at once (under a trace `fit_em` runs one loop)."""
    x = jax.ShapeDtypeStruct((10_000, 1000, 2), jnp.float32)

    def fit(x, key):
        return gmm.fit_em(x, n_components=2, key=key, tol=1e-5, max_iter=2000)

    check_accelerators(fit, x, KEY)


def test_vae_training_step_exports():
    """`vae.train_step` (Adam, the paper's batch of 256 MNIST images)."""
    cfg = vae.VAEConfig()
    params = jax.eval_shape(vae.init_params, jax.random.key(0))
    opt_state = jax.eval_shape(functools.partial(vae.init_optimizer, cfg=cfg), params)
    images = jax.ShapeDtypeStruct((cfg.batch_size, 28, 28), jnp.uint8)
    mask = jax.ShapeDtypeStruct((cfg.batch_size,), jnp.float32)

    def step(p, o, x, m, k):
        return vae.train_step(p, o, x, m, k, cfg)

    for exp in check_accelerators(step, params, opt_state, images, mask, KEY).values():
        # `convs` chose XLA's convolutions and JAX's own gradients inside the program: no
        # patch matmuls (the CPU path's), only the encoder's and decoder's dense layers.
        text = exp.mlir_module()
        # 4 layers: forward and kernel gradient each, input gradient but for the first layer.
        assert _count(r"stablehlo\.convolution", text) == 4 + 4 + 3
        assert "stablehlo.dot_general" in text


@pytest.mark.parametrize("config", ["truth_markov_beam", "truth_hmm_beam"])
def test_ground_truth_source_samplers_export(config):
    """The shipped sources' samplers, drawing the paper's 37k training blocks of 64 tokens."""
    cfg = config_lib.load_config(CONFIGS / "lm" / f"{config}.yaml")
    src = source_lib.build_source(cfg.model.data.source)
    check_accelerators(lambda k: src.sample(k, 36_718, 64), KEY)

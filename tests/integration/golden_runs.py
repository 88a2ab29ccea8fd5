"""Every shipped config, shrunk to seconds, run through the command line; the golden record.

`record(case, out)` runs one case (`collapse-jax run CONFIG overrides --out OUT`) and returns
what must not change for a given seed: every `metrics.json` row (each value as its `repr`, so
`1` and `1.0`, or two floats one ulp apart, differ) and a SHA-256 of every array the run saved
(`*.npz` entries and `*.npy`/`*.safetensors` parameters: dtype, shape and bytes, not file bytes,
which carry zip timestamps); wall-clock timings are left out.

The golden file `golden/golden.json` was recorded on commit 717aaa0, before the wave-three
refactor, and re-recorded in wave three, session 2 for intended changes only (the LM study's new
metrics, provenance and learners, the training-split vocabulary, the pretrained base, bf16 in the
OPT-125m configs, the multivariate Gaussian's log-space log-det; every other case bit-identical);
tests/integration/test_golden.py reruns every case and compares. Regenerate it ONLY
for an intended change of results (say which in the commit message), from the repository root:

    COLLAPSE_JAX_DATA=/path/to/shared/data python -m tests.integration.golden_runs [CASE ...]

(with case names, only those entries are rewritten). The record also names the jax, jaxlib and
NumPy versions: XLA may round differently in another version, so the test skips there.
"""

from __future__ import annotations

import os
import sys

# As tests/conftest.py: the same fake-device count, before JAX initialises its backend.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = REPO / "collapse_jax" / "configs"
GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "golden.json"

# Shrinks shared by families. Two generations in blocks of one cross a block boundary (the
# quickstart's three in blocks of two also end on a partial block); record_trials below
# num_trials keeps a subset of chains. Most time is XLA compilation, not the sizes.
_THEORY = [
    "generation.num_generations=2", "generation.samples_per_generation=10",
    "generation.num_trials=6", "generation.block_size=1", "generation.record_trials=4",
]  # fmt: skip
_QUICKSTART = [
    "generation.num_generations=3", "generation.samples_per_generation=10",
    "generation.num_trials=6", "generation.block_size=2", "generation.record_trials=4",
]  # fmt: skip
_GMM = [
    "generation.num_generations=2", "generation.samples_per_generation=40",
    "generation.num_trials=4", "generation.block_size=1", "generation.record_trials=3",
    "model.heldout_size=64", "model.max_iter=30", "model.scatter_generations=[0,1]",
]  # fmt: skip
_KDE = [
    "model.num_points=24", "model.heldout_points=40", "generation.num_generations=2",
    "generation.num_trials=4", "generation.chunk_size=2", "generation.block_size=1",
    "generation.record_trials=3",
]  # fmt: skip
_LINREG = [
    "model.num_points=16", "model.test_points=20", "generation.num_generations=2",
    "generation.num_trials=4", "generation.record_trials=3",
]  # fmt: skip
_VAE = [
    "model.train_size=64", "model.test_size=32", "model.latent_dim=2", "model.channels=[4,8]",
    "model.epochs=1", "model.batch_size=32", "model.eval_batch_size=32", "model.probe_size=16",
    "model.grid_size=2", "generation.num_generations=2",
]  # fmt: skip
_TRUTH = [
    "model.random_init.hidden_size=16", "model.random_init.num_hidden_layers=1",
    "model.random_init.num_attention_heads=2", "model.random_init.ffn_dim=32",
    "model.random_init.max_position_embeddings=40",
    "model.data.source.vocab_size=12", "model.data.source.support=5",
    "model.data.num_train_blocks=12", "model.data.num_eval_blocks=8", "model.data.block_size=16",
    "model.train.epochs=1", "model.train.batch_size=6", "model.eval_batch_size=8",
    "model.decode.num_beams=2", "model.decode.max_new_tokens=16",
    "model.decode.min_new_tokens=16", "model.generate_batch_size=12",
    "generation.num_generations=2",
]  # fmt: skip


_PRETRAIN = [
    "model.pretrain.num_blocks=48", "model.pretrain.train.epochs=1",
    "model.pretrain.train.batch_size=12",
]  # fmt: skip


def _wikitext(data: pathlib.Path) -> list[str]:
    """The CPU WikiText configs' shrink (tests/lm/test_experiment.py's, smaller blocks)."""
    return [
        f"model.data.source={data / 'wikitext-2-raw'}",
        f"model.data.tokenizer_path={data / 'opt-125m-tokenizer'}",
        "model.data.max_train_blocks=12", "model.data.valid_holdout=8",
        "model.data.max_eval_blocks=8", "model.data.block_size=16",
        "model.random_init.hidden_size=16", "model.random_init.ffn_dim=32",
        "model.random_init.max_position_embeddings=40",
        "model.train.epochs=2", "model.train.batch_size=8", "model.eval_batch_size=8",
        "model.decode.num_beams=2", "model.decode.max_new_tokens=16",
        "model.decode.min_new_tokens=16", "model.generate_batch_size=12",
        "generation.num_generations=2", "generation.num_trials=1",
    ]  # fmt: skip


def _opt125m(data: pathlib.Path) -> list[str]:
    """The paper's OPT-125m configs need the hub weights and the full dataset; their shrink
    keeps every block they set (train, decode, schedule, policy) but swaps the pretrained model
    for a tiny random one and the hub dataset for the shared WikiText files (valid split)."""
    return [
        "model.model_path=null", "model.vocabulary=corpus", "model.random_init.seed=0",
        "model.random_init.num_hidden_layers=2", "model.random_init.num_attention_heads=4",
        "model.data.train_split=valid", "model.data.valid_split=null",
        "model.data.eval_split=test",
        "model.example_prompt=0", "mesh.data=1",
        *_wikitext(data),
    ]  # fmt: skip


def cases(data: pathlib.Path) -> dict[str, tuple[str, list[str]]]:
    """Case name -> (config path relative to collapse_jax/configs/, overrides). One case per
    shipped config."""
    out: dict[str, tuple[str, list[str]]] = {}
    out["quickstart"] = ("quickstart.yaml", _QUICKSTART)
    for name in (
        "theory_discrete",
        "theory_gaussian",
        "gaussian_likelihood_filter",
        "verification",
    ):
        out[name] = (f"{name}.yaml", _THEORY)
    for p in sorted((CONFIGS / "theory").glob("*.yaml")):
        out[f"theory/{p.stem}"] = (f"theory/{p.name}", _THEORY)
    for name in ("gmm", "gmm_cpu", "gmm_tails", "gmm_tails_cpu"):
        out[name] = (f"{name}.yaml", _GMM)
    for name in ("kde_gaussian", "kde_moons", "kde_likelihood_filter"):
        out[name] = (f"{name}.yaml", _KDE)
    for name in ("linreg", "linreg_policies", "linreg_likelihood_filter"):
        out[name] = (f"{name}.yaml", _LINREG)
    mnist = f"model.data_dir={data / 'mnist'}"
    for name in ("vae", "vae_cpu", "vae_mix"):
        out[name] = (f"{name}.yaml", [*_VAE, mnist])
    for p in sorted((CONFIGS / "lm").glob("truth_*.yaml")):
        pretrained = "\n  pretrain:" in p.read_text()  # a pretrained base: shrink it too
        out[f"lm/{p.stem}"] = (f"lm/{p.name}", [*_TRUTH, *(_PRETRAIN if pretrained else [])])
    for name in ("opt_wikitext_cpu", "opt_wikitext_cpu_keep10", "opt_wikitext_cpu_sample"):
        out[f"lm/{name}"] = (f"lm/{name}.yaml", _wikitext(data))
    for name in (
        "opt125m_wikitext2",
        "opt125m_wikitext2_keep10",
        "gpt2_wikitext2",
        "pythia160m_wikitext2",
        "smollm2_135m_wikitext2",
    ):
        out[f"lm/{name}"] = (f"lm/{name}.yaml", _opt125m(data))
    return out


def shipped_configs() -> set[str]:
    """Every config the repository ships that the golden record must cover."""
    found = {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.glob("*.yaml")}
    found |= {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.glob("theory/*.yaml")}
    found |= {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.glob("lm/*.yaml")}
    return found


def _array_digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    h = hashlib.sha256()
    h.update(f"{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _arrays(run_dir: pathlib.Path) -> dict[str, str]:
    """`relative/path.npz:key` -> digest for every array file in the run directory."""
    out = {}
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir).as_posix()
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                for k in sorted(z.files):
                    if _timing(k):
                        continue
                    out[f"{rel}:{k}"] = _array_digest(z[k])
        elif p.suffix == ".npy":
            out[rel] = _array_digest(np.load(p, allow_pickle=False))
        elif p.suffix == ".safetensors":
            from safetensors.numpy import load_file

            for k, v in sorted(load_file(p).items()):
                out[f"{rel}:{k}"] = _array_digest(v)
    return out


def _timing(name: str) -> bool:
    """Wall-clock measurements (`fit_seconds`, `trials/eval_seconds`) are not results."""
    return "seconds" in name


def _rows(path: pathlib.Path) -> list[dict[str, str]]:
    rows = json.loads(path.read_text())
    return [{k: repr(v) for k, v in row.items() if not _timing(k)} for row in rows]


def record(case: tuple[str, list[str]], out: pathlib.Path) -> dict:
    """Runs one case through the command line in `out`; its record, one entry per experiment
    (a suite config writes one run directory per experiment)."""
    from collapse_jax import cli

    config, overrides = case
    argv = ["run", str(CONFIGS / config), *overrides, "--out", str(out), "--no-progress"]
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(argv)
    if code != 0:
        raise RuntimeError(f"collapse-jax {' '.join(argv)} exited with {code}")
    dirs = (
        [out]
        if (out / "metrics.json").exists()
        else sorted(d for d in out.iterdir() if (d / "metrics.json").exists())
    )
    return {
        d.relative_to(out).as_posix() or ".": {
            "metrics": _rows(d / "metrics.json"),
            "arrays": _arrays(d),
        }
        for d in dirs
    }


def versions() -> dict[str, str]:
    import jax
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": np.__version__}


def data_dir() -> pathlib.Path:
    env = os.environ.get("COLLAPSE_JAX_DATA")
    d = pathlib.Path(env) if env else REPO.parent / "shared" / "data"
    if not d.is_dir():
        raise SystemExit(f"data folder not found: {d} (set COLLAPSE_JAX_DATA)")
    return d


def main(names: list[str]) -> None:
    import time

    all_cases = cases(data_dir())
    unknown = [n for n in names if n not in all_cases]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {sorted(all_cases)}")
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() and names else {"cases": {}}
    golden["versions"] = versions()
    for name in names or list(all_cases):
        t, cpu = time.perf_counter(), time.process_time()
        with tempfile.TemporaryDirectory() as tmp:
            golden["cases"][name] = record(all_cases[name], pathlib.Path(tmp) / "run")
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        print(f"{name}: {wall:.1f} s ({cpu:.1f} s CPU)", file=sys.stderr, flush=True)
    golden["cases"] = dict(sorted(golden["cases"].items()))
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])

"""The known-language study in one command: `collapse-jax study lm [--quick] --out DIR`.

One sweep (`collapse_jax.sweep`) over the grid of issue 22, all on the known language of
`lm/truth_markov_beam.yaml` (a Zipfian Markov chain over 64 tokens, 16 continuations per
context, Zipf(1) weights):

- learner: `oracle` (the truth itself, never refitted: `model.kind: oracle`), `counts` (the
  exact learner, `model.kind: ngram`: add-0.01 bigram counts refitted every generation), `base`
  (the small OPT fine-tuned every generation from a base pretrained on a related language,
  `lm.base`), `scratch` (the same OPT trained from its random init every generation, lr 5e-3);
- decoder: `beam_paper` (5 beams, repetition penalty 3.0: the paper's), `beam` (5 beams, no
  penalty), `sample` (ancestral sampling at temperature 1, no top-k: the model's own
  distribution);
- policy: `replace` (Shumailov et al.), `mix10` (90 % new synthetic, 10 % real: the paper's
  keep-10 %), `accumulate` (Gerstgrasser et al.: every generation's data kept, the fit sees the
  whole pool), `accumulate_subsample` (Kazdan et al.: the pool kept, each fit on a subsample of
  replace's size, hence replace's compute);
- seed: 0, 1, 2 (the chain's seed and the real data's; the language is the same).

The axes are named (`sweep.Choice`): a learner point carries its own model block (the table
learners take no `pretrain:`; the scratch transformer drops it and trains at its own learning
rate), so the grid is one product without refused points. `SIZES` shrinks the quick-start config
for the study (`full`: designed for <= 2 h on a 2-core CPU; `quick`: <= 10 min); the sizes are
overrides, listed in `sweep.json` with every point's.

The study's own figures and table (`lm.study_figures`, `figures/study_*.png`; `lm.study_data`,
`metrics.csv`) average every (learner, decoder, policy) over the seeds (mean +- standard error)
and decompose each collapse metric m of a learner L under decoder D and policy P at generation
g into parts that sum exactly to it (seed by seed, so each part has its own standard error):

    m(L, D)  =  m(oracle, sample)                          floor: the truth sampled
             +  m(counts, sample) - m(oracle, sample)      recursion: finite-sample refitting
             +  m(L, sample)      - m(counts, sample)      approximation: the learner's excess
             +  m(L, D)           - m(L, sample)           decoder: what D adds to sampling

(every term at the same policy P, generation g and seed; for L = oracle, never refitted, the
recursion and approximation parts are 0 and the decoder part is m(oracle, D) - m(oracle,
sample); for L = counts the approximation part is 0). The floor is 0 for the KL (the oracle is
the truth) and the lost mass of a finite exact sample for the data. The recursion part of
generation 0 is the exact learner's estimation error on the real data. A part may be negative
(a decoder that keeps the data closer to the truth than sampling would); the figure draws it
below zero.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

from collapse_jax import config as config_lib
from collapse_jax import sweep as sweep_lib
from collapse_jax.lm import study_data

log = logging.getLogger(__name__)

CONFIG = "lm/truth_markov_beam.yaml"
SEEDS = (0, 1, 2)

_TABLE = {"model.pretrain": None}
LEARNERS = {
    "oracle": {"model.kind": "oracle", **_TABLE},
    "counts": {"model.kind": "ngram", **_TABLE},
    "base": {},
    "scratch": {"model.pretrain": None, "model.train.learning_rate": 5.0e-3},
}
POLICIES = {
    "replace": {"generation.policy": "replace"},
    "mix10": {
        "generation.policy": "mix",
        "generation.alpha": 0.9,
        "generation.beta": 0.0,
        "generation.gamma": 0.1,
    },
    "accumulate": {"generation.policy": "accumulate"},
    "accumulate_subsample": {"generation.policy": "accumulate_subsample"},
}
DECODERS = ("beam_paper", "beam", "sample")

# The language: `zipf`, the quick start's (every context Zipf(1) over its 16 continuations, so
# the mode has the same shape everywhere), or `heterogeneous` (each context 4-16 continuations
# with Dirichlet(1) weights: the mode has a different shape in every context). The base
# transformer's related language changes the Zipf exponent (`lm.base`), which a Dirichlet source
# does not have, so `heterogeneous` runs without the `base` learner.
SOURCES = {
    "zipf": {},
    "heterogeneous": {
        "model.data.source.support_min": 4,
        "model.data.source.weights": "dirichlet",
        "model.data.source.dirichlet_alpha": 1.0,
    },
}


def decode(name: str, new_tokens: int) -> dict[str, Any]:
    """The `model.decode` block of decoder `name`, writing `new_tokens` tokens per block."""
    size = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    if name == "beam_paper":
        return {**size, "num_beams": 5, "repetition_penalty": 3.0}
    if name == "beam":
        return {**size, "num_beams": 5, "repetition_penalty": 1.0}
    if name == "sample":
        return {
            **size,
            "num_beams": 1,
            "do_sample": True,
            "temperature": 1.0,
            "top_k": 0,
            "repetition_penalty": 1.0,
        }
    raise config_lib.ConfigError(f"study decoder {name!r} is not one of {', '.join(DECODERS)}")


# The sizes of each version of the study: overrides of the quick-start config, every point.
# full: 128 blocks of 32 tokens (the quick start: 256 of 64), the same model and pretrained base;
# quick: 6 generations, 128 blocks of 16 tokens, a 1-layer width-32 OPT fine-tuned for 2 epochs,
# a base pretrained on 1,024 blocks.
SIZES = {
    "full": {
        "model.data.num_train_blocks": 128,
        "model.data.num_eval_blocks": 64,
        "model.data.block_size": 32,
        "model.train.batch_size": 16,
        "model.random_init.max_position_embeddings": 64,
        "model.pretrain.num_blocks": 2048,
        "model.generate_batch_size": 128,
        "model.eval_batch_size": 64,
    },
    "quick": {
        "generation.num_generations": 6,
        "model.data.num_train_blocks": 128,
        "model.data.num_eval_blocks": 32,
        "model.data.block_size": 16,
        "model.train.epochs": 2,
        "model.train.batch_size": 32,
        "model.random_init.hidden_size": 32,
        "model.random_init.num_hidden_layers": 1,
        "model.random_init.num_attention_heads": 2,
        "model.random_init.ffn_dim": 64,
        "model.random_init.max_position_embeddings": 32,
        "model.pretrain.num_blocks": 1024,
        "model.pretrain.train.epochs": 4,
        "model.pretrain.train.batch_size": 32,
        "model.generate_batch_size": 128,
        "model.eval_batch_size": 32,
    },
}


def grid(
    version: str = "full",
    *,
    source: str = "zipf",
    learners: tuple[str, ...] | None = None,
    decoders: tuple[str, ...] = DECODERS,
    policies: tuple[str, ...] = tuple(POLICIES),
    seeds: tuple[int, ...] = SEEDS,
    extra: dict[str, Any] | None = None,
) -> list[sweep_lib.Axis]:
    """The study's axes (learner x decoder x policy x seed) with `SIZES[version]`,
    `SOURCES[source]` (and `extra`, e.g. a test's further shrink) as fixed overrides of every
    point. `learners` defaults to every learner the source allows."""
    if version not in SIZES:
        raise config_lib.ConfigError(f"study version {version!r} is not one of {sorted(SIZES)}")
    if source not in SOURCES:
        raise config_lib.ConfigError(f"study source {source!r} is not one of {', '.join(SOURCES)}")
    if learners is None:
        learners = tuple(n for n in LEARNERS if source == "zipf" or n != "base")
    elif source != "zipf" and "base" in learners:
        raise config_lib.ConfigError(
            f"study learner 'base' needs source zipf (its related language changes the Zipf "
            f"exponent; source {source!r} has Dirichlet weights)"
        )
    fixed = {**SIZES[version], **SOURCES[source], **(extra or {})}
    block = fixed.get("model.data.block_size", 64)
    for name, values in (("learner", learners), ("policy", policies), ("decoder", decoders)):
        known = {"learner": LEARNERS, "policy": POLICIES, "decoder": DECODERS}[name]
        bad = [v for v in values if v not in known]
        if bad or not values:
            raise config_lib.ConfigError(f"study {name}s must be among {', '.join(known)}: {bad}")

    def learner(name: str) -> sweep_lib.Choice:
        # fixed sizes of the pretrained base only where there is one
        sizes = {k: v for k, v in fixed.items() if not k.startswith("model.pretrain.")}
        if name == "base":
            sizes = fixed
        return sweep_lib.Choice(name, {**sizes, **LEARNERS[name]})

    return [
        ("learner", [learner(n) for n in learners]),
        ("decoder", [sweep_lib.Choice(d, {"model.decode": decode(d, block)}) for d in decoders]),
        ("policy", [sweep_lib.Choice(p, POLICIES[p]) for p in policies]),
        ("seed", [sweep_lib.Choice(str(s), {"seed": s, "model.data.seed": s}) for s in seeds]),
    ]


def make(out: str | pathlib.Path, version: str = "full", **kwargs: Any) -> sweep_lib.Sweep:
    """The study's sweep in `out` (`grid`'s arguments)."""
    return sweep_lib.Sweep(config_lib.find_config(CONFIG), grid(version, **kwargs), out)


def run_study(
    out: str | pathlib.Path, version: str = "full", *, progress: bool = False, **kwargs: Any
) -> sweep_lib.Sweep:
    """Runs (or resumes) the study in `out`, then writes `metrics.csv` and the study figures."""
    sw = make(out, version, **kwargs)
    sweep_lib.run_grid(sw, progress=progress, figures=False)
    study_data.write_metrics(sw)
    study_figures(sw)
    return sw


def study_figures(sw: sweep_lib.Sweep) -> list[pathlib.Path]:
    """The study's figures in `out/figures` (`lm.study_figures`)."""
    from collapse_jax.lm import study_figures as figures  # noqa: PLC0415 (matplotlib)

    return figures.study_figures(sw)

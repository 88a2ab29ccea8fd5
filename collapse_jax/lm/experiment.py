"""The paper's language-model experiment as a learner of the generational loop.

Every generation (Shumailov et al. 2024, "Language models" section, and its code):
  1. fine-tune OPT, starting from the pretrained model (`init_from: base`), on the current
     training blocks (64 tokens each) with AdamW and cosine annealing per epoch, evaluating the
     REAL validation blocks after every epoch and keeping the best epoch (the official code's
     `ModelCheckpoint(monitor="val_loss")`);
  2. evaluate it on the real test blocks (split perplexity and one perplexity per block, the
     quantity of the paper's histograms), next to a unigram baseline on the same tokens;
  3. regenerate the training set: every prompt block (an original training block) is continued
     by 5-way beam search with 64 new tokens (min 64) and repetition penalty 3.0, and the 64 new
     tokens form the next generation's block. With `gamma = 0.1` of the blocks are original data.

The config nests its blocks and hands them down whole: the model (a pretrained folder or hub id,
or `random_init`), `data:` (a data source picked by `kind`, `DATA_KINDS`), `train:`
(`lm.train_config.TrainConfig`) and `decode:` (`lm.settings.DecodeSettings`).

Data are int32 blocks [N, T] of the data source's token ids everywhere the loop sees them (run
directories hold OPT ids), with their provenance: the loop's data are {"data": blocks [N, T],
"origin": [N] int32}, origin -1 (`ORIGIN_REAL`) for a real block and g for a block written by
generation g's model (`stamp`, `loop.learner.Provenance`), saved with the blocks in every
data file of the run directory (data/gen_XXXXX.npz: "data" and "origin").

With `vocabulary: corpus` the model's vocabulary is restricted to the ids that occur in the training
blocks (plus the special ids): a much smaller output layer on a CPU; ids of the validation and test
blocks that training never saw map to the tokenizer's UNK id. Blocks are mapped to compact ids on
the way into the model and back on the way out; the saved model then has `vocab_size` = the compact
size and its folder holds `token_ids.npy`, the OPT id of every compact id (`token_ids[c]`), so
transformers loads it and ids map with one lookup.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from collapse_jax import config as config_lib
from collapse_jax.jaxtools import processes, sharding
from collapse_jax.lm import base as base_lib
from collapse_jax.lm import decode, families, hub, opt, tables, truth
from collapse_jax.lm import programs as programs_lib
from collapse_jax.lm import source as source_lib
from collapse_jax.lm import train as train_lib
from collapse_jax.lm.data import LMCorpus, WikiTextConfig
from collapse_jax.lm.evaluate import perplexity, unigram_perplexity
from collapse_jax.lm.placement import default_mesh
from collapse_jax.lm.regenerate import regenerate
from collapse_jax.lm.settings import DecodeSettings, resolve_decode_dtype
from collapse_jax.lm.source import SourceDataConfig
from collapse_jax.lm.train_config import TrainConfig
from collapse_jax.lm.vocab import Vocab
from collapse_jax.loop.learner import AbstractLearner
from collapse_jax.rundir import fileio

# Data sources of the LM experiment: `data.kind` -> "module:ConfigClass"; each class is a frozen
# config with a `load() -> lm.data.LMCorpus` method (a ground-truth language plugs in here).
DATA_KINDS: dict[str, str] = {
    "wikitext": "collapse_jax.lm.data:WikiTextConfig",
    # A known stochastic language: every generation is also measured exactly against the truth
    # (collapse_jax.lm.truth); the rest of the experiment is unchanged.
    "source": "collapse_jax.lm.source:SourceDataConfig",
}


def _check(ok: bool, key: str, message: str) -> None:
    config_lib.require(ok, f"model.{key}", message)


def paper_decode() -> DecodeSettings:
    """The paper's regeneration: 5 beams, exactly 64 new tokens, repetition penalty 3.0; in
    bfloat16 on accelerators and float32 on CPU (`dtype: auto`)."""
    return DecodeSettings(
        max_new_tokens=64, min_new_tokens=64, num_beams=5, repetition_penalty=3.0, dtype="auto"
    )


def paper_train() -> TrainConfig:
    """The paper's fine-tuning (lm.train_config.TrainConfig defaults) keeping the best epoch."""
    return TrainConfig(keep_best=True)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RandomOPTConfig:
    """Architecture of a randomly initialised model (when no pretrained model is given).

    Attributes:
      family: the model family (`lm.families`: "opt", "gpt2", ...); the other fields are
        common to every family, the rest of its config keeps the family's defaults, and its
        special ids are the data's (pad 1, bos = eos 2: OPT's tokenizer and the known language).
      hidden_size, num_hidden_layers, num_attention_heads, ffn_dim, max_position_embeddings:
        as transformers' `OPTConfig` (the defaults are opt-125m's; `ffn_dim` is the MLP width,
        the family's `intermediate_size` / `n_inner`).
      vocab_size: OPT's padded vocabulary (50272 for the real tokenizer); ignored with
        `vocabulary: corpus` (the corpus decides).
      seed: seed of the random initialisation (the "pretrained" base of every generation).
    """

    family: str = "opt"
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    vocab_size: int = 50272
    seed: int = 0

    def __post_init__(self):
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "ffn_dim",
            "max_position_embeddings",
            "vocab_size",
        ):
            _check(getattr(self, name) >= 1, f"random_init.{name}", "must be >= 1")
        _check(
            self.hidden_size % self.num_attention_heads == 0,
            "random_init.hidden_size",
            "must be divisible by num_attention_heads",
        )
        known = [f.name for f in families.FAMILIES]
        _check(self.family in known, "random_init.family", f"must be one of {known}")

    def architecture(self, vocab_size: int) -> Any:
        """The family's config with these fields and `vocab_size` (validated by the family)."""
        family = families.family_named(self.family)
        return family.config_class.from_hf_dict(
            {
                "model_type": family.model_types[0],
                "vocab_size": vocab_size,
                "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads,
                "ffn_dim": self.ffn_dim,
                "intermediate_size": self.ffn_dim,
                "max_position_embeddings": self.max_position_embeddings,
                "pad_token_id": 1,
                "bos_token_id": 2,
                "eos_token_id": 2,
            }
        )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class OPTExperimentConfig:
    """The language-model experiment (`model: {kind: opt, ...}`); defaults are the paper's.

    On a ground-truth source (`data: {kind: source}`) two more learners share this block, the
    loop, the decoders and the metrics (`OracleExperimentConfig`, `NgramExperimentConfig`):
    `kind: oracle` (the truth itself, never refitted: the decoder's effect alone) and
    `kind: ngram` (the exact learner: the add-alpha count estimate of a Markov source's
    transition table, refitted every generation; see `lm.tables`). The OPT fields
    (`model_path`, `random_init`, `train`, `pretrain`) are unused by those two; `learner` names
    which of the three a config is ("transformer", "oracle", "counts").

    Attributes:
      model_path: a Hugging Face model folder (config.json + weights) or a hub id
        (`facebook/opt-125m`, `gpt2`, through the hub cache; see `lm.hub`) of any family of
        `lm.families` (config.json's `model_type` picks it); None = a random model built from
        `random_init`.
      random_init: family and architecture of the random model used when `model_path` is None.
      vocabulary: "full" (the model's own vocabulary) or "corpus" (random_init only: the ids
        that occur in the training blocks plus the special ids, other ids -> UNK; see the
        module docstring).
      param_dtype: dtype of the parameters ("float32" or "bfloat16").
      data: the data source, a block with a `kind` (default `wikitext`, `lm.data.WikiTextConfig`:
        source, tokenizer_path, train/valid/eval splits, block_size, ...).
      train: the fine-tuning settings (`lm.train_config.TrainConfig`: epochs, batch_size,
        learning_rate, schedule, compute_dtype, keep_best, ...); `pad_token_id` is the model's.
      decode: the regeneration settings (`lm.settings.DecodeSettings`: max_new_tokens,
        min_new_tokens, num_beams, repetition_penalty, do_sample, dtype, ...). Empty
        `eos_token_ids` and null `pad_token_id` take the model's ids; `dtype` (default "auto":
        bfloat16 on accelerators, float32 on CPU, decided when the run starts) is the compute
        and KV-cache dtype of the regeneration and the example continuation, recorded in the
        run directory's `decode.json`.
      generate_batch_size: prompt blocks per compiled beam-search call.
      eval_batch_size: blocks per evaluation forward pass (test split, figures).
      example_prompt: index of the training block whose continuation by every generation's
        model is written as text (the paper's Example 1); null = none.
      histogram_bins: bins of the per-sequence perplexity histograms.
      count_smoothing: alpha of the `ngram` learner (> 0, so its KL to the truth is finite).
      pretrain: a base pretrained once on a related language, which every generation starts
        from (`lm.base.PretrainConfig`; `data: {kind: source}` and `random_init` only); null =
        every generation starts from the random init.
    """

    kind: ClassVar[str] = "opt"
    model_path: str | None = None
    random_init: RandomOPTConfig = dataclasses.field(default_factory=RandomOPTConfig)
    vocabulary: Literal["full", "corpus"] = "full"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    data: Any = dataclasses.field(default_factory=WikiTextConfig)
    train: TrainConfig = dataclasses.field(default_factory=paper_train)
    decode: DecodeSettings = dataclasses.field(default_factory=paper_decode)
    generate_batch_size: int = 64
    eval_batch_size: int = 128
    example_prompt: int | None = 0
    histogram_bins: int = 60
    count_smoothing: float = 0.01
    pretrain: base_lib.PretrainConfig | None = None

    def __post_init__(self):
        if isinstance(self.data, dict):  # built from YAML: the class is picked by `kind`
            object.__setattr__(self, "data", build_data_config(self.data))
        _check(
            hasattr(self.data, "load") and isinstance(getattr(self.data, "kind", None), str),
            "data",
            f"must be a data source block with a kind, one of {sorted(DATA_KINDS)}",
        )
        for name in ("generate_batch_size", "eval_batch_size", "histogram_bins"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1 (got {getattr(self, name)})")
        _check(
            self.example_prompt is None or self.example_prompt >= 0,
            "example_prompt",
            "must be >= 0 or null",
        )
        _check(
            self.vocabulary == "full" or self.model_path is None,
            "vocabulary",
            "'corpus' restricts a randomly initialised model; a pretrained model keeps 'full'",
        )
        _check(
            self.vocabulary == "full" or not isinstance(self.data, SourceDataConfig),
            "vocabulary",
            "a ground-truth source (data.kind: source) has its own small vocabulary: use 'full'",
        )
        _check(
            self.learner == "transformer" or isinstance(self.data, SourceDataConfig),
            "kind",
            f"{self.kind!r} needs a ground-truth source (data.kind: source)",
        )
        _check(
            self.learner != "counts" or self.data.source.kind == "markov",
            "kind",
            "'ngram' estimates a Markov chain's transition table: it needs a markov source",
        )
        _check(self.count_smoothing > 0, "count_smoothing", "must be > 0")
        _check(
            self.pretrain is None
            or (self.model_path is None and isinstance(self.data, SourceDataConfig)),
            "pretrain",
            "pretrains a random_init model on a related known language: needs model_path: null "
            "and data.kind: source",
        )
        _check(
            self.pretrain is None or self.learner == "transformer",
            "pretrain",
            f"pretrains the transformer; the {self.kind!r} learner has no base to pretrain",
        )
        _check(
            self.pretrain is None
            or not isinstance(self.data, SourceDataConfig)
            or self.data.source.weights == "zipf",
            "pretrain",
            "the related language is the truth's source with Zipf exponent pretrain.zipf_a; a "
            "source with weights: dirichlet has none (it would pretrain on the truth itself): "
            "set model.pretrain: null",
        )
        _check(
            self.decode.num_return_sequences == 1,
            "decode.num_return_sequences",
            "must be 1 (one new block per prompt block)",
        )

    @property
    def learner(self) -> str:
        """What is fitted every generation: "transformer", "oracle" or "counts" (by `kind`)."""
        return LEARNER_OF_KIND[self.kind]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class OracleExperimentConfig(OPTExperimentConfig):
    """`model: {kind: oracle, ...}`: the ground-truth source itself as the model, decoded by the
    `decode:` block every generation (never refitted), on the `data:` block of the OPT learner."""

    kind: ClassVar[str] = "oracle"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class NgramExperimentConfig(OPTExperimentConfig):
    """`model: {kind: ngram, ...}`: the exact learner, the add-`count_smoothing` count estimate
    of a Markov source's transition table refitted on every generation's data (`lm.tables`)."""

    kind: ClassVar[str] = "ngram"


# `model.kind` -> the learner it fits (`OPTExperimentConfig.learner`).
LEARNER_OF_KIND = {"opt": "transformer", "oracle": "oracle", "ngram": "counts"}


# Provenance of a block: real, or the generation whose model wrote it (>= 0); `sample` marks its
# blocks as new until the loop stamps them with their generation (`OPTLearner.stamp`).
ORIGIN_REAL = -1
_ORIGIN_NEW = -2


def with_origin(blocks: np.ndarray, origin: int) -> dict[str, np.ndarray]:
    """The learner's data: blocks [N, T] and their provenance, all `origin`."""
    blocks = np.asarray(blocks, np.int32)
    return {"data": blocks, "origin": np.full(len(blocks), origin, np.int32)}


def blocks_of(data: Any) -> np.ndarray:
    """The token blocks of the learner's data (a bare array: blocks without provenance)."""
    return np.asarray(data["data"] if isinstance(data, dict) else data, np.int32)


def origin_of(data: Any) -> np.ndarray | None:
    """The provenance of every block of the learner's data [N], or None when not recorded."""
    return np.asarray(data["origin"]) if isinstance(data, dict) and "origin" in data else None


def build_data_config(raw: dict) -> Any:
    """The data-source config of a `data:` block (its class picked by `kind`)."""
    raw = dict(raw)
    kind = raw.pop("kind", "wikitext")
    if kind not in DATA_KINDS:
        raise config_lib.ConfigError(
            f"model.data.kind: unknown data source {kind!r}; valid kinds: {sorted(DATA_KINDS)}"
        )
    return config_lib.build(config_lib.import_object(DATA_KINDS[kind]), raw, "model.data")


@dataclasses.dataclass(frozen=True)
class LMParams:
    """The learner's parameters: the Flax OPT model and what its fit recorded.

    Attributes:
      model: the `OPTForCausalLM` (compact vocabulary with `vocabulary: corpus`).
      info: the fit's record: `valid_loss` (one per epoch), `selected_epoch`, `fit_seconds`
        (empty for the base model); saved next to the model as `fit_info.json`.
    """

    model: Any
    info: dict = dataclasses.field(default_factory=dict)


class OPTLearner(AbstractLearner):
    """Fine-tune OPT / regenerate token blocks by beam search (non-jittable; one chain a call)."""

    jittable = False

    def __init__(self, config: OPTExperimentConfig, mesh: Any = None):
        super().__init__(config, mesh)
        self._cache: dict[str, Any] = {}

    def _mesh(self):
        """The experiment's device mesh (None: the trainer's default, all devices on data)."""
        if self.mesh_config is None:
            return None
        if "mesh" not in self._cache:
            self._cache["mesh"] = sharding.make_mesh(self.mesh_config.shape())
        return self._cache["mesh"]

    # --- data ------------------------------------------------------------------------------
    def corpus(self) -> LMCorpus:
        """The data source's real blocks (loaded once)."""
        if "corpus" not in self._cache:
            self._cache["corpus"] = self.config.data.load()
        return self._cache["corpus"]

    def vocab(self) -> Vocab | None:
        """The compact vocabulary (`vocabulary: corpus`), else None (ids pass unchanged)."""
        if self.config.vocabulary != "corpus":
            return None
        if "vocab" not in self._cache:
            # The training blocks only (and the special ids): the held-out validation and test
            # blocks must not shape the model, so their unseen ids fall into the UNK bucket.
            c = self.corpus()
            if c.unk_id is None:
                raise ValueError(
                    "model.vocabulary: 'corpus' needs a data source with an unknown-token id"
                )
            parts = [np.asarray(c.train).reshape(-1), np.asarray(c.special_ids, np.int32)]
            ids = np.unique(np.concatenate([*parts, [c.unk_id]]))
            self._cache["vocab"] = Vocab(ids, c.vocab_size, unk_id=c.unk_id)
        return self._cache["vocab"]

    def _to_model(self, blocks: np.ndarray) -> np.ndarray:
        v = self.vocab()
        blocks = np.asarray(blocks, np.int32)
        return blocks if v is None else v.to_model(blocks)

    def _to_source(self, blocks: np.ndarray) -> np.ndarray:
        v = self.vocab()
        blocks = np.asarray(blocks, np.int32)
        return blocks if v is None else v.to_source(blocks)

    def real_size(self, requested: int | None) -> int:
        """The number of training blocks (the paper regenerates the whole training set), or
        `requested` when it is smaller (a random subset of the blocks)."""
        n = len(self.corpus().train)
        return n if requested is None else min(n, requested)

    def real_data(self, key: jax.Array, num: int | None = None) -> dict[str, np.ndarray]:
        train = self.corpus().train
        blocks = train if num is None or num >= len(train) else self.subset(key, train, num)
        return with_origin(blocks, ORIGIN_REAL)

    def reference(self, key: jax.Array) -> np.ndarray:
        return self.corpus().eval

    def draw_real(self, key: jax.Array, num: int) -> dict[str, np.ndarray]:
        return with_origin(self.subset(key, self.corpus().train, num), ORIGIN_REAL)

    def subset(self, key: jax.Array, data: Any, num: int) -> Any:
        idx = np.sort(_choice(key, self.num_samples(data), num))
        return jax.tree.map(lambda x: x[idx], data)

    def stamp(self, data: dict[str, np.ndarray], generation: int) -> dict[str, np.ndarray]:
        """`loop.learner.Provenance`: the blocks `sample` wrote become generation's."""
        origin = np.where(data["origin"] == _ORIGIN_NEW, generation, data["origin"])
        return {**data, "origin": origin.astype(np.int32)}

    # --- model -----------------------------------------------------------------------------
    def init(self, key: jax.Array) -> LMParams:
        cfg = self.config
        if cfg.learner == "oracle":
            return LMParams(tables.oracle_table(self.ground_truth()))
        if cfg.learner == "counts":  # no data yet: the smoothing alone (uniform)
            return LMParams(self._count_table(np.zeros((0, cfg.data.block_size), np.int32)))
        param_dtype = jnp.dtype(cfg.param_dtype)
        if cfg.model_path is not None:
            model = families.load_pretrained(
                cfg.model_path, dtype=param_dtype, param_dtype=param_dtype
            )
            return LMParams(model)
        if cfg.pretrain is not None:  # the pretrained base (`prepare` read or made it)
            model, _ = self._cache.get("base") or self.base_model(None)
            return LMParams(base_lib.fresh_copy(model))
        # The "pretrained" base is fixed by random_init.seed, not by the chain key: every
        # generation starts from the same weights, as when loading facebook/opt-125m.
        return LMParams(self._random_model())

    def _random_arch(self) -> Any:
        vocab = self.vocab()
        return self.config.random_init.architecture(
            self._model_vocab_size() if vocab is None else len(vocab)
        )

    def _random_model(self):
        dtype = jnp.dtype(self.config.param_dtype)
        key = jax.random.key(self.config.random_init.seed)
        return families.init_random(self._random_arch(), key, dtype=dtype, param_dtype=dtype)

    def base_model(
        self, run_dir: pathlib.Path | None, *, log: Any = None
    ) -> tuple[Any, dict[str, Any]]:
        """The pretrained base of `pretrain:` and its record (`lm.base`): the run directory's
        `base/` when it holds one (checked), else pretrained now (its steps reported to `log`)
        and saved there."""
        cfg = self.config
        key = base_lib.fingerprint(
            cfg.pretrain, cfg.data, self._random_arch(), cfg.random_init.seed
        )
        folder = None if run_dir is None else pathlib.Path(run_dir) / base_lib.BASE_DIR
        found = base_lib.obtain(
            folder, key, lambda: self._pretrain_base(log), dtype=jnp.dtype(cfg.param_dtype)
        )
        self._cache["base"] = found
        return found

    def _pretrain_base(self, log: Any = None) -> tuple[Any, dict[str, Any]]:
        # Each process pretrains alone on its own devices (deterministic: the same base in every
        # process), so no collective waits for a process that reads base/ instead (process 0
        # resuming while the others, in their scratch folders, have no base/). With one process
        # the mesh is the experiment's own.
        cfg = self.config
        with processes.local_devices_only():
            mesh = (
                None if self.mesh_config is None else sharding.make_mesh(self.mesh_config.shape())
            )
            return base_lib.pretrain(
                self._random_model(), cfg.data, cfg.pretrain, mesh=mesh, log=log
            )

    def _train_config(self, model) -> TrainConfig:
        # Regenerated blocks that stopped at EOS are padded; padding is masked from the loss.
        return dataclasses.replace(self.config.train, pad_token_id=model.config.pad_token_id)

    def _count_table(self, data: np.ndarray) -> tables.MarkovTable:
        src = self.config.data.source
        tokens = source_lib.to_source_ids(data, src.vocab_size)
        return tables.fit_counts(tokens, src.order, src.vocab_size, self.config.count_smoothing)

    def fit(self, key: jax.Array, data: np.ndarray, params: LMParams, *, workdir=None, **kw):
        if self.config.learner == "oracle":  # the truth: nothing to fit
            return params
        data = blocks_of(data)
        if self.config.learner == "counts":
            return LMParams(self._count_table(data))
        start = time.perf_counter()
        valid = self.corpus().valid
        model, history = train_lib.fit(
            params.model,
            self._to_model(data),
            self._train_config(params.model),
            valid_blocks=None if valid is None else self._to_model(valid),
            mesh=self._mesh(),
            seed=_seed(key),
            checkpoint_dir=None if workdir is None else pathlib.Path(workdir) / "checkpoints",
            log=kw.get("log"),
        )
        model = _host_local(model)
        info = {
            "valid_loss": [float(v) for v in history["valid_loss"]],
            "selected_epoch": int(history["selected_epoch"][0]),
            "train_loss_last_epoch": float(
                np.mean(history["train_loss"][-max(1, _steps_per_epoch(history)) :])
            ),
            "fit_seconds": time.perf_counter() - start,
        }
        return LMParams(model, info)

    def evaluate(self, key: jax.Array, params: LMParams, reference: np.ndarray) -> dict[str, Any]:
        start = time.perf_counter()
        model = params.model
        if self._table():
            per_seq = self._table_perplexity(model, reference)
        else:
            per_seq = perplexity(
                model,
                self._to_model(reference),
                batch_size=self.config.eval_batch_size,
                per_sequence=True,
                mesh=self._mesh(),
                compute_dtype=self.config.train.compute_dtype,
                pad_token_id=model.config.pad_token_id,
            )
        nll = np.log(per_seq)
        out: dict[str, Any] = {
            "ppl": float(np.exp(nll.mean())),  # exp of the mean token loss (full blocks)
            "unigram_ppl": self.unigram_ppl(),
            "seq_ppl_median": float(np.median(per_seq)),
            "seq_ppl_p95": float(np.quantile(per_seq, 0.95)),
            "seq_ppl_p05": float(np.quantile(per_seq, 0.05)),
            "per_sequence_ppl": per_seq.astype(np.float32),
        }
        info = params.info
        if info.get("valid_loss"):
            curve = np.exp(np.minimum(np.asarray(info["valid_loss"], np.float64), 700.0))
            out["valid_ppl_curve"] = curve.astype(np.float32)  # one per epoch
            out["selected_epoch"] = float(info["selected_epoch"])
            out["valid_ppl"] = float(curve[info["selected_epoch"] - 1])
        if "fit_seconds" in info:
            out["fit_seconds"] = float(info["fit_seconds"])
        if self.config.pretrain is not None:  # where every generation started from
            base_info = (self._cache.get("base") or self.base_model(None))[1]
            out["base_kl_to_truth"] = float(base_info["kl_to_truth"])
        truth_source = self.ground_truth()
        if truth_source is not None:  # exact metrics against the known language
            out.update(truth.evaluate_model(
                model, truth_source, self._to_model(reference),
                batch_size=self.config.eval_batch_size, q=self.config.data.tail_mass,
            ))  # fmt: skip
        out["eval_seconds"] = time.perf_counter() - start
        if self.config.example_prompt is not None:
            out["example_continuation"] = self._continue_example(model)
        return out

    def _table(self) -> bool:
        """Whether the learner is a table model (`lm.tables`) rather than the transformer."""
        return self.config.learner != "transformer"

    def _table_perplexity(self, model: tables.TableModel, reference: np.ndarray) -> np.ndarray:
        """Per-block perplexity of a table model (positions 1..T-1, as the transformer's)."""
        ids = self._to_model(reference)
        v = self.config.data.source.vocab_size
        logq = truth.model_log_probs(model, ids, v)[:, 1:]  # [N, T-1, V]
        x = source_lib.to_source_ids(ids, v)[:, 1:]
        picked = np.take_along_axis(np.asarray(logq, np.float64), x[..., None], -1)[..., 0]
        return np.exp(-picked.mean(1))

    def ground_truth(self):
        """The ground-truth source of `data: {kind: source}` (`lm.source`), else None."""
        if not isinstance(self.config.data, SourceDataConfig):
            return None
        return source_lib.build_source(self.config.data.source)

    def data_metrics(self, data: Any) -> dict[str, Any]:
        """Metrics of a generation's training data: exact ones under the ground truth (if any);
        on real text, the share of repeated 4-grams within a block (`data_repetition`,
        seq-rep-4 of Welleck et al. 2020: what beam search does to the data).

        With the blocks' provenance (`origin`), `synthetic_share` (the share of blocks a model
        wrote) and, when the data hold synthetic blocks, every scalar metric of those blocks
        alone with the prefix `synthetic_` (e.g. `synthetic_support_coverage` next to
        `support_coverage` of the whole pool: under mix or accumulate the pool's value mostly
        scores the real blocks kept)."""
        blocks, origin = blocks_of(data), origin_of(data)
        out = self._block_metrics(blocks)
        if origin is not None:
            synthetic = origin != ORIGIN_REAL
            out["synthetic_share"] = float(synthetic.mean())
            if synthetic.any():
                part = self._block_metrics(blocks[synthetic])
                out.update({f"synthetic_{k}": v for k, v in part.items() if np.ndim(v) == 0})
        return out

    def _block_metrics(self, blocks: np.ndarray) -> dict[str, Any]:
        src = self.ground_truth()
        if src is None:
            return {"data_repetition": truth.repetition_rate(blocks)}
        return truth.data_metrics(src, source_lib.to_source_ids(blocks, src.vocab_size))

    def prepare(self, run_dir: pathlib.Path, *, log: Any = None) -> None:
        """Records the decode dtype this process resolved (`decode.json`: the setting, the
        backend and the dtype; one entry more when a resumed run resolves it differently), saves
        the ground-truth source in the run directory (checks it when resuming), and with
        `pretrain:` the pretrained base (`base/`; checked and reused when resuming; its
        pretraining steps go to `log`, generation -1 of metrics.jsonl)."""
        _record_decode_dtype(pathlib.Path(run_dir) / "decode.json", self.config.decode.dtype)
        src = self.ground_truth()
        if src is None:
            return
        if self.config.pretrain is not None:
            self.base_model(run_dir, log=log)
        folder = pathlib.Path(run_dir) / "source"
        if (folder / "source.json").is_file():
            source_lib.load_source(folder)  # raises if the saved source differs
        else:
            source_lib.save_source(src, folder)

    def unigram_ppl(self) -> float:
        """Test perplexity of an add-one unigram model of the training split (the baseline)."""
        if "unigram" not in self._cache:
            c = self.corpus()
            vocab = self.vocab()
            size = len(vocab) if vocab is not None else self._model_vocab_size()
            self._cache["unigram"] = unigram_perplexity(
                self._to_model(c.train), self._to_model(c.eval), size
            )
        return self._cache["unigram"]

    def _model_vocab_size(self) -> int:
        if self.config.model_path is None:
            if isinstance(self.config.data, SourceDataConfig):  # V + pad/bos/eos, not 50272
                return self.config.data.model_vocab_size
            return self.config.random_init.vocab_size
        cfg = json.loads((hub.resolve(self.config.model_path) / "config.json").read_text())
        return int(cfg["vocab_size"])

    def _decode_settings(self, model) -> DecodeSettings:
        d, mc = self.config.decode, model.config
        return dataclasses.replace(
            d,
            eos_token_ids=d.eos_token_ids or (int(mc.eos_token_id),),
            pad_token_id=mc.pad_token_id if d.pad_token_id is None else d.pad_token_id,
            dtype=resolve_decode_dtype(d.dtype),
        )

    def _continue_example(self, model) -> np.ndarray:
        """This model's continuation of the example prompt (source ids), the paper's Example 1."""
        train = self.corpus().train
        i = min(self.config.example_prompt, len(train) - 1)
        settings = self._decode_settings(model)
        if self._table():
            ids = self._to_model(train[i : i + 1])
            new = tables.generate(model, ids, settings, seed=0, batch_size=1)
            return self._to_source(new[0])
        graphdef, state = nnx.split(model)
        ids = jnp.asarray(self._to_model(train[i : i + 1]))
        out = decode.compiled_search(graphdef, settings)(
            state, ids, jnp.ones_like(ids), decode.prompt_keys(0, np.arange(1))
        )
        return self._to_source(np.asarray(out.tokens)[0])

    def sample(self, key: jax.Array, params: LMParams, num: int, *, workdir=None, **kw):
        cfg = self.config
        model = params.model
        prompts = self.corpus().train
        # The paper continues the original training blocks; a smaller share takes a random
        # subset of them (kept in order).
        if num < len(prompts):
            prompts = prompts[np.sort(_choice(key, len(prompts), num))]
        elif num > len(prompts):
            raise ValueError(f"cannot regenerate {num} blocks from {len(prompts)} prompts")
        if self._table():
            new = tables.generate(
                model,
                self._to_model(prompts),
                self._decode_settings(model),
                seed=_seed(key),
                batch_size=cfg.generate_batch_size,
            )
            blocks = _to_blocks(new, cfg.data.block_size, model.config.pad_token_id)
            return with_origin(self._to_source(blocks), _ORIGIN_NEW)
        # Without a workdir (several processes: see loop.sequential) nothing is stored.
        out = pathlib.Path(workdir) / "regenerated" if workdir is not None else None
        new = regenerate(
            model,
            self._to_model(prompts),
            out,
            batch_size=cfg.generate_batch_size,
            mesh=self._mesh(),
            settings=self._decode_settings(model),
            seed=_seed(key),
            progress=getattr(kw.get("log"), "progress", False),
        )
        blocks = _to_blocks(np.asarray(new), cfg.data.block_size, model.config.pad_token_id)
        return with_origin(self._to_source(blocks), _ORIGIN_NEW)

    # --- persistence -----------------------------------------------------------------------
    def save_params(self, path: pathlib.Path, params: LMParams) -> None:
        if self._table():
            tables.save_table(params.model, path)
            return
        families.save_pretrained(params.model, path)
        fileio.atomic_write_json(path / "fit_info.json", params.info)
        vocab = self.vocab()
        if vocab is not None:
            np.save(path / "token_ids.npy", vocab.ids)

    def load_params(self, path: pathlib.Path, template) -> LMParams:
        if self._table():
            return LMParams(tables.load_table(path))
        dtype = jnp.dtype(self.config.param_dtype)
        model = families.load_pretrained(path, dtype=dtype, param_dtype=dtype)
        info_file = pathlib.Path(path) / "fit_info.json"
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        return LMParams(model, info)

    def _planned_arch(self) -> tuple[Any, str]:
        """(the model's architecture, where it comes from) without loading weights or data:
        `random_init`, the model's `config.json` when at hand without a download (a local
        folder, or a hub id in the hub cache), else OPT-125m's (assumed); a corpus vocabulary
        is estimated at WikiText-2's valid + test size."""
        c = self.config
        if c.model_path is None:
            r = c.random_init
            vocab = r.vocab_size if c.vocabulary == "full" else _CORPUS_VOCAB_ESTIMATE
            return r.architecture(vocab), "random_init"
        found = _cached_model_config(c.model_path)
        if found is None:
            return opt.OPTConfig.opt_125m(), "assumed OPT-125m (config.json not at hand)"
        return families.config_from_hf_dict(found[0]), found[1]

    def programs(self, cfg: Any) -> list[tuple[str, Callable[[], Any]]]:
        """A generation's compiled programs, lowered from abstract shapes (`lm.programs`; the
        memory plan of `--dry-run`): the train step at `train.batch_size` and the
        regeneration's search at `generate_batch_size`, on the experiment's mesh, with the
        model built as `init` builds it (architecture as in `plan`). A table learner
        (`kind: oracle | ngram`, a table of V^k x V floats) has none: []."""
        c = self.config
        if self._table():
            return []
        arch, _ = self._planned_arch()
        dtype = jnp.dtype(c.param_dtype)
        model = families.abstract_model(arch, dtype=dtype, param_dtype=dtype)
        mesh = self._mesh()
        length = c.data.block_size
        tcfg = self._train_config(model)
        settings = self._decode_settings(model)
        compute = tcfg.compute_dtype or dtype.name
        train_name = f"train step ({tcfg.batch_size} x {length} tokens, {compute} compute)"
        search_name = (
            f"regeneration ({c.generate_batch_size} prompts x {settings.num_beams} beams, "
            f"{settings.max_new_tokens} new tokens, {settings.dtype or dtype.name})"
        )
        return [
            (
                train_name,
                lambda: programs_lib.lower_train_step(
                    model, tcfg, mesh=mesh or default_mesh(), length=length
                ),
            ),
            (
                search_name,
                lambda: programs_lib.lower_search(
                    model,
                    settings,
                    mesh=mesh or sharding.make_mesh(),
                    batch_size=c.generate_batch_size,
                    length=length,
                ),
            ),
        ]

    def plan(self, cfg: Any) -> dict[str, Any]:
        """What a run of `cfg` will do and write, for `--dry-run` (no data or weights loaded).

        The model's size comes from its `config.json` when that is at hand without a download
        (a local folder, or a hub id already in the hub cache), else OPT-125m's is assumed
        (`parameters_from` says which); a corpus vocabulary is estimated at WikiText-2's
        valid + test size (an upper bound for a subset of those splits). Disk per kept model =
        parameters x 4 bytes (float32) or 2 (bfloat16); data = blocks x block_size x 4 bytes,
        twice per generation (training set and regenerated set); the generation in progress
        also holds its checkpoints (the best and the latest model with Adam's two moments).
        """
        c = self.config
        gen = cfg.generation
        arch, source = self._planned_arch()
        n_params = families.num_params(arch)
        bytes_per = 2 if c.param_dtype == "bfloat16" else 4
        if self._table():  # a float32 table of V^k x V (the HMM oracle's arrays are smaller)
            src = c.data.source
            n_params, source, bytes_per = src.vocab_size ** (src.order + 1), c.learner, 4
        kept = {
            "all": gen.num_generations,
            "last": 1,
            "first_last": min(2, gen.num_generations),
        }.get(getattr(gen, "keep_params", "last"), gen.num_generations)
        runs = getattr(gen, "num_trials", 1)
        blocks = (
            c.data.num_train_blocks
            if isinstance(c.data, SourceDataConfig)
            else c.data.max_train_blocks or 36_718
        )  # WikiText-2 train: 36,718 64-token blocks
        data_bytes = blocks * c.data.block_size * 4 * gen.num_generations * 2  # data + regenerated
        model_bytes = n_params * bytes_per
        # best + latest: float32 parameters and two moments (a table learner keeps none)
        checkpoints = 0 if self._table() else 2 * 3 * n_params * 4
        return {
            "generations": gen.num_generations,
            "runs": runs,
            "parameters": n_params,
            "parameters_from": source,
            "models_kept_per_run": kept,
            "disk_bytes_estimate": runs * (kept * model_bytes + data_bytes + model_bytes)
            + checkpoints,
        }


# The size of a corpus vocabulary for dry-run estimates (WikiText-2 valid + test: 24.6k ids).
_CORPUS_VOCAB_ESTIMATE = 24_600


def _record_decode_dtype(path: pathlib.Path, setting: str | None) -> None:
    entry = {
        "setting": setting,
        "backend": jax.default_backend(),
        "dtype": resolve_decode_dtype(setting) or "the model's own",
    }
    entries = fileio.load_json(path)["resolved"] if path.is_file() else []
    if not entries or entries[-1] != entry:
        fileio.atomic_write_json(path, {"resolved": [*entries, entry]})


def _cached_model_config(model_path: str) -> tuple[dict, str] | None:
    """(config.json's dictionary, where it was found) when it is at hand without a download."""
    found = hub.cached_file(model_path, "config.json")
    if found is None:
        return None
    local = found == pathlib.Path(model_path).expanduser() / "config.json"
    where = str(found) if local else f"hub cache ({model_path})"
    return json.loads(found.read_text()), where


def _host_local(model: Any) -> Any:
    """The model with its arrays as this process's own copy when they span several processes
    (it is saved and decodes locally); unchanged with one process."""
    if processes.is_multiprocess():
        graphdef, state = nnx.split(model)
        model = nnx.merge(graphdef, processes.to_host_local(state))
    return model


def _steps_per_epoch(history: dict) -> int:
    ends = history.get("epoch_end_step") or [len(history["train_loss"])]
    return int(ends[0])


def _seed(key: jax.Array) -> int:
    return int(jax.random.randint(key, (), 0, 2**31 - 1))


def _choice(key: jax.Array, n: int, num: int) -> np.ndarray:
    if num > n:
        raise ValueError(f"cannot take {num} blocks from {n}")
    return np.asarray(jax.random.permutation(key, n)[:num])


def _to_blocks(new_tokens: np.ndarray, block_size: int, pad_token_id: int) -> np.ndarray:
    """The generated tokens as training blocks of `block_size` (padded/cropped if they differ)."""
    n, t = new_tokens.shape
    if t >= block_size:
        return new_tokens[:, :block_size].astype(np.int32)
    pad = np.full((n, block_size - t), pad_token_id, np.int32)
    return np.concatenate([new_tokens.astype(np.int32), pad], axis=1)

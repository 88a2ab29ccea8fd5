"""The paper's language-model experiment as a learner of the generational loop.

Every generation (Shumailov et al. 2024, "Language models" section, and its code):
  1. fine-tune OPT, starting from the pretrained model (`init_from: base`), on the current
     training blocks (64 tokens each) with AdamW and cosine annealing per epoch;
  2. evaluate it on the real WikiText-2 test blocks (split perplexity and one perplexity per
     block, the quantity of the paper's histograms);
  3. regenerate the training set: every prompt block (an original training block) is continued
     by 5-way beam search with 64 new tokens (min 64) and repetition penalty 3.0, and the 64 new
     tokens form the next generation's block. With `gamma = 0.1` of the blocks are original data.

Data are int32 token blocks [N, T]; parameters are an `OPTForCausalLM` (saved in the Hugging Face
layout, so each generation's model loads in transformers too).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax import config as config_lib
from collapse_jax.learner import AbstractLearner


def _check(ok: bool, key: str, message: str) -> None:
    config_lib.require(ok, f"model.{key}", message)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RandomOPTConfig:
    """Architecture of a randomly initialised OPT (when no pretrained directory is given).

    Attributes:
      hidden_size, num_hidden_layers, num_attention_heads, ffn_dim, max_position_embeddings:
        as transformers' `OPTConfig` (the defaults are opt-125m's).
      vocab_size: OPT's padded vocabulary (50272 for the real tokenizer).
      seed: seed of the random initialisation (the "pretrained" base of every generation).
    """

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


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class OPTExperimentConfig:
    """The language-model experiment (`model: {kind: opt, ...}`); defaults are the paper's.

    Attributes:
      model_path: a Hugging Face OPT directory (config.json + weights), e.g. facebook/opt-125m
        downloaded by the user; None = a random OPT built from `random_init`.
      random_init: architecture of the random OPT used when `model_path` is None.
      tokenizer_path: directory with the OPT tokenizer (vocab.json + merges.txt suffice).
      data_source: WikiText-2 raw: a folder with wiki.{train,valid,test}.raw, a Hugging Face
        `save_to_disk` folder, or "tfds".
      train_split: split the real training blocks come from (the paper: train).
      eval_split: split every generation is evaluated on (the paper: test).
      max_train_blocks: use only the first this many training blocks (None = all).
      max_eval_blocks: use only the first this many evaluation blocks (None = all).
      block_size: tokens per block (the paper: 64).
      param_dtype: dtype of the parameters ("float32" or "bfloat16").
      compute_dtype: dtype of the forward/backward pass (None = the parameters' dtype).
      epochs: fine-tuning epochs per generation (the paper: 5, or 10).
      batch_size: blocks per optimizer step (the paper: 128).
      learning_rate: peak AdamW learning rate (the paper: 2e-5).
      schedule: "paper_cosine" (per-epoch cosine to 1e-6), "warmup_cosine" or "constant".
      weight_decay: AdamW weight decay.
      eval_batch_size: blocks per evaluation forward pass.
      num_beams: beams of the regeneration (the paper: 5).
      max_new_tokens: tokens generated per block (the paper: 64).
      min_new_tokens: EOS is masked until this many tokens (the paper: 64).
      repetition_penalty: transformers' repetition penalty (the paper: 3.0).
      do_sample: sample instead of beam search (an ablation; then num_beams must be 1).
      temperature, top_k, top_p: sampling settings (do_sample only).
      generate_batch_size: prompt blocks per compiled beam-search call.
      histogram_bins: bins of the per-sequence perplexity histograms.
    """

    kind: ClassVar[str] = "opt"
    model_path: str | None = None
    random_init: RandomOPTConfig = dataclasses.field(default_factory=RandomOPTConfig)
    tokenizer_path: str = "${COLLAPSE_JAX_DATA:-data}/opt-125m-tokenizer"
    data_source: str = "${COLLAPSE_JAX_DATA:-data}/wikitext-2-raw"
    train_split: str = "train"
    eval_split: str = "test"
    max_train_blocks: int | None = None
    max_eval_blocks: int | None = None
    block_size: int = 64
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] | None = None
    epochs: int = 5
    batch_size: int = 128
    learning_rate: float = 2e-5
    schedule: Literal["paper_cosine", "warmup_cosine", "constant"] = "paper_cosine"
    weight_decay: float = 0.01
    eval_batch_size: int = 128
    num_beams: int = 5
    max_new_tokens: int = 64
    min_new_tokens: int = 64
    repetition_penalty: float = 3.0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generate_batch_size: int = 64
    histogram_bins: int = 60

    def __post_init__(self):
        for name in (
            "block_size",
            "epochs",
            "batch_size",
            "eval_batch_size",
            "num_beams",
            "max_new_tokens",
            "generate_batch_size",
            "histogram_bins",
        ):
            _check(getattr(self, name) >= 1, name, f"must be >= 1 (got {getattr(self, name)})")
        for name in ("max_train_blocks", "max_eval_blocks"):
            v = getattr(self, name)
            _check(v is None or v >= 2, name, f"must be >= 2 or null (got {v})")
        _check(self.block_size >= 2, "block_size", "must be >= 2")
        _check(
            0 <= self.min_new_tokens <= self.max_new_tokens,
            "min_new_tokens",
            "must lie in [0, max_new_tokens]",
        )
        _check(self.learning_rate > 0, "learning_rate", "must be > 0")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(self.repetition_penalty > 0, "repetition_penalty", "must be > 0")
        _check(
            not (self.do_sample and self.num_beams > 1),
            "do_sample",
            "sampling with num_beams > 1 is not supported; set num_beams: 1",
        )
        _check(self.temperature > 0, "temperature", "must be > 0")
        _check(self.top_p is None or 0 < self.top_p <= 1, "top_p", "must lie in (0, 1]")
        _check(self.top_k is None or self.top_k >= 1, "top_k", "must be >= 1")


class OPTLearner(AbstractLearner):
    """Fine-tune OPT / regenerate WikiText-2 blocks by beam search (one chain, not jittable)."""

    jittable = False

    def __init__(self, config: OPTExperimentConfig, mesh: Any = None):
        super().__init__(config, mesh)
        self._cache: dict[str, Any] = {}

    def _mesh(self):
        """The experiment's device mesh (None: the trainer's default, all devices on data)."""
        if self.mesh_config is None:
            return None
        if "mesh" not in self._cache:
            from collapse_jax import sharding

            self._cache["mesh"] = sharding.make_mesh(self.mesh_config.shape())
        return self._cache["mesh"]

    # --- data ------------------------------------------------------------------------------
    def _tokenizer(self):
        if "tokenizer" not in self._cache:
            from collapse_jax.lm.tokenizer import load_tokenizer

            self._cache["tokenizer"] = load_tokenizer(self.config.tokenizer_path)
        return self._cache["tokenizer"]

    def _blocks(self, split: str, limit: int | None) -> np.ndarray:
        name = f"blocks/{split}"
        if name not in self._cache:
            from collapse_jax.lm.data import load_wikitext_blocks

            blocks = load_wikitext_blocks(
                self.config.data_source, split, self._tokenizer(), self.config.block_size
            )
            self._cache[name] = blocks
        blocks = self._cache[name]
        blocks = blocks if limit is None else blocks[:limit]
        if len(blocks) < 2:
            raise ValueError(f"WikiText-2 split {split!r} gives only {len(blocks)} blocks")
        return blocks

    def real_size(self, requested: int | None) -> int:
        """The number of training blocks (the paper regenerates the whole training set)."""
        return len(self.real_data(None))

    def real_data(self, key: jax.Array, num: int | None = None) -> np.ndarray:
        """Every training block (the same for all chains; `num` is `real_size`'s answer)."""
        return self._blocks(self.config.train_split, self.config.max_train_blocks)

    def reference(self, key: jax.Array) -> np.ndarray:
        return self._blocks(self.config.eval_split, self.config.max_eval_blocks)

    def draw_real(self, key: jax.Array, num: int) -> np.ndarray:
        real = self.real_data(key)
        return real[np.sort(_choice(key, len(real), num))]

    def subset(self, key: jax.Array, data: np.ndarray, num: int) -> np.ndarray:
        return data[np.sort(_choice(key, len(data), num))]

    # --- model -----------------------------------------------------------------------------
    def init(self, key: jax.Array):
        from collapse_jax.lm import opt

        cfg = self.config
        param_dtype = jnp.dtype(cfg.param_dtype)
        if cfg.model_path is not None:
            return opt.load_pretrained(cfg.model_path, dtype=param_dtype, param_dtype=param_dtype)
        r = cfg.random_init
        arch = opt.OPTConfig(
            vocab_size=r.vocab_size,
            hidden_size=r.hidden_size,
            num_hidden_layers=r.num_hidden_layers,
            num_attention_heads=r.num_attention_heads,
            ffn_dim=r.ffn_dim,
            max_position_embeddings=r.max_position_embeddings,
        )
        # The "pretrained" base is fixed by random_init.seed, not by the chain key: every
        # generation starts from the same weights, as when loading facebook/opt-125m.
        return opt.init_random(
            arch, jax.random.key(r.seed), dtype=param_dtype, param_dtype=param_dtype
        )

    def fit(self, key: jax.Array, data: np.ndarray, params, *, workdir=None, **kw):
        from collapse_jax.lm import train

        cfg = self.config
        model, _ = train.finetune(
            params,
            np.asarray(data, np.int32),
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            mesh=self._mesh(),
            schedule=cfg.schedule,
            seed=_seed(key),
            weight_decay=cfg.weight_decay,
            checkpoint_dir=None if workdir is None else pathlib.Path(workdir) / "checkpoints",
            compute_dtype=cfg.compute_dtype,
            # Regenerated blocks that stopped at EOS are padded; padding is masked from the loss.
            pad_token_id=params.config.pad_token_id,
        )
        return model

    def evaluate(self, key: jax.Array, params, reference: np.ndarray) -> dict[str, Any]:
        from collapse_jax.lm import train

        per_seq = train.perplexity(
            params,
            reference,
            batch_size=self.config.eval_batch_size,
            per_sequence=True,
            mesh=self._mesh(),
            compute_dtype=self.config.compute_dtype,
            pad_token_id=params.config.pad_token_id,
        )
        nll = np.log(per_seq)
        return {
            "ppl": float(np.exp(nll.mean())),  # exp of the mean token loss (full blocks)
            "seq_ppl_median": float(np.median(per_seq)),
            "seq_ppl_p95": float(np.quantile(per_seq, 0.95)),
            "seq_ppl_p05": float(np.quantile(per_seq, 0.05)),
            "per_sequence_ppl": per_seq.astype(np.float32),
        }

    def sample(self, key: jax.Array, params, num: int, *, workdir=None, **kw) -> np.ndarray:
        from collapse_jax.lm.regenerate import regenerate

        cfg = self.config
        prompts = self.real_data(key)
        # The paper continues the original training blocks; a smaller share takes a random
        # subset of them (kept in order).
        if num < len(prompts):
            prompts = prompts[np.sort(_choice(key, len(prompts), num))]
        elif num > len(prompts):
            raise ValueError(f"cannot regenerate {num} blocks from {len(prompts)} prompts")
        out = pathlib.Path(workdir) / "regenerated" if workdir is not None else None
        if out is None:
            import tempfile

            out = pathlib.Path(tempfile.mkdtemp(prefix="collapse-jax-regen-"))
        new = regenerate(
            params,
            prompts,
            out,
            batch_size=cfg.generate_batch_size,
            mesh=self._mesh(),
            max_new_tokens=cfg.max_new_tokens,
            min_new_tokens=cfg.min_new_tokens,
            num_beams=cfg.num_beams,
            do_sample=cfg.do_sample,
            repetition_penalty=cfg.repetition_penalty,
            eos_token_id=params.config.eos_token_id,
            pad_token_id=params.config.pad_token_id,
            seed=_seed(key),
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            progress=False,
        )
        return _to_blocks(np.asarray(new), cfg.block_size, params.config.pad_token_id)

    # --- persistence -----------------------------------------------------------------------
    def save_params(self, path: pathlib.Path, params) -> None:
        from collapse_jax.lm import opt

        opt.save_pretrained(params, path)

    def load_params(self, path: pathlib.Path, template):
        from collapse_jax.lm import opt

        dtype = jnp.dtype(self.config.param_dtype)
        return opt.load_pretrained(path, dtype=dtype, param_dtype=dtype)

    # --- figures ---------------------------------------------------------------------------
    def figures(self, run, out_dir: pathlib.Path) -> list[pathlib.Path]:
        """Histograms of per-sequence perplexity (log-x axis):

        - `perplexity_histograms.png`: the real test blocks under every generation's model;
        - `train_perplexity_under_gen0.png`: every generation's *training* blocks under the
          generation-0 model (the paper's Fig. 1 histograms: later generations produce sequences
          the first model finds ever more likely, plus a long tail of improbable ones). Needs
          `keep_params: all`; the values are cached in `analysis/`.
        """
        files = []
        test = [
            (g, run.arrays(g).get("trials/per_sequence_ppl")) for g in run.finished_generations()
        ]
        test = [(g, v.reshape(-1)) for g, v in test if v is not None]
        if test:
            path = out_dir / "perplexity_histograms.png"
            _histograms(test, "perplexity of a real test block", path, self.config.histogram_bins)
            files.append(path)
        train = self._train_perplexity_under_gen0(run)
        if train:
            path = out_dir / "train_perplexity_under_gen0.png"
            _histograms(
                train,
                "perplexity of a training block under the generation-0 model",
                path,
                self.config.histogram_bins,
            )
            files.append(path)
        return files

    def _train_perplexity_under_gen0(self, run) -> list[tuple[int, np.ndarray]]:
        from collapse_jax import records
        from collapse_jax.lm import train

        p0 = run.params_dir(0)
        if not (p0 / "config.json").is_file():
            return []
        model0, out = None, []
        for g in run.finished_generations():
            cache = run.path / "analysis" / f"train_ppl_under_gen0_{g:05d}.npz"
            if cache.is_file():
                out.append((g, records.load_npz(cache)["ppl"]))
                continue
            if not run.data_path(g).is_file():
                continue
            if model0 is None:
                model0 = self.load_params(p0, None)
            ppl = train.perplexity(
                model0,
                records.load_npz(run.data_path(g))["data"],
                batch_size=self.config.eval_batch_size,
                per_sequence=True,
                mesh=self._mesh(),
                compute_dtype=self.config.compute_dtype,
                pad_token_id=model0.config.pad_token_id,
            )
            records.save_npz(cache, {"ppl": ppl})
            out.append((g, ppl))
        return out


def _histograms(series: list[tuple[int, np.ndarray]], xlabel: str, path, num_bins: int) -> None:
    """One step histogram per generation on shared logarithmic bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    allv = np.concatenate([v[np.isfinite(v)] for _, v in series])
    lo, hi = np.log10(max(allv.min(), 1.0)), np.log10(max(allv.max(), 1.0))
    bins = np.logspace(lo, hi + 1e-9, num_bins)
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=110)
    cmap = plt.get_cmap("viridis")
    for i, (g, v) in enumerate(series):
        color = cmap(i / max(1, len(series) - 1))
        ax.hist(v, bins=bins, histtype="step", density=True, color=color, label=f"gen {g}")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title("Per-sequence perplexity by generation")
    ax.legend(fontsize=7, frameon=False, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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

"""A pretrained base for the known-language experiment (`model.pretrain:`).

The paper fine-tunes a *pretrained* OPT-125m in every generation. A small OPT trained from a
random init on the 256 real blocks of the known language is far from the truth (KL 0.36
nats/token against 0.042 for bigram counts on the same blocks): its approximation error, not the
recursion, then dominates every later generation. With `pretrain:` the experiment first trains
its random OPT once on a large sample of a *related* language, and every generation fine-tunes
from that base (`generation.init_from: base`), as the paper does.

The related language is the ground truth's source config with another Zipf exponent
(`zipf_a`): the same structure seed, hence the same supports (what can follow what: the
grammar) and the same ranking of every context's continuations, but other weights (other
frequencies). It plays the part of the web text OPT was pretrained on, which shares English's
grammar with WikiText but not its frequencies: the base knows which tokens are possible (no
mass off the support) and must still learn the real weights from the generation's data. (A
mixture with an unrelated language would also teach impossible transitions; a source of
another seed would share nothing.)

The base is an artefact of the run directory, `base/`: the model, and `base.json` with the
fingerprint of what it was made from (pretraining settings, architecture, related source), the
SHA-256 of each of its files, its KL to the truth and to the related language, and the time it
took. A resumed run checks the files against their digests and reuses the base; a run of
another pretraining config refuses it. Within one process, bases are kept in memory by
fingerprint, so a sweep's runs that share a base pretrain it once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from collapse_jax import config as config_lib
from collapse_jax.lm import families, truth
from collapse_jax.lm import source as source_lib
from collapse_jax.lm import train as train_lib
from collapse_jax.lm.train_config import TrainConfig
from collapse_jax.rundir import fileio

BASE_DIR = "base"
BASE_JSON = "base.json"


def pretrain_train() -> TrainConfig:
    """Pretraining: 6 epochs over 4,096 blocks in batches of 64 (384 steps), lr 5e-3."""
    return TrainConfig(epochs=6, batch_size=64, learning_rate=5e-3, keep_best=False)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PretrainConfig:
    """The base model's pretraining (`model.pretrain:`; see the module docstring).

    Attributes:
      zipf_a: Zipf exponent of the related language (the truth's source with this exponent:
        the same supports and rankings, other weights).
      num_blocks: blocks of the related language pretrained on.
      seed: seed of those blocks (a stream of their own, not the real data's).
      train: the pretraining's settings (`lm.train_config.TrainConfig`); its data order is
        seeded by `seed` too, so the base is the same in every run and chain of a config.
    """

    zipf_a: float = 0.5
    num_blocks: int = 4096
    seed: int = 1
    train: TrainConfig = dataclasses.field(default_factory=pretrain_train)

    def __post_init__(self):
        config_lib.require(self.zipf_a >= 0, "model.pretrain.zipf_a", "must be >= 0")
        config_lib.require(self.num_blocks >= 2, "model.pretrain.num_blocks", "must be >= 2")


def related_data(data: source_lib.SourceDataConfig, pretrain: PretrainConfig):
    """The related language's data config: the truth's source with `pretrain.zipf_a`."""
    return dataclasses.replace(
        data,
        source=dataclasses.replace(data.source, zipf_a=pretrain.zipf_a),
        num_train_blocks=pretrain.num_blocks,
        num_valid_blocks=0,
        seed=pretrain.seed,
    )


def fingerprint(
    pretrain: PretrainConfig, data: source_lib.SourceDataConfig, arch: Any, init_seed: int
) -> str:
    """A digest of everything the base is made from (settings, related source, architecture)."""
    what = {
        "pretrain": config_lib.to_dict(pretrain),
        "related": config_lib.to_dict(related_data(data, pretrain)),
        "architecture": arch.to_hf_dict(),
        "init_seed": init_seed,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def pretrain(
    model: Any,
    data: source_lib.SourceDataConfig,
    pretrain: PretrainConfig,
    *,
    mesh: Any = None,
    log: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """Trains `model` (a fresh random OPT) on the related language, reporting its steps to `log`
    (a `rundir.events.StepLog`, or None); returns (base, info).

    `info` holds `kl_to_truth` and `kl_to_related` of the base, measured exactly on the truth's
    held-out evaluation blocks, and `pretrain_seconds`."""
    start = time.perf_counter()
    related = related_data(data, pretrain)
    blocks = related.blocks("train")
    settings = dataclasses.replace(pretrain.train, pad_token_id=model.config.pad_token_id)
    base, _ = train_lib.fit(model, blocks, settings, mesh=mesh, seed=pretrain.seed, log=log)
    seconds = time.perf_counter() - start
    eval_ids = data.blocks("eval")
    kl = {}
    for name, cfg in (("kl_to_truth", data.source), ("kl_to_related", related.source)):
        src = source_lib.build_source(cfg)
        kl[name] = truth.evaluate_model(base, src, eval_ids, batch_size=128)["kl_to_truth"]
    return base, {**kl, "pretrain_seconds": seconds}


def _digests(folder: pathlib.Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != BASE_JSON
    }


def save(folder: pathlib.Path, model: Any, key: str, info: dict[str, Any]) -> None:
    """Writes the base into `folder` (atomically: a folder renamed into place when complete)."""
    with fileio.staged_dir(pathlib.Path(folder)) as tmp:
        families.save_pretrained(model, tmp)
        record = {"fingerprint": key, "files": _digests(tmp), **info}
        fileio.atomic_write_json(tmp / BASE_JSON, record)


def load(folder: pathlib.Path, key: str, *, dtype: Any) -> tuple[Any, dict[str, Any]]:
    """Reads the base saved in `folder` after checking it is the base of `key`, intact.

    Raises:
      ValueError: the folder holds the base of another pretraining config, or a file that
        differs from its recorded digest (one line naming the file).
    """
    folder = pathlib.Path(folder)
    record = fileio.load_json(folder / BASE_JSON)
    if record.get("fingerprint") != key:
        raise ValueError(
            f"{folder}: the base was pretrained with other settings (fingerprint "
            f"{record.get('fingerprint')}, this config's {key}); use a new run directory"
        )
    found = _digests(folder)
    for name, digest in record.get("files", {}).items():
        if found.get(name) != digest:
            raise ValueError(
                f"{folder / name}: missing or corrupt (SHA-256 differs from base.json)"
            )
    model = families.load_pretrained(folder, dtype=dtype, param_dtype=dtype)
    return model, {k: v for k, v in record.items() if k not in ("files", "fingerprint")}


# Bases made or read in this process, by fingerprint (a sweep's runs share them).
_MEMORY: dict[str, tuple[Any, dict[str, Any]]] = {}


def obtain(
    folder: pathlib.Path | None, key: str, make: Callable[[], tuple[Any, dict]], *, dtype: Any
) -> tuple[Any, dict[str, Any]]:
    """The base of fingerprint `key`: read from `folder` when it holds one (checked), else from
    this process's memory, else made by `make()` (pretraining); then saved into `folder` (when
    given and empty) and remembered. Returns (model, info)."""
    saved = folder is not None and (pathlib.Path(folder) / BASE_JSON).is_file()
    if saved:
        found = load(folder, key, dtype=dtype)
    elif key in _MEMORY:
        found = _MEMORY[key]
    else:
        found = make()
    if folder is not None and not saved:
        save(folder, found[0], key, found[1])
    _MEMORY[key] = found
    return found


def fresh_copy(model: Any) -> Any:
    """A model with the same weights that a fit may change without touching `model`."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))

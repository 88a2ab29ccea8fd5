"""WikiText-2 token blocks and the training input pipeline.

Blocks are built the way Hugging Face's `run_clm.py` builds them, which is what the paper's code
(`curse_recurse/main.py`: `prepare_data()` + `preprocess_datasets(raw_dataset, tokenizer)` on the
HF `wikitext-2-raw-v1` dataset, 64-token blocks) does; its `dataset.py` is not in the public
repository, so the steps below follow `run_clm.py`'s `tokenize_function` + `group_texts`:

1. Every line of `wiki.<split>.raw` is one dataset row, in the layout of the HF `wikitext` dataset
   (`wikitext-2-raw-v1`): a line with text keeps its leading space and trailing newline; a blank
   line becomes the empty row `""` (HF's loader yields `""` for lines whose `strip()` is empty).
2. Each row is tokenised on its own with the tokenizer's defaults. OPT's tokenizer prepends
   `</s>` (id 2) to every row, so each empty row contributes exactly one `</s>` token.
3. All rows' ids are concatenated in order and cut into `block_size`-token blocks; the remainder
   (fewer than `block_size` tokens) is dropped.

The pipeline shuffles block indices per epoch with NumPy's generator seeded by `(seed, epoch)`,
independently of the mesh and of the number of processes, and assembles each global batch with
`jax.make_array_from_callback`, so every process reads only the rows of its own devices' shards
(a memory-mapped array is read lazily). A background thread prepares the next batches while the
current step runs.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding

from collapse_jax.config import MissingExtra, expand_env
from collapse_jax.lm import hub
from collapse_jax.lm.tokenizer import load_tokenizer
from collapse_jax.rundir import fileio

SPLITS: dict[str, str] = {
    "train": "train",
    "valid": "valid",
    "validation": "valid",
    "test": "test",
}
_HF_SPLIT = {"train": "train", "valid": "validation", "test": "test"}


def _canonical_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown WikiText split {split!r}; expected one of {sorted(SPLITS)}")
    return SPLITS[split]


def _hf_row(line: str) -> str:
    """One raw-file line as the HF `wikitext` dataset stores it ("" for blank lines)."""
    return line if line.strip() else ""


# The one data root of every shipped config: `${COLLAPSE_JAX_DATA:-data}` (docs/data.md).
DATA_ROOT = "${COLLAPSE_JAX_DATA:-data}"
MISSING_HINT = (
    "set COLLAPSE_JAX_DATA to the folder holding wikitext-2-raw/, opt-125m-tokenizer/ and mnist/ "
    "(see docs/data.md), or name a downloadable source"
)


def load_wikitext_lines(source: str | os.PathLike, split: str) -> list[str]:
    """Rows of a WikiText-2 raw split, in the HF `wikitext` dataset's row layout.

    Args:
      source: one of
        - a directory holding `wiki.{train,valid,test}.raw` (the original zip's layout);
        - a directory written by `datasets.DatasetDict.save_to_disk` (needs `datasets`);
        - `"tfds"` or `"tfds:<name>"`: TensorFlow Datasets (default name
          `huggingface:wikitext/wikitext-2-raw-v1`; needs `tensorflow_datasets`);
        - `"hf"` or `"hf:<path>/<name>"`: the Hugging Face hub dataset through `datasets`
          (default `wikitext/wikitext-2-raw-v1`), from its cache, downloading when online
          (`HF_DATASETS_OFFLINE=1` / `HF_HUB_OFFLINE=1` keep it offline).
      split: "train", "valid" (or "validation") or "test".

    Returns:
      One string per row; blank rows are "".

    Raises:
      FileNotFoundError: the directory or the split's file does not exist.
      ValueError: an unknown split, or a directory that is neither layout.
      MissingExtra: the source needs `datasets` / `tensorflow_datasets` and it is not installed.
    """
    split = _canonical_split(split)
    src = str(source)
    if src == "tfds" or src.startswith("tfds:"):
        return _tfds_lines(src.partition(":")[2] or "huggingface:wikitext/wikitext-2-raw-v1", split)
    if src == "hf" or src.startswith("hf:"):
        return _hf_hub_lines(src.partition(":")[2] or "wikitext/wikitext-2-raw-v1", split)
    path = pathlib.Path(src)
    if not path.is_dir():
        raise FileNotFoundError(
            f"WikiText source directory {path} does not exist: {MISSING_HINT} "
            "(data_source: hf needs `pip install datasets`)"
        )
    raw = path / f"wiki.{split}.raw"
    if raw.is_file():
        with open(raw, encoding="utf-8", newline="\n") as f:
            return [_hf_row(line) for line in f]
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _hf_disk_lines(path, split)
    others = sorted(p.name for p in path.glob("wiki.*.raw"))
    if others:
        raise FileNotFoundError(f"{raw} not found (the directory has {others})")
    raise ValueError(
        f"{path} holds neither wiki.{{train,valid,test}}.raw files nor a Hugging Face "
        "save_to_disk dataset (dataset_dict.json / state.json)"
    )


def _hf_disk_lines(path: pathlib.Path, split: str) -> list[str]:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as e:
        raise MissingExtra(
            f"{path} is a Hugging Face save_to_disk directory; reading it needs the `datasets` "
            "package: pip install 'collapse-jax[hf]' (or pass a directory with wiki.*.raw files)"
        ) from e
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        name = _HF_SPLIT[split]
        if name not in ds:
            raise ValueError(f"{path} has splits {sorted(ds)}, not {name!r}")
        ds = ds[name]
    if "text" not in ds.column_names:
        raise ValueError(f"{path}: dataset has columns {ds.column_names}, expected 'text'")
    return list(ds["text"])


def _hf_hub_lines(name: str, split: str) -> list[str]:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as e:
        raise MissingExtra(
            "data source 'hf' needs the `datasets` package: pip install 'collapse-jax[hf]'"
        ) from e
    path, _, config = name.partition("/")
    ds = datasets.load_dataset(path, config or None, split=_HF_SPLIT[split])
    if "text" not in ds.column_names:
        raise ValueError(f"dataset {name}: columns {ds.column_names}, expected 'text'")
    return list(ds["text"])


def _tfds_lines(name: str, split: str) -> list[str]:
    try:
        import tensorflow_datasets as tfds  # type: ignore[import-not-found]
    except ImportError as e:
        raise MissingExtra(
            "source 'tfds' needs the `tensorflow_datasets` package (pip install collapse-jax[tfds])"
        ) from e
    ds = tfds.load(name, split=_HF_SPLIT[split])
    rows = []
    for ex in tfds.as_numpy(ds):
        text = ex["text"]
        rows.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
    return rows


def group_blocks(token_rows: Sequence[Sequence[int]], block_size: int = 64) -> np.ndarray:
    """Concatenates token rows and cuts them into blocks, dropping the remainder (`run_clm.py`).

    Args:
      token_rows: token ids of each row, in order.
      block_size: tokens per block (T).

    Returns:
      int32 array [N, T], N = total tokens // T.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    flat = np.fromiter(
        (t for row in token_rows for t in row), dtype=np.int64, count=sum(map(len, token_rows))
    )
    n = len(flat) // block_size
    if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(np.int32).max):
        raise ValueError("token ids must fit in int32")
    return flat[: n * block_size].reshape(n, block_size).astype(np.int32)


def load_wikitext_blocks(
    source: str | os.PathLike, split: str, tokenizer: Any, block_size: int = 64
) -> np.ndarray:
    """WikiText-2 split tokenised and grouped into blocks exactly as the paper's code does.

    Args:
      source: see `load_wikitext_lines` (directory with wiki.*.raw, HF save_to_disk dir, "tfds").
      split: "train", "valid" / "validation" or "test".
      tokenizer: a Hugging Face tokenizer (e.g. `collapse_jax.lm.tokenizer.load_tokenizer(path)`)
        called on a list of strings, returning `{"input_ids": [[int, ...], ...]}`, or the path
        of a tokenizer directory (loaded with `load_tokenizer`).
      block_size: tokens per block (T), 64 in the paper.

    Returns:
      int32 array [N, T] of token ids.
    """
    rows = load_wikitext_lines(source, split)
    if isinstance(tokenizer, str | os.PathLike):
        tokenizer = load_tokenizer(tokenizer)
    ids = tokenizer(rows)["input_ids"]
    return group_blocks(ids, block_size)


class LMCorpus(NamedTuple):
    """What a language-model data source gives the experiment (token ids of the source's
    tokenizer; for WikiText-2 those of OPT).

    Attributes:
      train: [N, T] int32 real training blocks (generation 0's data, the prompts of regeneration).
      valid: [M, T] int32 real validation blocks (best-epoch selection), or None.
      eval: [K, T] int32 real evaluation blocks (every generation's test perplexity).
      vocab_size: size of the token id space (ids lie in [0, vocab_size)).
      special_ids: ids a restricted vocabulary must always keep (BOS, pad, EOS, UNK).
      decode: token ids -> text, for the written examples (None: no text).
      unk_id: the tokenizer's unknown-token id, the bucket of every id a vocabulary built from
        the training blocks has not seen (`vocabulary: corpus`); None: the source has none.
    """

    train: np.ndarray
    valid: np.ndarray | None
    eval: np.ndarray
    vocab_size: int
    special_ids: tuple[int, ...]
    decode: Callable[[Sequence[int]], str] | None
    unk_id: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class WikiTextConfig:
    """WikiText-2 blocks with the OPT tokenizer (`data: {kind: wikitext, ...}`).

    A data source is a frozen config with a `kind` and a `load() -> LMCorpus` method; the
    experiment picks the class by `kind` (`collapse_jax.lm.experiment.DATA_KINDS`).

    Attributes:
      source: see `load_wikitext_lines`: a folder with wiki.*.raw, a `save_to_disk` folder,
        "hf" (the hub dataset through `datasets`) or "tfds".
      tokenizer_path: the OPT tokenizer: a local folder (vocab.json + merges.txt suffice) or a
        hub id (`facebook/opt-125m`).
      train_split: split of the real training blocks (the paper: train).
      valid_split: split of the validation blocks (the paper: valid), or null.
      valid_holdout: when > 0 (and `valid_split` is null), the last this many blocks of the
        training split are held out as the validation set and never trained on (the CPU configs
        train on WikiText-2 valid, so they hold out part of it).
      eval_split: split every generation is evaluated on (the paper: test).
      max_train_blocks, max_valid_blocks, max_eval_blocks: keep only the first this many
        blocks (null = all).
      block_size: tokens per block (the paper: 64).
    """

    kind: ClassVar[str] = "wikitext"
    source: str = f"{DATA_ROOT}/wikitext-2-raw"
    tokenizer_path: str = f"{DATA_ROOT}/opt-125m-tokenizer"
    train_split: str = "train"
    valid_split: str | None = "valid"
    valid_holdout: int = 0
    eval_split: str = "test"
    max_train_blocks: int | None = None
    max_valid_blocks: int | None = None
    max_eval_blocks: int | None = None
    block_size: int = 64

    def __post_init__(self) -> None:
        # `config.build` expands ${VAR} in YAML strings; the defaults and configs made in code
        # are expanded here, so a config equals its YAML round trip.
        for name in ("source", "tokenizer_path"):
            object.__setattr__(self, name, expand_env(getattr(self, name), f"data.{name}"))
        for name in ("train_split", "eval_split", "valid_split"):
            v = getattr(self, name)
            if v is not None and v not in SPLITS:
                raise ValueError(f"{name}: unknown split {v!r}; expected one of {sorted(SPLITS)}")
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}")
        if self.valid_holdout < 0:
            raise ValueError(f"valid_holdout must be >= 0, got {self.valid_holdout}")
        if self.valid_holdout and self.valid_split is not None:
            raise ValueError(
                "valid_holdout > 0 takes the validation blocks from the training "
                "split: set valid_split: null"
            )
        for name in ("max_train_blocks", "max_valid_blocks", "max_eval_blocks"):
            v = getattr(self, name)
            if v is not None and v < 2:
                raise ValueError(f"{name} must be >= 2 or null, got {v}")

    def load(self) -> LMCorpus:
        source = self.source
        tokenizer = load_tokenizer(hub.resolve(self.tokenizer_path, what="tokenizer"))
        cache: dict[str, np.ndarray] = {}

        def blocks(split: str) -> np.ndarray:
            name = _canonical_split(split)
            if name not in cache:
                cache[name] = load_wikitext_blocks(source, name, tokenizer, self.block_size)
            return cache[name]

        train = blocks(self.train_split)
        valid = None
        if self.valid_holdout:
            if self.valid_holdout >= len(train) - 1:
                raise ValueError(
                    f"valid_holdout={self.valid_holdout} leaves no training blocks of the "
                    f"{len(train)} in split {self.train_split!r}"
                )
            train, valid = train[: -self.valid_holdout], train[-self.valid_holdout :]
        elif self.valid_split is not None:
            valid = blocks(self.valid_split)
        train = _first(train, self.max_train_blocks, "train")
        valid = None if valid is None else _first(valid, self.max_valid_blocks, "valid")
        evals = _first(blocks(self.eval_split), self.max_eval_blocks, "eval")
        return LMCorpus(
            train=train,
            valid=valid,
            eval=evals,
            vocab_size=len(tokenizer),
            special_ids=tuple(sorted(set(tokenizer.all_special_ids))),
            decode=lambda ids: tokenizer.decode(list(map(int, ids)), skip_special_tokens=True),
            # OPT's own UNK is </s> (also BOS and EOS): the bucket is `<unk>` (id 3) instead, an
            # id of OPT's vocabulary that its byte-level BPE never emits.
            unk_id=tokenizer.get_vocab().get("<unk>", tokenizer.unk_token_id),
        )


def _first(blocks: np.ndarray, limit: int | None, what: str) -> np.ndarray:
    out = blocks if limit is None else blocks[:limit]
    if len(out) < 2:
        raise ValueError(f"the {what} split gives only {len(out)} blocks (need >= 2)")
    return out


def save_blocks(path: str | os.PathLike, blocks: np.ndarray) -> None:
    """Writes blocks as `.npy` (atomically), so `np.load(path, mmap_mode="r")` can map them."""
    with fileio.atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, np.asarray(blocks, dtype=np.int32))


# ----------------------------------------------------------------------------------------------
# Input pipeline
# ----------------------------------------------------------------------------------------------


def epoch_permutation(seed: int, epoch: int, num_blocks: int) -> np.ndarray:
    """The order in which an epoch visits the blocks: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(num_blocks)


def steps_per_epoch(num_blocks: int, batch_size: int, drop_last: bool = False) -> int:
    """Optimizer steps in one epoch (a last partial batch counts unless `drop_last`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return num_blocks // batch_size if drop_last else -(-num_blocks // batch_size)


def batch_rows(
    seed: int,
    epoch: int,
    step_in_epoch: int,
    num_blocks: int,
    batch_size: int,
    *,
    shuffle: bool = True,
) -> np.ndarray:
    """Block indices of one batch; -1 marks filler rows of a last partial batch.

    Returns:
      int64 array [batch_size].
    """
    order = epoch_permutation(seed, epoch, num_blocks) if shuffle else np.arange(num_blocks)
    rows = order[step_in_epoch * batch_size : (step_in_epoch + 1) * batch_size]
    return np.concatenate([rows, np.full(batch_size - len(rows), -1, dtype=rows.dtype)])


def host_batch(
    blocks: np.ndarray,
    rows: np.ndarray,
    *,
    pad_token_id: int | None = None,
    filler_token_id: int = 1,
) -> dict[str, np.ndarray]:
    """Gathers the rows of one batch from a (possibly memory-mapped) block array.

    Args:
      blocks: int array [N, T].
      rows: block indices [B]; -1 = filler (excluded from the loss).
      pad_token_id: if set, tokens equal to it are padding (masked from attention and loss).
      filler_token_id: token id written into filler rows.

    Returns:
      dict with `input_ids` int32 [B, T], `attention_mask` int32 [B, T] (1 = attend) and
      `loss_mask` int32 [B, T] (1 = this token counts as a target).
    """
    rows = np.asarray(rows)
    valid = rows >= 0
    ids = np.full((len(rows), blocks.shape[1]), filler_token_id, dtype=np.int32)
    if valid.any():
        # Sorted reads are friendlier to a memory map; scatter back into batch order.
        idx = np.nonzero(valid)[0]
        order = np.argsort(rows[idx], kind="stable")
        ids[idx[order]] = np.asarray(blocks[np.sort(rows[idx])], dtype=np.int32)
    attn = np.ones_like(ids) if pad_token_id is None else (ids != pad_token_id).astype(np.int32)
    # Filler rows attend to themselves (so the model sees ordinary inputs, no NaN) but carry no
    # loss; they keep a last partial batch the same shape as the others without biasing the mean.
    attn[~valid] = 1
    loss = attn * valid[:, None].astype(np.int32)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def global_batch(
    blocks: np.ndarray,
    rows: np.ndarray,
    sharding: NamedSharding,
    *,
    pad_token_id: int | None = None,
) -> dict[str, jax.Array]:
    """One global batch as sharded jax Arrays; each process reads only its shards' rows.

    Args:
      blocks: int array [N, T], the same on every process (e.g. memory-mapped).
      rows: block indices of the global batch [B] (-1 = filler), the same on every process.
      sharding: sharding of the [B, T] batch arrays.
      pad_token_id: see `host_batch`.

    Returns:
      dict of [B, T] int32 arrays (`input_ids`, `attention_mask`, `loss_mask`).
    """
    shape = (len(rows), blocks.shape[1])
    cache: dict[tuple, dict[str, np.ndarray]] = {}

    def piece(name: str) -> Callable[[tuple[slice, ...]], np.ndarray]:
        def cb(index: tuple[slice, ...]) -> np.ndarray:
            rs = index[0]
            key = (rs.start, rs.stop, rs.step)
            if key not in cache:
                cache[key] = host_batch(blocks, rows[rs], pad_token_id=pad_token_id)
            return cache[key][name][(slice(None),) + tuple(index[1:])]

        return cb

    return {
        name: jax.make_array_from_callback(shape, sharding, piece(name))
        for name in ("input_ids", "attention_mask", "loss_mask")
    }


class Prefetcher:
    """Runs an iterator in a background thread, `depth` items ahead of the consumer.

    Used to build (and transfer) the next global batches while the current train step runs.
    Exceptions of the producer are re-raised in the consumer.
    """

    _DONE = object()

    def __init__(self, it: Iterator[Any], depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(it,), daemon=True)
        self._thread.start()

    def _run(self, it: Iterator[Any]) -> None:
        try:
            for item in it:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._put_final(self._DONE)
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer
            self._put_final(e)

    def _put_final(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stops the producer thread (pending items are dropped)."""
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

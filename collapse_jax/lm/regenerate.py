"""Regenerating a whole data set of prompt blocks: the hot path of the paper's LM experiment.

Each generation of Shumailov et al. (2024) continues every 64-token training block with
`generate(num_beams=5, max_new_tokens=64, min_new_tokens=64, repetition_penalty=3.0)` and keeps
the new tokens as the next generation's data. `regenerate` does this in fixed-size batches (the
last one padded with copies and cropped), data-parallel over a mesh (each shard runs its own
compiled decoding loop on its slice of the batch, no communication), and writes each finished
batch to disk so that an interrupted run resumes after the last finished batch.

With several processes (`jax.distributed`), each process places only its own devices' rows of a
batch, keeps only the tokens its devices produced, and the processes exchange them once, at the
end (one all-gather); every process returns all N rows. There is no per-batch store then (no
process holds a whole batch), so `out_path` must be None and an interrupted regeneration
restarts.

On disk (`out_path` is a directory):
  tokens.npy     [N, L] int32, a memory-mapped array filled batch by batch;
  progress.json  what is being generated (N, prompt length, settings, a fingerprint of the blocks)
                 and `rows_done`, replaced atomically after each batch is flushed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from collapse_jax.jaxtools import processes, sharding
from collapse_jax.lm import decode
from collapse_jax.lm.placement import to_global
from collapse_jax.lm.settings import DecodeSettings
from collapse_jax.lm.tokenizer import check_token_ids
from collapse_jax.rundir import fileio

_TOKENS = "tokens.npy"
_PROGRESS = "progress.json"


def regenerate(
    model: Any,
    blocks: np.ndarray,
    out_path: os.PathLike | str | None,
    *,
    batch_size: int,
    mesh: Mesh | None = None,
    settings: DecodeSettings | None = None,
    seed: int = 0,
    progress: bool = True,
    **decode_kwargs: Any,
) -> np.ndarray:
    """Continues every block with `decode.generate`'s semantics and returns the new tokens.

    Args:
      model: the NNX causal LM (e.g. `collapse_jax.lm.families.load_pretrained(path)`).
      blocks: [N, T] int prompt blocks, all T tokens valid (no padding).
      out_path: directory for the incremental results; created if missing. Calling again with the
        same directory and arguments resumes after the last finished batch (or just loads).
        None: nothing is written (required with several processes).
      batch_size: prompts per compiled call; rounded up to a multiple of the mesh's data-parallel
        size. Results do not depend on it (up to float rounding of batched matmuls).
      mesh: a `jaxtools.sharding.make_mesh` mesh; the batch is split over its data-parallel
        axes and parameters are replicated. None: all local devices on "data".
      settings: the resolved decode settings as one object (e.g. the experiment's `decode:`
        block); given together with keyword settings, a ValueError.
      seed: sampling seed; block i samples with `fold_in(key(seed), i)` whatever the batching.
      progress: show a tqdm progress bar.
      **decode_kwargs: when `settings` is None, the settings as keywords of
        `collapse_jax.lm.decode.generate` (`max_new_tokens=64, num_beams=5, ...`;
        `max_new_tokens` required).

    Returns:
      [N, max_new_tokens] int32 new tokens; after an EOS (if one is reached before
      `max_new_tokens`), the pad id.

    Raises:
      ValueError: bad arguments, or `out_path` holds a regeneration of other blocks or settings.
    """
    blocks = np.asarray(blocks)
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] == 0:
        raise ValueError(f"blocks must be a non-empty [N, T] array, got shape {blocks.shape}")
    if not np.issubdtype(blocks.dtype, np.integer):
        raise ValueError(f"blocks must be integer token ids, got {blocks.dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_token_ids(blocks, model, "blocks")
    if settings is None:
        if "max_new_tokens" not in decode_kwargs:
            raise ValueError("regenerate needs settings= or max_new_tokens=")
        settings = decode.resolve_settings(model, **decode_kwargs)
    elif decode_kwargs:
        raise ValueError(f"regenerate got settings= and also {sorted(decode_kwargs)}: pass one")
    n, t = blocks.shape
    big_l = settings.max_new_tokens
    mesh = sharding.make_mesh() if mesh is None else mesh
    dp = sharding.data_parallel_size(mesh)
    batch_size = -(-batch_size // dp) * dp

    if processes.is_multiprocess():
        if out_path is not None:
            raise ValueError(
                "regenerate across several processes keeps no per-batch store: pass out_path=None"
            )
        return _regenerate_processes(model, blocks, batch_size, mesh, settings, seed)
    if out_path is None:
        return _regenerate_batches(model, blocks, batch_size, mesh, settings, seed, progress)
    out_dir = pathlib.Path(out_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "num_blocks": n,
        "block_length": t,
        "blocks_sha256": hashlib.sha256(
            np.ascontiguousarray(blocks, np.int64).tobytes()
        ).hexdigest(),
        "settings": dataclasses.asdict(settings),
        "seed": int(seed) if settings.do_sample else None,
    }
    tokens, rows_done = _open_store(out_dir, meta, (n, big_l))

    def done(start: int, stop: int, new: np.ndarray) -> None:
        tokens[start:stop] = new
        tokens.flush()
        fileio.atomic_write_json(out_dir / _PROGRESS, {**meta, "rows_done": stop})

    if rows_done < n:
        _decode_batches(model, blocks, batch_size, mesh, settings, seed, progress, rows_done, done)
    return np.array(tokens)


def _regenerate_batches(model, blocks, batch_size, mesh, settings, seed, progress) -> np.ndarray:
    """`regenerate` without a store (one process): the same batches, kept in memory."""
    tokens = np.zeros((len(blocks), settings.max_new_tokens), np.int32)

    def done(start: int, stop: int, new: np.ndarray) -> None:
        tokens[start:stop] = new

    _decode_batches(model, blocks, batch_size, mesh, settings, seed, progress, 0, done)
    return tokens


def _decode_batches(
    model, blocks, batch_size, mesh, settings, seed, progress, rows_done, done
) -> None:
    """Decodes rows [rows_done, N) batch by batch on one process; `done(start, stop, tokens)`
    receives each finished batch."""
    n, t = blocks.shape
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.replicated(mesh))
    fn = decode.compiled_search(graphdef, settings, mesh)
    in_sharding = sharding.batch_sharding(mesh)
    mask = jnp.ones((batch_size, t), jnp.int32)
    mask = jax.device_put(mask, in_sharding)
    bar = tqdm(total=n, initial=rows_done, disable=not progress, desc="regenerate", unit="blk")
    try:
        while rows_done < n:
            stop = min(rows_done + batch_size, n)
            # The last batch is padded with copies of its last block, then cropped.
            rows = np.minimum(np.arange(rows_done, rows_done + batch_size), n - 1)
            ids = jax.device_put(jnp.asarray(blocks[rows], jnp.int32), in_sharding)
            keys = jax.device_put(decode.prompt_keys(seed, rows), in_sharding)
            out = fn(state, ids, mask, keys)
            new = np.asarray(out.tokens)[: stop - rows_done]
            done(rows_done, stop, new)
            rows_done = stop
            bar.update(len(new))
    finally:
        bar.close()


def _regenerate_processes(model, blocks, batch_size, mesh, settings, seed) -> np.ndarray:
    """`regenerate` across processes: each places and keeps only its own devices' rows of every
    batch (the same batches and per-row keys as one process), then one all-gather."""
    n, t = blocks.shape
    graphdef, state = nnx.split(model)
    rep = sharding.replicated(mesh)
    state = to_global(state, jax.tree.map(lambda _: rep, state))
    fn = decode.compiled_search(graphdef, settings, mesh)
    in_sharding = sharding.batch_sharding(mesh)
    mask = to_global(np.ones((batch_size, t), np.int32), in_sharding)
    key_data = np.asarray(jax.random.key_data(decode.prompt_keys(seed, np.arange(n))))
    mine_rows, mine_tokens = [], []
    for first in range(0, n, batch_size):
        # The last batch is padded with copies of its last block, then cropped.
        rows = np.minimum(np.arange(first, first + batch_size), n - 1)
        ids = to_global(blocks[rows].astype(np.int32), in_sharding)
        keys = jax.random.wrap_key_data(to_global(key_data[rows], in_sharding))
        out = fn(state, ids, mask, keys)
        seen = set()
        for shard in out.tokens.addressable_shards:
            lo, hi, _ = shard.index[0].indices(batch_size)
            if lo in seen:  # the same rows on another local device (a replicated axis)
                continue
            seen.add(lo)
            idx = np.arange(first + lo, first + hi)
            keep = idx < n
            mine_rows.append(idx[keep])
            mine_tokens.append(np.asarray(shard.data)[keep])
    # One exchange: every process's [row, tokens...] (padded to the largest share with row -1).
    mine = np.concatenate(
        [np.concatenate(mine_rows)[:, None], np.concatenate(mine_tokens)], axis=1
    ).astype(np.int32)
    size = int(np.max(multihost_utils.process_allgather(np.int64(len(mine)))))
    mine = np.concatenate([mine, np.full((size - len(mine), mine.shape[1]), -1, np.int32)])
    everyone = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, mine.shape[1])
    everyone = everyone[everyone[:, 0] >= 0]
    tokens = np.zeros((n, settings.max_new_tokens), np.int32)
    tokens[everyone[:, 0]] = everyone[:, 1:]
    covered = np.zeros(n, bool)
    covered[everyone[:, 0]] = True
    if not covered.all():  # every row is on some device: a mesh that drops rows is a bug
        raise RuntimeError(f"regenerate: {int((~covered).sum())} rows came back from no process")
    return tokens


def _open_store(out_dir: pathlib.Path, meta: dict, shape: tuple[int, int]) -> tuple[np.memmap, int]:
    """Opens (or creates) the token store; returns it and the number of finished rows."""
    progress_file = out_dir / _PROGRESS
    tokens_file = out_dir / _TOKENS
    if progress_file.exists():
        saved = fileio.load_json(progress_file)  # a corrupt file is named
        rows_done = int(saved.pop("rows_done", 0))
        # JSON turns tuples into lists: compare through a JSON round trip.
        expected = json.loads(json.dumps(meta))
        if saved != expected:
            diff = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
            raise ValueError(
                f"{out_dir} holds a regeneration with different {diff}; use another out_path "
                "or delete it"
            )
        if not tokens_file.exists():
            raise FileNotFoundError(f"{tokens_file} is missing although {progress_file} exists")
        try:
            tokens = np.load(tokens_file, mmap_mode="r+")
        except (OSError, ValueError, EOFError) as e:
            raise fileio.CorruptFileError(f"corrupt token file {tokens_file}: {e}") from None
        if tokens.shape != shape:
            raise ValueError(f"{tokens_file} has shape {tokens.shape}, expected {shape}")
        return tokens, rows_done
    tokens = np.lib.format.open_memmap(tokens_file, mode="w+", dtype=np.int32, shape=shape)
    tokens.flush()
    fileio.atomic_write_json(progress_file, {**meta, "rows_done": 0})
    return tokens, 0

"""What a run does across processes (after `jax.distributed.initialize`; see
`collapse_jax.lm.distributed` for the start-up): process 0 is the one that writes a run
directory (`is_primary`), values and files go from it to every process (`broadcast_json`,
`broadcast_files`), arrays that span processes come back as this process's own copy
(`to_host_local`), and work one process does alone uses only its own devices
(`local_devices_only`). With one process every function is a cheap identity.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils


def is_multiprocess() -> bool:
    """Whether this run spans several processes."""
    return jax.process_count() > 1


_LOCAL_ONLY = contextvars.ContextVar("collapse_jax_local_devices_only", default=False)


@contextlib.contextmanager
def local_devices_only() -> Iterator[None]:
    """Default meshes (`jaxtools.sharding.make_mesh` without `devices`) take only this process's
    devices while the block runs: for work one process of a multi-process run does alone
    (process 0 drawing a run's figures), which must not wait for the others."""
    token = _LOCAL_ONLY.set(True)
    try:
        yield
    finally:
        _LOCAL_ONLY.reset(token)


def mesh_devices() -> list:
    """The devices a default mesh spans: every process's, or this process's own inside
    `local_devices_only`."""
    return jax.local_devices() if _LOCAL_ONLY.get() else jax.devices()


def is_primary() -> bool:
    """Whether this is process 0 (always true in a single-process run)."""
    return jax.process_index() == 0


def broadcast_json(value: object) -> object:
    """Process 0's JSON-serialisable `value`, on every process (others pass anything)."""
    payload = json.dumps(value).encode() if is_primary() else b""
    return json.loads(_broadcast_bytes(payload).decode())


def broadcast_files(root: os.PathLike | str | None, relpaths: Sequence[str]) -> dict[str, bytes]:
    """{relative path: bytes} of process 0's files `root/relpath`, on every process.

    `relpaths` must be the same on every process (e.g. from `broadcast_json`); only process 0
    reads (others may pass `root=None`). The bytes reach every process through the devices'
    collectives, so no shared file system is needed.
    """
    out = {}
    for rel in relpaths:
        data = _read(root, rel) if is_primary() else b""
        out[rel] = _broadcast_bytes(data)
    return out


def _read(root: os.PathLike | str | None, rel: str) -> bytes:
    with open(os.path.join(os.fspath(root), rel), "rb") as f:
        return f.read()


_CHUNK = 1 << 28  # bytes per collective (bounded memory; sizes fit int32)


def _broadcast_bytes(data: bytes) -> bytes:
    n = len(data)
    size = np.array([n >> 30, n & ((1 << 30) - 1)], np.int32)
    hi, lo = (int(v) for v in multihost_utils.broadcast_one_to_all(size))
    n = (hi << 30) | lo
    parts = []
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        if is_primary():
            buf = np.frombuffer(data, np.uint8, count=m, offset=start)
        else:
            buf = np.zeros(m, np.uint8)
        parts.append(np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes())
    return b"".join(parts)


def to_host_local(tree):
    """`tree` with every array that spans other processes replaced by this process's own full
    copy on its default device (values unchanged); other leaves are returned as they are."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jnp.asarray(multihost_utils.process_allgather(x, tiled=True))
        return x

    return jax.tree.map(one, tree)

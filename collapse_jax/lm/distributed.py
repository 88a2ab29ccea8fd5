"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from a config or the cluster.

After `initialize`, `jax.devices()` lists every process's devices, so
`jaxtools.sharding.make_mesh` builds a global mesh, and `collapse_jax.lm.train` feeds each
process only the rows of its own devices' batch shards (`jax.make_array_from_callback`). Every
process must run the same program with the same data and seed.

This module reads no environment variables itself: with every field of `DistributedConfig` left
None, JAX's own cluster detection (SLURM, Open MPI, Cloud TPU, Kubernetes ...) fills them in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DistributedConfig:
    """Where the coordinator is and who this process is (None = detected by JAX).

    Attributes:
      coordinator_address: "host:port" of process 0's coordination service.
      num_processes: total number of processes.
      process_id: this process's index in [0, num_processes).
      local_device_ids: restrict this process to these local devices.
      initialization_timeout: seconds to wait for every process to join.
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: Sequence[int] | None = None
    initialization_timeout: int = 300

    def __post_init__(self) -> None:
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and self.num_processes is not None:
            if not 0 <= self.process_id < self.num_processes:
                raise ValueError(
                    f"process_id {self.process_id} is outside [0, {self.num_processes})"
                )
        if self.coordinator_address is not None and ":" not in self.coordinator_address:
            raise ValueError(
                f"coordinator_address must be 'host:port', got {self.coordinator_address!r}"
            )


def is_initialized() -> bool:
    """Whether `jax.distributed.initialize` has run in this process."""
    return jax.distributed.is_initialized()


def initialize(config: DistributedConfig | None = None) -> None:
    """Joins (or starts) the JAX cluster; call before any other JAX work. Idempotent.

    A single process without a coordinator (everything None and no cluster detected by JAX)
    needs no call at all; `num_processes=1` returns at once.
    """
    config = config or DistributedConfig()
    if is_initialized() or config.num_processes == 1:
        return
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address,
        num_processes=config.num_processes,
        process_id=config.process_id,
        local_device_ids=config.local_device_ids,
        initialization_timeout=config.initialization_timeout,
    )


def shutdown() -> None:
    """Leaves the cluster (no-op when not initialised)."""
    if is_initialized():
        jax.distributed.shutdown()

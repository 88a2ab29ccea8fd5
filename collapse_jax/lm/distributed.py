"""Multi-process (multi-host) runs: `jax.distributed.initialize` from a config, the environment
or the cluster, and the few cross-process steps a run needs.

After `initialize`, `jax.devices()` lists every process's devices, so
`jaxtools.sharding.make_mesh` builds a global mesh, and `collapse_jax.lm.train` feeds each
process only the rows of its own devices' batch shards (`jax.make_array_from_callback`). Every
process must run the same program with the same data and seed.

- `from_env` reads the launcher's variables (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
  `JAX_PROCESS_ID`, as MaxText's and levanter's launchers set them); with none of them set and
  every field of `DistributedConfig` None, JAX's own cluster detection (SLURM, Open MPI, Cloud
  TPU, Kubernetes) fills them in (`collapse-jax run --distributed`).

The steps a run takes across processes (process 0 writes, values and files broadcast from it)
are in `collapse_jax.jaxtools.processes`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import jax

# The launcher's variables (the names jax.distributed and MaxText's / levanter's launchers use).
ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_COUNT = "JAX_NUM_PROCESSES"
ENV_ID = "JAX_PROCESS_ID"
ENV_VARS = (ENV_ADDRESS, ENV_COUNT, ENV_ID)


class DistributedSetupError(ValueError):
    """The environment (or `--distributed`) asks for a multi-process run that cannot start; the
    message names the variable."""


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


def from_env(
    environ: Mapping[str, str] | None = None, *, requested: bool = False
) -> DistributedConfig | None:
    """The multi-process setup the environment asks for, or None for a single process.

    Any of `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` set asks for one, and
    then all three are needed; none set and `requested` (`--distributed`) leaves every field to
    JAX's cluster detection. Bad or partial settings raise `DistributedSetupError` naming the
    variable.
    """
    environ = os.environ if environ is None else environ
    given = {k: environ[k].strip() for k in ENV_VARS if environ.get(k, "").strip()}
    if not given:
        return DistributedConfig() if requested else None
    missing = [k for k in ENV_VARS if k not in given]
    if missing:
        raise DistributedSetupError(
            f"{', '.join(sorted(given))} set but {', '.join(missing)} not: a multi-process run "
            f"needs all of {', '.join(ENV_VARS)} (or none, with --distributed on a cluster JAX "
            "detects)"
        )
    ints = {}
    for k in (ENV_COUNT, ENV_ID):
        try:
            ints[k] = int(given[k])
        except ValueError:
            raise DistributedSetupError(f"{k}={given[k]!r} is not an integer") from None
    try:
        return DistributedConfig(
            coordinator_address=given[ENV_ADDRESS],
            num_processes=ints[ENV_COUNT],
            process_id=ints[ENV_ID],
        )
    except ValueError as e:
        raise DistributedSetupError(f"{', '.join(ENV_VARS)}: {e}") from None


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
    try:
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
            local_device_ids=config.local_device_ids,
            initialization_timeout=config.initialization_timeout,
        )
    except (ValueError, RuntimeError) as e:  # no cluster detected; coordinator not reached
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if config.coordinator_address is None and config.num_processes is None:
            raise DistributedSetupError(
                f"no cluster detected by JAX and {', '.join(ENV_VARS)} not set ({first})"
            ) from None
        who = f"process {config.process_id} of {config.num_processes}"
        raise DistributedSetupError(
            f"cannot join the JAX cluster at {config.coordinator_address} as {who}: {first}"
        ) from None


def shutdown() -> None:
    """Leaves the cluster (no-op when not initialised)."""
    if is_initialized():
        jax.distributed.shutdown()

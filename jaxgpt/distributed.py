"""Multi-host start-up: `jax.distributed.initialize` from flags, the environment, or TPU auto-detection."""

from __future__ import annotations

import os

import jax
import numpy as np

from jaxgpt.errors import JaxgptError


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join the other hosts. Explicit arguments win, then JAXGPT_COORDINATOR / JAXGPT_NUM_PROCESSES /
    JAXGPT_PROCESS_ID, then TPU VM slices (which JAX configures itself); a single host does nothing."""
    coordinator = coordinator or os.environ.get("JAXGPT_COORDINATOR")
    num_processes = num_processes or _env_int("JAXGPT_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAXGPT_PROCESS_ID")
    if coordinator:
        if num_processes is None or process_id is None:
            raise JaxgptError("a coordinator address needs --num-processes and --process-id as well")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=300)
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a multi-host TPU slice
        jax.distributed.initialize()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def any_process(flag: bool) -> bool:
    """True on every host if it is True on any (so all hosts stop, and save, at the same step)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)

"""Devices, processes and the data-parallel mesh.

One process per host, ``jax.distributed.initialize`` joining them (coordinator address,
process count and id from arguments or the ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` environment variables); one 1-D mesh over
every device of every process with the axis ``'data'``. On CPUs the cross-process
collectives are gloo, so several processes on one machine work as several hosts.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join a multi-process run if one is configured; returns whether it did."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if not coordinator and (num_processes or 1) == 1:
        return False
    if not coordinator or num_processes is None or process_id is None:
        raise ValueError("a multi-process run needs the coordinator address, the process count and this "
                         "process's id (--coordinator/--num-processes/--process-id or JAX_COORDINATOR_ADDRESS/"
                         "JAX_NUM_PROCESSES/JAX_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is outside 0..{num_processes - 1}")
    # gloo for the CPU devices' collectives (harmless where the devices are GPUs). Decided from
    # the configured platforms only: asking for the backend here would start it before
    # jax.distributed.initialize, which must come first.
    platforms = jax.config.jax_platforms or ""
    if not platforms or "cpu" in platforms.split(","):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    return True


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``'data'`` over ``devices`` (default: all devices, all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("data",))


def replicate(tree, mesh: Mesh):
    """Host arrays (identical on every process) -> arrays replicated over ``mesh``."""
    sharding = NamedSharding(mesh, P())

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def to_host(tree):
    """Replicated (or fully addressable) device arrays -> numpy, on every process."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError(f"cannot fetch a sharded array of shape {x.shape} to one host")
            return np.asarray(x.addressable_data(0))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


def is_main() -> bool:
    return jax.process_index() == 0

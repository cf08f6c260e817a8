"""Multi-host start: one `jax.distributed.initialize` per process, before any device is touched.

`dist.coordinator` (host:port of process 0), `dist.num_processes` and `dist.process_id` name the
job explicitly (GPU nodes, or processes on one machine); left unset, JAX discovers the job
itself where the environment describes one (TPU VMs / pod slices, SLURM), and a plain machine
runs one process.
"""
from __future__ import annotations

import glob
import logging
import os

import jax

log = logging.getLogger("jpeft.parallel")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join the multi-process job once (a second call in the same process is a no-op)."""
    if jax.distributed.is_initialized():
        return
    if coordinator is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only; harmless elsewhere
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    elif _cluster_detected():
        jax.distributed.initialize()
    else:
        return
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def _cluster_detected() -> bool:
    """A multi-process job JAX can discover by itself: a TPU VM, or a SLURM step with several tasks."""
    tpu = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
    return tpu or int(os.environ.get("SLURM_NTASKS", "1")) > 1

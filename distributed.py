"""Starts JAX's multi-controller runtime when several processes (hosts) run one job."""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Any

import jax
import numpy as np
from absl import logging


def _on_cloud_tpu_vm() -> bool:
    """libtpu is installed and TPU chips are attached. A TPU VM made by `gcloud compute tpus
    tpu-vm create` has no TPU_WORKER_HOSTNAMES variable: jax.distributed finds the slice's hosts
    from the metadata server (a single-host slice becomes a job of one process)."""
    chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
    return bool(chips) and importlib.util.find_spec("libtpu") is not None


def _cluster_detected() -> bool:
    """True on a TPU VM or multi-host GKE TPU slice, a SLURM job of several tasks, or a JobSet."""
    if os.environ.get("SLURM_JOB_ID"):
        return int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or _on_cloud_tpu_vm():
        return True
    return bool(os.environ.get("JOBSET_NAME") or os.environ.get("OMPI_COMM_WORLD_SIZE"))


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_devices_per_process: int | None = None,
) -> None:
    """Initialises jax.distributed from explicit values, or by auto-detection on TPU pods, SLURM
    and Kubernetes (JobSet); does nothing for an ordinary single-process run."""
    if cpu_devices_per_process:
        jax.config.update("jax_num_cpu_devices", cpu_devices_per_process)
    if coordinator_address:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    elif _cluster_detected():
        jax.distributed.initialize()
    else:
        return
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def to_host(tree: Any) -> Any:
    """Fetches a (possibly sharded, multi-process) pytree to host numpy arrays, whole on every
    process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)


def all_processes_agree(ok: bool) -> bool:
    """True only if `ok` on every process (e.g. a damaged shard may be read by one process only)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))
